"""Augmentation presets move the image and its mask together and end at the model's input size."""

from __future__ import annotations

import pytest
import torch

from skinray.data.synthetic import synthetic_batch
from skinray.data.transforms import PRESETS, augment_batch, augmentation, normalise


def _batch(count: int = 6, size: int = 96):
    images, masks, _ = synthetic_batch(count, size, seed=4)
    return torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(masks)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_ends_at_the_input_size_and_keeps_the_mask_binary(preset):
    images, masks = _batch()
    torch.manual_seed(0)
    out_images, out_masks = augment_batch(augmentation(preset, (64, 80)), images, masks)
    assert out_images.shape == (6, 3, 64, 80) and out_images.dtype == torch.uint8
    assert out_masks.shape == (6, 64, 80)
    assert set(out_masks.unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("preset", ["mbdcnn", "two_step", "flips"])
def test_geometry_moves_image_and_mask_together(preset):
    # The lesion is the darkest region: after augmentation it must still sit under the mask.
    images, masks = _batch(8)
    torch.manual_seed(1)
    out_images, out_masks = augment_batch(augmentation(preset, (96, 96)), images, masks)
    brightness = out_images.float().mean(1)
    for image_brightness, mask in zip(brightness, out_masks.bool(), strict=True):
        skin = ~mask & (image_brightness > 0)  # affine transforms fill uncovered corners with black
        if mask.sum() < 50 or skin.sum() < 50:
            continue
        assert image_brightness[mask].mean() < image_brightness[skin].mean() - 15


def test_flips_really_flip():
    images, masks = _batch(1)
    transform = augmentation("flips", (96, 96))
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        _, out = augment_batch(transform, images, masks)
        seen.add(bytes(out.numpy().tobytes()))
    assert len(seen) >= 3  # identity, horizontal, vertical, both


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(
        ValueError, match="unknown augmentation preset 'rotate'; presets: none, flips"
    ):
        augmentation("rotate", (64, 64))


def test_normalise_uses_the_encoder_statistics():
    images = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalise(images, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    assert out[0, :, 0, 0].tolist() == [2.0, 1.0, 0.5]
