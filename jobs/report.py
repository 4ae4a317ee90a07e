"""Write an HTML report on one run date of the scoring job's output.

    python jobs/report.py --output s3://analytics/skinray
    python jobs/report.py --output runs/score --run-date 2026-11-24 --html report.html --sample-size 48

The page (``skinray.report.html.build_report``) is self-contained: sample results with the lesion
border and CAM drawn over the source images, class and lesion-size plots, and the errors. By default
it goes to ``<output>/reports/run_date=<date>/report.html``; ``--run-date`` defaults to the latest.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from skinray.report.html import ReportError, latest_run_date, write_report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="the scoring job's output root")
    parser.add_argument(
        "--run-date", type=dt.date.fromisoformat, help="YYYY-MM-DD (default: the latest)"
    )
    parser.add_argument(
        "--html", help="where to write the page (default <output>/reports/run_date=…)"
    )
    parser.add_argument("--sample-size", type=int, default=24, help="sample tiles (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    parser.add_argument(
        "--images-root", help="read source images by file name from here instead of source_uri"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run_date = args.run_date.isoformat() if args.run_date else latest_run_date(args.output)
        target = write_report(
            args.output,
            run_date,
            args.html,
            images_uri_root=args.images_root,
            sample_size=args.sample_size,
            seed=args.seed,
        )
    except (ReportError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"report for run_date={run_date} written to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
