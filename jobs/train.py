"""Train a skinray model on Ray Train.

    python jobs/train.py unet_two_step --set epochs=5 --set scaling.num_workers=2
    python jobs/train.py my_config.yaml --resume runs/x/ray/train/checkpoint_<date-time>
    python jobs/train.py --smoke-test
    python jobs/train.py mbdcnn --output runs/mbdcnn       # a staged chain: every stage in order
    ray job submit --working-dir . -- python jobs/train.py --smoke-test

The first argument is a recipe shipped with skinray (one per paper; ``--list-recipes``), a staged
chain (``mbdcnn``, ``two_step``: each stage in turn, finished stages skipped), or a YAML file;
``--set key=value`` overrides any key (dotted for nested keys). Runs on the Ray cluster in
``RAY_ADDRESS`` (as under ``ray job submit``), or on a local one started for the run.
"""

from __future__ import annotations

import argparse
import sys

from skinray.data.datasets import DatasetError
from skinray.models import ModelConfigError, PretrainedWeightsError
from skinray.train.config import (
    ConfigError,
    list_recipes,
    load_config,
    recipe_summary,
    smoke_test_config,
)
from skinray.train.staged import STAGED, run_staged

USER_ERRORS = (
    ConfigError,
    DatasetError,
    ModelConfigError,
    PretrainedWeightsError,
    FileNotFoundError,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="recipe name or path to a YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume", help="checkpoint directory to continue from")
    parser.add_argument("--output", help="where the model, metrics.json and the curve go")
    parser.add_argument("--smoke-test", action="store_true", help="synthetic data, small model")
    parser.add_argument("--model", default="unet", help="model for --smoke-test (default unet)")
    parser.add_argument("--list-recipes", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_recipes:
        width = max(len(name) for name in [*list_recipes(), *STAGED])
        for name in list_recipes():
            print(f"{name:<{width}}  {recipe_summary(load_config(name))}")
        for name, stages in STAGED.items():
            print(f"{name:<{width}}  staged: {' → '.join(stage.recipe for stage in stages)}")
        return 0
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"resume={args.resume}")
    if args.output:
        overrides.append(f"output={args.output}")
    try:
        if args.config in STAGED:
            output = args.output or f"runs/{args.config}"
            overrides = [o for o in overrides if not o.startswith("output=")]
            models = run_staged(args.config, output, overrides, smoke=args.smoke_test)
            print("\n".join(f"{stage}: {uri}" for stage, uri in models.items()))
            return 0
        if args.smoke_test:
            config = smoke_test_config(args.model, overrides=overrides)
        elif args.config:
            config = load_config(args.config, overrides)
        else:
            print("error: give a recipe or config file, or --smoke-test", file=sys.stderr)
            return 2
        from skinray.train.trainer import run_training

        outcome = run_training(config)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    metric = config.checkpoint.metric
    print(
        f"done in {outcome.wall_time_s:.0f} s: best {metric} "
        f"{outcome.best_metrics.get(metric, float('nan')):.4f} "
        f"(epoch {int(outcome.best_metrics.get('epoch', 0))}); model at {outcome.model_uri}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
