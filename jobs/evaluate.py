"""Score a saved model on a labelled dataset: a table on stdout and the figures as JSON.

    python jobs/evaluate.py runs/unet/model --data isic2017 --root ../shared/data/isic2017 --split validation
    python jobs/evaluate.py s3://bucket/models/x --data manifest --root s3://bucket/val.csv --json out.json
    python jobs/evaluate.py runs/two_step/segmenter/model --classifier runs/two_step/classifier/model \
        --data ham10000 --root ../shared/data/ham10000

The metrics are the training job's (``skinray.evaluation``): per-image ISIC Jaccard, Dice,
sensitivity, specificity, accuracy and thresholded Jaccard; per-class AUC, accuracy, balanced accuracy.
The model runs through ``skinray.predict.Predictor``, the path training's validation and the scoring
job take: a two-step model classifies the ROIs its own segmenter finds, never ground-truth masks.
"""

from __future__ import annotations

import argparse
import json
import sys

from skinray import io
from skinray.data.datasets import DatasetError, read_ham10000, read_isic2017, read_manifest
from skinray.evaluation import evaluate_samples
from skinray.predict import ModelCheckError, Predictor, check_models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="saved model directory (local or s3://)")
    parser.add_argument(
        "--classifier", help="saved ROI classifier: evaluate the two-step pair model → ROI → this"
    )
    parser.add_argument("--data", choices=("isic2017", "ham10000", "manifest"), required=True)
    parser.add_argument("--root", required=True, help="dataset root, or the manifest file")
    parser.add_argument(
        "--split", default="validation", help="ISIC 2017 split (training/validation)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, help="evaluate the first N images only")
    parser.add_argument("--json", dest="json_path", help="write the metrics here (local or s3://)")
    parser.add_argument(
        "--predictions", help="write each image's prediction here as Parquet (local or s3://)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        configs = check_models(args.model, args.classifier, segments=bool(args.classifier))
        if args.data == "isic2017":
            samples = read_isic2017(args.root, args.split)
        elif args.data == "ham10000":
            samples = read_ham10000(args.root)
        else:
            samples = read_manifest(args.root, configs[-1].class_names)
        if args.limit:
            samples = samples.take(range(min(args.limit, len(samples))))
        predictor = Predictor.load(args.model, args.classifier)
        results = evaluate_samples(
            predictor, samples, batch_size=args.batch_size, predictions_uri=args.predictions
        )
    except (ModelCheckError, DatasetError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    width = max(len(k) for k in results)
    print(f"{'metric':<{width}}  value")
    for key, value in results.items():
        print(
            f"{key:<{width}}  {value:.4f}"
            if isinstance(value, float)
            else f"{key:<{width}}  {value}"
        )
    if args.json_path:
        payload = {"model": args.model, "data": args.data, "root": args.root, "metrics": results}
        io.write_bytes(args.json_path, json.dumps(payload, indent=2).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
