"""ISIC challenge metrics as pure functions of arrays.

Segmentation follows the ISIC 2017 scoring (and its reference package, ``isic-challenge-scoring``):
each metric is computed per image from that image's confusion counts, then averaged over images.
Ill-defined cases score as the reference does: Jaccard and Dice of an empty prediction of an empty
mask are 1, sensitivity with no lesion pixels is 1, specificity with no background pixels is 1.
The ISIC 2018 thresholded Jaccard sets every per-image Jaccard below 0.65 to 0 before averaging.

Classification: per-class one-vs-rest ROC AUC (scikit-learn), accuracy, and balanced multi-class
accuracy (mean per-class recall).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

__all__ = [
    "THRESHOLD_JACCARD_CUTOFF",
    "accuracy",
    "balanced_accuracy",
    "binary_confusion",
    "classification_scores",
    "per_class_auc",
    "per_image_segmentation_metrics",
    "segmentation_scores",
]

THRESHOLD_JACCARD_CUTOFF = 0.65


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
