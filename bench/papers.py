"""The five papers side by side: each trained once on ISIC 2017 at the same CPU budget, measured the
same way, for the table in docs/models.md.

    python bench/papers.py [--epochs 2] [--size 96] [--papers fcn,asnet,mbdcnn,clnet,two_step] \
        [--workdir /work/runs/papers] [--json /work/runs/papers/results.json]

Each paper's own recipe (losses, optimiser, schedule, augmentation), with what this machine forces
changed and stated: ``--epochs`` epochs at ``--size`` px, batch 16, and the EfficientNet-Lite0 ImageNet
encoder where the paper's (ResNet34/50, Xception, EfficientNet-B4) has no weights here; the FCN keeps
its VGG16 (it takes no other) from random initialisation, with 512-channel fc layers instead of
4096. All train on the 1,808 ISIC 2017 training images and are measured on the official 150-image
validation split through ``Predictor``: per-image Jaccard and thresholded Jaccard; for the models that
classify (MB-DCNN, CLNet, two-step on ISIC 2017's 3 classes) the mean AUC of melanoma and seborrheic
keratosis; parameters; training wall time; inference images/s (batch 16, this machine's threads).
A stage already trained under ``--workdir`` is reused, so an interrupted run continues.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
LITE0 = [
    "model_kwargs.encoder=tf_efficientnet_lite0",
    f"encoder_weights={SHARED / 'weights' / 'efficientnet_lite0.safetensors'}",
]
#: paper → (recipe or staged chain, overrides, what differs from the paper)
PAPERS = {
    "fcn": (
        "fcn_multiscale",
        ["model_kwargs.fc_channels=512"],
        "VGG16 from random init (no ImageNet VGG16 here), fc layers 512 channels instead of 4096",
    ),
    "asnet": ("asnet", LITE0, "EfficientNet-Lite0 encoder (ImageNet) instead of ResNet34"),
    "mbdcnn": ("mbdcnn", LITE0, "EfficientNet-Lite0 encoders (ImageNet) instead of Xception"),
    "clnet": ("clnet", LITE0, "EfficientNet-Lite0 encoder (ImageNet) instead of ResNet50"),
    "two_step": (
        "two_step",
        [
            *LITE0,
            f"data.root={SHARED / 'data' / 'isic2017'}",
            "data.source=isic2017",
            "data.validation=split",
        ],
        "EfficientNet-Lite0 encoders (ImageNet) instead of EfficientNet-B4 / Xception; "
        "ISIC 2017's 3 classes instead of HAM10000's 7",
    ),
}


def train(paper: str, args, output: Path) -> float:
    """Train the paper's model (or chain) into ``output`` unless it is there; the training wall
    seconds its runs recorded (every stage of a chain)."""
    recipe, overrides, _ = PAPERS[paper]
    if not (output / "model" / "config.json").exists():
        _run_training(recipe, overrides, args, output, paper)
    return sum(
        json.loads(path.read_text())["wall_time_s"]
        for path in output.rglob("metrics.json")
        if "ray" not in path.relative_to(output).parts
    )


def _run_training(recipe: str, overrides: list[str], args, output: Path, paper: str) -> None:
    settings = [
        f"data.image_size=[{args.size},{args.size}]",
        f"epochs={args.epochs}",
        "batch_size=16",
        "checkpoint.num_to_keep=1",
        # The worker holds one CPU so that Ray Data's decode tasks get the rest (holding every
        # CPU, it waited forever for its first batch); its torch uses every core.
        "scaling.cpus_per_worker=1",
        f"scaling.torch_threads={args.cpus}",
        "max_failures=10",
    ]
    if paper == "two_step":
        settings.append(f"data.roi_size=[{args.size},{args.size}]")
    command = [
        sys.executable,
        "jobs/train.py",
        recipe,
        "--output",
        str(output),
        *[item for setting in [*overrides, *settings] for item in ("--set", setting)],
    ]
    print("$", " ".join(command), flush=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output.with_suffix(".log"), "w") as stream:
        subprocess.run(command, check=True, stdout=stream, stderr=subprocess.STDOUT)


def measure(model_dir: Path) -> dict:
    """Validation figures through Predictor, parameters and inference images/s."""
    import torch

    from skinray.data.datasets import read_split
    from skinray.data.loading import decode_samples
    from skinray.evaluation import evaluate_samples
    from skinray.predict import Predictor

    predictor = Predictor.load(str(model_dir))
    samples = read_split("isic2017", str(SHARED / "data" / "isic2017"), "validation")
    figures = evaluate_samples(predictor, samples)
    batch = decode_samples(
        samples.rows.slice(0, 64).to_pydict(), predictor.input_size, len(samples.class_names)
    )
    images = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2)
    predictor(images[:16])  # warm-up: oneDNN plans its kernels per shape
    started = time.perf_counter()
    for start in range(0, len(images), 16):
        predictor(images[start : start + 16])
    rate = len(images) / (time.perf_counter() - started)
    aucs = [figures.get(f"auc_{c}") for c in ("melanoma", "seborrheic_keratosis")]
    return {
        "jaccard": figures.get("jaccard"),
        "threshold_jaccard": figures.get("threshold_jaccard"),
        "auc_mel_sk": sum(aucs) / 2 if None not in aucs else None,
        "balanced_accuracy": figures.get("balanced_accuracy"),
        "parameters_millions": sum(p.numel() for p in predictor.model.parameters()) / 1e6,
        "inference_images_per_s": rate,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # the table in docs/models.md: 28 minutes on 2 cores
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--papers", default=",".join(PAPERS))
    parser.add_argument("--workdir", default="/work/runs/papers")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    workdir = Path(args.workdir)
    results = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": vars(args),
    }
    for paper in args.papers.split(","):
        output = workdir / paper
        wall_s = train(paper, args, output)
        results[paper] = {
            "train_wall_s": wall_s,
            "differs": PAPERS[paper][2],
            **measure(output / "model"),
        }
        print(paper, json.dumps(results[paper]), flush=True)
        path = Path(args.json or workdir / "results.json")
        path.write_text(json.dumps(results, indent=2))
    print("\n| paper | Jaccard | thr. Jaccard | AUC mel+SK | params (M) | train min | images/s |")
    print("|---|---|---|---|---|---|---|")
    for paper in args.papers.split(","):
        r = results[paper]
        auc = f"{r['auc_mel_sk']:.3f}" if r["auc_mel_sk"] is not None else "—"
        print(
            f"| {paper} | {r['jaccard']:.3f} | {r['threshold_jaccard']:.3f} | {auc} | "
            f"{r['parameters_millions']:.1f} | {r['train_wall_s'] / 60:.0f} | "
            f"{r['inference_images_per_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
