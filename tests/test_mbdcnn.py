"""MB-DCNN: each stage alone, the chain end to end, and the paper's specific choices."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from skinray.losses import LOSSES, hybrid_dice_rank_loss
from skinray.models import (
    CAM,
    CLASS_LOGITS,
    MASK_LOGITS,
    create_model,
    get_model_spec,
    load_model,
    save_model,
)
from skinray.models.mbdcnn import MBDCNN, expand_input_conv

SIZE = 64
STAGES = ("mbdcnn_coarse_sn", "mbdcnn_mask_cn", "mbdcnn_enhanced_sn")
MOBILENET = (
    Path(__file__).resolve().parents[2] / "shared" / "weights" / "mobilenetv2_100.safetensors"
)


def _stage(name: str):
    torch.manual_seed(0)
    return create_model(name, **get_model_spec(name).smoke_kwargs).eval()


def test_mask_cn_fourth_channel_weights_are_the_mean_of_rgb_at_initialisation():
    model = create_model("mbdcnn_mask_cn", encoder="legacy_xception")
    stem = model.net.get_submodule(model.stem_name).weight
    assert stem.shape[1] == 4
    assert torch.allclose(stem[:, 3], stem[:, :3].mean(1))
    assert not torch.allclose(stem[:, 0], stem[:, 1])  # the RGB weights themselves are untouched


def test_mask_cn_keeps_pretrained_rgb_weights_and_adds_their_mean():
    if not MOBILENET.exists():
        pytest.skip(f"{MOBILENET} is absent: no ImageNet weights to check against")
    model = create_model(
        "mbdcnn_mask_cn", encoder="mobilenetv2_100", encoder_weights=str(MOBILENET)
    )
    pretrained = safetensors.torch.load_file(str(MOBILENET))["conv_stem.weight"]
    stem = model.net.conv_stem.weight
    assert torch.equal(stem[:, :3], pretrained)
    assert torch.allclose(stem[:, 3], pretrained.mean(1))


def test_expand_input_conv_preserves_the_response_to_the_original_channels():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    expanded = expand_input_conv(conv, extra_channels=2)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(expanded(torch.cat([x, torch.zeros(1, 2, 16, 16)], 1)), conv(x))


def test_mask_cn_removes_the_last_downsampling_of_xception():
    dilated = create_model("mbdcnn_mask_cn", encoder="legacy_xception").eval()
    plain = create_model("classifier", encoder="legacy_xception", num_classes=3).eval()
    with torch.no_grad():
        cam = dilated(torch.zeros(1, 4, 224, 224))[CAM]
        features = plain.net.forward_features(torch.zeros(1, 3, 224, 224))
    assert cam.shape == (1, 3, 14, 14)  # output stride 16
    assert features.shape[-2:] == (7, 7)  # Xception's own stride 32
    assert dilated.net.conv3.conv1.dilation == (2, 2) and dilated.net.conv4.conv1.dilation == (2, 2)


def test_mask_cn_cam_is_the_fc_weighted_sum_of_the_last_features():
    model = _stage("mbdcnn_mask_cn")
    x = torch.randn(2, 4, SIZE, SIZE)
    with torch.no_grad():
        out = model(x)
        features = model.net.forward_features(x)
    weights = model.net.get_classifier().weight
    expected = (weights[None, :, :, None, None] * features[:, None]).sum(2)
    assert torch.allclose(out[CAM], expected, atol=1e-4)
    # GAP of the CAM plus the bias is the class score: the map explains the logit.
    gap = out[CAM].mean((2, 3)) + model.net.get_classifier().bias
    assert torch.allclose(gap, out[CLASS_LOGITS], atol=1e-4)


@pytest.mark.parametrize(
    ("name", "channels", "keys"),
    [
        ("mbdcnn_coarse_sn", 3, {MASK_LOGITS}),
        ("mbdcnn_mask_cn", 4, {CLASS_LOGITS, CAM}),
        ("mbdcnn_enhanced_sn", 6, {MASK_LOGITS}),
    ],
)
def test_each_stage_builds_and_runs_alone(name, channels, keys):
    model = _stage(name)
    assert model.input_channels == channels
    with torch.no_grad():
        out = model(torch.randn(2, channels, SIZE, SIZE))
    assert set(out) == keys
    if MASK_LOGITS in out:
        assert out[MASK_LOGITS].shape == (2, 1, SIZE, SIZE)
    if CLASS_LOGITS in out:
        assert out[CLASS_LOGITS].shape == (2, 3)


def test_the_chain_gives_masks_classes_and_cams_of_the_right_shapes():
    model = _stage("mbdcnn")
    with torch.no_grad():
        out = model(torch.randn(2, 3, SIZE, SIZE))
    assert out[MASK_LOGITS].shape == (2, 1, SIZE, SIZE)
    assert out[CLASS_LOGITS].shape == (2, 3)
    assert out[CAM].shape == (2, 3, SIZE // 16, SIZE // 16)


def test_chain_from_trained_stages_matches_running_them_by_hand(tmp_path):
    coarse, mask_cn, enhanced = (_stage(name) for name in STAGES)
    chain = MBDCNN.from_stages(coarse, mask_cn, enhanced).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        probability = torch.sigmoid(coarse(x)[MASK_LOGITS])
        classified = mask_cn(torch.cat([x, probability], 1))
        from skinray.models.mbdcnn import normalise_cam

        guidance = normalise_cam(classified[CAM], (SIZE, SIZE))
        by_hand = enhanced(torch.cat([x, guidance], 1))[MASK_LOGITS]
        chained = chain(x)
    assert torch.equal(chained[MASK_LOGITS], by_hand)
    assert torch.equal(chained[CLASS_LOGITS], classified[CLASS_LOGITS])
    # The assembled chain saves and loads like any registered model.
    save_model(chain, str(tmp_path / "chain"), input_size=(SIZE, SIZE), class_names=["a", "b", "c"])
    restored = load_model(str(tmp_path / "chain"))
    with torch.no_grad():
        assert torch.equal(restored(x)[MASK_LOGITS], chained[MASK_LOGITS])


def test_enhanced_sn_starts_from_coarse_sn_weights():
    coarse, enhanced = _stage("mbdcnn_coarse_sn"), _stage("mbdcnn_enhanced_sn")
    torch.manual_seed(1)
    for p in coarse.parameters():
        p.data.add_(torch.randn_like(p))
    enhanced.load_coarse_sn(coarse)
    for (name, a), b in zip(
        coarse.net.state_dict().items(), enhanced.net.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_enhanced_sn_cams_change_its_mask():
    model = _stage("mbdcnn_enhanced_sn")
    image = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        no_cam = model(torch.cat([image, torch.zeros(1, 3, SIZE, SIZE)], 1))[MASK_LOGITS]
        with_cam = model(torch.cat([image, torch.ones(1, 3, SIZE, SIZE)], 1))[MASK_LOGITS]
    assert not torch.allclose(no_cam, with_cam)


def test_enhanced_sn_rejects_input_without_cam_channels():
    with pytest.raises(ValueError, match="RGB \\+ 3 CAM channels, got 3"):
        _stage("mbdcnn_enhanced_sn")(torch.zeros(1, 3, SIZE, SIZE))


@pytest.mark.parametrize("name", ["mbdcnn_coarse_sn", "mbdcnn_enhanced_sn", "mbdcnn"])
def test_segmenters_use_the_hybrid_dice_rank_loss(name):
    assert LOSSES[get_model_spec(name).segmentation_loss] is hybrid_dice_rank_loss


def test_mask_cn_uses_cross_entropy():
    assert get_model_spec("mbdcnn_mask_cn").classification_loss == "cross_entropy"


def test_the_chain_gives_each_stage_its_own_normalisation_as_the_staged_path_does(tmp_path):
    # Coarse-SN and enhanced-SN on ImageNet statistics, mask-CN on 0.5/0.5 (EfficientNet-Lite0):
    # the assembled chain must compute what training's guidance chain (Predictor) computes.
    from skinray.data.synthetic import synthetic_sample
    from skinray.predict import Predictor

    torch.manual_seed(0)
    coarse, enhanced = _stage("mbdcnn_coarse_sn"), _stage("mbdcnn_enhanced_sn")
    mask_cn = create_model("mbdcnn_mask_cn", encoder="tf_efficientnet_lite0", num_classes=3).eval()
    assert coarse.normalization != mask_cn.normalization
    saved = {}
    for name, stage in zip(STAGES, (coarse, mask_cn, enhanced), strict=True):
        classes = ["a", "b", "c"] if name != "mbdcnn_coarse_sn" else None
        save_model(stage, str(tmp_path / name), input_size=(SIZE, SIZE), class_names=classes)
        saved[name] = load_model(str(tmp_path / name))
    chain = MBDCNN.from_stages(*saved.values())  # stages in eval mode: the chain too
    save_model(chain, str(tmp_path / "chain"), input_size=(SIZE, SIZE), class_names=["a", "b", "c"])
    images = [synthetic_sample(seed, (SIZE, SIZE)).image for seed in range(2)]

    def staged(name, guidance):
        return Predictor.from_saved(saved[name], guidance=[saved[g] for g in guidance])(images)

    together = Predictor.load(str(tmp_path / "chain"))(images)
    segmented = staged("mbdcnn_enhanced_sn", ["mbdcnn_coarse_sn", "mbdcnn_mask_cn"])
    classified = staged("mbdcnn_mask_cn", ["mbdcnn_coarse_sn"])
    torch.testing.assert_close(together.mask_probability, segmented.mask_probability)
    torch.testing.assert_close(together.class_probabilities, classified.class_probabilities)
