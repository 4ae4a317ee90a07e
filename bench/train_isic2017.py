"""Accuracy run: the two-step U-Net on the real ISIC 2017 data, on this machine's CPU.

    python bench/train_isic2017.py --output runs/bench_unet_isic2017 [--epochs 10] [--size 192]

U-Net with an EfficientNet-Lite0 encoder from ../shared/weights (the closest ImageNet encoder available
here to the paper's EfficientNet-B4), trained on the 1,808 training images and validated on the 150
images of the official validation split (which has masks here). Prints the per-epoch lines and writes
metrics.json + training_curve.png under --output; the figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import ray

from skinray.train.config import load_config
from skinray.train.trainer import run_training

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="runs/bench_unet_isic2017")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    config = load_config(
        "unet_two_step",
        [
            "model_kwargs.encoder=tf_efficientnet_lite0",
            f"encoder_weights={SHARED / 'weights' / 'efficientnet_lite0.safetensors'}",
            f"data.root={SHARED / 'data' / 'isic2017'}",
            "data.validation=split",
            f"data.image_size=[{args.size}, {args.size}]",
            "data.augment=flips",
            f"epochs={args.epochs}",
            "batch_size=16",
            f"scaling.cpus_per_worker={args.cpus}",
            "checkpoint.num_to_keep=1",
            "max_failures=10",
            f"output={args.output}",
        ],
    )
    # One more logical CPU than the worker takes, for Ray Data's decode tasks.
    ray.init(num_cpus=args.cpus + 1)
    outcome = run_training(config)
    best = outcome.best_metrics
    print(
        f"best epoch {int(best['epoch'])}: val_jaccard {best['val_jaccard']:.4f} "
        f"dice {best['val_dice']:.4f} threshold_jaccard {best['val_threshold_jaccard']:.4f} "
        f"accuracy {best['val_accuracy']:.4f}; wall time {outcome.wall_time_s / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
