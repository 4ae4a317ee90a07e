"""Metrics on hand-computed cases, and against the ISIC challenge's own scoring package."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pandas as pd
import pytest
from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore
from isic_challenge_scoring.segmentation import SegmentationScore

from skinray.data.synthetic import synthetic_batch
from skinray.metrics import (
    accuracy,
    balanced_accuracy,
    binary_confusion,
    classification_scores,
    per_class_auc,
    per_image_segmentation_metrics,
    segmentation_scores,
)


def test_hand_computed_confusion_and_metrics():
    truth = np.array([[1, 1, 0, 0], [1, 1, 0, 0]])
    prediction = np.array([[1, 0, 1, 0], [1, 0, 0, 0]])
    counts = binary_confusion(prediction, truth)
    assert {k: int(v[0]) for k, v in counts.items()} == {"tp": 2, "fp": 1, "tn": 3, "fn": 2}
    m = {k: float(v[0]) for k, v in per_image_segmentation_metrics(prediction, truth).items()}
    assert m["jaccard"] == pytest.approx(2 / 5)
    assert m["dice"] == pytest.approx(4 / 7)
    assert m["sensitivity"] == pytest.approx(2 / 4)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["threshold_jaccard"] == 0.0  # 0.4 < 0.65


def test_scores_are_averaged_per_image_not_pooled():
    truth = np.zeros((2, 10, 10), bool)
    truth[0, :, :] = True  # 100 lesion pixels
    truth[1, 0, 0] = True  # 1 lesion pixel
    prediction = truth.copy()
    prediction[1] = False  # miss the small lesion entirely
    scores = segmentation_scores(prediction, truth)
    assert scores["jaccard"] == pytest.approx(0.5)  # (1 + 0) / 2; pooled would be 100/101


def test_thresholded_jaccard_zeroes_images_below_065():
    truth = np.zeros((2, 10, 10), bool)
    truth[:, :5, :] = True  # 50 pixels each
    prediction = np.zeros_like(truth)
    prediction[0, :4, :] = True  # JA 0.8
    prediction[1, :3, :] = True  # JA 0.6
    scores = segmentation_scores(prediction, truth)
    assert scores["jaccard"] == pytest.approx(0.7)
    assert scores["threshold_jaccard"] == pytest.approx(0.4)


def test_empty_prediction_of_empty_mask_is_perfect():
    empty = np.zeros((1, 8, 8), bool)
    scores = segmentation_scores(empty, empty)
    assert scores == {k: 1.0 for k in scores}


def test_classification_hand_computed():
    labels = np.array([0, 0, 0, 1, 2])
    predicted = np.array([0, 0, 1, 1, 1])
    assert accuracy(labels, predicted) == pytest.approx(3 / 5)
    assert balanced_accuracy(labels, predicted) == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_per_class_auc_hand_computed_and_undefined_class_is_nan():
    labels = np.array([0, 0, 1, 1])
    probabilities = np.array([[0.9, 0.1, 0.0], [0.4, 0.6, 0.0], [0.3, 0.7, 0.0], [0.8, 0.2, 0.0]])
    aucs = per_class_auc(labels, probabilities, ["a", "b", "c"])
    # class a scores: positives 0.9, 0.4 vs negatives 0.3, 0.8 → 3 of 4 pairs ordered
    assert aucs["a"] == pytest.approx(0.75)
    assert aucs["b"] == pytest.approx(0.75)
    assert math.isnan(aucs["c"])
    scores = classification_scores(labels, probabilities, ["a", "b", "c"])
    assert scores["auc_mean"] == pytest.approx(0.75)


def _perturbed_masks(seed: int = 0):
    """Ground truth from synthetic lesions and predictions that err in varied ways."""
    rng = np.random.default_rng(seed)
    _, truth, _ = synthetic_batch(12, 64, seed=seed)
    predictions = []
    for i, mask in enumerate(truth):
        kernel = np.ones((2 * (i % 4) + 1,) * 2, np.uint8)
        pred = cv2.dilate(mask, kernel) if i % 2 else cv2.erode(mask, kernel)
        pred = np.roll(pred, int(rng.integers(-6, 7)), axis=int(rng.integers(2)))
        predictions.append(pred)
    truth = np.concatenate([truth, np.zeros((2, 64, 64), np.uint8)])
    predictions.append(np.zeros((64, 64), np.uint8))  # empty prediction, empty truth
    predictions.append(truth[0])  # false lesion where truth is empty
    return np.stack(predictions).astype(bool), truth.astype(bool)


def test_segmentation_metrics_match_isic_challenge_scoring(tmp_path):
    prediction, truth = _perturbed_masks()
    truth_dir, prediction_dir = tmp_path / "truth", tmp_path / "prediction"
    truth_dir.mkdir(), prediction_dir.mkdir()
    for i, (p, t) in enumerate(zip(prediction, truth, strict=True)):
        cv2.imwrite(str(truth_dir / f"ISIC_{i:07d}_segmentation.png"), t.astype(np.uint8) * 255)
        cv2.imwrite(str(prediction_dir / f"ISIC_{i:07d}.png"), p.astype(np.uint8) * 255)
    reference = SegmentationScore.from_dir(truth_dir, prediction_dir).macro_average
    ours = segmentation_scores(prediction, truth)
    for name in ("jaccard", "dice", "sensitivity", "specificity", "accuracy", "threshold_jaccard"):
        assert ours[name] == pytest.approx(reference[name], abs=1e-12), name
    # The generated cases span the cutoff, so the thresholded figure is a real check.
    per_image = per_image_segmentation_metrics(prediction, truth)["jaccard"]
    assert (per_image < 0.65).any() and (per_image >= 0.65).any()


def test_classification_metrics_match_isic_challenge_scoring():
    rng = np.random.default_rng(7)
    classes = ["MEL", "NV", "BCC", "AKIEC"]
    labels = rng.integers(0, len(classes), 200)
    logits = rng.normal(size=(200, len(classes))) + 1.5 * np.eye(len(classes))[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ids = pd.Index([f"ISIC_{i:07d}" for i in range(200)], name="image")
    truth = pd.DataFrame(np.eye(len(classes))[labels], columns=classes, index=ids)
    prediction = pd.DataFrame(probabilities, columns=classes, index=ids)
    weights = pd.DataFrame({"score_weight": 1.0, "validation_weight": 1.0}, index=ids)
    # The score object itself, not from_stream: its CSV validation calls DataFrame.applymap,
    # which pandas 3 removed; the metric code it runs is the same.
    reference = ClassificationScore(truth, prediction, weights, ClassificationMetric.AUC)
    ours = classification_scores(labels, probabilities, classes)
    for name in classes:
        assert ours[f"auc_{name}"] == pytest.approx(
            reference.per_category.loc[name, "auc"], abs=1e-9
        )
    assert ours["auc_mean"] == pytest.approx(reference.macro_average["auc"], abs=1e-9)
    assert ours["balanced_accuracy"] == pytest.approx(
        reference.aggregate["balanced_accuracy"], abs=1e-9
    )


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        binary_confusion(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))
