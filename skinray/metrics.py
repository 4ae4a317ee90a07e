"""ISIC challenge metrics as pure functions of arrays.

Segmentation follows the ISIC 2017 scoring (and its reference package, ``isic-challenge-scoring``):
each metric is computed per image from that image's confusion counts, then averaged over images.
Ill-defined cases score as the reference does: Jaccard and Dice of an empty prediction of an empty
mask are 1, sensitivity with no lesion pixels is 1, specificity with no background pixels is 1.
The ISIC 2018 thresholded Jaccard sets every per-image Jaccard below 0.65 to 0 before averaging.

Classification: per-class one-vs-rest ROC AUC (scikit-learn), accuracy, and balanced multi-class
accuracy (mean per-class recall); ``per_class_report`` adds ISIC's per-category figures
(sensitivity, specificity, PPV, NPV, AUC, ``auc_sens_80``, average precision). Calibration: top-label
expected calibration error and its reliability bins (Guo et al., ICML 2017). ``bootstrap_interval``
gives a percentile bootstrap confidence interval of any of these over images, or over groups of
images (lesions) drawn whole.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "AUC_SENSITIVITY_FLOOR",
    "THRESHOLD_JACCARD_CUTOFF",
    "accuracy",
    "balanced_accuracy",
    "binary_confusion",
    "bootstrap_interval",
    "bootstrap_resamples",
    "classification_scores",
    "expected_calibration_error",
    "per_class_auc",
    "per_class_report",
    "per_image_segmentation_metrics",
    "percentile_interval",
    "reliability_bins",
    "segmentation_scores",
]

THRESHOLD_JACCARD_CUTOFF = 0.65
#: ``auc_sens_80``: the ROC area over the part of the curve where sensitivity is at least this.
AUC_SENSITIVITY_FLOOR = 0.80


def _as_masks(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N,H,W), (N,1,H,W) or (H,W); got shape {masks.shape}")
    return masks.astype(bool)


def binary_confusion(prediction: np.ndarray, truth: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image counts ``tp, fp, tn, fn`` (each shape (N,)) of boolean/0-1 masks."""
    prediction, truth = _as_masks(prediction), _as_masks(truth)
    if prediction.shape != truth.shape:
        raise ValueError(f"prediction {prediction.shape} and truth {truth.shape} differ in shape")
    axes = (1, 2)
    return {
        "tp": np.sum(prediction & truth, axis=axes),
        "fp": np.sum(prediction & ~truth, axis=axes),
        "tn": np.sum(~prediction & ~truth, axis=axes),
        "fn": np.sum(~prediction & truth, axis=axes),
    }


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, and 1.0 where the denominator is 0 (the ISIC 'freebie')."""
    numerator = numerator.astype(float)
    denominator = denominator.astype(float)
    out = np.ones_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def per_image_segmentation_metrics(
    prediction: np.ndarray, truth: np.ndarray
) -> dict[str, np.ndarray]:
    """Per-image Jaccard, Dice, sensitivity, specificity, accuracy and thresholded Jaccard."""
    c = binary_confusion(prediction, truth)
    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    jaccard = _ratio(tp, tp + fp + fn)
    return {
        "jaccard": jaccard,
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "accuracy": _ratio(tp + tn, tp + tn + fp + fn),
        "threshold_jaccard": np.where(jaccard >= THRESHOLD_JACCARD_CUTOFF, jaccard, 0.0),
    }


def segmentation_scores(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Each per-image metric averaged over images (ISIC 2017 ranking used ``jaccard``,
    ISIC 2018 ``threshold_jaccard``)."""
    return {
        name: float(values.mean())
        for name, values in per_image_segmentation_metrics(prediction, truth).items()
    }


def accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    return float(np.mean(labels == predicted))


def balanced_accuracy(
    labels: np.ndarray, predicted: np.ndarray, num_classes: int | None = None
) -> float:
    """Mean recall over the classes present in ``labels`` (ISIC 2018/2019's balanced accuracy)."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    classes = np.unique(labels) if num_classes is None else np.arange(num_classes)
    recalls = [np.mean(predicted[labels == c] == c) for c in classes if np.any(labels == c)]
    return float(np.mean(recalls))


def per_class_auc(
    labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str] | None = None
) -> dict[str, float]:
    """One-vs-rest ROC AUC of each class; NaN for a class with no positives or no negatives."""
    # Imported here: scikit-learn took 1.7 s of a 5.5 s training-loop import, which every training
    # worker and job that imports this module would pay for this one function.
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=float)
    num_classes = probabilities.shape[1]
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} probability columns")
    scores = {}
    for index, name in enumerate(names):
        positives = labels == index
        if positives.all() or not positives.any():
            scores[name] = float("nan")
        else:
            scores[name] = float(roc_auc_score(positives, probabilities[:, index]))
    return scores


def classification_scores(
    labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str] | None = None
) -> dict[str, float]:
    """Accuracy, balanced accuracy, each class's AUC (``auc_<name>``) and their mean (``auc_mean``,
    over classes where AUC is defined)."""
    probabilities = np.asarray(probabilities, dtype=float)
    predicted = probabilities.argmax(1)
    aucs = per_class_auc(labels, probabilities, class_names)
    defined = [v for v in aucs.values() if not np.isnan(v)]
    return {
        "accuracy": accuracy(labels, predicted),
        "balanced_accuracy": balanced_accuracy(labels, predicted, probabilities.shape[1]),
        **{f"auc_{name}": value for name, value in aucs.items()},
        "auc_mean": float(np.mean(defined)) if defined else float("nan"),
    }


def _class_names(probabilities: np.ndarray, class_names: Sequence[str] | None) -> list[str]:
    num_classes = probabilities.shape[1]
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} probability columns")
    return names


def _nan_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, and NaN where the denominator is 0 (the figure is undefined)."""
    out = np.full(np.shape(numerator), np.nan)
    np.divide(numerator, denominator, out=out, where=np.asarray(denominator) > 0)
    return out


