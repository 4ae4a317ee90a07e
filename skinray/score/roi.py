"""ABCD-style lesion descriptors: pure functions of (mask, image). (The two-step pipeline's lesion
ROI is defined once, in torch, in ``skinray.models.two_step``.)

Descriptors follow the ABCD rule of dermoscopy (Stolz et al. 1994: Asymmetry, Border, Colour,
Differential structures; Diameter in its common clinical variant). The shape descriptors are
computed on the mask's largest 8-connected component only, with OpenCV contours and moments, since
asymmetry and border of several blobs together describe their arrangement, not a lesion:

- ``lesion_area_fraction``: lesion pixels / all pixels, over the whole mask (every component).
- ``equivalent_diameter_px``: diameter of the circle with the largest component's area; in source
  pixels when ``source_size`` is given, else in mask pixels.
- ``asymmetry`` in [0, 1]: mirror the component about each of its two principal axes through the
  centroid (orientation from second-order central moments); the area that does not overlap its
  mirror image, over the area; the mean of the two axes. 0 for an ellipse or a circle; a shape
  symmetric about one axis only scores at most 0.5.
- ``border_irregularity``: compactness, perimeter² / (4π · area); 1 for a circle, larger for
  elongated or ragged borders. Only the outer border counts as perimeter; holes just lower
  the area (and so raise the value).
- ``colour_variegation``: mean over R, G, B of the standard deviation of the largest component's
  pixel values, in [0, 1] units; 0 for a uniformly coloured lesion, 0.5 at most. NaN without an
  image. (RGB rather than Lab: no colour-space conversion whose white point we would have to
  guess for dermatoscope images, and the value is easy to check by hand.)
- ``component_count``: 8-connected lesion components.

A segmenter's mask is usually the source image squashed to the model's square input: a circular
lesion on a 4:3 photo comes back as an ellipse, whose asymmetry is still 0 but whose border and
diameter are not the lesion's. Given ``source_size`` = the source's (height, width), the shape
descriptors (diameter, asymmetry, border, component count) are measured on the mask resampled to
the source's aspect ratio, so they describe the lesion as photographed. The area fraction and
colour variegation are pixel ratios and statistics, the same at any aspect, so they stay on the
mask (and image) as given.

An empty mask gives ``lesion_area_fraction`` 0, ``component_count`` 0 and NaN for the rest. Every
value is a plain Python float, so a row goes straight into an Arrow table.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = ["DESCRIPTOR_NAMES", "lesion_descriptors"]

DESCRIPTOR_NAMES = (
    "lesion_area_fraction",
    "equivalent_diameter_px",
    "asymmetry",
    "border_irregularity",
    "colour_variegation",
    "component_count",
)


def _as_mask(mask: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
    """A 2-D boolean mask (nonzero = lesion) of the image's height and width."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H,W); got shape {mask.shape}")
    if image is not None and image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    return mask.astype(bool)


def _largest_component(mask: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice], int]:
    """The largest 8-connected component cropped to its bounding box (uint8 0/1), that box as
    slices of the mask, and the number of components; an empty crop and 0 for an empty mask."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8
    )
    if count <= 1:
        return np.zeros((0, 0), np.uint8), (slice(0, 0), slice(0, 0)), 0
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, w, h = stats[largest, :4]
    box = (slice(y, y + h), slice(x, x + w))
    return (labels[box] == largest).astype(np.uint8), box, count - 1


def _asymmetry(component: np.ndarray) -> float:
    """Mean over the two principal axes of the area not overlapping the component's mirror image,
    over its area. The mirror is one nearest-neighbour warp; only overlap with the component
    counts, so the component's own box is canvas enough."""
    moments = cv2.moments(component, binaryImage=True)
    area = moments["m00"]
    centre = np.array([moments["m10"] / area, moments["m01"] / area])
    # Orientation of the major axis from the second-order central moments.
    theta = 0.5 * math.atan2(2 * moments["mu11"], moments["mu20"] - moments["mu02"])
    c, s = math.cos(2 * theta), math.sin(2 * theta)
    height, width = component.shape
    mismatches = []
    # Reflection about the line through the centroid at angle θ is p ↦ R(p - centre) + centre with
    # R = [[cos 2θ, sin 2θ], [sin 2θ, -cos 2θ]]; about the perpendicular axis it is -R.
    for reflection in (np.array([[c, s], [s, -c]]), np.array([[-c, -s], [-s, c]])):
        affine = np.hstack([reflection, (centre - reflection @ centre)[:, None]])
        mirrored = cv2.warpAffine(component, affine, (width, height), flags=cv2.INTER_NEAREST)
        overlap = int(np.count_nonzero(component & mirrored))
        mismatches.append(1.0 - overlap / area)
    return float(np.clip(np.mean(mismatches), 0.0, 1.0))


