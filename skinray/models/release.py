"""Release a trained model into the zoo: measured, calibrated, halved, carded.

``release_model`` takes a saved model and the validation split it was chosen on, and writes
``models/<name>/``: the weights in fp16 (kept in fp32 when fp16 moves a headline figure
by more than ``FP16_TOLERANCE``), ``config.json`` with the fitted temperature, ``metrics.json`` (the
full report with 95 % bootstrap intervals), ``reliability.png`` and ``MODEL_CARD.md``. Given the
training split too, a classifier gets its out-of-distribution bank and threshold (``skinray.ood``):
``OOD_BANK_SIZE`` training images' features, the threshold at ``OOD_QUANTILE`` of the validation
split's scores. It also writes
the regression fixture ``tests/fixtures/released/<name>.npz``: the released model's outputs on 10
fixed real images, which CI compares on every change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import skinray
from skinray import calibration, io, metrics
from skinray.data.datasets import image_set_digest
from skinray.evaluation import Evaluator, evaluate_samples
from skinray.models.card import reliability_png, render_model_card
from skinray.models.registry import CLASS_LOGITS, FEATURES
from skinray.models.serialization import (
    WEIGHTS_FILE,
    load_model,
    read_model_config,
    save_model,
    write_model_config,
)
from skinray.models.zoo import zoo_root
from skinray.ood import fit_ood, quantile_threshold, save_ood
from skinray.predict import Predictor

__all__ = [
    "FP16_TOLERANCE",
    "REGRESSION_IMAGES",
    "CalibrationError",
    "ReleaseSpec",
    "out_of_fold_pass_rate",
    "regression_outputs",
    "release_model",
    "shipped_flips",
]

#: fp16 weights are shipped when no headline figure moves by more than this.
FP16_TOLERANCE = 0.005
#: Images in the regression fixture.
REGRESSION_IMAGES = 10
#: Training images in a released classifier's OOD bank (2.6 MB in fp16 at 1,280 features), and the
#: share of validation images its threshold lets pass.
OOD_BANK_SIZE = 1000
OOD_QUANTILE = 0.975
#: The validation split is cut in this many folds to measure the temperature and the OOD threshold
#: on images they were not fitted on (each fitted on the other folds; the shipped ones on all).
CALIBRATION_FOLDS = 2
_HEADLINES = (
    "jaccard",
    "threshold_jaccard",
    "dice",
    "pixel_accuracy",
    "accuracy",
    "balanced_accuracy",
    "auc_mean",
)


class CalibrationError(ValueError):
    """A validation split that cannot fit the classifier's temperature."""


@dataclass
class ReleaseSpec:
    """What a model card states besides the measurements."""

    name: str
    title: str
    data: str  # the data set and split, in words
    licence: str  # the training data's licence
    recipe: str  # recipe name and its one-line summary
    reproduce: str = ""  # the command that trains it
    training: dict = field(default_factory=dict)  # metrics.json of the training run
    intended_use: str = ""
    limits: Sequence[str] = ()
    segmenter: str | None = None  # for a ROI classifier: the segmenter that cuts its ROIs
    test_time_flips: bool = False  # ship with Predictor's flip averaging on
    holdout: dict | None = None  # the run's validation hold-out, for config.json (else the model's)
    shared_root: str = "../shared/data"  # regression image paths are stored relative to it


def release_model(
    model_uri: str,
    spec: ReleaseSpec,
    samples,
    *,
    calibrate: bool = True,
    resamples: int = 1000,
    destination: str | None = None,
    fixture_dir: str | None = None,
    batch_size: int = 16,
    training_samples=None,
) -> dict:
    """Measure ``model_uri`` on ``samples`` (the validation split), fit its temperature, write the
    release; returns the released model's report."""
    destination = destination or str(zoo_root() / spec.name)
    model = load_model(model_uri)
    temperature, calibration_report, fitted_on = 1.0, None, None
    if calibrate and CLASS_LOGITS in model.saved_config.outputs:
        temperature, calibration_report = _fit_temperature(model_uri, spec, samples, batch_size)
        fitted_on = {"images": len(samples), "image_ids_sha256": image_set_digest(samples)}

    def save_and_measure(dtype: torch.dtype) -> dict:
        _save(model, destination, dtype, temperature, spec, fitted_on)
        evaluator = _evaluate(destination, spec, samples, batch_size)
        return {
            "metrics": evaluator.result(),
            "report": evaluator.report(resamples=resamples),
            "_evaluator": evaluator,
        }

    fp32 = save_and_measure(torch.float32)
    report = save_and_measure(torch.float16)
    moved = _largest_change(fp32["metrics"], report["metrics"])
    if moved > FP16_TOLERANCE:
        report = save_and_measure(torch.float32)
    report.update(
        fp16_change=moved,
        weights_dtype="float16" if moved <= FP16_TOLERANCE else "float32",
        test_time_flips=shipped_flips(spec),
    )
    evaluator = report.pop("_evaluator")
    if calibration_report is not None:
        labels, probabilities = evaluator.labels_and_probabilities()
        calibration_report["after"] = _calibration(labels, probabilities)
        report["calibration"] = calibration_report
        png = reliability_png(labels, probabilities, calibration_report)
        io.write_bytes(io.join(destination, "reliability.png"), png)
    if training_samples is not None and FEATURES in load_model(destination).saved_config.outputs:
        report["ood"] = _fit_ood(destination, spec, training_samples, samples, batch_size)
    if "config" in spec.training:  # every setting of the run; the card's recipe line is a summary
        report["training_config"] = spec.training["config"]
    _write_card(destination, spec, report)
    if fixture_dir is not None:
        write_regression_fixture(destination, spec, samples, fixture_dir)
    return report


