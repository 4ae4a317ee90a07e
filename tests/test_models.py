"""Every registered model against the output contract, on its small (smoke) configuration."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from skinray.data.synthetic import synthetic_batch
from skinray.losses import LOSSES, bce_dice_loss
from skinray.models import (
    CAM,
    CLASS_LOGITS,
    MASK_LOGITS,
    ModelConfigError,
    create_model,
    get_model_spec,
    list_models,
    load_model,
    save_model,
)

SIZE = 64
NUM_CLASSES = 3


def _batch(count: int = 4, channels: int = 3):
    """Synthetic images; channels past RGB carry guidance (the lesion mask, as MB-DCNN's stages get)."""
    images, masks, labels = synthetic_batch(count, SIZE, num_classes=NUM_CLASSES, seed=3)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    x = (x - 0.5) / 0.25
    masks = torch.from_numpy(masks).float()[:, None]
    guidance = masks.expand(-1, channels - 3, -1, -1)
    return torch.cat([x, guidance], dim=1), masks, torch.from_numpy(labels)


def _build(name: str):
    torch.manual_seed(0)
    spec = get_model_spec(name)
    kwargs = dict(spec.smoke_kwargs)
    if spec.classifies and "num_classes" in spec.accepted_kwargs():
        kwargs["num_classes"] = NUM_CLASSES
    return create_model(name, **kwargs)


def _loss(outputs, masks, labels):
    loss = torch.zeros(())
    if MASK_LOGITS in outputs:
        loss = loss + bce_dice_loss(outputs[MASK_LOGITS], masks)
    if CLASS_LOGITS in outputs:
        loss = loss + F.cross_entropy(outputs[CLASS_LOGITS], labels)
    return loss


def _paper_loss(name, outputs, masks, labels):
    spec = get_model_spec(name)
    loss = torch.zeros(())
    if spec.segmentation_loss:
        loss = loss + LOSSES[spec.segmentation_loss](outputs[MASK_LOGITS], masks)
    if spec.classification_loss:
        loss = loss + LOSSES[spec.classification_loss](outputs[CLASS_LOGITS], labels)
    return loss


def test_the_registry_holds_the_papers_models():
    assert {
        "unet",
        "classifier",
        "fcn_multiscale",
        "asnet",
        "mbdcnn",
        "mbdcnn_coarse_sn",
        "mbdcnn_mask_cn",
        "mbdcnn_enhanced_sn",
        "clnet",
    } <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_outputs_follow_the_contract(name):
    model = _build(name).eval()
    x, _, _ = _batch(2, model.input_channels)
    with torch.no_grad():
        outputs = model(x)
    spec = get_model_spec(name)
    assert set(outputs) == set(spec.outputs)
    if spec.segments:
        assert outputs[MASK_LOGITS].shape == (2, 1, SIZE, SIZE)
    if spec.classifies:
        assert outputs[CLASS_LOGITS].shape == (2, NUM_CLASSES)
    if CAM in spec.outputs:
        cam = outputs[CAM]
        assert cam.shape[:2] == (2, NUM_CLASSES) and cam.dim() == 4
        assert cam.shape[-1] < SIZE  # at the feature resolution
    for key, value in outputs.items():
        assert value.dtype == torch.float32, key
        assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("name", list_models())
def test_backward_gives_finite_gradients_on_every_trainable_parameter(name):
    model = _build(name).train()
    x, masks, labels = _batch(2, model.input_channels)
    _loss(model(x), masks, labels).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None]
    assert not no_grad, f"parameters outside the graph: {no_grad[:5]}"
    not_finite = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not not_finite, f"non-finite gradients: {not_finite[:5]}"


@pytest.mark.parametrize("name", list_models())
def test_a_few_optimiser_steps_lower_the_papers_loss_on_one_batch(name):
    model = _build(name).train()
    x, masks, labels = _batch(4, model.input_channels)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_with_fixed_dropout():
        torch.manual_seed(123)
        with torch.no_grad():
            return _paper_loss(name, model(x), masks, labels).item()

    before = loss_with_fixed_dropout()
    for _ in range(8):
        optimiser.zero_grad()
        _paper_loss(name, model(x), masks, labels).backward()
        optimiser.step()
    after = loss_with_fixed_dropout()
    assert after < 0.9 * before, f"loss {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize("name", list_models())
def test_save_then_load_gives_identical_outputs(name, tmp_path):
    model = _build(name)
    # Move BatchNorm statistics and every weight away from their initial values first.
    model.train()
    x, _, _ = _batch(2, model.input_channels)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model(x)
    model.eval()
    config = save_model(model, str(tmp_path / name), class_names=["a", "b", "c"][:NUM_CLASSES])
    restored = load_model(str(tmp_path / name))
    assert restored.saved_config == config
    assert not restored.training
    with torch.no_grad():
        expected, actual = model(x), restored(x)
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ModelConfigError, match="unknown model 'nope'") as caught:
        create_model("nope")
    for name in list_models():
        assert name in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_unknown_argument_lists_the_accepted_ones():
    with pytest.raises(ValueError, match="does not take 'encoderr'") as caught:
        create_model("unet", encoderr="resnet18")
    message = str(caught.value)
    for accepted in (
        "encoder='resnet50'",
        "encoder_weights=None",
        "in_chans=3",
        "decoder_channels",
    ):
        assert accepted in message


def test_unknown_timm_encoder_suggests_close_names():
    with pytest.raises(ValueError, match="unknown timm architecture 'resnet5'.*resnet50"):
        create_model("unet", encoder="resnet5")


def test_create_model_records_its_arguments_but_not_weight_paths():
    model = create_model("classifier", encoder="resnet18", num_classes=4)
    assert model.skinray_model_name == "classifier"
    assert model.skinray_model_kwargs == {"encoder": "resnet18", "num_classes": 4}


@pytest.mark.parametrize("name", ["unet", "asnet"])
def test_segmenters_accept_a_four_channel_input(name):
    spec = get_model_spec(name)
    model = create_model(name, **spec.smoke_kwargs, in_chans=4).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 4, SIZE, SIZE))
    assert out[MASK_LOGITS].shape == (1, 1, SIZE, SIZE)


def test_fcn_rejects_sides_not_divisible_by_32():
    model = _build("fcn_multiscale").eval()
    with pytest.raises(ValueError, match="divisible by 32, got 48×64"):
        model(torch.zeros(1, 3, 48, 64))
