"""One evaluation path for training's validation and ``jobs/evaluate.py``.

Both run a ``skinray.predict.Predictor`` on decoded batches and hand its ``Prediction`` to an
``Evaluator``, which accumulates per-image segmentation metrics and class probabilities batch by batch
(memory stays flat) and reports the same figures in both places: ISIC per-image Jaccard, Dice,
sensitivity, specificity, accuracy, thresholded Jaccard, per-class AUC, accuracy and balanced
accuracy. Ground-truth masks and labels reach the metrics only, never the model's input.
``Evaluator.report`` adds 95 % bootstrap confidence intervals, ISIC's per-class figures and
calibration for ``jobs/evaluate.py``; ``result()`` stays cheap for training's per-epoch validation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from skinray import io, metrics
from skinray.data.datasets import SUBGROUP_COLUMNS, DatasetError
from skinray.data.decode import encode_png
from skinray.predict import Prediction, Predictor
from skinray.skin_tone import individual_typology_angle, ita_category

__all__ = [
    "CLASSIFICATION_FIGURES",
    "PER_CLASS_FIGURES",
    "PREDICTION_SCHEMA",
    "SEGMENTATION_FIGURES",
    "Evaluator",
    "evaluate_samples",
    "guarded_backend",
    "mask_at_size",
    "read_truth_mask",
]

#: The headline figures ``Evaluator.report`` puts a confidence interval on, in its order.
SEGMENTATION_FIGURES = (
    "jaccard",
    "threshold_jaccard",
    "dice",
    "sensitivity",
    "specificity",
    "accuracy",
)
CLASSIFICATION_FIGURES = ("accuracy", "balanced_accuracy", "auc_mean", "ece")
#: Per-class figures of ``metrics.per_class_report`` that get an interval (``n`` is a count).
PER_CLASS_FIGURES = ("sensitivity", "specificity", "ppv", "npv", "auc", "auc_sens_80", "ap")


class Evaluator:
    """Accumulates predictions over batches; ``result()`` gives the metrics. With
    ``keep_predictions`` it also keeps each batch's ``Prediction.numpy()`` (``predictions``)."""

    def __init__(self, class_names: Sequence[str] | None, keep_predictions: bool = False) -> None:
        self.class_names = list(class_names) if class_names is not None else None
        self._per_image: dict[str, list[np.ndarray]] = {}
        self._probabilities: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self.keep_predictions = keep_predictions
        self.predictions: list[dict[str, np.ndarray]] = []
        self.images = 0
        self._subgroups: dict[str, list] = {}
        self._lesions: list[str] = []

    def update(
        self,
        prediction: Prediction,
        masks: torch.Tensor | Sequence[np.ndarray],
        labels: torch.Tensor,
        subgroups: dict[str, Sequence[str | None]] | None = None,
        lesions: Sequence[str | None] | None = None,
    ) -> None:
        """``masks``: the truth at the predictor's input size (N, H, W), or a list of truth masks
        at any sizes (the source's), to which each predicted mask is resized (``mask_at_size``).
        ``subgroups``: each image's value (None: unknown) of attributes ``subgroup_report`` splits
        the figures by; every update must name the same attributes. ``lesions``: each image's
        lesion (the data's ``group``), which ``report``'s bootstrap draws whole; None: the image
        is a lesion of its own."""
        lesions = lesions if lesions is not None else [None] * len(labels)
        self._lesions.extend(
            f"lesion:{lesion}" if lesion is not None else f"image:{self.images + i}"
            for i, lesion in enumerate(lesions)
        )
        subgroups = subgroups or {}
        for name in [*self._subgroups, *(n for n in subgroups if n not in self._subgroups)]:
            known = self._subgroups.setdefault(name, [None] * self.images)
            known.extend(subgroups.get(name, [None] * len(labels)))
        self.images += len(labels)
        if prediction.mask is not None:
            predicted = prediction.mask.bool().cpu().numpy()
            if isinstance(masks, torch.Tensor):
                per_image = metrics.per_image_segmentation_metrics(predicted, masks.cpu().numpy())
            else:
                per_image = _at_truth_size(predicted, masks)
            for name, values in per_image.items():
                self._per_image.setdefault(name, []).append(values)
        if prediction.class_probabilities is not None:
            self._probabilities.append(prediction.class_probabilities.float().cpu().numpy())
            self._labels.append(labels.cpu().numpy())
        if self.keep_predictions:
            self.predictions.append(prediction.numpy())

    def result(self) -> dict[str, float]:
        results: dict[str, float] = {"images": self.images}
        for name, chunks in self._per_image.items():
            # a model that segments and classifies has two accuracies: the pixels' is renamed
            key = "pixel_accuracy" if name == "accuracy" else name
            results[key] = float(np.concatenate(chunks).mean())
        if self._probabilities:
            results.update(
                metrics.classification_scores(
                    np.concatenate(self._labels),
                    np.concatenate(self._probabilities),
                    self.class_names,
                )
            )
        return results

    def report(self, resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
        """Every figure with a percentile bootstrap interval: ``resamples`` draws of lesions, each
        with all its images (``metrics.bootstrap_resamples``; 0: none, ``low`` and ``high`` are
        NaN). Images of one lesion are not independent: drawn one by one, HAM10000's hold-out
        (1,276 images of 953 lesions) gave intervals too narrow::

            {"images": N, "bootstrap": {"resamples", "confidence", "seed", "lesions"},
             "segmentation": {figure: {"value", "low", "high"}},     # SEGMENTATION_FIGURES
             "classification": {figure: {"value", "low", "high"}},   # CLASSIFICATION_FIGURES
             "per_class": {class: {"n": positives, figure: {"value", "low", "high"}}},
             "reliability": {"edges", "confidence", "accuracy", "count"}}  # lists, 15 bins

        Segmentation figures are means of per-image values (ISIC's; ``threshold_jaccard`` zeroes
        each image's Jaccard below 0.65); ``auc_mean`` is the mean over classes whose AUC is
        defined on all the images, undefined in a resample that lacks one of them; ``ece`` is
        the top-label expected calibration error (15 bins); the per-class figures are
        ``metrics.per_class_report``'s. Sections without data are left out. A figure
        undefined in some resamples but not all (a class absent from a draw) has its interval
        over the others, and ``resamples_defined`` gives their number."""
        lesions = np.array(self._lesions)
        arrays = self._arrays()
        return _report(arrays, self.class_names, lesions, resamples, seed, confidence)

    def subgroup_report(
        self, resamples: int = 1000, seed: int = 0, confidence: float = 0.95
    ) -> dict[str, dict[str, dict]]:
        """``report`` for the images of each value of each subgroup attribute (images whose value
        is unknown are left out): ``{attribute: {value: report}}``, values by descending count."""
        arrays, reports, lesions = self._arrays(), {}, np.array(self._lesions)
        for name, values in self._subgroups.items():
            values = np.array(values, dtype=object)
            known = [v for v in values if v is not None]
            reports[name] = {}
            for value in sorted(set(known), key=lambda v: (-known.count(v), str(v))):
                chosen = np.flatnonzero(values == value)
                subset = {key: array[chosen] for key, array in arrays.items()}
                reports[name][value] = _report(
                    subset, self.class_names, lesions[chosen], resamples, seed, confidence
                )
        return reports

    def _arrays(self) -> dict[str, np.ndarray]:
        """What ``report`` resamples, one row per image: the per-image segmentation figures
        (N, len(SEGMENTATION_FIGURES)), the labels (N,) and the class probabilities (N, C)."""
        arrays = {}
        if self._per_image:
            columns = [np.concatenate(self._per_image[name]) for name in SEGMENTATION_FIGURES]
            arrays["segmentation"] = np.stack(columns, axis=1)
        if self._probabilities:
            arrays["labels"], arrays["probabilities"] = self.labels_and_probabilities()
        return arrays

    @property
    def lesions(self) -> np.ndarray:
        """Each image's lesion (``lesion:<group>``, or ``image:<n>`` for one of its own)."""
        return np.array(self._lesions, dtype=object)

    def labels_and_probabilities(self) -> tuple[np.ndarray, np.ndarray]:
        """The labels (N,) and class probabilities (N, C) of every image so far."""
        if not self._probabilities:
            raise ValueError("no class probabilities evaluated: the model does not classify")
        return np.concatenate(self._labels), np.concatenate(self._probabilities)


def _report(
    arrays: dict[str, np.ndarray],
    names: list[str] | None,
    lesions: np.ndarray,
    resamples: int,
    seed: int,
    confidence: float,
) -> dict:
    """``Evaluator.report`` of the per-image ``arrays`` (``Evaluator._arrays``) of images of
    ``lesions`` (one label an image), which the bootstrap draws whole."""

    auc_classes = None  # those whose AUC is defined on all the images
    report: dict = {
        "images": len(lesions),
        "bootstrap": {
            "resamples": resamples,
            "confidence": confidence,
            "seed": seed,
            "lesions": len(set(lesions.tolist())),
        },
    }
    if not arrays:
        return report
    if "probabilities" in arrays:
        labels, probabilities = arrays["labels"], arrays["probabilities"]
        per_class = metrics.per_class_report(labels, probabilities, names)
        report["per_class"] = {name: {"n": c["n"]} for name, c in per_class.items()}
        auc_classes = [name for name, c in per_class.items() if not np.isnan(c["auc"])]
        reliability = metrics.reliability_bins(labels, probabilities)
        report["reliability"] = {key: value.tolist() for key, value in reliability.items()}

    def figures(*columns: np.ndarray) -> dict[tuple[str, ...], float]:
        return _report_figures(dict(zip(arrays, columns, strict=True)), names, auc_classes)

    point = figures(*arrays.values())
    low = high = np.full(len(point), np.nan)
    defined = np.zeros(len(point), int)
    if resamples > 0:
        values = metrics.bootstrap_resamples(
            lambda *columns: np.fromiter(figures(*columns).values(), float, len(point)),
            *arrays.values(),
            resamples=resamples,
            seed=seed,
            groups=lesions,
        )
        low, high = metrics.percentile_interval(values, confidence)
        defined = (~np.isnan(values)).sum(0)
    for ((section, *path), value), lo, hi, kept in zip(
        point.items(), low, high, defined, strict=True
    ):
        node = report.setdefault(section, {})
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = {"value": value, "low": float(lo), "high": float(hi)}
        if 0 < kept < resamples:  # the interval rests on the resamples where it is defined
            node[path[-1]]["resamples_defined"] = int(kept)
    order = ("images", "bootstrap", "segmentation", "classification", "per_class")
    return {key: report[key] for key in (*order, "reliability") if key in report}


def _report_figures(
    arrays: dict[str, np.ndarray],
    class_names: list[str] | None,
    auc_classes: list[str] | None,
) -> dict[tuple[str, ...], float]:
    """The figures ``Evaluator.report`` gives, flat, keyed by their path in the report.
    ``auc_mean`` is over ``auc_classes`` (those whose AUC all the images define), and NaN where
    one of them has none: a resample's mean over fewer classes is another figure."""
    figures: dict[tuple[str, ...], float] = {}
    if "segmentation" in arrays:
        means = arrays["segmentation"].mean(axis=0)
        for name, value in zip(SEGMENTATION_FIGURES, means, strict=True):
            figures["segmentation", name] = float(value)
    if "probabilities" in arrays:
        labels, probabilities = arrays["labels"], arrays["probabilities"]
        predicted = probabilities.argmax(1)
        per_class = metrics.per_class_report(labels, probabilities, class_names)
        aucs = [per_class[name]["auc"] for name in auc_classes]
        figures["classification", "accuracy"] = metrics.accuracy(labels, predicted)
        figures["classification", "balanced_accuracy"] = metrics.balanced_accuracy(
            labels, predicted, probabilities.shape[1]
        )
        figures["classification", "auc_mean"] = float(np.mean(aucs)) if aucs else float("nan")
        figures["classification", "ece"] = metrics.expected_calibration_error(labels, probabilities)
        for name, values in per_class.items():
            for figure in PER_CLASS_FIGURES:
                figures["per_class", name, figure] = values[figure]
    return figures


def mask_at_size(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """A predicted mask at the model's resolution → ``size`` (height, width), nearest neighbour:
    how a scored ``mask_png`` is compared with a truth mask at the source's resolution."""
    mask = np.asarray(mask, np.uint8)
    if mask.shape[:2] == tuple(size):
        return mask
    return cv2.resize(mask, (int(size[1]), int(size[0])), interpolation=cv2.INTER_NEAREST_EXACT)


def has_truth_masks(samples, root: str) -> bool:
    """Whether ``samples`` name a truth mask for every image (True) or for none (False). Some
    but not all is refused: the reader gives an image without one an empty mask, and its
    predicted lesion would be scored against nothing."""
    missing = samples.rows["mask_uri"].is_null().to_numpy(zero_copy_only=False)
    if missing.any() and not missing.all():
        first = samples.rows["image_uri"][int(np.flatnonzero(missing)[0])].as_py()
        raise DatasetError(
            f"{root}: {int(missing.sum())} of {len(missing)} images have no truth mask "
            f"(the first: {first}); segmentation figures need one for every image"
        )
    return not missing.any()


def read_truth_mask(uri: str) -> np.ndarray:
    """A 0/255 mask file → bool (H, W) at its own resolution, read as training reads masks."""
    from skinray.data.loading import read_mask

    return read_mask(uri).astype(bool)


def _at_truth_size(predicted: np.ndarray, truths: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    per_image: dict[str, list] = {}
    for mask, truth in zip(predicted, truths, strict=True):
        resized = mask_at_size(mask, truth.shape[:2])[None].astype(bool)
        one = metrics.per_image_segmentation_metrics(resized, np.asarray(truth, bool)[None])
        for name, values in one.items():
            per_image.setdefault(name, []).append(values)
    return {name: np.concatenate(values) for name, values in per_image.items()}


def guarded_backend(
    predictor: Predictor, samples, backend: str, calibration_images=None, batch_size: int = 16
):
    """``predictor`` on ``backend`` as a scoring actor would run it: held to the accuracy guard
    (``skinray.backends.GuardedPredictor``) over the first ``GUARD_MIN_IMAGES`` readable images
    of ``samples``, in batches of ``batch_size``, falling back as an actor falls back, so that
    every image is measured on the one backend that passed. ``(predictor, backend used, fallback
    reason, GuardResult or None)``; None: eager (nothing to guard) or no image could be read."""
    from skinray.backends import GuardedPredictor
    from skinray.data.loading import decode_samples

    guarded = GuardedPredictor(predictor, backend, calibration_images=calibration_images)
    for start in range(0, len(samples), batch_size):
        if not guarded.guarding:
            break
        rows = samples.rows.slice(start, batch_size).to_pydict()
        batch = decode_samples(rows, predictor.input_size, len(samples.class_names))
        if batch["ok"].any():
            guarded(torch.from_numpy(batch["image"][batch["ok"]]).permute(0, 3, 1, 2))
    return guarded.predictor, guarded.backend, guarded.fallback_reason, guarded.result


@torch.inference_mode()
def evaluate_samples(
    predictor: Predictor,
    samples,
    *,
    batch_size: int = 16,
    evaluator: Evaluator | None = None,
    predictions_uri: str | None = None,
    at_source_size: bool = False,
    subgroups: bool = False,
    segmentation: bool = True,
) -> dict[str, float]:
    """Metrics of ``predictor`` on a labelled ``SampleTable``, decoded at the predictor's input size
    with the training pipeline's own reader; unreadable images are skipped and counted in
    ``skipped``. ``predictions_uri``: also write each image's prediction there as Parquet
    (``PREDICTION_SCHEMA``), a batch at a time. ``at_source_size``: segmentation figures at each
    truth mask's own resolution (the predicted mask resized to it, as a scored mask is), not at
    the model's input size. ``subgroups``: also place each image in its subgroups (metadata, and
    skin tone from the image) for ``Evaluator.subgroup_report``. Without ``segmentation`` (data
    without truth masks) only the class figures are measured."""
    from skinray.data.loading import decode_samples

    evaluator = evaluator or Evaluator(predictor.class_names or samples.class_names)
    writer = _PredictionWriter(predictions_uri) if predictions_uri else None
    rows = samples.rows
    skipped = 0
    try:
        for start in range(0, rows.num_rows, batch_size):
            chunk = rows.slice(start, batch_size).to_pydict()
            batch = decode_samples(chunk, predictor.input_size, len(samples.class_names))
            ok = batch["ok"]
            skipped += int((~ok).sum())
            if not ok.any():
                continue
            images = torch.from_numpy(batch["image"][ok]).permute(0, 3, 1, 2)
            prediction = predictor(images)
            labels = torch.from_numpy(batch["label"][ok])
            masks = (
                [read_truth_mask(uri) for uri in np.asarray(chunk["mask_uri"])[ok]]
                if at_source_size
                else torch.from_numpy(batch["mask"][ok])
            )
            groups = _subgroups(chunk, ok, batch, prediction) if subgroups else None
            lesions = np.asarray(chunk["group"], dtype=object)[ok].tolist()
            # Without truth masks the predicted ones are written, not scored against nothing.
            scored = prediction if segmentation else dataclasses.replace(prediction, mask=None)
            evaluator.update(scored, masks, labels, groups, lesions)
            if writer:
                writer.write(batch["image_uri"][ok], labels.numpy(), prediction)
    finally:
        if writer:
            writer.close()
    return {**evaluator.result(), "skipped": skipped}


def _subgroups(chunk: dict, ok: np.ndarray, batch: dict, prediction: Prediction) -> dict:
    """Each evaluated image's metadata subgroups (``SUBGROUP_COLUMNS``, where the samples have
    them) and its skin tone: the ITA category of the skin around the predicted lesion, or around
    the true one where the model does not segment (the truth only places the image in a group)."""
    groups = {
        name: list(np.asarray(chunk[name], dtype=object)[ok])
        for name in SUBGROUP_COLUMNS
        if name in chunk
    }
    masks = prediction.mask.cpu().numpy() if prediction.mask is not None else batch["mask"][ok]
    groups["skin_tone"] = [
        ita_category(individual_typology_angle(image, mask))
        for image, mask in zip(batch["image"][ok], masks, strict=True)
    ]
    return groups


PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string()),
        pa.field("label", pa.int64()),
        pa.field("class_probabilities", pa.list_(pa.float32())),
        pa.field("mask_png", pa.binary()),
        pa.field("roi_box", pa.list_(pa.float32())),
    ]
)


class _PredictionWriter:
    def __init__(self, uri: str) -> None:
        fs, path = io.resolve(uri)
        self._writer = pq.ParquetWriter(path, PREDICTION_SCHEMA, filesystem=fs)

    def write(self, uris, labels: np.ndarray, prediction: Prediction) -> None:
        values = prediction.numpy()
        count = len(uris)
        probabilities = values.get("class_probabilities")
        masks = values.get("mask")
        boxes = values.get("roi_box")
        table = pa.table(
            {
                "image_uri": [str(u) for u in uris],
                "label": labels.astype(np.int64),
                "class_probabilities": [None] * count
                if probabilities is None
                else list(probabilities.astype(np.float32)),
                "mask_png": [None] * count
                if masks is None
                else [encode_png(m * 255) for m in masks],
                "roi_box": [None] * count if boxes is None else list(boxes.astype(np.float32)),
            },
            schema=PREDICTION_SCHEMA,
        )
        self._writer.write_table(table)

    def close(self) -> None:
        self._writer.close()