def _perimeter(component: np.ndarray) -> float:
    """Length of the outer border, as a pixel-edge outline would measure it.

    The 8-connected contour through boundary pixels' centres is a staircase that overstates a
    smooth border by ~10 % (a digitised circle would score 1.1); a polygon that follows it within
    1 px removes the staircase. That polygon runs half a pixel inside the lesion's edge, and
    moving a simple closed curve ½ px outward adds 2π·½ = π to its length (Steiner's formula):
    a 100×200 rectangle then measures 599.1 against 600, a circle of radius 50 scores 1.01.
    """
    contours, _ = cv2.findContours(component, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = cv2.approxPolyDP(max(contours, key=cv2.contourArea), 1.0, closed=True)
    return cv2.arcLength(outline, closed=True) + math.pi


def _at_source_aspect(
    mask: np.ndarray, source_size: tuple[int, int] | None
) -> tuple[np.ndarray, float]:
    """The mask resampled to the source's aspect ratio (bilinear, thresholded at ½: smoother
    than nearest-neighbour), and the factor from that grid's pixels to source pixels."""
    if source_size is None or tuple(source_size) == mask.shape:
        return mask, 1.0
    if len(source_size) != 2 or min(source_size) < 1:
        raise ValueError(f"source_size must be (height, width) >= 1, got {source_size}")
    source_h, source_w = source_size
    # The mask's coarser sampling of the source (for a square mask: long side = the mask's long
    # side), so the grid only ever shrinks the mask. Stretching an axis (e.g. to keep the pixel
    # count) stretches its pixel staircase into steps the perimeter reads as a ragged border: a
    # circle on a 3:2 source scored 1.027 that way, 1.017 this way. Never finer than the source.
    scale = min(1.0, mask.shape[0] / source_h, mask.shape[1] / source_w)
    grid_h, grid_w = max(1, round(source_h * scale)), max(1, round(source_w * scale))
    resized = cv2.resize(mask.astype(np.float32), (grid_w, grid_h), interpolation=cv2.INTER_LINEAR)
    return resized >= 0.5, source_h / grid_h


def _colour_variegation(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean over R, G, B of the largest component's pixel standard deviation, in [0, 1] units."""
    component, box, count = _largest_component(mask)
    if count == 0:
        return float("nan")
    _, channel_std = cv2.meanStdDev(np.ascontiguousarray(image[box]), mask=component)
    return float(channel_std.mean() / 255.0)


def lesion_descriptors(
    mask: np.ndarray,
    image: np.ndarray | None = None,
    *,
    source_size: tuple[int, int] | None = None,
) -> dict[str, float]:
    """ABCD-style descriptors (Stolz et al. 1994) of the lesion in ``mask`` (nonzero = lesion),
    keyed by ``DESCRIPTOR_NAMES`` in that order; see the module docstring for each definition.
    ``image`` (H×W×3 uint8 RGB, the mask's size), when given, adds ``colour_variegation``.
    ``source_size`` = (height, width) of the image the mask was predicted from, when given, has
    the shape descriptors measured at its aspect ratio and the diameter in its pixels.

    Shapes under ~5 px across are too coarse for asymmetry and border to mean much (a single
    pixel scores a compactness of π/4); the values are still computed, not hidden.
    """
    mask = _as_mask(mask, image)
    if image is not None and (image.dtype != np.uint8 or image.ndim != 3):
        raise ValueError(f"image must be H×W×3 uint8; got {image.dtype} {image.shape}")
    nan = float("nan")
    grid, to_source_px = _at_source_aspect(mask, source_size)
    component, _, count = _largest_component(grid)
    results = {
        "lesion_area_fraction": float(mask.mean()),
        "equivalent_diameter_px": nan,
        "asymmetry": nan,
        "border_irregularity": nan,
        "colour_variegation": nan,
        "component_count": float(count),
    }
    if count > 0:
        area = float(np.count_nonzero(component))
        results["equivalent_diameter_px"] = to_source_px * math.sqrt(4 * area / math.pi)
        results["asymmetry"] = _asymmetry(component)
        results["border_irregularity"] = float(_perimeter(component) ** 2 / (4 * math.pi * area))
    if image is not None:
        results["colour_variegation"] = _colour_variegation(image, mask)
    return results
