"""``jobs/release.py``'s library: a classifier released with a fitted temperature, fp16 weights
that hold its figures, and a card stating what was measured."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from skinray.data.datasets import synthetic_samples
from skinray.models import create_model, get_model_spec, load_model, save_model
from skinray.models.release import CalibrationError, ReleaseSpec, release_model
from skinray.predict import Predictor


def test_a_released_classifier_is_calibrated_carded_and_halved(tmp_path):
    torch.manual_seed(0)
    model = _decisive_classifier()  # a random one's temperature would sit at a bound
    save_model(model, str(tmp_path / "trained"), input_size=(64, 64), class_names=["a", "b", "c"])
    spec = ReleaseSpec(
        name="tiny-classifier",
        title="a test classifier",
        data="synthetic",
        licence="none",
        recipe="smoke",
        training={"best": {"epoch": 1}, "epochs_run": 1, "wall_time_s": 1.0},
        limits=["a test model"],
    )
    samples = _labelled_by(str(tmp_path / "trained"), synthetic_samples(24, num_classes=3))
    destination = tmp_path / "released"
    training = synthetic_samples(40, num_classes=3, seed=100)
    report = release_model(
        str(tmp_path / "trained"),
        spec,
        samples,
        resamples=50,
        destination=str(destination),
        training_samples=training,
    )

    released = load_model(str(destination))
    assert released.saved_config.temperature == report["calibration"]["temperature"]
    calibration = report["calibration"]
    assert 0.2 < released.saved_config.temperature < 10  # fitted, not stopped at a bound
    # Temperature scaling minimises the validation NLL, and the released model applies it.
    assert calibration["after"]["nll"] < calibration["before"]["nll"] - 0.01
    assert calibration["folds"] == 2 and set(calibration["after_out_of_fold"]) == {"ece", "nll"}
    assert report["weights_dtype"] == "float16" and report["fp16_change"] <= 0.005
    assert (destination / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    card = (destination / "MODEL_CARD.md").read_text()
    assert report["weights_sha256"] in card and f"T = {calibration['temperature']:.3f}" in card
    for name in ("a", "b", "c"):
        assert f"| {name} |" in card  # a per-class row
    assert json.loads((destination / "metrics.json").read_text())["commit"] == report["commit"]
    # the OOD bank: every training image drawn (fewer than the bank size), the threshold passing
    # 97.5 % of the validation images, the card saying so
    assert released.ood.bank.shape[0] == 40 and report["ood"]["bank_size"] == 40
    scores = Predictor.load(str(destination))(_decoded(samples)).ood_score
    # On 24 images the threshold is their highest score. Scored again in batches of another size
    # (other convolution kernels), a score moved by 1.4e-4 of itself.
    threshold = released.ood.threshold * (1 + 1e-3)
    assert (scores <= threshold).float().mean().item() >= 0.975
    assert scores.max().item() == pytest.approx(released.ood.threshold, rel=1e-3)
    assert report["ood"]["bank_sha256"] in card and "Out-of-distribution flag" in card
    held = calibration["after_out_of_fold"]
    assert "| after, out of fold (2 folds" in card and f"{held['ece']:.4f}" in card
    assert 0 <= report["ood"]["validation_pass_out_of_fold"] <= 1
    assert f"{report['ood']['validation_pass_out_of_fold']:.1%} did of each fold" in card


def _decoded(samples):
    from skinray.data.loading import decode_samples

    return decode_samples(samples.rows.to_pydict(), (64, 64), 3)["image"]


def test_the_card_marks_the_ece_and_any_figure_its_bootstrap_range_does_not_contain():
    from skinray.models.card import _headline_table

    def figure(value, low, high):
        return {"value": value, "low": low, "high": high}

    classification = {"accuracy": figure(0.8, 0.75, 0.85), "ece": figure(0.047, 0.055, 0.141)}
    rows = _headline_table({"report": {"classification": classification}})
    assert "| accuracy | 0.800 [0.750, 0.850] |" in rows
    assert "| expected calibration error (15 bins) | 0.047 [0.055, 0.141] † |" in rows
    assert rows[-1].startswith("† The resamples' spread, not a confidence interval")
    # ECE's range sits above it even where it holds the figure.
    classification["ece"] = figure(0.033, 0.029, 0.057)
    rows = _headline_table({"report": {"classification": classification}})
    assert "| expected calibration error (15 bins) | 0.033 [0.029, 0.057] † |" in rows
    del classification["ece"]
    assert not any(
        "†" in row for row in _headline_table({"report": {"classification": classification}})
    )
    classification["accuracy"] = figure(0.8, 0.81, 0.85)
    rows = _headline_table({"report": {"classification": classification}})
    assert "| accuracy | 0.800 [0.810, 0.850] † |" in rows


def test_the_temperature_is_fitted_on_the_logits_the_release_ships(tmp_path):
    # With test-time flips on, on the flip-averaged logits; and in absolute terms, so that a model
    # released again from a release (temperature already fitted) gets the same temperature back.
    from skinray import calibration
    from skinray.evaluation import Evaluator, evaluate_samples

    torch.manual_seed(0)
    model = _decisive_classifier()
    save_model(model, str(tmp_path / "trained"), input_size=(64, 64), class_names=["a", "b", "c"])
    spec = ReleaseSpec(
        name="flipped", title="t", data="synthetic", licence="none", recipe="smoke",
        training={"best": {}, "epochs_run": 1, "wall_time_s": 1.0, "config": {"model": "x"}},
        test_time_flips=True,
        holdout={"source": "synthetic", "root": None, "fraction": 0.2, "seed": 4},
    )  # fmt: skip
    samples = _labelled_by(str(tmp_path / "trained"), synthetic_samples(24, num_classes=3))
    first = release_model(
        str(tmp_path / "trained"), spec, samples, resamples=10, destination=str(tmp_path / "r1")
    )
    flipped = Predictor.load(str(tmp_path / "trained"))
    flipped.test_time_flips = True
    evaluator = Evaluator(["a", "b", "c"])
    evaluate_samples(flipped, samples, evaluator=evaluator)
    labels, probabilities = evaluator.labels_and_probabilities()
    expected = calibration.fit_temperature(np.log(np.clip(probabilities, 1e-12, 1)), labels)
    assert first["calibration"]["temperature"] == pytest.approx(expected, rel=1e-6)
    again = release_model(
        str(tmp_path / "r1"), spec, samples, resamples=10, destination=str(tmp_path / "r2")
    )
    assert again["calibration"]["temperature"] == pytest.approx(expected, rel=2e-3)
    released = load_model(str(tmp_path / "r2")).saved_config
    assert released.test_time_flips and released.holdout == spec.holdout  # the run's, recorded
    from skinray.data.datasets import image_set_digest

    # Where the temperature was fitted, for evaluation to say its calibration is in-sample there;
    # a record, not a setting: the config hash does not change with it.
    fitted = {"images": 24, "image_ids_sha256": image_set_digest(samples)}
    assert released.temperature_fitted_on == fitted
    assert released.replace(temperature_fitted_on=None).config_sha256 == released.config_sha256
    # every training setting travels with the release, beyond the card's one-line recipe
    assert again["training_config"] == {"model": "x"}
    assert json.loads((tmp_path / "r2" / "metrics.json").read_text())["training_config"]
    assert "`training_config` in `metrics.json`" in (tmp_path / "r2" / "MODEL_CARD.md").read_text()


def test_behind_a_flipping_segmenter_the_temperature_is_fitted_on_flipped_logits(tmp_path):
    # The pair flips as a whole when either model was saved with flips: the classifier's class
    # logits are flip-averaged, so its temperature must be fitted on those.
    from skinray import calibration
    from skinray.evaluation import Evaluator, evaluate_samples

    torch.manual_seed(0)
    segmenter, trained = str(tmp_path / "segmenter"), str(tmp_path / "trained")
    unet = create_model("unet", **get_model_spec("unet").smoke_kwargs)
    save_model(unet, segmenter, input_size=(64, 64), test_time_flips=True)
    model = _decisive_classifier()
    save_model(model, trained, input_size=(64, 64), class_names=["a", "b", "c"])
    spec = ReleaseSpec(
        name="paired", title="t", data="synthetic", licence="none", recipe="smoke",
        segmenter=segmenter, holdout={"source": "synthetic", "root": None, "fraction": 0.2, "seed": 4},
    )  # fmt: skip
    samples = _labelled_by(trained, synthetic_samples(24, num_classes=3))
    report = release_model(trained, spec, samples, resamples=10, destination=str(tmp_path / "r"))
    pair = Predictor.load(segmenter, trained)
    assert pair.test_time_flips
    evaluator = Evaluator(["a", "b", "c"])
    evaluate_samples(pair, samples, evaluator=evaluator)
    labels, probabilities = evaluator.labels_and_probabilities()
    expected = calibration.fit_temperature(np.log(np.clip(probabilities, 1e-12, 1)), labels)
    assert report["calibration"]["temperature"] == pytest.approx(expected, rel=1e-6)
    card = (tmp_path / "r" / "MODEL_CARD.md").read_text()
    assert "- Test-time flips: on (" in card and "the segmenter's setting" in card


def test_weights_stay_float32_where_halving_them_moves_a_figure(tmp_path, monkeypatch):
    import safetensors.torch

    from skinray.models import release

    torch.manual_seed(0)
    model = create_model("unet", **get_model_spec("unet").smoke_kwargs)
    save_model(model, str(tmp_path / "trained"), input_size=(64, 64))
    spec = ReleaseSpec(name="s", title="t", data="synthetic", licence="none", recipe="smoke")
    monkeypatch.setattr(release, "_largest_change", lambda fp32, fp16: 0.02)  # > FP16_TOLERANCE
    samples = synthetic_samples(4, num_classes=3)
    report = release_model(
        str(tmp_path / "trained"), spec, samples, resamples=5, destination=str(tmp_path / "r")
    )
    assert (report["weights_dtype"], report["fp16_change"]) == ("float32", 0.02)
    weights = safetensors.torch.load_file(str(tmp_path / "r" / "model.safetensors"))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    card = (tmp_path / "r" / "MODEL_CARD.md").read_text()
    assert "`model.safetensors`, float32 (fp16 against fp32" in card
    # A segmenter's card says at what resolution its masks were compared, and no temperature.
    assert "compared with the truth resized to the model's 64×64 input" in card
    assert "fitted the temperature" not in card


def _decisive_classifier():
    """The smoke classifier with its last layer's weights ×30: at initialisation its logits are
    so flat that the fitted temperature sits at its lower bound with flips on or off (0.05 either
    way), and a test of what it was fitted on could not fail. ×30 gives 1.41 with flips and 3.29
    without on the tests' images."""
    model = create_model("classifier", **get_model_spec("classifier").smoke_kwargs)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(30)
    return model


