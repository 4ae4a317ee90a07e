"""Score a saved model on a labelled dataset: a table on stdout and the figures as JSON.

    python jobs/evaluate.py runs/unet/model --data isic2017 --root ../shared/data/isic2017 --split validation
    python jobs/evaluate.py s3://bucket/models/x --data manifest --root s3://bucket/val.csv --json out.json
    python jobs/evaluate.py runs/two_step/segmenter/model --classifier runs/two_step/classifier/model \
        --data ham10000 --root ../shared/data/ham10000

The metrics are the training job's (``skinray.evaluation``): per-image ISIC Jaccard, Dice,
sensitivity, specificity, accuracy and thresholded Jaccard; accuracy, balanced accuracy, mean AUC and
the expected calibration error; per class, ISIC's sensitivity, specificity, PPV, NPV, AUC,
``auc_sens_80`` and average precision. Each comes with a 95 % percentile bootstrap interval over
lesions, each drawn with all its images (``--bootstrap N`` resamples, 0 for none). ``--json`` writes training's flat figures
(``metrics``) and the full report with intervals and reliability bins (``report``).
The model runs through ``skinray.predict.Predictor``, the path training's validation and the scoring
job take: a two-step model classifies the ROIs its own segmenter finds, never ground-truth masks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from skinray import io
from skinray.backends import BACKENDS, read_calibration_images, runtime_versions
from skinray.data.datasets import DatasetError, common_holdout, image_set_digest, read_split
from skinray.evaluation import (
    CLASSIFICATION_FIGURES,
    PER_CLASS_FIGURES,
    SEGMENTATION_FIGURES,
    Evaluator,
    evaluate_samples,
    guarded_backend,
    has_truth_masks,
)
from skinray.models import CLASS_LOGITS, MASK_LOGITS
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
        "--split",
        default="validation",
        type=str.lower,
        choices=("training", "validation"),
        help="ISIC 2017: its own folders; HAM10000: the lesion-grouped hold-out as training draws "
        "it; a manifest whole, or, where the model's training drew its validation images from "
        "this same manifest, that hold-out (or the rest, for training)",
    )
    parser.add_argument(
        "--holdout-fraction",
        type=float,
        help="HAM10000 hold-out fraction (default: the one the model's training drew, in its "
        "config.json; the classifier's for a pair; else the recipes' 0.15)",
    )
    parser.add_argument(
        "--holdout-seed", type=int, help="HAM10000 hold-out seed (default: likewise, else 0)"
    )
    parser.add_argument(
        "--at-source-size",
        action="store_true",
        help="segmentation figures at each truth mask's own resolution (the predicted mask resized "
        "to it, as a scored mask_png is), not at the model's input size",
    )
    parser.add_argument(
        "--test-time-flips",
        action="store_true",
        help="average over the image and its two flips, whatever the saved model says",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="eager",
        help="run the networks as a scoring actor would (skinray.backends), held to its accuracy "
        "guard on the first images (falling back as an actor would): the figures a backend gives, "
        "to set beside eager's",
    )
    parser.add_argument(
        "--int8-calibration",
        metavar="URI",
        help="real images (folder, s3:// prefix or manifest; never the split evaluated) that "
        "calibrate --backend openvino-int8",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="evaluate N images drawn at random with --seed (in listing order), not all",
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap resamples for the 95%% confidence intervals (0: none)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="the random seed of the bootstrap and of --limit"
    )
    parser.add_argument(
        "--no-subgroups",
        dest="subgroups",
        action="store_false",
        help="skip the figures per subgroup (sex, age band, site where the data has them; skin "
        "tone from the image)",
    )
    parser.add_argument("--json", dest="json_path", help="write the metrics here (local or s3://)")
    parser.add_argument(
        "--predictions", help="write each image's prediction here as Parquet (local or s3://)"
    )
    args = parser.parse_args(argv)
    if args.bootstrap < 0:
        parser.error("--bootstrap must be 0 or more")
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be 1 or more")
    if args.backend == "openvino-int8" and not args.int8_calibration:
        parser.error("--backend openvino-int8 needs --int8-calibration (real images)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        configs = check_models(args.model, args.classifier, segments=bool(args.classifier))
        # A model without a class output is not judged by labels, whatever names it carries.
        classes = configs[-1].class_names if CLASS_LOGITS in configs[-1].outputs else None
        models = [args.model, args.classifier] if args.classifier else [args.model]
        records = {uri: c.holdout for uri, c in zip(models, configs, strict=True)}
        trained = common_holdout(records, args.data, args.root)
        holdout = _holdout(args, trained)
        samples = read_split(
            args.data,
            args.root,
            args.split,
            fraction=holdout["fraction"],
            seed=holdout["seed"],
            class_names=classes,
            manifest_holdout=args.data == "manifest" and bool(trained),
            groups_sha256=_recorded_groups(args, trained),
        )
        _check_classes(args, classes, samples.class_names)
        # Masks are truth only for a model that segments: a classifier needs none.
        segmentation = MASK_LOGITS in configs[0].outputs and has_truth_masks(samples, args.root)
        if not segmentation and CLASS_LOGITS not in configs[-1].outputs:
            raise DatasetError(f"{args.root}: no truth masks, and {args.model} has no class output")
        # The classifier's temperature fitted on these images: its calibration is in-sample.
        fitted_on = configs[-1].temperature_fitted_on or {}
        in_sample = fitted_on.get("image_ids_sha256") == image_set_digest(samples)
        if args.limit:
            samples = samples.random_subset(args.limit, args.seed)
        predictor = Predictor.load(args.model, args.classifier)
        predictor.test_time_flips = predictor.test_time_flips or args.test_time_flips
        calibration = None
        if args.backend == "openvino-int8":
            calibration = read_calibration_images(args.int8_calibration, predictor.input_size)
        predictor, used, reason, guard = guarded_backend(
            predictor, samples, args.backend, calibration, args.batch_size
        )
        if reason:
            print(f"backend {args.backend} fell back to {used}: {reason}", file=sys.stderr)
        evaluator = Evaluator(classes or samples.class_names)
        results = evaluate_samples(
            predictor,
            samples,
            batch_size=args.batch_size,
            evaluator=evaluator,
            predictions_uri=args.predictions,
            at_source_size=args.at_source_size,
            subgroups=args.subgroups,
            segmentation=segmentation,
        )
        report = evaluator.report(resamples=args.bootstrap, seed=args.seed)
        subgroups = (
            evaluator.subgroup_report(resamples=args.bootstrap, seed=args.seed)
            if args.subgroups
            else {}
        )
    except (ModelCheckError, DatasetError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(report, skipped=results["skipped"]))
    if in_sample and "classification" in report:
        print(
            "ece is in-sample: the classifier's temperature was fitted on these images "
            "(out of fold: the model card's out-of-fold row)"
        )
    if subgroups:
        print("\n" + format_subgroups(subgroups))
    if args.json_path:
        payload = {
            "model": args.model,
            "backend": used,  # what ran: after a fallback, not what was asked
            "backend_requested": args.backend,
            "backend_versions": runtime_versions(used),
            # the backend that ran against eager on the first images, as a scoring actor judges
            # it (null for eager), and why any other asked for did not run
            "guard": dataclasses.asdict(guard) if guard else None,
            "fallback_reason": reason,
            "data": args.data,
            "root": args.root,
            "split": args.split,
            # ISIC 2017's splits are its own folders: a hold-out is drawn only from the others
            "holdout": holdout
            if args.data == "ham10000" or (trained and args.data == "manifest")
            else None,
            "settings": {**_settings(args, predictor, configs), "calibration_in_sample": in_sample},
            "metrics": results,
            "report": report,
            "subgroups": subgroups,
        }
        io.write_bytes(args.json_path, json.dumps(_json_safe(payload), indent=2).encode())
    return 0


def _settings(args: argparse.Namespace, predictor, configs) -> dict:
    """What else shapes the figures: the classifier of a pair, the prediction settings that ran
    (flips, temperature), the models' identities, and the flags that choose or limit images."""
    return {
        "classifier": args.classifier,
        "config_sha256": [config.config_sha256 for config in configs],
        "test_time_flips": predictor.test_time_flips,
        "temperature": predictor.temperature,
        "at_source_size": args.at_source_size,
        "limit": args.limit,
        "int8_calibration": args.int8_calibration,
        "bootstrap": args.bootstrap,
        "bootstrap_seed": args.seed,
    }