def _fit_temperature(model_uri: str, spec: ReleaseSpec, samples, batch_size: int):
    """The NLL-minimising temperature on the validation split, and the calibration before it,
    fitted on the logits the release will ship (its test-time flips, no temperature yet, so that
    a model released again gets its temperature anew). The logs of the softmax are the logits up
    to a per-image constant, which the softmax ignores."""
    evaluated = _evaluate(
        model_uri, spec, samples, batch_size, temperature=1.0, test_time_flips=shipped_flips(spec)
    )
    labels, probabilities = evaluated.labels_and_probabilities()
    logits = np.log(np.clip(probabilities, 1e-12, 1))
    temperature = calibration.fit_temperature(logits, labels)
    if calibration.at_search_bound(temperature, logits, labels):
        raise CalibrationError(
            f"the validation NLL falls all the way to the temperature search's bound "
            f"(T = {temperature:.3g}): these {len(labels)} images cannot fit a temperature; "
            "release with --no-calibrate or on a larger validation split"
        )
    out_of_fold = calibration.out_of_fold_probabilities(
        logits, labels, CALIBRATION_FOLDS, groups=evaluated.lesions
    )
    return temperature, {
        "temperature": temperature,
        "before": _calibration(labels, probabilities),
        "after_out_of_fold": _calibration(labels, out_of_fold),
        "folds": CALIBRATION_FOLDS,
    }


def shipped_flips(spec: ReleaseSpec) -> bool:
    """Whether the released model runs test-time flips: its own setting, or, behind a segmenter,
    the pair's (``Predictor.pair`` flips when either model was saved with them)."""
    segmenter_flips = bool(spec.segmenter) and read_model_config(spec.segmenter).test_time_flips
    return spec.test_time_flips or segmenter_flips


def _write_card(destination: str, spec: ReleaseSpec, report: dict) -> None:
    weights = io.read_bytes(io.join(destination, WEIGHTS_FILE))
    report.update(weights_sha256=hashlib.sha256(weights).hexdigest(), commit=skinray.code_commit())
    io.write_bytes(io.join(destination, "metrics.json"), json.dumps(report, indent=2).encode())
    card = render_model_card(spec, load_model(destination).saved_config, report)
    io.write_bytes(io.join(destination, "MODEL_CARD.md"), card.encode())


def _predictor(model_uri: str, spec: ReleaseSpec, **settings) -> Predictor:
    """The release's prediction path; ``settings`` (``temperature``, ``test_time_flips``) in
    place of the saved ones."""
    predictor = (
        Predictor.load(spec.segmenter, model_uri) if spec.segmenter else Predictor.load(model_uri)
    )
    for name, value in settings.items():
        if not hasattr(predictor, name):
            raise AttributeError(f"Predictor has no setting {name!r}")
        setattr(predictor, name, value)
    return predictor


def _evaluate(model_uri: str, spec: ReleaseSpec, samples, batch_size: int, **settings) -> Evaluator:
    predictor = _predictor(model_uri, spec, **settings)
    evaluator = Evaluator(predictor.class_names or samples.class_names)
    evaluate_samples(predictor, samples, batch_size=batch_size, evaluator=evaluator)
    return evaluator


def _save(
    model, destination: str, dtype, temperature: float, spec: ReleaseSpec, fitted_on: dict | None
) -> None:
    """``fitted_on``: the images ``temperature`` was fitted on (None: not fitted)."""
    config = model.saved_config
    save_model(
        model,
        destination,
        input_size=config.input_size,
        mean=config.mean,
        std=config.std,
        class_names=config.class_names,
        mask_threshold=config.mask_threshold,
        roi_margin=config.roi_margin,
        roi_source_size=config.roi_source_size,
        temperature=temperature,
        test_time_flips=spec.test_time_flips,
        holdout=spec.holdout or config.holdout,
        temperature_fitted_on=fitted_on,
        weights_dtype=dtype,
    )


