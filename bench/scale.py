"""Scale simulation: the scoring pipeline over 10 k, 100 k and 1 M inputs with a near-zero-cost model,
so that the framework's own cost shows.

    .venv/bin/python bench/scale.py [--sizes 10000 100000 1000000] [--workdir /work/runs/scale] \\
        [--json /work/runs/scale/results.json]

Inputs: a local folder of N small JPEGs (1,000 distinct 32×32 synthetic dermoscopy images, each
hard-linked under N / 1,000 names in folders of 1,000), listed as the job lists any folder. Model: a
freshly initialised U-Net on timm's smallest MobileNetV3 (8–16 decoder channels) at 32×32, alone
(no classifier): the actor, descriptor and row stages all run, on images that cost next to nothing.
Every other setting is the job's default (``ScoreConfig``); ``--batch-size`` and
``--decode-batch-size`` set the rows per model call and per decode/row task.

Each size runs ``run_scoring`` in its own Python process and ``ray.init(num_cpus=--cpus)``, while
``bench/score_pipeline.MemorySampler`` samples the driver's RSS, the workers' and the object
store's bytes in use every ``--sample-interval`` s. Reported per size: wall time, images/s and µs per
image, peak driver RSS and its growth over the smallest size, peak object store, and the output's
file count and sizes. Target (issue #12): driver RSS growth from 10 k to 1 M inputs ≤ 100 MiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from score_pipeline import MIB, MemorySampler, machine, start_ray

DISTINCT = 1000
PER_FOLDER = 1000
IMAGE_SIZE = 32
TARGET_DRIVER_GROWTH_MIB = 100
#: 0.22 ms an image at 32 px in a batch of 64 on 2 threads, against 0.56 for the smoke U-Net's
#: ResNet-18 (measured beside a training run).
TINY_UNET = {"encoder": "tf_mobilenetv3_small_minimal_100", "decoder_channels": (16, 8, 8, 8, 8)}


def make_pool(folder: Path) -> list[Path]:
    """``DISTINCT`` synthetic JPEGs at ``IMAGE_SIZE`` px."""
    import cv2

    from skinray.data.synthetic import synthetic_sample

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(DISTINCT):
        path = folder / f"{seed:04d}.jpg"
        if not path.exists():
            rgb = synthetic_sample(seed, IMAGE_SIZE).image
            cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def make_archive(folder: Path, size: int, pool: list[Path]) -> Path:
    """``size`` hard links to the pool, ``PER_FOLDER`` a folder; kept between runs."""
    done = folder / ".complete"
    if done.exists():
        return folder
    for index in range(size):
        sub = folder / f"{index // PER_FOLDER:05d}"
        if index % PER_FOLDER == 0:
            sub.mkdir(parents=True, exist_ok=True)
        link = sub / f"{index:07d}.jpg"
        if not link.exists():
            os.link(pool[index % DISTINCT], link)
    done.write_text(f"{size}\n")
    return folder


def save_tiny_segmenter(folder: Path) -> str:
    import torch

    from skinray.models import create_model, save_model

    torch.manual_seed(0)
    model = create_model("unet", **TINY_UNET)
    save_model(model, str(folder), input_size=(IMAGE_SIZE, IMAGE_SIZE))
    return str(folder)


def output_files(output: Path) -> dict:
    files = sorted((output / "results").rglob("*.parquet"))
    sizes = [f.stat().st_size for f in files]
    return {
        "result_files": len(files),
        "result_file_mib_min": round(min(sizes) / MIB, 2) if sizes else None,
        "result_file_mib_max": round(max(sizes) / MIB, 2) if sizes else None,
        "result_mib_total": round(sum(sizes) / MIB, 1),
        "error_files": len(list((output / "errors").rglob("*.parquet"))),
    }


def session(args: argparse.Namespace) -> dict:
    """One size, in this (fresh) process."""
    import shutil

    import ray

    from skinray.score.config import make_score_config
    from skinray.score.pipeline import run_scoring

    output = Path(args.output)
    shutil.rmtree(output, ignore_errors=True)
    config = make_score_config(
        input=args.images,
        output=str(output),
        segmenter=args.segmenter,
        run_id="scale",
        batch_size=args.batch_size,
        decode_batch_size=args.decode_batch_size,
    )
    start_ray(args.cpus)
    try:
        sampler = MemorySampler(args.sample_interval)
        sampler.start()
        started = time.perf_counter()
        try:
            summary = run_scoring(config)
        finally:
            wall_s = time.perf_counter() - started
            memory = sampler.stop()
    finally:
        ray.shutdown()
    memory.pop("timeline", None)
    listed = summary.inputs_listed
    return {
        "inputs": listed,
        "results": summary.results,
        "errors": summary.errors,
        "wall_s": round(wall_s, 1),
        "images_per_s": round(listed / wall_s, 1),
        "us_per_image": round(wall_s / listed * 1e6, 1),
        "object_store_budget_mib": summary.object_store_budget_mib,
        "stage_lines": [stage.line() for stage in summary.stages],
        "memory": memory,
        **output_files(output),
    }


def run_size(size: int, images: Path, segmenter: str, args: argparse.Namespace) -> dict:
    result = Path(args.workdir) / f"session_{size}.json"
    command = [
        sys.executable,
        __file__,
        "--session",
        "--images",
        str(images),
        "--output",
        str(Path(args.workdir) / f"scored_{size}"),
        "--segmenter",
        segmenter,
        "--result",
        str(result),
        "--cpus",
        str(args.cpus),
        "--sample-interval",
        str(args.sample_interval),
        *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
        *(["--decode-batch-size", str(args.decode_batch_size)] if args.decode_batch_size else []),
    ]
    print(f"… {size:,} inputs", flush=True)
    subprocess.run(command, check=True)
    return json.loads(result.read_text())


def report(results: dict) -> None:
    runs = results["runs"]
    base = runs[0]["memory"]["peak_driver_rss_mib"]
    print(
        f"\n{'inputs':>10} {'wall s':>8} {'img/s':>8} {'µs/img':>8} {'driver MiB':>11} "
        f"{'growth':>7} {'store MiB':>9} {'files':>6} {'MiB/file':>12}"
    )
    for run in runs:
        memory = run["memory"]
        growth = memory["peak_driver_rss_mib"] - base
        run["driver_growth_mib"] = round(growth, 1)
        print(
            f"{run['inputs']:>10,} {run['wall_s']:>8.1f} {run['images_per_s']:>8.1f} "
            f"{run['us_per_image']:>8.1f} {memory['peak_driver_rss_mib']:>11.1f} {growth:>7.1f} "
            f"{memory['peak_object_store_used_mib'] or 0:>9.1f} {run['result_files']:>6} "
            f"{run['result_file_mib_min']}–{run['result_file_mib_max']:>5}"
        )
    growth = runs[-1]["driver_growth_mib"]
    verdict = "met" if growth <= TARGET_DRIVER_GROWTH_MIB else "MISSED"
    print(
        f"driver RSS growth {runs[0]['inputs']:,} → {runs[-1]['inputs']:,}: {growth:.1f} MiB "
        f"(target ≤ {TARGET_DRIVER_GROWTH_MIB}: {verdict})"
    )


def main_benchmark(args: argparse.Namespace) -> None:
    workdir = Path(args.workdir)
    pool = make_pool(workdir / "pool")
    segmenter = save_tiny_segmenter(workdir / "segmenter")
    results = {"machine": machine(), "settings": vars(args), "runs": []}
    for size in args.sizes:
        started = time.perf_counter()
        images = make_archive(workdir / f"archive_{size}", size, pool)
        print(f"archive of {size:,} links in {time.perf_counter() - started:.0f} s", flush=True)
        results["runs"].append(run_size(size, images, segmenter, args))
        for line in results["runs"][-1]["stage_lines"]:
            print(line)
        Path(args.json or workdir / "results.json").write_text(json.dumps(results, indent=2))
    report(results)
    Path(args.json or workdir / "results.json").write_text(json.dumps(results, indent=2))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--workdir", default="runs/scale")
    parser.add_argument("--json")
    parser.add_argument("--cpus", type=int, default=2, help="ray.init(num_cpus=…)")
    parser.add_argument("--sample-interval", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, help="rows per model call (job default)")
    parser.add_argument(
        "--decode-batch-size", type=int, help="rows per decode and row task (job default)"
    )
    parser.add_argument("--session", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--images", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--segmenter", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.session:
        Path(args.result).write_text(json.dumps(session(args), indent=2))
        return
    main_benchmark(args)


if __name__ == "__main__":
    main()