def _labelled_by(model_uri: str, samples):
    """``samples`` relabelled so that a random network is informative but not always right: its
    own predicted class for two images in three, the next class for the third (a temperature
    inside the fitting bounds)."""
    import pyarrow as pa

    from skinray.data.datasets import SampleTable

    predicted = Predictor.load(model_uri)(_decoded(samples)).class_probabilities.argmax(1).numpy()
    labels = [(int(c) + (i % 3 == 2)) % 3 for i, c in enumerate(predicted)]
    rows = samples.rows.set_column(
        samples.rows.schema.get_field_index("label"), "label", pa.array(labels, pa.int64())
    )
    return SampleTable(rows, samples.class_names)


def test_a_split_that_cannot_fit_a_temperature_is_refused_before_anything_is_written(tmp_path):
    # A random classifier's validation NLL falls all the way to the search's bound: that bound
    # would have shipped as its temperature (0.05: twenty times sharper than trained).
    torch.manual_seed(0)
    model = create_model("classifier", **get_model_spec("classifier").smoke_kwargs)
    save_model(model, str(tmp_path / "trained"), input_size=(64, 64), class_names=["a", "b", "c"])
    spec = ReleaseSpec(name="x", title="x", data="synthetic", licence="none", recipe="smoke")
    samples = synthetic_samples(24, num_classes=3)
    with pytest.raises(CalibrationError, match="cannot fit a temperature"):
        release_model(str(tmp_path / "trained"), spec, samples, destination=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
