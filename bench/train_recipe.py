"""Accuracy run: a CPU-budget recipe trained on the real data, on this machine's CPU.

    python bench/train_recipe.py [--recipe segmenter_cpu] [--output runs/bench_segmenter_cpu] \
        [override ...]

Trains the recipe as shipped (every setting is in the recipe; overrides are key=value as for
jobs/train.py) and prints the best epoch's validation figures. The recipes validate on the data set's
own validation split (ISIC 2017: the official 150 images; HAM10000: a lesion-grouped 15 %); the
figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import ray

from skinray.train.config import load_config
from skinray.train.trainer import run_training


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="segmenter_cpu")
    parser.add_argument("--output", default=None)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    output = args.output or f"runs/bench_{args.recipe}"
    config = load_config(
        args.recipe,
        [
            f"scaling.cpus_per_worker={args.cpus}",
            "max_failures=10",
            f"output={output}",
            *args.overrides,
        ],
    )
    if Path(output, "ray").exists():  # run_training would continue that run: no fresh timing
        raise SystemExit(f"error: {output} holds a training run; give a new --output")
    # One more logical CPU than the worker takes, for Ray Data's decode tasks.
    ray.init(num_cpus=args.cpus + 1)
    outcome = run_training(config)
    best = outcome.best_metrics
    figures = " ".join(f"{k} {v:.4f}" for k, v in sorted(best.items()) if k.startswith("val_"))
    print(
        f"best epoch {int(best['epoch'])} of {args.recipe}: "
        f"{figures}; wall time {outcome.wall_time_s / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