def _ranking_curve(positives: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positive counts with each distinct score as the cutoff, highest first, from
    (0, 0): the points of ``sklearn.metrics.roc_curve(..., drop_intermediate=False)`` before they
    are divided by the class sizes (its ``_binary_clf_curve``). Written out because one curve gives
    AUC, ``auc_sens_80`` and AP, and scikit-learn's input checks (about 1 ms a call) would make the
    bootstrap's thousands of calls take tens of seconds; tests check it against scikit-learn."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, positives = scores[order], positives[order]
    cutoffs = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(positives)[cutoffs]
    return np.r_[0, tps], np.r_[0, cutoffs + 1 - tps]


def _auc_above_sensitivity(
    tpr: np.ndarray, fpr: np.ndarray, floor: float = AUC_SENSITIVITY_FLOOR
) -> float:
    """ISIC's ``auc_sens_80``, as ``auc_above_sensitivity`` in isic_challenge_scoring/metrics.py
    (github.com/ImageMarkup/isic-challenge-scoring, v5.6.0): the raw partial AUC — not McClish-
    normalised — under the full ROC curve (every threshold kept), from the point where the curve
    first reaches sensitivity ``floor`` (its FPR interpolated linearly between the two points around
    it) to (1, 1), integrated by trapezoids down to TPR 0. A perfect classifier scores 1, chance
    (the diagonal) 0.18."""
    index = int(np.searchsorted(tpr, floor, side="left"))  # tpr[0] == 0 < floor, so index >= 1
    fpr_at_floor = np.interp(floor, tpr[index - 1 : index + 1], fpr[index - 1 : index + 1])
    return float(np.trapezoid(np.r_[floor, tpr[index:]], np.r_[fpr_at_floor, fpr[index:]]))


def _ranking_scores(positives: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """ROC AUC, ``auc_sens_80`` and average precision of ``scores`` for one class; NaN unless the
    class has both positives and negatives."""
    if positives.all() or not positives.any():
        return dict.fromkeys(("auc", "auc_sens_80", "ap"), float("nan"))
    tps, fps = _ranking_curve(positives, scores)
    tpr, fpr = tps / tps[-1], fps / fps[-1]
    precision = tps[1:] / (tps[1:] + fps[1:])
    return {
        "auc": float(np.trapezoid(tpr, fpr)),  # = sklearn.metrics.roc_auc_score
        "auc_sens_80": _auc_above_sensitivity(tpr, fpr),
        "ap": float(np.sum(np.diff(tpr) * precision)),  # = sklearn average_precision_score
    }


def per_class_report(
    labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str] | None = None
) -> dict[str, dict[str, float]]:
    """ISIC's per-category classification figures, one-vs-rest, for each class: ``n`` (its
    positives), ``sensitivity``, ``specificity``, ``ppv``, ``npv``, ``auc``, ``auc_sens_80`` and
    ``ap`` (average precision).

    The predicted class is the argmax of ``probabilities``, as for ``accuracy`` and
    ``balanced_accuracy`` (so ``sensitivity`` is the recall that balanced accuracy averages). Two
    departures from isic-challenge-scoring's ``ClassificationScore``: it calls a class predicted
    where that class's probability is above 0.5 (the same as the argmax for two classes, ties
    aside), and it scores a ratio with a zero denominator as 1; here such a figure is NaN — a class
    without positives (or without negatives) has NaN for every figure that needs them, and a class
    never predicted has NaN PPV.
    """
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=float)
    if not np.isfinite(probabilities).all():  # NaN sorted as the highest score: AUC 1 for NaNs
        raise ValueError("class probabilities are not all finite")
    names = _class_names(probabilities, class_names)
    num_classes = len(names)
    # The confusion matrix (rows truth, columns prediction) in one bincount: sklearn's
    # confusion_matrix checks its inputs for about 1 ms a call, too slow inside the bootstrap.
    predicted = probabilities.argmax(1)
    confusion = np.bincount(labels * num_classes + predicted, minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes)
    tp = np.diag(confusion)
    fp, fn = confusion.sum(0) - tp, confusion.sum(1) - tp
    tn = len(labels) - tp - fp - fn
    ratios = {
        "sensitivity": _nan_ratio(tp, tp + fn),
        "specificity": _nan_ratio(tn, tn + fp),
        "ppv": _nan_ratio(tp, tp + fp),
        "npv": _nan_ratio(tn, tn + fn),
    }
    report = {}
    for index, name in enumerate(names):
        positives = labels == index
        report[name] = {
            "n": int(positives.sum()),
            **{figure: float(values[index]) for figure, values in ratios.items()},
            **_ranking_scores(positives, probabilities[:, index]),
        }
    return report


