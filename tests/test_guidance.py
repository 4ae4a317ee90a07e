"""Guidance for staged training: saved models feeding the next stage's input channels or ROIs."""

from __future__ import annotations

import torch

from skinray.data.synthetic import synthetic_batch
from skinray.evaluation import model_input
from skinray.models import CAM, MASK_LOGITS, create_model, get_model_spec, save_model
from skinray.models.mbdcnn import normalise_cam
from skinray.train.guidance import GuidanceChain, RoiSegmenter

SIZE = 64


def _saved(name: str, folder, **extra) -> str:
    torch.manual_seed(0)
    model = create_model(name, **get_model_spec(name).smoke_kwargs, **extra)
    save_model(model, str(folder / name), input_size=(SIZE, SIZE))
    return str(folder / name)


def _images(count: int = 2) -> torch.Tensor:
    images, _, _ = synthetic_batch(count, SIZE)
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def test_chain_hands_coarse_probability_then_cams_as_mbdcnn_does(tmp_path):
    coarse = _saved("mbdcnn_coarse_sn", tmp_path)
    mask_cn = _saved("mbdcnn_mask_cn", tmp_path)
    images = _images()

    probability = GuidanceChain([coarse])(images)
    assert probability.shape == (2, 1, SIZE, SIZE)
    assert probability.min() >= 0 and probability.max() <= 1

    cams = GuidanceChain([coarse, mask_cn])(images)
    assert cams.shape == (2, 3, SIZE, SIZE)
    # By hand: mask-CN on the image + coarse probability, CAMs normalised to [0, 1].
    chain = GuidanceChain([coarse, mask_cn])
    model = chain.models[1]
    config = model.saved_config
    from skinray.data.transforms import normalise

    with torch.no_grad():
        expected = normalise_cam(
            model(torch.cat([normalise(images, config.mean, config.std), probability], 1))[CAM],
            (SIZE, SIZE),
        )
    assert torch.allclose(cams, expected, atol=1e-6)


def test_roi_segmenter_masks_the_image_with_its_prediction(tmp_path):
    segmenter = RoiSegmenter(_saved("unet", tmp_path))
    images = _images()
    masks = segmenter(images)
    assert masks.shape == (2, SIZE, SIZE) and set(masks.unique().tolist()) <= {0, 1}
    with torch.no_grad():
        logits = segmenter.model(
            (
                images.float() / 255
                - torch.tensor(segmenter.model.saved_config.mean).view(1, 3, 1, 1)
            )
            / torch.tensor(segmenter.model.saved_config.std).view(1, 3, 1, 1)
        )[MASK_LOGITS]
    assert torch.equal(masks, (torch.sigmoid(logits)[:, 0] > 0.5).to(torch.uint8))
    true_masks = torch.ones(2, SIZE, SIZE, dtype=torch.uint8)
    x = model_input(images, true_masks, 3, (0, 0, 0), (1, 1, 1), roi=True, roi_masks=masks)
    assert torch.allclose(
        x, images.float() / 255 * masks[:, None]
    )  # the prediction cut it, not the truth


def test_guidance_channels_replace_the_dataset_mask():
    images = _images()
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.uint8)
    guidance = torch.full((2, 3, SIZE, SIZE), 0.25)
    x = model_input(images, masks, 6, (0, 0, 0), (1, 1, 1), guidance=guidance)
    assert x.shape == (2, 6, SIZE, SIZE) and torch.equal(x[:, 3:], guidance)
