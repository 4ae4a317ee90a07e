"""ImageNet weights from ../shared/weights load into every encoder that has a file, strictly."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from skinray import io
from skinray.models import PretrainedWeightsError, create_model
from skinray.models.backbones import read_backbone_weights

SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"

# file stem -> timm architecture it holds (../shared/weights/README.md)
WEIGHT_FILES = {
    "efficientnet_lite0": "tf_efficientnet_lite0",
    "efficientnet_lite2": "tf_efficientnet_lite2",
    "mobilenetv2_100": "mobilenetv2_100",
}


def _weights(stem: str) -> str:
    path = SHARED_WEIGHTS / f"{stem}.safetensors"
    if not path.exists():
        pytest.skip(f"{path} is absent: ImageNet weights for {stem} not shipped on this machine")
    return str(path)


def _trunk_of(model, name):
    """The timm module inside each registered model that the weights file is for."""
    return {
        "classifier": lambda: model.net,
        "unet": lambda: model.net.encoder.model,
        "asnet": lambda: model.encoder,
    }[name]()


@pytest.mark.parametrize("stem", sorted(WEIGHT_FILES))
@pytest.mark.parametrize("model_name", ["classifier", "unet", "asnet"])
def test_imagenet_weights_load_into_every_matching_encoder(stem, model_name):
    path = _weights(stem)
    architecture = WEIGHT_FILES[stem]
    extra = {"num_classes": 7} if model_name == "classifier" else {}
    torch.manual_seed(0)
    model = create_model(model_name, encoder=architecture, encoder_weights=path, **extra)
    file_state = safetensors.torch.load_file(path)
    trunk = _trunk_of(model, model_name).state_dict()
    head = {"classifier.weight", "classifier.bias"}
    compared = 0
    for key, value in trunk.items():
        if key in head:
            continue
        assert key in file_state, f"{key} in the model but not in {path}"
        assert torch.equal(value, file_state[key]), key
        compared += 1
    # features_only encoders drop the classifier stage (conv_head, bn2); everything else is loaded.
    assert compared >= 0.9 * len([k for k in file_state if k not in head])
    if model_name == "classifier":
        assert model.net.get_classifier().out_features == 7


def test_pretrained_and_random_models_differ():
    path = _weights("mobilenetv2_100")
    torch.manual_seed(0)
    random = create_model("classifier", encoder="mobilenetv2_100", num_classes=3)
    torch.manual_seed(0)
    pretrained = create_model(
        "classifier", encoder="mobilenetv2_100", num_classes=3, encoder_weights=path
    )
    assert not torch.equal(random.net.conv_stem.weight, pretrained.net.conv_stem.weight)


def test_weights_for_another_architecture_are_refused_naming_the_file():
    path = _weights("mobilenetv2_100")
    with pytest.raises(
        PretrainedWeightsError, match=r"mobilenetv2_100\.safetensors.*'resnet18'.*missing"
    ):
        create_model("unet", encoder="resnet18", encoder_weights=path)


def test_a_file_that_is_not_safetensors_is_refused_naming_it(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(PretrainedWeightsError, match="broken.safetensors: not a readable"):
        read_backbone_weights("resnet18", str(bad))


def test_a_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        create_model(
            "classifier", encoder="resnet18", encoder_weights=str(tmp_path / "nowhere.safetensors")
        )


def test_weights_load_from_s3(s3_bucket):
    path = _weights("efficientnet_lite0")
    uri = f"{s3_bucket}/weights/efficientnet_lite0.safetensors"
    with open(path, "rb") as f:
        io.write_bytes(uri, f.read())
    model = create_model(
        "classifier", encoder="tf_efficientnet_lite0", num_classes=2, encoder_weights=uri
    )
    file_state = safetensors.torch.load_file(path)
    assert torch.equal(model.net.conv_stem.weight, file_state["conv_stem.weight"])
    assert model.normalization == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
