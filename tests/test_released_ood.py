"""The released classifier's out-of-distribution flag and uncertainty on real images: flagged
non-dermoscopy, unflagged HAM10000 validation images, and more uncertainty when images degrade."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from skinray.data.datasets import read_split
from skinray.data.loading import decode_samples
from skinray.data.non_dermoscopy import non_dermoscopy_images
from skinray.predict import Predictor
from skinray.uncertainty import normalised_entropy

HAM10000 = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"


@pytest.fixture(scope="module")
def classifier() -> Predictor:
    return Predictor.load("ham10000-classifier")


@pytest.fixture(scope="module")
def validation_images(classifier) -> np.ndarray:
    """Every 5th image of the lesion-grouped validation split (256 of 1,276)."""
    samples = read_split("ham10000", str(HAM10000), "validation")
    every_fifth = samples.take(np.arange(0, len(samples.rows), 5))
    decoded = decode_samples(every_fifth.rows.to_pydict(), classifier.input_size, 7)
    assert decoded["ok"].all()
    return decoded["image"]


def _predict(classifier: Predictor, images) -> tuple[torch.Tensor, torch.Tensor]:
    scores, entropies = [], []
    for start in range(0, len(images), 64):
        prediction = classifier(images[start : start + 64])
        scores.append(prediction.ood_score)
        entropies.append(normalised_entropy(prediction.class_probabilities))
    return torch.cat(scores), torch.cat(entropies)


def test_non_dermoscopy_images_are_flagged(classifier):
    images = non_dermoscopy_images()
    scores, _ = _predict(classifier, list(images.values()))
    flagged = classifier.ood.flags(scores)
    missed = [name for name, flag in zip(images, flagged.tolist(), strict=True) if not flag]
    assert flagged.float().mean().item() >= 0.9, missed


def test_validation_images_pass(classifier, validation_images):
    scores, _ = _predict(classifier, validation_images)
    assert (~classifier.ood.flags(scores)).float().mean().item() >= 0.95


def test_blurring_and_noise_raise_the_distance_from_the_training_data(
    classifier, validation_images
):
    originals = validation_images[:48]
    rng = np.random.default_rng(0)
    blurred = np.stack([cv2.GaussianBlur(image, (0, 0), 3) for image in originals])
    noised = np.clip(originals + rng.normal(0, 25, originals.shape), 0, 255).astype(np.uint8)
    base, base_entropy = _predict(classifier, originals)
    for degraded in (blurred, noised):
        scores, _ = _predict(classifier, degraded)
        assert scores.mean() > base.mean()
        assert (scores > base).float().mean().item() >= 0.75
    # The classifier grows less sure of blurred images; noise makes it *more* sure (entropy falls),
    # which is why the OOD score, not the entropy, is the uncertainty that catches it.
    _, blurred_entropy = _predict(classifier, blurred)
    assert blurred_entropy.mean() > base_entropy.mean()