def _check_classes(args: argparse.Namespace, model_classes, data_classes) -> None:
    """A classifier's figures mean something only against labels in its own classes, in order."""
    if model_classes and tuple(model_classes) != tuple(data_classes):
        model = args.classifier or args.model
        raise DatasetError(
            f"{model}: its classes {list(model_classes)} are not {args.data}'s "
            f"{list(data_classes)}; evaluate it on data labelled with its classes"
        )


def _recorded_groups(args: argparse.Namespace, trained: dict) -> str | None:
    """The digest of the lesions the model's hold-out was drawn from, to draw it again only from
    those; None where the flags ask for another draw."""
    if args.holdout_fraction is not None or args.holdout_seed is not None:
        return None
    return trained.get("groups_sha256")


def _holdout(args: argparse.Namespace, trained: dict) -> dict:
    """The hold-out to draw: the flags where given, else the one the model's training drew,
    else the recipes' default."""
    holdout = {}
    for key, default in (("fraction", 0.15), ("seed", 0)):
        flag = getattr(args, f"holdout_{key}")
        holdout[key] = flag if flag is not None else trained.get(key, default)
    return holdout


def _cell(figure: dict, digits: int, intervals: bool) -> str:
    """``value [low, high]``, starred where some resamples left the figure undefined; the value
    alone without intervals."""
    value = f"{figure['value']:.{digits}f}"
    if not intervals:
        return value
    star = "*" if "resamples_defined" in figure else ""
    return f"{value} [{figure['low']:.{digits}f}, {figure['high']:.{digits}f}]{star}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(
            f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}"
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [header, *rows]
    ]


