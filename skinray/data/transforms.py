"""Joint image + mask augmentation presets (torchvision transforms v2), one per paper.

Geometric transforms move the image and its ``tv_tensors.Mask`` together; photometric ones touch the
image only. Every preset ends at the model's input size; normalisation with the encoder's mean/std is a
separate step (:func:`normalise`) so evaluation and scoring share it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = ["PRESETS", "augmentation", "normalise"]


def _flips() -> list[v2.Transform]:
    return [v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]


def _mbdcnn(size: tuple[int, int]) -> list[v2.Transform]:
    # Sec. V-A: crop 50–100 % of the image, rotate 0–10°, shear ≤ 0.1 rad, shift ≤ 20 px, zoom to 110 %,
    # horizontal and vertical flips, then resize to the input size.
    height, width = size
    shear_degrees = math.degrees(0.1)
    return [
        v2.RandomResizedCrop(size, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
        v2.RandomAffine(
            degrees=10,
            translate=(20 / width, 20 / height),
            scale=(1.0, 1.1),
            shear=(-shear_degrees, shear_degrees, -shear_degrees, shear_degrees),
        ),
        *_flips(),
    ]


def _two_step(size: tuple[int, int]) -> list[v2.Transform]:
    # Innani et al. Sec. 4: rotation, shearing, zooming, brightness and flips (amounts unstated).
    return [
        v2.RandomAffine(degrees=20, shear=10, scale=(0.9, 1.1)),
        v2.ColorJitter(brightness=0.2),
        *_flips(),
    ]


def _dermoscopy(size: tuple[int, int]) -> list[v2.Transform]:
    # What ISIC challenge entries use beyond the papers' presets: a dermoscopy image has no "up", so
    # any rotation and both flips; scale and crop changes for lesion size; colour jitter for the
    # lighting and camera differences between clinics.
    return [
        v2.RandomResizedCrop(size, scale=(0.6, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
        v2.RandomAffine(degrees=180, shear=5),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
        *_flips(),
    ]


PRESETS = {
    "none": lambda size: [],
    "flips": lambda size: _flips(),  # CLNet Sec. 3.1: random up-down or left-right flips
    "clnet": lambda size: _flips(),
    "asnet": lambda size: [v2.RandomHorizontalFlip()],  # ASNet Sec. 2.5: left-right flips only
    "mbdcnn": _mbdcnn,
    "two_step": _two_step,
    "dermoscopy": _dermoscopy,
}


def augmentation(preset: str, size: Sequence[int]) -> v2.Compose:
    """The preset's transforms for (image uint8 (3,H,W), mask (H,W)) pairs, ending at ``size``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; presets: {', '.join(PRESETS)}")
    size = (int(size[0]), int(size[1]))
    return v2.Compose([*PRESETS[preset](size), v2.Resize(size, antialias=True)])


def augment_batch(
    transform: v2.Compose, images: torch.Tensor, masks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``transform`` per sample (each draws its own random parameters): images (N,3,H,W) uint8,
    masks (N,H,W)."""
    out_images, out_masks = [], []
    for image, mask in zip(images, masks, strict=True):
        image, mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        out_images.append(image.as_subclass(torch.Tensor))
        out_masks.append(mask.as_subclass(torch.Tensor))
    return torch.stack(out_images), torch.stack(out_masks)


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N,3,H,W) → float, scaled to [0, 1] then standardised with the encoder's statistics."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - mean_t) / std_t
