"""The nightly job measured against the truth: score the 110 full-resolution archive images with the
released models, then compare the Parquet results with their masks and diagnoses.

    python bench/score_vs_truth.py [--segmenter lesion-segmenter] [--classifier ham10000-classifier]

Runs ``jobs/score.py`` (Ray, the production path: decode with JPEG reduction, the one PredictActor,
rows, Parquet) and ``jobs/evaluate.py --at-source-size`` (the evaluation path) on the same images,
and prints from each the mean per-image Jaccard at the original resolution (the predicted mask resized
to the truth's size with nearest neighbour) and the melanoma AUC from the melanoma probability. The
two must agree within 0.01: the scorer's decode, resize and ROI path costs no accuracy. Exits 1 when
they do not. These images are ISIC 2017 training images: the figures check the path, not accuracy.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import duckdb
import numpy as np
from sklearn.metrics import roc_auc_score

from skinray import metrics
from skinray.evaluation import mask_at_size, read_truth_mask
from skinray.models import read_model_config
from skinray.models.zoo import DEFAULT_CLASSIFIER, DEFAULT_SEGMENTER

ROOT = Path(__file__).resolve().parents[1]
FULLRES = ROOT.parent / "shared" / "data" / "isic2017_fullres"
#: The archive's diagnosis → the classifier's class name, per class set.
MELANOMA_CLASS = {"mel": "melanoma", "melanoma": "melanoma"}
TOLERANCE = 0.01


def write_manifest(path: Path, class_names: list[str]) -> dict[str, str]:
    """image, mask, label CSV of the 110 images; labels named as the classifier names them."""
    melanoma = next((c for c in class_names if c in MELANOMA_CLASS), None)
    other = next((c for c in class_names if c in ("nv", "nevus")), class_names[-1])
    diagnoses = {}
    with open(FULLRES / "metadata.csv") as source, open(path, "w", newline="") as target:
        writer = csv.writer(target)
        writer.writerow(["image", "mask", "label"])
        for row in csv.DictReader(source):
            image = FULLRES / "images" / f"{row['image']}.jpg"
            diagnoses[row["image"]] = row["diagnosis"]
            label = melanoma if row["diagnosis"] == "melanoma" and melanoma else other
            writer.writerow([image, FULLRES / "masks" / f"{row['image']}_segmentation.png", label])
    return diagnoses


def run(command: list[str]) -> str:
    print("$", " ".join(command), flush=True)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def scored_figures(output: Path, diagnoses: dict[str, str], melanoma: str | None) -> dict:
    """Mean source-size Jaccard and melanoma AUC from the Parquet results, read with DuckDB."""
    columns = "source_uri, mask_png" + (f", prob_{melanoma}" if melanoma else "")
    rows = duckdb.sql(
        f"select {columns} from read_parquet('{output}/results/*/*.parquet')"
    ).fetchall()
    jaccards, truth, scores = [], [], []
    for row in rows:
        uri, mask_png = row[0], row[1]
        truth_mask = read_truth_mask(str(FULLRES / "masks" / f"{Path(uri).stem}_segmentation.png"))
        predicted = cv2.imdecode(np.frombuffer(mask_png, np.uint8), cv2.IMREAD_GRAYSCALE) > 127
        resized = mask_at_size(predicted.astype(np.uint8), truth_mask.shape)[None].astype(bool)
        jaccards.append(
            metrics.per_image_segmentation_metrics(resized, truth_mask[None])["jaccard"]
        )
        if melanoma:
            truth.append(diagnoses[Path(uri).stem] == "melanoma")
            scores.append(row[2])
    figures = {"images": len(rows), "jaccard": float(np.concatenate(jaccards).mean())}
    if melanoma:
        figures["melanoma_auc"] = float(roc_auc_score(truth, scores))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segmenter", default=DEFAULT_SEGMENTER)
    parser.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help="'none': segment only")
    parser.add_argument("--output", help="scoring output (default: a temporary folder)")
    args = parser.parse_args()
    classifier = None if args.classifier == "none" else args.classifier
    class_names = list(read_model_config(classifier or args.segmenter).class_names or ["lesion"])
    melanoma = next((c for c in class_names if c in MELANOMA_CLASS), None) if classifier else None
    work = Path(args.output or tempfile.mkdtemp(prefix="score_vs_truth_"))
    work.mkdir(parents=True, exist_ok=True)
    diagnoses = write_manifest(work / "manifest.csv", class_names)
    models = ["--segmenter", args.segmenter] + (["--classifier", classifier] if classifier else [])

    print(
        run(
            [
                sys.executable,
                "jobs/score.py",
                "--input",
                str(FULLRES / "images"),
                "--output",
                str(work / "scored"),
                "--no-report",
                *models,
            ]
        )
    )
    scored = scored_figures(work / "scored", diagnoses, melanoma)
    evaluate_models = [args.segmenter] + (["--classifier", classifier] if classifier else [])
    run(
        [
            sys.executable,
            "jobs/evaluate.py",
            *evaluate_models,
            "--data",
            "manifest",
            "--root",
            str(work / "manifest.csv"),
            "--at-source-size",
            "--bootstrap",
            "0",
            "--json",
            str(work / "evaluate.json"),
        ]
    )
    evaluated = json.loads((work / "evaluate.json").read_text())["metrics"]
    evaluated = {
        "images": evaluated["images"],
        "jaccard": evaluated["jaccard"],
        **({"melanoma_auc": evaluated[f"auc_{melanoma}"]} if melanoma else {}),
    }
    print(f"{'figure':<14} {'jobs/score.py':>14} {'jobs/evaluate.py':>17} {'difference':>11}")
    worst = 0.0
    for key in scored:
        difference = scored[key] - evaluated[key]
        worst = max(worst, abs(difference)) if key != "images" else worst
        print(f"{key:<14} {scored[key]:>14.4f} {evaluated[key]:>17.4f} {difference:>+11.4f}")
    print(f"largest difference {worst:.4f} (tolerance {TOLERANCE})")
    sys.exit(0 if worst <= TOLERANCE else 1)


if __name__ == "__main__":
    main()