def _fit_ood(destination: str, spec: ReleaseSpec, training, validation, batch_size: int) -> dict:
    """The OOD bank from ``OOD_BANK_SIZE`` training images (seed 0), its threshold from the
    validation split, written beside the released weights and into its config."""
    predictor = _predictor(destination, spec)
    bank_features, _ = _features(predictor, training.random_subset(OOD_BANK_SIZE, 0), batch_size)
    validation_features, lesions = _features(predictor, validation, batch_size)
    ood = fit_ood(
        bank_features, validation_features, bank_size=OOD_BANK_SIZE, quantile=OOD_QUANTILE
    )
    entry = save_ood(ood, destination)
    write_model_config(destination, load_model(destination).saved_config.replace(ood=entry))
    scores = ood.score(validation_features)
    return {
        **entry,
        "validation_pass": (~ood.flags(scores)).float().mean().item(),
        "validation_pass_out_of_fold": out_of_fold_pass_rate(
            scores.numpy(), OOD_QUANTILE, CALIBRATION_FOLDS, groups=lesions
        ),
    }


def out_of_fold_pass_rate(
    scores: np.ndarray,
    quantile: float,
    folds: int = CALIBRATION_FOLDS,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> float:
    """The share of validation images that pass a threshold set on the other folds' scores: the
    threshold's pass rate on images it was not set on (on its own images it passes ``quantile``
    by construction); ``groups``: each image's lesion, kept in one fold. Here, not in
    ``skinray.ood``: scoring actors import that, and the folds' module brings scipy.optimize
    (0.67-0.77 s of their start, measured) with it."""
    scores = np.asarray(scores)
    passed = np.empty(len(scores), bool)
    for held in calibration.split_in_folds(len(scores), folds, seed, groups):
        threshold = quantile_threshold(np.delete(scores, held), quantile)
        passed[held] = scores[held] <= threshold
    return float(passed.mean())


def _features(predictor: Predictor, samples, batch_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """The classifier's pooled features of each readable image, decoded as evaluation decodes it,
    and each one's lesion (the data's ``group``)."""
    from skinray.data.loading import decode_samples

    chunks, lesions = [], []
    for start in range(0, len(samples.rows), batch_size):
        rows = samples.rows.slice(start, batch_size).to_pydict()
        decoded = decode_samples(rows, predictor.input_size, len(samples.class_names))
        with torch.inference_mode():
            chunks.append(predictor.run(decoded["image"][decoded["ok"]])[0][FEATURES])
        lesions += np.asarray(rows["group"], dtype=object)[decoded["ok"]].tolist()
    return torch.cat(chunks), np.array(lesions, dtype=object)


def _largest_change(reference: dict, candidate: dict) -> float:
    changes = [
        abs(reference[key] - candidate[key])
        for key in _HEADLINES
        if key in reference and np.isfinite(reference[key])
    ]
    return float(max(changes, default=0.0))


def _calibration(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    return {
        "ece": metrics.expected_calibration_error(labels, probabilities),
        "nll": calibration.negative_log_likelihood(
            np.log(np.clip(probabilities, 1e-12, 1)), labels
        ),
    }


# -- the regression fixture ----------------------------------------------------------------------
def regression_outputs(predictor: Predictor, image_uris: Sequence[str]) -> dict[str, np.ndarray]:
    """The predictor's mask and class probabilities on the images, decoded as evaluation decodes."""
    from skinray.data.decode import decode

    images = [
        decode(io.read_bytes(uri), predictor.input_size, source=uri).rgb for uri in image_uris
    ]
    prediction = predictor(np.stack(images)).numpy()
    return {key: prediction[key] for key in ("mask", "class_probabilities") if key in prediction}


def write_regression_fixture(model_dir: str, spec: ReleaseSpec, samples, fixture_dir: str) -> str:
    """The first ``REGRESSION_IMAGES`` validation images by id, with the released model's outputs."""
    uris = sorted(samples.rows["image_uri"].to_pylist())[:REGRESSION_IMAGES]
    outputs = regression_outputs(_predictor(model_dir, spec), uris)
    shared = Path(spec.shared_root).resolve()
    relative = np.array([str(Path(uri).resolve().relative_to(shared)) for uri in uris])
    path = Path(fixture_dir) / f"{spec.name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, image=relative, segmenter=np.array(spec.segmenter or ""), **outputs)
    return str(path)
