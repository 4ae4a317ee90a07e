"""Score an archive of dermoscopy images into Parquet: the nightly job.

    python jobs/score.py --input s3://archive/isic/ --output s3://analytics/skinray \\
        --segmenter s3://models/unet-v3 --classifier s3://models/roi-xception-v2
    ray job submit --working-dir . -- python jobs/score.py --input … --output … --segmenter …

Every listed image ends in exactly one of ``results/run_date=…`` or ``errors/run_date=…``. S3
credentials and region come from the standard AWS environment or config; ``AWS_ENDPOINT_URL`` points at
an S3-compatible store. Runs on the Ray cluster in ``RAY_ADDRESS``, or a local one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from skinray import io
from skinray.data.datasets import DatasetError
from skinray.models import ModelConfigError
from skinray.models.zoo import example_archive
from skinray.score.config import BACKEND_NAMES, ScoreConfigError, make_score_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--input",
        help="s3:// prefix, local folder, or manifest file (default: the 8 CC0 example images "
        "shipped in skinray/examples/isic_archive)",
    )
    parser.add_argument("--output", required=True, help="output root (local or s3://)")
    parser.add_argument(
        "--segmenter",
        help="saved segmenter (or joint model), a directory or a released model's name "
        "(default: the released lesion-segmenter with the released ham10000-classifier)",
    )
    parser.add_argument("--classifier", help="saved ROI classifier (omit for a joint model)")
    parser.add_argument(
        "--run-date", type=dt.date.fromisoformat, help="partition date (default today, UTC)"
    )
    parser.add_argument(
        "--run-id",
        help="the run's id (default: a new one); a run id given again continues that run where "
        "its driver died: what it staged is committed, not scored again",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue the run RUN_ID whose driver died (its staged rows must be under --output)",
    )
    parser.add_argument(
        "--rows-per-file",
        type=int,
        help="rows per output Parquet file (10000: tens of MB; they wait in the object store)",
    )
    parser.add_argument(
        "--incremental",
        action="store_true",
        help="skip images already scored by the same models, from input decoded on CPU or by "
        "this run's segmenter decoder (docs/output-schema.md)",
    )
    parser.add_argument("--cam", dest="include_cam", action="store_true", help="store CAMs as PNG")
    parser.add_argument("--max-pixels", type=int, help="decompression-bomb limit per image")
    parser.add_argument("--batch-size", type=int, help="images per model call on an actor (16)")
    parser.add_argument(
        "--decode-batch-size",
        type=int,
        help="images a decode task yields at a time, and per descriptor and row task (64)",
    )
    parser.add_argument(
        "--max-actors",
        type=int,
        help="upper bound of each model's actor pool (default: the GPUs, or CPUs / 4, that the "
        "cluster may autoscale to)",
    )
    parser.add_argument(
        "--jpeg-decode-in-segmenter",
        action="store_true",
        default=None,
        help="decode JPEGs in the segmenter actor (nvJPEG on its GPU), not in the CPU tasks",
    )
    parser.add_argument(
        "--prefetch-batches",
        type=int,
        help="model batches queued per actor; with the pool, bounds the object store (8)",
    )
    parser.add_argument(
        "--object-store-mib",
        dest="object_store_memory_mib",
        type=float,
        help="object-store bound for the run, instead of the one derived from the pool",
    )
    parser.add_argument(
        "--cpu-threads",
        dest="cpu_threads_per_actor",
        type=int,
        help="torch threads per model actor on CPU (default: node CPUs / actors per node)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKEND_NAMES,
        help="how model actors run the networks (default: the fastest that passed the accuracy "
        "guard on their device, skinray.backends.DEFAULT_BACKENDS; on CPU openvino-int8 with "
        "--int8-calibration, else openvino-mixed)",
    )
    parser.add_argument(
        "--int8-calibration",
        metavar="URI",
        help="real images (folder, s3:// prefix or manifest) that calibrate openvino-int8, the "
        "CPU default when given",
    )
    parser.add_argument(
        "--no-report",
        dest="report",
        action="store_false",
        help="do not write the HTML report (<output>/reports/run_date=…/report.html) after the run",
    )
    parser.add_argument(
        "--use-gpu",
        action="store_true",
        default=None,
        help="a GPU per model actor even where Ray reports no GPU node types (default: when the "
        "cluster has GPUs or its autoscaler may start GPU nodes)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.input is None:
        args.input = example_archive()
    resume = args.resume
    if resume is not None:
        if args.run_id is not None and args.run_id != resume:
            print(f"error: --resume {resume}: two run ids given", file=sys.stderr)
            return 2
        args.run_id = resume
    try:
        settings = {k: v for k, v in vars(args).items() if k not in ("report", "resume")}
        config = make_score_config(**settings)  # refuses a run id that is no folder name
        staging = io.join(config.output, "_staging", config.run_id)
        if resume is not None and not io.exists(staging):
            print(f"error: --resume {resume}: nothing staged at {staging}", file=sys.stderr)
            return 2
        from skinray.score.pipeline import run_scoring

        summary = run_scoring(config)
    except (ScoreConfigError, DatasetError, ModelConfigError, FileNotFoundError) as error:
        # One line: the door checks (config, saved models) run before any Ray work.
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(summary.lines()))
    if args.report:
        from skinray.report.html import predicted_class_counts, write_report

        counts = predicted_class_counts(config.output, summary.run_date, summary.run_id)
        print("  classes  " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none"))
        if summary.results or summary.errors:
            print(f"  report   {write_report(config.output, summary.run_date)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
