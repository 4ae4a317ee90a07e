"""The ROI classifier's cached training masks: the segmenter's own prediction of each image, made
once per segmenter and size, never the ground truth."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
import torch

from skinray.data.datasets import read_manifest
from skinray.data.synthetic import synthetic_sample
from skinray.data.transforms import normalise
from skinray.models import load_model
from skinray.models.serialization import write_model_config
from skinray.models.two_step import predicted_lesion, segment_at
from skinray.train.roi_masks import cache_predicted_masks

CLASSES = ("melanoma", "seborrheic_keratosis", "nevus")
SIZE = (72, 88)


@pytest.fixture
def manifest(tmp_path) -> str:
    lines = ["image,mask,label"]
    for seed in range(5):
        sample = synthetic_sample(seed, (90, 120), label=seed % 3)
        cv2.imwrite(str(tmp_path / f"{seed}.png"), cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(tmp_path / f"{seed}_mask.png"), sample.mask * 255)
        lines.append(f"{seed}.png,{seed}_mask.png,{CLASSES[seed % 3]}")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken_mask.png").write_bytes(cv2.imencode(".png", np.zeros((4, 4), np.uint8))[1])
    lines.append("broken.png,broken_mask.png,nevus")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "manifest.csv")


@pytest.fixture
def segmenter(fitted_segmenter, tmp_path) -> str:
    # A copy: the test rewrites its config. A random one marks nearly every pixel, and any cache
    # would agree with it.
    return str(shutil.copytree(fitted_segmenter, tmp_path / "segmenter"))


def test_cached_masks_are_the_segmenters_prediction_and_are_made_once(
    manifest, segmenter, tmp_path
):
    samples = read_manifest(manifest, list(CLASSES))
    run = str(tmp_path / "run")
    cached = cache_predicted_masks(samples, segmenter, SIZE, run, batch_size=2)

    uris = cached.rows["mask_uri"].to_pylist()
    assert uris[-1] is None  # the unreadable image: training skips it
    assert all(uri.startswith(run) and uri.endswith(".png") for uri in uris[:-1])
    assert cached.rows["image_uri"].equals(samples.rows["image_uri"])

    model = load_model(segmenter)
    config = model.saved_config
    for i, uri in enumerate(uris[:-1]):
        image = cv2.cvtColor(cv2.imread(str(tmp_path / f"{i}.png")), cv2.COLOR_BGR2RGB)
        image = cv2.resize(image, SIZE[::-1], interpolation=cv2.INTER_AREA)
        x = normalise(torch.from_numpy(image).permute(2, 0, 1)[None], config.mean, config.std)
        with torch.no_grad():
            expected = predicted_lesion(segment_at(model, x, config.input_size), 0.5)[0].numpy()
        stored = cv2.imread(uri, cv2.IMREAD_GRAYSCALE)
        assert stored.shape == SIZE
        # the decoder's resize may differ from cv2's by a pixel value: nearly all pixels agree
        assert np.mean((stored > 127) == expected) > 0.99
        truth = cv2.imread(str(tmp_path / f"{i}_mask.png"), cv2.IMREAD_GRAYSCALE)
        assert not np.array_equal(stored > 127, cv2.resize(truth, SIZE[::-1]) > 127)

    written = {uri: cv2.imread(uri, cv2.IMREAD_UNCHANGED) for uri in uris[:-1]}
    for uri in written:
        cv2.imwrite(uri, np.full(SIZE, 255, np.uint8))  # mark: a second call must not rewrite
    again = cache_predicted_masks(samples, segmenter, SIZE, run)
    assert again.rows["mask_uri"].to_pylist() == uris
    assert all(cv2.imread(uri, cv2.IMREAD_GRAYSCALE).min() == 255 for uri in written)

    other = cache_predicted_masks(samples, segmenter, (64, 64), run)
    assert set(other.rows["mask_uri"].to_pylist()[:-1]).isdisjoint(uris)

    # The same weights under another mask threshold predict other masks: not the cached ones.
    write_model_config(segmenter, config.replace(mask_threshold=0.9))
    stricter = cache_predicted_masks(samples, segmenter, SIZE, run)
    assert set(stricter.rows["mask_uri"].to_pylist()[:-1]).isdisjoint(uris)


def test_images_of_one_file_name_in_two_folders_get_their_own_cached_masks(segmenter, tmp_path):
    # Cached by file name alone, b/0.png would have been given a/0.png's predicted mask.
    lines = ["image,label"]
    for folder, seed in (("a", 1), ("b", 4)):  # lesions in other places
        (tmp_path / folder).mkdir()
        sample = synthetic_sample(seed, (90, 120), label=0)
        cv2.imwrite(str(tmp_path / folder / "0.png"), cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR))
        lines.append(f"{folder}/0.png,melanoma")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    samples = read_manifest(str(tmp_path / "m.csv"), list(CLASSES), require_masks=False)
    cached = cache_predicted_masks(samples, segmenter, SIZE, str(tmp_path / "run"))
    first, second = cached.rows["mask_uri"].to_pylist()
    assert first != second
    assert not np.array_equal(cv2.imread(first, 0), cv2.imread(second, 0))
