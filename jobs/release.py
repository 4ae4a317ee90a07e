"""Release a trained model into skinray's zoo (``models/<name>``), with its model card.

    python jobs/release.py runs/segmenter_cpu/model --name lesion-segmenter \
        --data isic2017 --root ../shared/data/isic2017
    python jobs/release.py runs/classifier_roi/model --name ham10000-classifier \
        --segmenter lesion-segmenter --data ham10000 --root ../shared/data/ham10000

Measures the model on the validation split it was chosen on (ISIC 2017's official split; HAM10000's
lesion-grouped hold-out drawn as training drew it), fits a temperature for class outputs, writes fp16
weights when they hold the figures, the card, ``metrics.json``, ``reliability.png`` and the regression
fixture under ``tests/fixtures/released/``. The training run's ``metrics.json`` (beside the model)
gives the recipe as run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from skinray import io
from skinray.data.datasets import DatasetError, common_holdout, read_split
from skinray.models.release import CalibrationError, ReleaseSpec, release_model
from skinray.predict import ModelCheckError, check_models
from skinray.train.config import TrainConfig, recipe_summary
from skinray.train.trainer import holdout_record

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "released"

DATA = {
    "isic2017": (
        "ISIC 2017 challenge (Codella et al., ISBI 2018), 256 px copies: trained on the 1,808 "
        "training images, measured on the official 150-image validation split. That split is not "
        "drawn by lesion: 5 of its images show a lesion of the training images (ISIC_0012127 is "
        "ISIC_0012970, pixel for pixel; docs/benchmarks.md measures the figures without them).",
        "CC0 1.0 (ISIC Archive, as the challenge gives it).",
    ),
    "ham10000": (
        "HAM10000 (Tschandl et al., Sci. Data 2018; 85 % copy, 8,525 images, 200×150 px), 7 `dx` "
        "classes: trained on {train_percent} % of the lesions, measured on the other {held_percent} % "
        "(split by `lesion_id`, seed {seed}: no lesion on both sides).",
        "CC BY-NC 4.0 (as the ISIC challenge states it; the Harvard Dataverse release says CC BY-NC-SA "
        "4.0): non-commercial use only, attribution required. Models trained on it inherit the "
        "non-commercial term.",
    ),
}

LIMITS = [
    "Trained and measured on dermoscopy images only; clinical (non-dermoscopic) photographs, "
    "other body imaging and non-skin images are out of scope. A classifier shipped with an "
    "OOD bank flags images unlike its training data (`ood`; its section above, where it has one); a "
    "segmenter alone flags nothing.",
    "The data sets are mostly from fair-skinned patients (ISIC: Europe, Australia, USA); "
    "docs/benchmarks.md gives figures per skin tone, with few brown or dark-skinned images.",
    "The validation split chose the checkpoint; a held-out test figure is lower in expectation.",
    "Not a medical device: outputs are for research and triage, never a diagnosis.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="the trained model directory (local or s3://)")
    parser.add_argument("--name", required=True, help="short name in the zoo")
    parser.add_argument("--title", help="one-line description (default from the data)")
    parser.add_argument("--data", choices=tuple(DATA), required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--segmenter", help="for a ROI classifier: the segmenter cutting its ROIs")
    parser.add_argument("--reproduce", default="", help="the command that trained it, for the card")
    parser.add_argument("--training-metrics", help="the run's metrics.json (default: beside model)")
    parser.add_argument(
        "--training-commit",
        help="the commit the model was trained with, where metrics.json lacks it",
    )
    parser.add_argument("--no-calibrate", action="store_true")
    parser.add_argument(
        "--test-time-flips", action="store_true", help="ship with flip averaging on (3× compute)"
    )
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--destination", help="default: models/<name>")
    return parser.parse_args(argv)


def splits_as_drawn(data: str, root: str, config: TrainConfig, holdout: dict | None = None):
    """(validation, training) as the run drew them: for HAM10000, its hold-out at the run's
    fraction and seed (``skinray.train.trainer``), not the recipes' default, and only from the
    lesions the model's ``holdout`` record names; the OOD bank is drawn from the training side,
    so it holds no validation image either. A ``holdout`` record drawn from ``data`` (a pair's
    segmenter's, say) with another fraction or seed than the run's is refused: its model trained
    on the run's validation images."""
    drawn = {
        "fraction": config.data.validation_fraction,
        "seed": config.data.validation_seed,
        "groups_sha256": (holdout or {}).get("groups_sha256"),
    }
    recorded = {k: (holdout or {}).get(k) for k in ("fraction", "seed")}
    if (holdout or {}).get("source") == data and recorded != {k: drawn[k] for k in recorded}:
        raise DatasetError(
            f"the run drew its {data} hold-out at fraction {drawn['fraction']}, seed "
            f"{drawn['seed']}; a model of the pair drew fraction {recorded['fraction']}, seed "
            f"{recorded['seed']}: each one's validation images are the other's training images"
        )
    return tuple(read_split(data, root, split, **drawn) for split in ("validation", "training"))


def _as_drawn(settings: dict) -> dict:
    """A run's recorded settings; a run from before ``data.validation_seed`` (2026-12-03) drew
    its hold-out with its training ``seed``, which the default (0) would not redraw."""
    data = settings.get("data") or {}
    if "validation_seed" in data:
        return settings
    return {**settings, "data": {**data, "validation_seed": settings.get("seed", 0)}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.segmenter:
            configs = check_models(args.segmenter, args.model)
            records = {args.segmenter: configs[0].holdout, args.model: configs[1].holdout}
            # The pair's figures on the hold-out either model drew from this data.
            recorded = common_holdout(records, args.data, args.root) or configs[1].holdout
        else:
            (recorded,) = (c.holdout for c in check_models(args.model, segments=False))
        run_dir = args.model.rstrip("/").rsplit("/", 1)[0]
        training_uri = args.training_metrics or io.join(run_dir, "metrics.json")
        training = json.loads(io.read_bytes(training_uri))
        config = TrainConfig.model_validate(_as_drawn(training["config"]))
        if config.data.source != args.data:
            raise DatasetError(f"{training_uri}: trained on {config.data.source}, not {args.data}")
        samples, training_samples = splits_as_drawn(args.data, args.root, config, recorded)
    except (ModelCheckError, DatasetError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    data, licence = DATA[args.data]
    data = data.format(
        train_percent=round(100 * (1 - config.data.validation_fraction)),
        held_percent=round(100 * config.data.validation_fraction),
        seed=config.data.validation_seed,
    )
    spec = ReleaseSpec(
        name=args.name,
        title=args.title or f"{config.model} trained on {args.data}",
        data=data,
        licence=licence,
        recipe=recipe_summary(config),
        reproduce=args.reproduce,
        training={
            "best": training["best_metrics"],
            "epochs_run": len(training["history"]),
            "wall_time_s": training["wall_time_s"],
            "commit": args.training_commit or training.get("commit", "not recorded"),
            "machine": f"{platform.machine()} CPU, see docs/benchmarks.md",
            "config": training["config"],
        },
        limits=LIMITS,
        segmenter=args.segmenter,
        test_time_flips=args.test_time_flips,
        holdout=recorded or holdout_record(config),  # the model's own, where it has one
        shared_root=str(Path(args.root).resolve().parent),
    )
    try:
        report = release_model(
            args.model,
            spec,
            samples,
            calibrate=not args.no_calibrate,
            resamples=args.bootstrap,
            destination=args.destination,
            fixture_dir=str(FIXTURES),
            training_samples=training_samples,
        )
    except CalibrationError as error:  # measured before anything is written
        print(f"error: {args.model}: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in report.items() if k != "report"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
