"""Skin tone of the skin around a lesion: the individual typology angle (ITA) and its category.

ITA = arctan((L* − 50) / b*) in degrees, from the CIELab colour of the skin (Chardon et al., Int. J.
Cosmet. Sci. 1991), with the categories of Del Bino & Bernerd (Br. J. Dermatol. 2013): very light
> 55°, light 41–55°, intermediate 28–41°, tan 10–28°, brown −30–10°, dark < −30°. Dermatology
fairness studies measure it on the non-lesion skin of each image (Kinyanjui et al., MICCAI 2020).

The lesion, a margin around it, and the black vignette of a dermoscope's field stop are left out;
the angle is taken from the median L* and b* of the skin that remains, so hair and glare (a minority
of the pixels) barely move it. It is computed with arctan2, so skin that reads bluish (b* < 0, a cold
white balance: HAM10000 images with their masks gave a median of 75° and a 95th percentile of 119°
over 200 images) comes out above 90°, very light, where arctan of the ratio would call it dark.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["ITA_CATEGORIES", "individual_typology_angle", "ita_category"]

#: (lower bound in degrees, name), from the lightest category down.
ITA_CATEGORIES = (
    (55.0, "very_light"),
    (41.0, "light"),
    (28.0, "intermediate"),
    (10.0, "tan"),
    (-30.0, "brown"),
    (-np.inf, "dark"),
)
#: Pixels darker than this L* are the dermoscope's vignette or shadow, not skin.
VIGNETTE_LIGHTNESS = 15.0
#: Skin pixels needed for an angle; with fewer (a lesion filling the frame) there is none.
MIN_SKIN_FRACTION = 0.02


def individual_typology_angle(
    image: np.ndarray, lesion_mask: np.ndarray | None = None, margin_fraction: float = 0.05
) -> float:
    """ITA in degrees of the skin in an RGB uint8 ``image`` (H, W, 3), outside ``lesion_mask``
    (H, W, non-zero on the lesion) grown by ``margin_fraction`` of the image's shorter side; NaN
    where too little skin is left."""
    lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)  # L* 0–100
    skin = lab[..., 0] >= VIGNETTE_LIGHTNESS
    if lesion_mask is not None and lesion_mask.any():
        lesion = (lesion_mask > 0).astype(np.uint8)
        radius = max(1, round(margin_fraction * min(lesion.shape)))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        skin &= cv2.dilate(lesion, kernel) == 0
    if skin.mean() < MIN_SKIN_FRACTION:
        return float("nan")
    lightness, yellowness = np.median(lab[..., 0][skin]), np.median(lab[..., 2][skin])
    return float(np.degrees(np.arctan2(lightness - 50.0, yellowness)))


def ita_category(angle: float) -> str | None:
    """The skin-tone category of an ITA (None for NaN)."""
    if np.isnan(angle):
        return None
    return next(name for bound, name in ITA_CATEGORIES if angle > bound)
