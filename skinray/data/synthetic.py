"""Deterministic dermoscopy-like images with exact lesion masks, for tests and smoke runs.

Each image has a skin-toned background with mild texture, one darker irregular lesion (a star-shaped
polygon with a few random harmonics on its radius), dark hairs drawn over everything, and the radial
vignetting of a dermatoscope's lens. The mask is the lesion polygon exactly: hairs cross it without
changing it, as in real annotations.

The class label shows in the lesion itself, so a classifier has something to learn and class activation
maps have something to find: class 0 is a uniform light-brown lesion, class 1 a dark lesion with
blue-grey globules, class 2 a reddish lesion with a darker network; further classes cycle the hue.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

__all__ = ["SyntheticSample", "synthetic_batch", "synthetic_sample"]

_SKIN_TONES = np.array([[224, 180, 150], [210, 160, 130], [190, 140, 110], [235, 200, 175]], float)
_LESION_BASE = np.array([[150, 100, 70], [80, 50, 40], [160, 70, 70]], float)


@dataclass(frozen=True)
class SyntheticSample:
    image: np.ndarray  # H×W×3 uint8 RGB
    mask: np.ndarray  # H×W uint8, 1 inside the lesion
    label: int
    seed: int


def synthetic_sample(
    seed: int,
    size: int | tuple[int, int] = 128,
    label: int | None = None,
    num_classes: int = 3,
    hairs: int | None = None,
) -> SyntheticSample:
    """One image, its mask and its label, fully determined by ``seed`` (and the other arguments)."""
    height, width = (size, size) if isinstance(size, int) else size
    if height < 16 or width < 16:
        raise ValueError(f"synthetic images need at least 16×16 pixels, got {height}×{width}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    rng = np.random.default_rng(seed)
    if label is None:
        label = int(rng.integers(num_classes))
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} outside 0..{num_classes - 1}")

    image = _skin(rng, height, width)
    mask = _lesion_mask(rng, height, width)
    image = _paint_lesion(rng, image, mask, label)
    image = _draw_hairs(rng, image, rng.integers(2, 7) if hairs is None else hairs)
    image = _vignette(image, strength=rng.uniform(0.15, 0.35))
    noise = rng.normal(0.0, 3.0, image.shape)
    image = np.clip(image + noise, 0, 255).astype(np.uint8)
    return SyntheticSample(image=image, mask=mask, label=label, seed=seed)


def synthetic_batch(
    count: int, size: int | tuple[int, int] = 128, num_classes: int = 3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``count`` samples stacked: images N×H×W×3 uint8, masks N×H×W uint8, labels N int64.

    Labels cycle through the classes so every class is present once ``count >= num_classes``.
    """
    samples = [
        synthetic_sample(seed + i, size, label=i % num_classes, num_classes=num_classes)
        for i in range(count)
    ]
    return (
        np.stack([s.image for s in samples]),
        np.stack([s.mask for s in samples]),
        np.array([s.label for s in samples], dtype=np.int64),
    )


def _skin(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    tone = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] + rng.normal(0, 6, 3)
    texture = cv2.GaussianBlur(rng.normal(0, 8, (height, width)).astype(np.float32), (0, 0), 3)
    return tone[None, None, :] + texture[..., None]


def _lesion_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    short_side = min(height, width)
    radius = rng.uniform(0.18, 0.32) * short_side
    centre = np.array([width, height]) / 2 + rng.uniform(-0.12, 0.12, 2) * short_side
    angles = np.linspace(0, 2 * np.pi, 180, endpoint=False)
    harmonics = np.arange(2, 7)
    amplitudes = rng.uniform(0.02, 0.12, harmonics.size) / np.sqrt(harmonics - 1)
    phases = rng.uniform(0, 2 * np.pi, harmonics.size)
    wobble = (amplitudes[:, None] * np.cos(harmonics[:, None] * angles + phases[:, None])).sum(0)
    r = radius * (1 + wobble)
    points = np.stack([centre[0] + r * np.cos(angles), centre[1] + r * np.sin(angles)], axis=1)
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    return mask


def _paint_lesion(
    rng: np.random.Generator, image: np.ndarray, mask: np.ndarray, label: int
) -> np.ndarray:
    base = _LESION_BASE[label % len(_LESION_BASE)].copy()
    base = np.roll(base, label // len(_LESION_BASE)) + rng.normal(0, 5, 3)
    height, width = mask.shape
    lesion = np.broadcast_to(base, image.shape).copy()
    kind = label % len(_LESION_BASE)
    if kind == 1:  # blue-grey globules
        for _ in range(int(rng.integers(6, 14))):
            ys, xs = np.nonzero(mask)
            k = int(rng.integers(len(ys)))
            radius = max(1, int(min(height, width) * rng.uniform(0.015, 0.04)))
            cv2.circle(lesion, (int(xs[k]), int(ys[k])), radius, (90, 100, 130), -1)
    elif kind == 2:  # darker reticular network
        step = max(3, min(height, width) // 16)
        lesion[::step, :, :] *= 0.6
        lesion[:, ::step, :] *= 0.6
    # Soft edge inside the exact mask: real lesions fade into skin; the label stays the polygon.
    edge = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(1.0, min(height, width) / 96))
    alpha = (edge * mask)[..., None]
    return image * (1 - alpha) + lesion * alpha


def _draw_hairs(rng: np.random.Generator, image: np.ndarray, count: int) -> np.ndarray:
    height, width = image.shape[:2]
    canvas = image.astype(np.float32).copy()
    thickness = max(1, min(height, width) // 128)
    for _ in range(int(count)):
        start = rng.uniform([0, 0], [width, height])
        heading = rng.uniform(0, 2 * np.pi)
        points = [start]
        for _ in range(12):
            heading += rng.normal(0, 0.15)
            step = min(height, width) / 10
            points.append(points[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
        colour = float(rng.uniform(20, 60))
        cv2.polylines(
            canvas,
            [np.round(points).astype(np.int32)],
            isClosed=False,
            color=(colour, colour * 0.9, colour * 0.8),
            thickness=thickness,
            lineType=cv2.LINE_AA,
        )
    return canvas


def _vignette(image: np.ndarray, strength: float) -> np.ndarray:
    height, width = image.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    distance = np.hypot((yy - height / 2) / (height / 2), (xx - width / 2) / (width / 2)) / np.sqrt(
        2
    )
    return image * (1 - strength * distance**2)[..., None]