def format_report(report: dict, skipped: int = 0) -> str:
    """``Evaluator.report`` as text: the headline figures, then one row per class."""
    bootstrap = report["bootstrap"]
    intervals = bootstrap["resamples"] > 0
    lines = [f"images {report['images']}, skipped {skipped}"]
    if intervals:
        lines[0] += (
            f"; [low, high]: {bootstrap['confidence']:.0%} percentile bootstrap interval over"
            f" {bootstrap['lesions']} lesions, each drawn with all its images"
            f" ({bootstrap['resamples']} resamples, seed {bootstrap['seed']})"
        )
    headline = "value [low, high]" if intervals else "value"
    for section, names in (
        ("segmentation", SEGMENTATION_FIGURES),
        ("classification", CLASSIFICATION_FIGURES),
    ):
        if section in report:
            rows = [[name, _cell(report[section][name], 4, intervals)] for name in names]
            lines += ["", *_table([section, headline], rows)]
    if "per_class" in report:
        rows = [
            [name, str(figures["n"]), *(_cell(figures[f], 3, intervals) for f in PER_CLASS_FIGURES)]
            for name, figures in report["per_class"].items()
        ]
        lines += ["", *_table(["class", "n", *PER_CLASS_FIGURES], rows)]
    return "\n".join(_with_footnote(lines))


def _with_footnote(lines: list[str]) -> list[str]:
    if not any("]*" in line for line in lines):
        return lines
    return [*lines, "", _PARTLY_DEFINED]


#: What a starred interval means.
_PARTLY_DEFINED = (
    "* interval over the resamples where the figure is defined (a class absent from a draw "
    "leaves it undefined); --json gives their number as resamples_defined"
)


#: The figures shown per subgroup (all of them are in the JSON).
SUBGROUP_FIGURES = (
    ("segmentation", "jaccard"),
    ("classification", "accuracy"),
    ("classification", "balanced_accuracy"),
    ("classification", "auc_mean"),
)


def format_subgroups(subgroups: dict[str, dict[str, dict]]) -> str:
    """``Evaluator.subgroup_report`` as one table per attribute: a row per value, with its images."""
    lines: list[str] = []
    for attribute, reports in subgroups.items():
        if not reports:
            continue
        first = next(iter(reports.values()))
        shown = [(s, f) for s, f in SUBGROUP_FIGURES if f in first.get(s, {})]
        intervals = first["bootstrap"]["resamples"] > 0
        rows = [
            [
                str(value),
                str(report["images"]),
                *(_cell(report[s][f], 3, intervals) for s, f in shown),
            ]
            for value, report in reports.items()
        ]
        lines += ["", *_table([attribute, "images", *(f for _, f in shown)], rows)]
    return "\n".join(_with_footnote(lines)).lstrip("\n")


def _json_safe(value):
    """NaN (an undefined figure) as JSON null."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return None if isinstance(value, float) and math.isnan(value) else value


if __name__ == "__main__":
    sys.exit(main())
