"""Metrics on hand-computed cases, and against the ISIC challenge's own scoring package."""

from __future__ import annotations

import math
import warnings

import cv2
import numpy as np
import pandas as pd
import pytest
from isic_challenge_scoring import metrics as isic_metrics
from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore
from isic_challenge_scoring.segmentation import SegmentationScore
from sklearn.metrics import average_precision_score, roc_auc_score

from skinray.data.synthetic import synthetic_batch
from skinray.metrics import (
    accuracy,
    balanced_accuracy,
    binary_confusion,
    bootstrap_interval,
    classification_scores,
    expected_calibration_error,
    per_class_auc,
    per_class_report,
    per_image_segmentation_metrics,
    reliability_bins,
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


def _one_hot_probabilities(predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows whose argmax is ``predicted``: 0.7 there, the rest shared out (sums to 1)."""
    rest = 0.3 / (num_classes - 1)
    return np.where(np.eye(num_classes)[predicted] > 0, 0.7, rest)


def test_per_class_report_hand_computed_confusion():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    predicted = np.array([0, 0, 0, 1, 1, 1, 0, 2, 2, 1])
    # truth 0 → predicted [3, 1, 0, 0]; truth 1 → [1, 2, 0, 0]; truth 2 → [0, 1, 2, 0]; no class d
    report = per_class_report(labels, _one_hot_probabilities(predicted, 4), ["a", "b", "c", "d"])
    expected = {  # (n, sensitivity, specificity, ppv, npv) from tp, fn, fp, tn
        "a": (4, 3 / 4, 5 / 6, 3 / 4, 5 / 6),  # tp 3, fn 1, fp 1, tn 5
        "b": (3, 2 / 3, 5 / 7, 2 / 4, 5 / 6),  # tp 2, fn 1, fp 2, tn 5
        "c": (3, 2 / 3, 7 / 7, 2 / 2, 7 / 8),  # tp 2, fn 1, fp 0, tn 7
    }
    for name, (n, sensitivity, specificity, ppv, npv) in expected.items():
        figures = report[name]
        assert figures["n"] == n
        assert figures["sensitivity"] == pytest.approx(sensitivity)
        assert figures["specificity"] == pytest.approx(specificity)
        assert figures["ppv"] == pytest.approx(ppv)
        assert figures["npv"] == pytest.approx(npv)
    # Class d: no positives and never predicted → the figures that need them are NaN.
    d = report["d"]
    assert d["n"] == 0 and d["specificity"] == 1.0 and d["npv"] == 1.0
    for figure in ("sensitivity", "ppv", "auc", "auc_sens_80", "ap"):
        assert math.isnan(d[figure]), figure
    # The sensitivities are the recalls balanced accuracy averages.
    recalls = [report[name]["sensitivity"] for name in "abc"]
    assert balanced_accuracy(labels, predicted) == pytest.approx(np.mean(recalls))


@pytest.mark.parametrize("seed", range(6))
def test_per_class_ranking_figures_match_sklearn_and_isic(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 400))
    labels = rng.integers(0, 4, n)
    logits = rng.normal(size=(n, 4)) + np.eye(4)[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probabilities = probabilities.round(int(rng.integers(1, 4)))  # ties, as in real outputs
    report = per_class_report(labels, probabilities)
    weights = pd.Series(np.ones(n))
    for c in range(4):
        positives, scores = labels == c, probabilities[:, c]
        figures = report[str(c)]
        assert figures["auc"] == pytest.approx(roc_auc_score(positives, scores), abs=1e-12)
        assert figures["ap"] == pytest.approx(average_precision_score(positives, scores), abs=1e-12)
        isic = isic_metrics.auc_above_sensitivity(
            pd.Series(positives.astype(float)), pd.Series(scores), weights, 0.80
        )
        assert figures["auc_sens_80"] == pytest.approx(isic, abs=1e-12)
    aucs = per_class_auc(labels, probabilities)
    assert [report[str(c)]["auc"] for c in range(4)] == pytest.approx(list(aucs.values()))


def _binary_report(positives: list[int], scores: list[float]) -> dict[str, float]:
    positives = np.array(positives)
    probabilities = np.stack([1 - np.array(scores), np.array(scores)], axis=1)
    return per_class_report(positives, probabilities)["1"]


def test_auc_sens_80_perfect_chance_and_hand_integrated_curves():
    # Perfect ranking: TPR is 1 over the whole FPR range, so the area is ISIC's maximum, 1.
    perfect = _binary_report([1, 1, 1, 0, 0], [0.9, 0.8, 0.7, 0.2, 0.1])
    assert perfect["auc"] == 1.0 and perfect["auc_sens_80"] == pytest.approx(1.0)
    # Chance: each positive tied with a negative puts every ROC point on the diagonal; the area
    # under TPR = FPR from FPR 0.8 to 1 is (1 - 0.8²) / 2 = 0.18.
    scores = np.repeat(np.arange(10) / 10, 2)
    chance = _binary_report([1, 0] * 10, list(scores))
    assert chance["auc"] == pytest.approx(0.5)
    assert chance["auc_sens_80"] == pytest.approx(0.18)
    # Ranked P N P P N P N P N (5 positives, 4 negatives): ROC (0,.2) (.25,.2) (.25,.6) (.5,.6)
    # (.5,.8) (.75,.8) (.75,1) (1,1). Sensitivity first reaches .8 at FPR .5: the area is
    # .25 × .8 (FPR .5 → .75) + .25 × 1 (FPR .75 → 1) = .45.
    steps = _binary_report([1, 0, 1, 1, 0, 1, 0, 1, 0], [9, 8, 7, 6, 5, 4, 3, 2, 1])
    assert steps["auc_sens_80"] == pytest.approx(0.45)
    # Three positives first, then a tie of two positives and two negatives, then two negatives:
    # ROC (0,.6) → (.5,1) → (1,1). Sensitivity .8 falls inside the tied segment, at FPR .25
    # (linear interpolation, as ISIC does): the trapezoid .25 × (.8 + 1) / 2 plus .5 × 1 = .725.
    tied = _binary_report([1, 1, 1, 1, 1, 0, 0, 0, 0], [9, 8, 7, 5, 5, 5, 5, 1, 1])
    assert tied["auc_sens_80"] == pytest.approx(0.725)
    assert tied["auc"] == pytest.approx(0.5 * (0.6 + 1) / 2 + 0.5)  # the whole curve: .9


def _probabilities_with_confidence(confidence: float, correct: int, total: int):
    """``total`` three-class rows with top probability ``confidence`` on class 0, ``correct`` of
    them labelled 0 (the rest 1)."""
    rest = (1 - confidence) / 2
    probabilities = np.tile([confidence, rest, rest], (total, 1))
    labels = np.r_[np.zeros(correct, int), np.ones(total - correct, int)]
    return labels, probabilities


def test_ece_is_zero_when_every_bin_is_calibrated():
    parts = [_probabilities_with_confidence(0.7, 7, 10), _probabilities_with_confidence(0.5, 2, 4)]
    labels = np.concatenate([p[0] for p in parts])
    probabilities = np.concatenate([p[1] for p in parts])
    assert expected_calibration_error(labels, probabilities) == pytest.approx(0.0, abs=1e-12)


def test_ece_adds_each_bins_gap_whatever_its_sign():
    # One bin over-confident by .3, one under-confident by .3: their signed gaps cancel, their
    # absolute ones do not. And .61 and .69 share a bin of ten but not one of fifteen.
    over = _probabilities_with_confidence(0.9, 6, 10)
    under = _probabilities_with_confidence(0.4, 7, 10)
    labels = np.concatenate([over[0], under[0]])
    probabilities = np.concatenate([over[1], under[1]])
    assert expected_calibration_error(labels, probabilities) == pytest.approx(0.3)
    low, high = (
        _probabilities_with_confidence(0.61, 8, 10),
        _probabilities_with_confidence(0.69, 5, 10),
    )
    labels = np.concatenate([low[0], high[0]])
    probabilities = np.concatenate([low[1], high[1]])
    assert expected_calibration_error(labels, probabilities) == pytest.approx(0.19)
    assert expected_calibration_error(labels, probabilities, bins=10) == pytest.approx(
        0.0, abs=1e-12
    )


def test_ece_and_reliability_bins_on_a_constructed_case():
    over = _probabilities_with_confidence(0.9, 6, 10)  # confidence .9, accuracy .6: gap .3
    fair = _probabilities_with_confidence(0.62, 6, 10)  # confidence .62, accuracy .6: gap .02
    labels = np.concatenate([over[0], fair[0]])
    probabilities = np.concatenate([over[1], fair[1]])
    # Half the images in each bin: (0.3 + 0.02) / 2.
    assert expected_calibration_error(labels, probabilities) == pytest.approx(0.16)
    bins = reliability_bins(labels, probabilities)
    assert len(bins["edges"]) == 16 and bins["count"].sum() == 20
    # 0.9 lies in (13/15, 14/15], 0.62 in (9/15, 10/15].
    assert np.flatnonzero(bins["count"]).tolist() == [9, 13]
    assert bins["confidence"][[9, 13]] == pytest.approx([0.62, 0.9])
    assert bins["accuracy"][[9, 13]] == pytest.approx([0.6, 0.6])
    assert np.isnan(bins["accuracy"][0]) and np.isnan(bins["confidence"][0])
    # Ten bins: 0.62 and 0.9 still in separate bins, the same figure.
    assert expected_calibration_error(labels, probabilities, bins=10) == pytest.approx(0.16)


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_images():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 10_000):
        values = rng.normal(1.0, 1.0, n)
        low, high = bootstrap_interval(np.mean, values, resamples=500)
        assert low < values.mean() < high
        widths.append(high - low)
    # The standard error shrinks as 1/sqrt(n): a hundred times the images, a tenth the width.
    assert widths[1] == pytest.approx(widths[0] / 10, rel=0.3)
    assert widths[0] == pytest.approx(2 * 1.96 / 10, rel=0.3)


def test_bootstrap_interval_is_reproducible_and_resamples_rows_together():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=200), rng.normal(size=200)

    def mean_difference(a, b):
        return np.mean(a - b)

    first = bootstrap_interval(mean_difference, x, y, resamples=200, seed=3)
    assert bootstrap_interval(mean_difference, x, y, resamples=200, seed=3) == first
    assert bootstrap_interval(mean_difference, x, y, resamples=200, seed=4) != first
    # Rows stay paired: resampling x against itself gives a difference of exactly 0.
    assert bootstrap_interval(mean_difference, x, x, resamples=50) == (0.0, 0.0)
    # An array statistic gets one interval per element, the same as element by element.
    low, high = bootstrap_interval(
        lambda a, b: np.array([np.mean(a), np.mean(b)]), x, y, resamples=200, seed=3
    )
    assert (low[0], high[0]) == bootstrap_interval(np.mean, x, resamples=200, seed=3)


def test_a_grouped_bootstrap_draws_whole_groups():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(40), 3)
    values = np.repeat(rng.normal(size=40), 3)  # each group's rows alike

    def mean_of_whole_groups(v, g):
        assert (np.bincount(g) % 3 == 0).all()  # a group's rows come all together
        return np.mean(v)

    low, high = bootstrap_interval(mean_of_whole_groups, values, groups, groups=groups, seed=1)
    rows_low, rows_high = bootstrap_interval(np.mean, values, seed=1)
    assert 1.4 < (high - low) / (rows_high - rows_low) < 2.2  # about sqrt(3) wider
    # Every row its own group (any labels) draws exactly what no groups draws.
    names = np.array([f"image {i}" for i in range(120)])
    assert bootstrap_interval(np.mean, values, seed=1, groups=names) == (rows_low, rows_high)
    with pytest.raises(ValueError, match="119 group labels for 120 rows"):
        bootstrap_interval(np.mean, values, groups=names[:-1])


def test_bootstrap_interval_drops_nan_resamples():
    labels = np.zeros(10, int)
    labels[0] = 1  # the one positive is missing from about a third of the draws
    values = np.arange(10.0)

    def positives_mean(labels, values):
        return values[labels == 1].mean() if (labels == 1).any() else np.nan

    assert bootstrap_interval(positives_mean, labels, values, resamples=200) == (0.0, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        never = bootstrap_interval(lambda v: np.nan, values, resamples=20)
    assert all(math.isnan(v) for v in never)
    with pytest.raises(ValueError, match="equal"):
        bootstrap_interval(np.mean, values, values[:5])


def test_per_class_figures_refuse_probabilities_that_are_not_finite():
    # Ranked as the highest scores, two NaN positives made the class's AUC 1.
    probabilities = np.array([[np.nan, 0.5], [np.nan, 0.5], [0.2, 0.8], [0.3, 0.7]])
    with pytest.raises(ValueError, match="not all finite"):
        per_class_report(np.array([0, 0, 1, 1]), probabilities)
