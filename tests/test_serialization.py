"""Saved models: safetensors + config.json in one directory, local or on a real S3 server."""

from __future__ import annotations

import json

import pytest
import torch

from skinray import io
from skinray.models import create_model, get_model_spec, load_model, read_model_config, save_model
from skinray.models.serialization import CONFIG_FILE, WEIGHTS_FILE


def _small_unet():
    torch.manual_seed(0)
    return create_model("unet", **get_model_spec("unet").smoke_kwargs).eval()


def test_round_trip_through_s3_gives_identical_outputs(s3_bucket):
    model = _small_unet()
    uri = f"{s3_bucket}/models/unet-v1"
    saved = save_model(model, uri, input_size=(64, 64), mask_threshold=0.4)
    assert io.exists(f"{uri}/{WEIGHTS_FILE}") and io.exists(f"{uri}/{CONFIG_FILE}")
    restored = load_model(uri)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)["mask_logits"], restored(x)["mask_logits"])
    assert restored.saved_config == saved
    assert read_model_config(uri).mask_threshold == 0.4


def test_config_records_what_scoring_needs(tmp_path):
    model = create_model("classifier", encoder="resnet18", num_classes=3)
    save_model(model, str(tmp_path), class_names=["melanoma", "seborrheic_keratosis", "nevus"])
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["model"] == "classifier"
    assert config["kwargs"] == {"encoder": "resnet18", "num_classes": 3}
    assert config["input_size"] == [224, 224]  # the paper's, by default
    assert config["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert config["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert config["class_names"] == ["melanoma", "seborrheic_keratosis", "nevus"]
    assert config["outputs"] == ["class_logits", "features"]
    assert len(config["weights_sha256"]) == 64
    assert config["skinray_version"]


def test_saved_weights_are_plain_safetensors(tmp_path):
    import safetensors.torch

    model = _small_unet()
    save_model(model, str(tmp_path))
    stored = safetensors.torch.load_file(str(tmp_path / WEIGHTS_FILE))
    assert stored.keys() == model.state_dict().keys()


def test_weight_paths_are_not_recorded(tmp_path):
    model = create_model("classifier", encoder="resnet18", num_classes=3)
    save_model(model, str(tmp_path), class_names=["a", "b", "c"])
    assert "encoder_weights" not in read_model_config(str(tmp_path)).kwargs


def test_mixed_directory_is_detected(tmp_path):
    save_model(_small_unet(), str(tmp_path / "a"))
    torch.manual_seed(1)
    other = create_model("unet", **get_model_spec("unet").smoke_kwargs)
    save_model(other, str(tmp_path / "b"))
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes((tmp_path / "b" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValueError, match="does not match config.json"):
        load_model(str(tmp_path / "a"))


def test_missing_directory_names_the_config_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing-here/config\.json"):
        load_model(str(tmp_path / "nothing-here"))


def test_a_plain_module_cannot_be_saved(tmp_path):
    with pytest.raises(ValueError, match="create_model"):
        save_model(torch.nn.Linear(2, 2), str(tmp_path))


def test_fp16_weights_halve_the_file_and_load_back_as_float32(tmp_path):
    torch.manual_seed(0)
    model = create_model("unet", **get_model_spec("unet").smoke_kwargs).eval()
    save_model(model, str(tmp_path / "fp32"), input_size=(64, 64))
    save_model(model, str(tmp_path / "fp16"), input_size=(64, 64), weights_dtype=torch.float16)
    size32 = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    size16 = (tmp_path / "fp16" / "model.safetensors").stat().st_size
    assert size16 < 0.6 * size32
    loaded = load_model(str(tmp_path / "fp16"))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(
            dict(loaded.named_parameters())[name], parameter.half().float(), rtol=0, atol=0
        )
    # Buffers (BatchNorm statistics) keep float32.
    for name, buffer in model.named_buffers():
        assert torch.equal(dict(loaded.named_buffers())[name], buffer)


def test_a_released_model_loads_by_its_short_name(tmp_path, monkeypatch):
    from skinray.models import zoo

    torch.manual_seed(0)
    model = create_model("unet", **get_model_spec("unet").smoke_kwargs).eval()
    save_model(model, str(tmp_path / "zoo" / "tiny-segmenter"), input_size=(64, 64))
    monkeypatch.setattr(zoo, "zoo_root", lambda: tmp_path / "zoo")
    assert zoo.released_models() == ["tiny-segmenter"]
    loaded = load_model("tiny-segmenter")
    assert loaded.saved_config.input_size == (64, 64)
    assert zoo.resolve_model("not-released") == "not-released"
    assert zoo.resolve_model("s3://bucket/tiny-segmenter") == "s3://bucket/tiny-segmenter"
