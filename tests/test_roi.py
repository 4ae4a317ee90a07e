"""ROI extraction and ABCD lesion descriptors on shapes whose answers can be worked out by hand."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from skinray.data.synthetic import synthetic_sample
from skinray.score.roi import DESCRIPTOR_NAMES, lesion_descriptors

SHAPE_DESCRIPTORS = ("equivalent_diameter_px", "asymmetry", "border_irregularity")


def _canvas(size: int = 200) -> np.ndarray:
    return np.zeros((size, size), np.uint8)


def _circle(radius: int = 50) -> np.ndarray:
    mask = _canvas()
    cv2.circle(mask, (100, 100), radius, 1, -1)
    return mask


# Descriptors


@pytest.mark.parametrize("radius", [10, 50, 90])
def test_a_filled_circle_has_diameter_2r_no_asymmetry_and_compactness_one(radius):
    d = lesion_descriptors(_circle(radius))
    assert d["equivalent_diameter_px"] == pytest.approx(2 * radius, rel=0.02)
    assert d["asymmetry"] < 0.05
    assert 0.95 < d["border_irregularity"] < 1.15
    assert d["component_count"] == 1.0


@pytest.mark.parametrize("angle_deg", [0, 30, 77])
def test_an_ellipse_is_symmetric_at_any_angle_and_its_compactness_matches_its_perimeter(
    angle_deg,
):
    mask = _canvas()
    cv2.ellipse(mask, (100, 100), (70, 30), angle_deg, 0, 360, 1, -1)
    d = lesion_descriptors(mask)
    assert d["asymmetry"] < 0.05
    a, b = 70, 30  # Ramanujan's perimeter of an ellipse; area πab
    perimeter = math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))
    expected = perimeter**2 / (4 * math.pi * math.pi * a * b)  # ≈ 1.29
    assert d["border_irregularity"] == pytest.approx(expected, rel=0.03)


def test_a_rectangle_has_the_compactness_of_its_side_lengths():
    mask = _canvas()
    mask[50:100, 20:180] = 1  # 50 × 160: perimeter 420, area 8000
    d = lesion_descriptors(mask)
    assert d["border_irregularity"] == pytest.approx(420**2 / (4 * math.pi * 8000), rel=0.01)
    assert d["asymmetry"] == pytest.approx(0.0, abs=0.01)


def test_an_l_shape_is_asymmetric_and_irregular():
    mask = _canvas()
    mask[30:170, 50:80] = 1  # a 140-long upright arm
    mask[140:170, 50:130] = 1  # and an 80-long foot: no mirror line at all
    circle, l_shape = lesion_descriptors(_circle()), lesion_descriptors(mask)
    assert l_shape["asymmetry"] > 0.2
    assert l_shape["asymmetry"] > circle["asymmetry"] + 0.2
    assert l_shape["border_irregularity"] > circle["border_irregularity"] + 1.0


def test_a_circle_with_a_bite_out_is_more_asymmetric_and_irregular_than_the_circle():
    bitten = _circle(50)
    cv2.circle(bitten, (140, 130), 30, 0, -1)
    circle, d = lesion_descriptors(_circle(50)), lesion_descriptors(bitten)
    # Still mirror-symmetric about the line through both centres, which is a principal axis, so
    # that axis scores 0 and the mean over the two axes is half the other's mismatch (≈ 0.09).
    assert d["asymmetry"] > circle["asymmetry"] + 0.07
    assert d["border_irregularity"] > circle["border_irregularity"] + 0.2


def test_a_star_has_a_ragged_border():
    radii = [80 if i % 2 == 0 else 35 for i in range(16)]
    points = [
        (100 + r * math.cos(i * math.pi / 8), 100 + r * math.sin(i * math.pi / 8))
        for i, r in enumerate(radii)
    ]
    star = _canvas()
    cv2.fillPoly(star, [np.int32(points)], 1)
    assert lesion_descriptors(star)["border_irregularity"] > 1.5


def test_area_fraction_counts_every_pixel_of_the_mask():
    mask = np.zeros((100, 100), np.uint8)
    mask[10:30, 10:20] = 1  # 20 × 10 = 200 of 10 000 pixels
    assert lesion_descriptors(mask)["lesion_area_fraction"] == pytest.approx(0.02)


def test_two_blobs_are_two_components_and_shape_comes_from_the_larger():
    mask = np.zeros((100, 100), np.uint8)
    mask[10:30, 10:20] = 1  # 200 pixels
    mask[60:70, 60:70] = 1  # 100 pixels
    d = lesion_descriptors(mask)
    assert d["component_count"] == 2.0
    assert d["lesion_area_fraction"] == pytest.approx(0.03)  # both blobs
    assert d["equivalent_diameter_px"] == pytest.approx(math.sqrt(4 * 200 / math.pi))


def test_diagonal_neighbours_are_one_component():
    mask = np.eye(10, dtype=np.uint8)
    assert lesion_descriptors(mask)["component_count"] == 1.0


def test_a_uniform_lesion_has_no_colour_variegation_and_two_colours_have_half_their_gap():
    mask = _canvas()
    mask[50:150, 40:160] = 1
    uniform = np.full((200, 200, 3), (200, 100, 50), np.uint8)
    two_tone = uniform.copy()
    two_tone[:, 100:] = (100, 100, 50)  # the lesion's right half differs by 100 in red only
    assert lesion_descriptors(mask, uniform)["colour_variegation"] == pytest.approx(0.0, abs=1e-6)
    # Half the pixels at each value: red's std is 100/2 = 50, green's and blue's 0.
    expected = (50 / 255 + 0 + 0) / 3
    assert lesion_descriptors(mask, two_tone)["colour_variegation"] == pytest.approx(expected)


def test_colour_variegation_needs_an_image():
    assert math.isnan(lesion_descriptors(_circle())["colour_variegation"])


def test_colour_outside_the_lesion_does_not_count():
    image = np.zeros((200, 200, 3), np.uint8)
    image[_circle().astype(bool)] = (120, 80, 60)
    image[:10] = 255  # bright background far from the lesion
    assert lesion_descriptors(_circle(), image)["colour_variegation"] == pytest.approx(
        0.0, abs=1e-6
    )


def test_an_empty_mask_has_no_area_no_components_and_nan_shape():
    d = lesion_descriptors(_canvas(), np.zeros((200, 200, 3), np.uint8))
    assert d["lesion_area_fraction"] == 0.0 and d["component_count"] == 0.0
    assert all(math.isnan(d[name]) for name in (*SHAPE_DESCRIPTORS, "colour_variegation"))


def test_descriptors_are_python_floats_under_the_documented_names():
    for mask in (_circle(), _canvas()):
        d = lesion_descriptors(mask, np.zeros((200, 200, 3), np.uint8))
        assert tuple(d) == DESCRIPTOR_NAMES
        assert all(type(value) is float for value in d.values())


def test_descriptors_of_a_synthetic_dermoscopy_image_are_in_range():
    sample = synthetic_sample(7, 256)
    d = lesion_descriptors(sample.mask, sample.image)
    assert d["lesion_area_fraction"] == pytest.approx(float(sample.mask.mean()))
    assert d["component_count"] == 1.0
    assert 0.0 <= d["asymmetry"] < 0.3  # a blob with a few harmonics on its radius
    assert 1.0 < d["border_irregularity"] < 2.0
    assert 0.0 < d["colour_variegation"] < 0.5  # texture and hairs, never more than black/white


def test_descriptors_reject_an_image_of_another_size():
    with pytest.raises(ValueError, match="differ in size"):
        lesion_descriptors(_circle(), np.zeros((100, 100, 3), np.uint8))


# Descriptors at the source's aspect ratio


def _squashed_circle(height: int, width: int, radius: int = 120) -> np.ndarray:
    """A centred circle on a height × width source, as a model's 256 × 256 input holds it."""
    source = np.zeros((height, width), np.uint8)
    cv2.circle(source, (width // 2, height // 2), radius, 1, -1)
    return cv2.resize(source, (256, 256), interpolation=cv2.INTER_NEAREST)


@pytest.mark.parametrize("height, width", [(600, 600), (600, 800), (600, 900)], ids=str)
def test_a_circle_squashed_to_the_model_input_measures_as_the_source_circle(height, width):
    d = lesion_descriptors(_squashed_circle(height, width), source_size=(height, width))
    assert d["asymmetry"] < 0.02
    assert d["equivalent_diameter_px"] == pytest.approx(2 * 120, rel=0.02)
    assert d["border_irregularity"] == pytest.approx(1.0, abs=0.03)
    assert d["component_count"] == 1.0


def test_without_source_size_a_squashed_circle_measures_as_an_ellipse_in_mask_pixels():
    d = lesion_descriptors(_squashed_circle(600, 900))
    # Squashing 3:2 keeps the circle mirror-symmetric, so asymmetry cannot show it; the border
    # does (a 3:2 ellipse's compactness is ≈ 1.06), and so does the diameter: in mask pixels,
    # and neither axis's scale back to the source gives the circle's 240 px.
    assert d["asymmetry"] < 0.02
    assert d["border_irregularity"] > 1.05
    for source_px_per_mask_px in (600 / 256, 900 / 256):
        assert abs(d["equivalent_diameter_px"] * source_px_per_mask_px / 240 - 1) > 0.1


def test_source_size_leaves_area_fraction_and_colour_as_measured_on_the_mask():
    sample = synthetic_sample(7, 256)
    plain = lesion_descriptors(sample.mask, sample.image)
    at_source = lesion_descriptors(sample.mask, sample.image, source_size=(600, 900))
    for name in ("lesion_area_fraction", "colour_variegation"):
        assert at_source[name] == plain[name]


def test_a_source_size_equal_to_the_mask_changes_nothing():
    sample = synthetic_sample(4, 128)
    plain = lesion_descriptors(sample.mask, sample.image)
    assert lesion_descriptors(sample.mask, sample.image, source_size=(128, 128)) == plain


def test_a_source_smaller_than_the_mask_is_measured_at_its_own_size():
    d = lesion_descriptors(_squashed_circle(60, 90, radius=20), source_size=(60, 90))
    assert d["equivalent_diameter_px"] == pytest.approx(40, rel=0.03)
    assert d["asymmetry"] < 0.05


@pytest.mark.parametrize("source_size", [(0, 100), (100,), (100, 100, 3)], ids=str)
def test_descriptors_reject_a_source_size_that_is_not_a_height_and_width(source_size):
    with pytest.raises(ValueError, match="source_size"):
        lesion_descriptors(_circle(), source_size=source_size)
