"""The released models (``models/``): they load by name, their files match their cards,
they fit the size limits, and on 10 fixed real images they still give the outputs recorded when
they were released (``tests/fixtures/released/<name>.npz``, written by ``jobs/release.py``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from skinray.models import load_model
from skinray.models.release import regression_outputs
from skinray.models.zoo import DEFAULT_SEGMENTER, released_models, zoo_root
from skinray.predict import Predictor

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURES = Path(__file__).parent / "fixtures" / "released"
MiB = 1024 * 1024


def test_the_default_segmenter_is_released():
    assert DEFAULT_SEGMENTER in released_models()


def test_released_models_fit_the_size_limits():
    sizes = {
        name: sum(f.stat().st_size for f in (zoo_root() / name).iterdir())
        for name in released_models()
    }
    assert all(size <= 15 * MiB for size in sizes.values()), sizes
    assert sum(sizes.values()) <= 40 * MiB, sizes


@pytest.mark.parametrize("name", released_models())
def test_weights_match_config_and_card(name):
    folder = zoo_root() / name
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    model = load_model(name)  # refuses a weights file whose hash differs from config.json
    assert model.saved_config.weights_sha256 == digest
    assert digest in (folder / "MODEL_CARD.md").read_text()


@pytest.mark.parametrize("name", released_models())
def test_every_training_setting_is_beside_the_card(name):
    # The card's recipe line is a summary; metrics.json holds every setting of the run, which
    # must be the run the summary describes.
    import json

    from skinray.train.config import TrainConfig, recipe_summary

    folder = zoo_root() / name
    config = TrainConfig.model_validate(
        json.loads((folder / "metrics.json").read_text())["training_config"]
    )
    assert f"- Recipe: {recipe_summary(config)}." in (folder / "MODEL_CARD.md").read_text()


@pytest.mark.parametrize("name", released_models())
def test_outputs_on_fixed_real_images_are_unchanged(name):
    fixture = np.load(FIXTURES / f"{name}.npz")
    segmenter = str(fixture["segmenter"])
    predictor = Predictor.load(segmenter, name) if segmenter else Predictor.load(name)
    images = [str(SHARED_DATA / relative) for relative in fixture["image"]]
    assert len(images) == 10
    outputs = regression_outputs(predictor, images)
    if "mask" in fixture:
        expected, got = fixture["mask"].astype(bool), outputs["mask"].astype(bool)
        union = (expected | got).sum((1, 2))
        jaccard = np.where(union > 0, (expected & got).sum((1, 2)) / np.maximum(union, 1), 1.0)
        assert jaccard.min() >= 0.99, jaccard
    if "class_probabilities" in fixture:
        np.testing.assert_allclose(
            outputs["class_probabilities"], fixture["class_probabilities"], atol=1e-4
        )
