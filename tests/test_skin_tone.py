"""ITA of synthetic skin of known CIELab colour, with a lesion, hair and a dermoscope's vignette."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from skinray.skin_tone import individual_typology_angle, ita_category

SIZE = 192


def _skin(lightness: float, a: float, b: float, seed: int = 0) -> np.ndarray:
    """An RGB uint8 image of skin of CIELab colour (L*, a*, b*) with a little texture."""
    rng = np.random.default_rng(seed)
    lab = np.empty((SIZE, SIZE, 3), np.float32)
    lab[..., 0] = lightness + rng.normal(0, 1.5, (SIZE, SIZE))
    lab[..., 1], lab[..., 2] = a, b
    rgb = cv2.cvtColor(lab, cv2.COLOR_Lab2RGB)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def _with_lesion(image: np.ndarray, colour=(70, 40, 25)) -> tuple[np.ndarray, np.ndarray]:
    image, mask = image.copy(), np.zeros(image.shape[:2], np.uint8)
    cv2.ellipse(mask, (SIZE // 2, SIZE // 2), (50, 35), 20, 0, 360, 1, -1)
    image[mask > 0] = colour
    return image, mask


def _true_ita(lightness: float, b: float) -> float:
    return math.degrees(math.atan((lightness - 50) / b))


# Very light to dark skin (Del Bino & Bernerd's categories), each with its true angle.
TONES = [(80, 6, 14), (70, 8, 16), (62, 9, 18), (55, 11, 20), (45, 12, 21), (32, 10, 16)]


@pytest.mark.parametrize(("lightness", "a", "b"), TONES)
def test_ita_of_known_skin_is_within_three_degrees_and_ignores_the_lesion(lightness, a, b):
    image, mask = _with_lesion(_skin(lightness, a, b))
    truth = _true_ita(lightness, b)
    assert individual_typology_angle(image, mask) == pytest.approx(truth, abs=3)
    # A different lesion colour gives the same angle: the lesion is left out.
    blue_lesion, _ = _with_lesion(_skin(lightness, a, b), colour=(40, 60, 160))
    assert individual_typology_angle(blue_lesion, mask) == pytest.approx(
        individual_typology_angle(image, mask), abs=0.2
    )


def test_without_the_mask_a_large_dark_lesion_would_pull_the_angle_down():
    # The counterpart of the test above: the mask is what keeps the lesion out.
    image, mask = _with_lesion(_skin(70, 8, 16))
    mask[:] = 0
    cv2.circle(mask, (SIZE // 2, SIZE // 2), 80, 1, -1)
    image[mask > 0] = (70, 40, 25)
    assert individual_typology_angle(image, mask) == pytest.approx(_true_ita(70, 16), abs=3)
    assert individual_typology_angle(image, None) < _true_ita(70, 16) - 10


def test_vignette_and_hair_do_not_move_the_angle():
    image, mask = _with_lesion(_skin(62, 9, 18))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    image[(yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 > (0.55 * SIZE) ** 2] = 0  # field stop
    for k in range(6):  # dark hairs across the skin
        cv2.line(image, (0, 20 + 30 * k), (SIZE, 40 + 30 * k), (30, 25, 20), 2)
    assert individual_typology_angle(image, mask) == pytest.approx(_true_ita(62, 18), abs=3)


def test_categories_follow_del_bino():
    angles = [60, 50, 30, 20, 0, -40]
    names = ["very_light", "light", "intermediate", "tan", "brown", "dark"]
    assert [ita_category(a) for a in angles] == names
    assert [ita_category(_true_ita(L, b)) for L, _, b in TONES] == names
    assert ita_category(float("nan")) is None


def test_a_lesion_filling_the_frame_has_no_angle():
    image = _skin(62, 9, 18)
    assert math.isnan(individual_typology_angle(image, np.ones((SIZE, SIZE), np.uint8)))
