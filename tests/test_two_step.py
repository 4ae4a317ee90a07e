"""The two-step pipeline's one ROI definition (``lesion_boxes``, ``cut_rois``) and its composite."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from skinray.data.synthetic import synthetic_sample
from skinray.models import CLASS_LOGITS, MASK_LOGITS, ROI_BOX, create_model, get_model_spec
from skinray.models.two_step import TwoStep, cut_rois, lesion_boxes


def _boxes(mask: np.ndarray, margin: float) -> tuple[int, ...]:
    return tuple(int(v) for v in lesion_boxes(torch.from_numpy(mask[None]).bool(), margin)[0])


def test_box_is_the_lesion_box_plus_the_margin_of_its_size():
    mask = np.zeros((100, 100), np.uint8)
    mask[40:60, 30:70] = 1  # 20 tall, 40 wide
    assert _boxes(mask, 0.1) == (38, 26, 62, 74)  # 2 px above and below, 4 px left and right
    assert _boxes(mask, 0) == (40, 30, 60, 70)


def test_box_is_clipped_at_the_image_border_and_spans_every_component():
    corner = np.zeros((50, 50), np.uint8)
    corner[0:10, 40:50] = 1
    assert _boxes(corner, 0.5) == (0, 35, 15, 50)
    two = np.zeros((100, 100), np.uint8)
    two[10:20, 10:20] = 1
    two[70:80, 60:90] = 1
    assert _boxes(two, 0) == (10, 10, 80, 90)


def test_an_empty_mask_gives_the_whole_image_box():
    assert _boxes(np.zeros((64, 48), np.uint8), 0.1) == (0, 0, 64, 48)


def test_rois_zero_pixels_outside_the_mask_and_keep_those_inside():
    sample = synthetic_sample(3, 128)
    image = torch.from_numpy(sample.image).permute(2, 0, 1)[None].float()
    lesion = torch.from_numpy(sample.mask)[None].bool()
    boxes = lesion_boxes(lesion, 0.0)
    y0, x0, y1, x1 = (int(v) for v in boxes[0])
    # Output at the box's own size: roi_align with aligned=True samples the pixel centres.
    roi = cut_rois(image, lesion, boxes, (y1 - y0, x1 - x0))[0]
    inside = lesion[0, y0:y1, x0:x1]
    assert torch.allclose(roi[:, inside], image[0, :, y0:y1, x0:x1][:, inside], atol=1e-3)
    assert roi[:, ~inside].abs().max() < 1e-3


def test_an_empty_mask_gives_the_whole_unmasked_image_resampled():
    image = torch.from_numpy(synthetic_sample(1, 64).image).permute(2, 0, 1)[None].float()
    lesion = torch.zeros(1, 64, 64, dtype=torch.bool)
    roi = cut_rois(image, lesion, lesion_boxes(lesion), (32, 32))
    expected = torch.nn.functional.avg_pool2d(image, 2)  # 2×2 means: adaptive sampling, no aliasing
    assert torch.allclose(roi, expected, atol=1e-3)


def test_composite_classifies_the_roi_its_own_segmenter_cuts():
    torch.manual_seed(0)
    model = create_model("two_step", **get_model_spec("two_step").smoke_kwargs).eval()
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        outputs = model(x)
        mask_logits = model.segment(x)
        rois, boxes = model.roi_input(x, mask_logits)
        expected = model.classifier(rois)[CLASS_LOGITS]
    assert outputs[MASK_LOGITS].shape == (2, 1, 96, 80)
    assert torch.equal(outputs[MASK_LOGITS], mask_logits)
    assert torch.equal(outputs[ROI_BOX], boxes)
    assert torch.allclose(outputs[CLASS_LOGITS], expected)
    assert rois.shape == (2, 3, 64, 64)


def test_composite_refuses_a_classifier_that_is_not_rgb():
    spec = get_model_spec("two_step").smoke_kwargs
    classifier = {"model": "classifier", "kwargs": {**spec["classifier"]["kwargs"], "in_chans": 4}}
    with pytest.raises(ValueError, match="RGB"):
        TwoStep(spec["segmenter"], classifier)
