"""Class activation maps localise: after a few training steps on synthetic images whose class evidence
is the lesion, the maps put more mass inside the lesion mask than outside."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from skinray.data.synthetic import synthetic_batch
from skinray.models import CLASS_LOGITS, create_model, get_model_spec
from skinray.models.cam import class_activation_map, grad_cam_plus_plus

SIZE = 128  # at 64 px a ResNet18's last features are 2×2, too coarse to localise anything


def _data(count: int, seed: int, size: int = SIZE):
    images, masks, labels = synthetic_batch(count, size, seed=seed)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    return x, torch.from_numpy(masks).float(), torch.from_numpy(labels)


def lesion_to_skin_density_ratio(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image: mean map value inside the lesion over mean map value outside it."""
    inside = (maps * masks).sum((1, 2)) / masks.sum((1, 2))
    outside = (maps * (1 - masks)).sum((1, 2)) / (1 - masks).sum((1, 2))
    return inside / outside.clamp_min(1e-6)


@functools.cache  # one training per model for the whole module; tests only read the model
def _trained(name: str, with_mask_channel: bool, size: int, steps: int = 30):
    torch.manual_seed(0)
    model = create_model(name, **get_model_spec(name).smoke_kwargs)
    train_x, train_masks, train_labels = _data(48, seed=0, size=size)
    if with_mask_channel:
        train_x = torch.cat([train_x, train_masks[:, None]], 1)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        pick = torch.randint(0, len(train_x), (16,))
        loss = F.cross_entropy(model(train_x[pick])[CLASS_LOGITS], train_labels[pick])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@pytest.fixture(scope="module")
def held_out():
    return _data(16, seed=1000)


# CLNet and mask-CN localise at 96 px too, in a third of the time (median lesion/skin ratios 2.02
# and 6.28 there, every image above 1); the plain ResNet18 classifier needs 128 (1.91 at 96).
@pytest.mark.parametrize(
    ("name", "with_mask_channel", "cam", "min_median_ratio", "size"),
    [
        ("classifier", False, class_activation_map, 2.0, SIZE),
        ("classifier", False, grad_cam_plus_plus, 2.0, SIZE),
        ("mbdcnn_mask_cn", True, class_activation_map, 3.0, 96),
        ("clnet", False, grad_cam_plus_plus, 1.5, 96),
    ],
    ids=["classifier-cam", "classifier-gradcam++", "mask_cn-cam", "clnet-gradcam++"],
)
def test_trained_classifier_maps_concentrate_inside_the_lesion(
    name, with_mask_channel, cam, min_median_ratio, size
):
    x, masks, labels = _data(16, seed=1000, size=size)
    if with_mask_channel:
        x = torch.cat([x, masks[:, None]], 1)
    model = _trained(name, with_mask_channel, size)
    with torch.no_grad():
        accuracy = (model(x)[CLASS_LOGITS].argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.9  # it learned the lesion's colour, so its maps have something to show
    maps = cam(model, x, labels)
    assert maps.shape == (16, size, size)
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    ratios = lesion_to_skin_density_ratio(maps, masks)
    assert ratios.median() > min_median_ratio, ratios
    assert (ratios > 1).float().mean() >= 0.9, ratios


def test_untrained_classifier_maps_do_not_favour_the_lesion(held_out):
    # The counterpart of the test above: localisation is learned, not an artefact of the maps.
    x, masks, labels = held_out
    torch.manual_seed(0)
    model = create_model("classifier", **get_model_spec("classifier").smoke_kwargs).eval()
    ratios = lesion_to_skin_density_ratio(class_activation_map(model, x, labels), masks)
    assert ratios.median() < 1.5


def test_targets_default_to_the_predicted_class(held_out):
    x, _, _ = held_out
    torch.manual_seed(0)
    model = create_model("classifier", **get_model_spec("classifier").smoke_kwargs).eval()
    with torch.no_grad():
        predicted = model(x[:4])[CLASS_LOGITS].argmax(1)
    assert torch.allclose(
        class_activation_map(model, x[:4]), class_activation_map(model, x[:4], predicted)
    )


def test_a_model_without_a_linear_head_or_cams_is_refused_for_plain_cam():
    model = create_model("clnet", **get_model_spec("clnet").smoke_kwargs).eval()
    with pytest.raises(ValueError, match="grad_cam_plus_plus"):
        class_activation_map(model, torch.zeros(1, 3, 64, 64))


def test_wrong_number_of_targets_is_an_error(held_out):
    x, _, _ = held_out
    model = create_model("classifier", **get_model_spec("classifier").smoke_kwargs).eval()
    with pytest.raises(ValueError, match="one target class per image"):
        class_activation_map(model, x[:2], [0, 1, 2])