def reliability_bins(
    labels: np.ndarray, probabilities: np.ndarray, bins: int = 15
) -> dict[str, np.ndarray]:
    """Top-label reliability diagram (Guo et al., ICML 2017, Sec. 2): images binned by confidence
    (their highest probability) into ``bins`` equal-width bins ((m-1)/M, m/M] of [0, 1] (the first
    also takes 0). Returns ``edges`` (bins + 1,) and, per bin, the mean ``confidence``, the
    ``accuracy`` (fraction whose argmax is the label) — NaN in an empty bin — and the ``count``."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=float)
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.digitize(confidence, edges[1:-1], right=True)
    count = np.bincount(which, minlength=bins)
    return {
        "edges": edges,
        "confidence": _nan_ratio(np.bincount(which, confidence, minlength=bins), count),
        "accuracy": _nan_ratio(np.bincount(which, correct, minlength=bins), count),
        "count": count,
    }


def expected_calibration_error(
    labels: np.ndarray, probabilities: np.ndarray, bins: int = 15
) -> float:
    """Top-label ECE (Guo et al., ICML 2017, Eq. 3): over the ``reliability_bins``, the mean of
    |accuracy − confidence| weighted by each bin's share of the images."""
    reliability = reliability_bins(labels, probabilities, bins)
    gaps = np.abs(reliability["accuracy"] - reliability["confidence"])
    filled = reliability["count"] > 0
    return float(np.sum(reliability["count"][filled] * gaps[filled]) / len(np.asarray(labels)))


def bootstrap_interval(
    statistic: Callable[..., float | np.ndarray],
    *arrays: np.ndarray,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> tuple[float, float] | tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of ``statistic(*arrays)``: the (1 ± confidence) / 2 quantiles
    of ``bootstrap_resamples``. Resamples where the statistic is NaN (a class missing from the
    draw) are left out; with none left the interval is (NaN, NaN). A statistic that returns an
    array gets an interval for each element (arrays ``low``, ``high``) from the same resamples."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must be in (0, 1)")
    values = bootstrap_resamples(statistic, *arrays, resamples=resamples, seed=seed, groups=groups)
    low, high = percentile_interval(values, confidence)
    return (float(low), float(high)) if values.ndim == 1 else (low, high)


def bootstrap_resamples(
    statistic: Callable[..., float | np.ndarray],
    *arrays: np.ndarray,
    resamples: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """``statistic`` of ``resamples`` sets of rows drawn with replacement (the same rows of every
    array, so an image's figures stay together), drawn by one ``numpy.random.Generator`` seeded
    with ``seed``: an array of ``resamples`` values (or rows, for an array statistic).

    ``groups`` (one label a row): rows that are not independent, such as images of one lesion,
    are drawn together. A resample draws as many groups as there are, with replacement, and takes
    every row of each (the cluster bootstrap; Field & Welsh 2007). Rows drawn alone where it is
    None, or where every row is its own group, which draws the same resamples."""
    if not arrays:
        raise ValueError("bootstrap_interval needs at least one array")
    arrays = tuple(np.asarray(a) for a in arrays)
    rows = len(arrays[0])
    if rows == 0 or any(len(a) != rows for a in arrays):
        raise ValueError(f"arrays of {[len(a) for a in arrays]} rows: need equal, non-zero lengths")
    if resamples < 1:
        raise ValueError(f"resamples {resamples} must be >= 1")
    members = _group_members(groups, rows)
    rng = np.random.default_rng(seed)
    return np.array(
        [
            np.asarray(statistic(*(a[draw] for a in arrays)), dtype=float)
            for draw in (
                np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
                for _ in range(resamples)
            )
        ]
    )


def percentile_interval(values: np.ndarray, confidence: float = 0.95) -> tuple:
    """The (1 ± confidence) / 2 quantiles of bootstrap ``values`` over their first axis, NaN
    (undefined) values left out; (NaN, NaN) where none is defined."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must be in (0, 1)")
    tail = (1 - confidence) / 2
    with warnings.catch_warnings():  # an all-NaN element is (NaN, NaN), as documented
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanquantile(values, [tail, 1 - tail], axis=0)
    return low, high


def _group_members(groups: np.ndarray | None, rows: int) -> list[np.ndarray]:
    """Each group's row indices, groups in the order they first appear (every row alone: None)."""
    if groups is None:
        return [np.array([i]) for i in range(rows)]
    groups = np.asarray(groups)
    if len(groups) != rows:
        raise ValueError(f"{len(groups)} group labels for {rows} rows")
    members: dict = {}  # insertion order: first appearance
    for row, group in enumerate(groups.tolist()):
        members.setdefault(group, []).append(row)
    return [np.array(indices) for indices in members.values()]
