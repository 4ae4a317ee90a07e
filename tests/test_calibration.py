"""Temperature scaling: the fit recovers a known temperature, the Predictor applies the stored one,
and the ranking (accuracy, AUC) does not move."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax

from skinray.calibration import (
    at_search_bound,
    fit_temperature,
    negative_log_likelihood,
    out_of_fold_probabilities,
    split_in_folds,
)
from skinray.models import create_model, get_model_spec, load_model, read_model_config, save_model
from skinray.models.serialization import write_model_config
from skinray.predict import Predictor


def _labels_drawn_from(logits: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    probabilities = softmax(logits, axis=1)
    cumulative = probabilities.cumsum(1)
    return (rng.random((len(logits), 1)) > cumulative).sum(1)


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 3.0])
def test_fit_recovers_the_temperature_that_made_the_labels(true_temperature):
    rng = np.random.default_rng(1)
    calibrated = rng.normal(size=(8000, 4)) * 2
    labels = _labels_drawn_from(calibrated)
    fitted = fit_temperature(calibrated * true_temperature, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.08)
    # The fitted T is the minimum of the NLL: both neighbours are worse.
    over = calibrated * true_temperature
    nll = negative_log_likelihood(over, labels, fitted)
    assert nll < negative_log_likelihood(over, labels, fitted * 1.2)
    assert nll < negative_log_likelihood(over, labels, fitted / 1.2)


def test_out_of_fold_calibration_uses_each_folds_temperature_from_the_other_folds():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(300, 3)) * 4  # overconfident: labels drawn at T = 2
    labels = _labels_drawn_from(logits / 2)
    folds = split_in_folds(300, 3, seed=0)
    assert sorted(np.concatenate(folds)) == list(range(300)) and {len(f) for f in folds} == {100}
    calibrated = out_of_fold_probabilities(logits, labels, folds=3, seed=0)
    for held in folds:
        others = np.setdiff1d(np.arange(300), held)
        temperature = fit_temperature(logits[others], labels[others])
        np.testing.assert_allclose(calibrated[held], softmax(logits[held] / temperature, axis=1))
    # Measured on images it never saw, the scaling does worse than on the images it was fitted on.
    in_sample = negative_log_likelihood(logits, labels, fit_temperature(logits, labels))
    assert negative_log_likelihood(np.log(calibrated), labels) > in_sample
    with pytest.raises(ValueError, match="folds"):
        split_in_folds(3, 4)


def test_fit_refuses_logits_and_labels_that_do_not_pair():
    with pytest.raises(ValueError, match="do not pair"):
        fit_temperature(np.zeros((3, 2)), np.zeros(4, int))


def test_fit_refuses_what_would_give_a_meaningless_temperature():
    logits = np.random.default_rng(0).normal(size=(20, 3))
    labels = logits.argmax(1)
    with pytest.raises(ValueError, match="1 logits are not finite"):
        fit_temperature(np.where(np.arange(60).reshape(20, 3) == 7, np.nan, logits), labels)
    with pytest.raises(ValueError, match="labels outside 0..2"):
        fit_temperature(logits, np.where(np.arange(20) == 3, -1, labels))  # -1 indexed the last
    # Every image right: the NLL falls all the way to the search's lower bound, which is no
    # fitted temperature; the release refuses it (tests/test_release.py).
    for wrong_by in (0, 1):  # every image right, every one wrong
        chosen = (labels + wrong_by) % 3
        assert at_search_bound(fit_temperature(logits, chosen), logits, chosen)
    noisy = np.where(np.arange(20) % 3 == 0, (labels + 1) % 3, labels)
    assert not at_search_bound(fit_temperature(logits, noisy), logits, noisy)
    # Every image right by a wide margin: the NLL is 0 in float64 for every small T, and the
    # search stopped mid-way on that flat stretch (T = 0.206 here), not at its bound.
    for margin in (8.0, 15.0):
        wide = logits + margin * np.eye(3)[labels]
        fitted = fit_temperature(wide, labels)
        assert at_search_bound(fitted, wide, labels), (margin, fitted)


def test_predictor_divides_class_logits_by_the_stored_temperature(tmp_path):
    torch.manual_seed(0)
    model = create_model("classifier", **get_model_spec("classifier").smoke_kwargs)
    save_model(model, str(tmp_path / "m"), input_size=(64, 64), class_names=["a", "b", "c"])
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    predictor = Predictor.load(str(tmp_path / "m"))
    outputs, before = predictor.run(images)
    assert predictor.temperature == 1.0

    config = read_model_config(str(tmp_path / "m"))
    write_model_config(str(tmp_path / "m"), config.replace(temperature=2.5))
    after = Predictor.load(str(tmp_path / "m"))(images)
    expected = torch.softmax(outputs["class_logits"] / 2.5, 1)
    torch.testing.assert_close(after.class_probabilities, expected)
    assert torch.equal(after.class_probabilities.argmax(1), before.class_probabilities.argmax(1))
    # Rewriting the config left the weights and their hash as they were.
    assert load_model(str(tmp_path / "m")).saved_config.weights_sha256 == config.weights_sha256


def test_out_of_fold_folds_keep_each_lesion_whole():
    groups = np.array(["a", "a", "b", "c", "c", "c", "d", "e", "f", "f"])
    folds = split_in_folds(len(groups), 2, seed=0, groups=groups)
    assert sorted(np.concatenate(folds).tolist()) == list(range(10))
    for fold in folds:
        outside = np.setdiff1d(np.arange(10), fold)
        assert not set(groups[fold]) & set(groups[outside])
    with pytest.raises(ValueError, match="9 groups for 10 items"):
        split_in_folds(10, 2, 0, groups[:9])
    ungrouped = split_in_folds(4, 2, 0, np.array(["a", None, "a", None], dtype=object))
    assert any({0, 2} <= set(fold) for fold in ungrouped)  # None: a group of its own each
    # Every image its own lesion: the folds drawn without groups.
    alone = np.array([f"image:{i}" for i in range(10)])
    for with_groups, without in zip(
        split_in_folds(10, 2, 0, alone), split_in_folds(10, 2, 0), strict=True
    ):
        np.testing.assert_array_equal(with_groups, without)
