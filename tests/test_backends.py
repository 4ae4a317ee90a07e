"""Execution backends against eager PyTorch, on real dermoscopy images: every registered model a
backend takes passes the accuracy guard; what it cannot take falls back to eager and says why."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from skinray.backends import (
    BACKENDS,
    GUARD_FALLBACK,
    MAX_PROBABILITY_DIFFERENCE,
    AutocastNetwork,
    GuardedPredictor,
    accelerated,
    calibration_sha256,
    compare_predictions,
    default_backend,
    exported_network,
    network_inputs,
    openvino_runs_bf16,
    read_calibration_images,
    runtime_versions,
)
from skinray.models import create_model, get_model_spec, list_models, load_model, save_model
from skinray.predict import Predictor

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZE = (64, 64)
CLASSES = ["a", "b", "c"]


def _real_images(count: int = 4) -> list[np.ndarray]:
    folder = SHARED_DATA / "isic2017" / "ISIC-2017_Validation_Data"
    paths = sorted(folder.glob("*.jpg"))[:count]
    return [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]


def _predictor(name: str, folder: Path) -> Predictor:
    torch.manual_seed(0)
    model = create_model(name, **get_model_spec(name).smoke_kwargs)
    classes = CLASSES if get_model_spec(name).classifies else None
    save_model(model, str(folder / name), input_size=SIZE, class_names=classes)
    return Predictor.load(str(folder / name))


def _takes_rgb(name: str) -> bool:
    model = create_model(name, **get_model_spec(name).smoke_kwargs)
    return getattr(model, "input_channels", 3) == 3


#: Guided MB-DCNN stages run on their chain (the fallback test); every other model goes through.
UNGUIDED = [name for name in list_models() if _takes_rgb(name)]


@pytest.mark.parametrize("name", UNGUIDED)
def test_openvino_matches_eager_within_the_guard(name, tmp_path):
    eager = _predictor(name, tmp_path)
    fast, used, reason = accelerated(eager, "openvino", cache_dir=tmp_path / "cache")
    assert (used, reason) == ("openvino", None)
    images = _real_images()
    reference, exported = eager(images), fast(images)
    result = compare_predictions(reference, exported)
    assert result.passed, result
    assert eager.model is not fast.model  # the eager predictor is left as it was
    # Random weights answer nearly alike whatever the image, so the guard's bounds alone would
    # pass an export that ignored its input: the raw outputs must match far more closely than
    # eager's own outputs for other images do.
    others = eager(images[::-1])
    for field in ("mask_probability", "class_probabilities"):
        if getattr(reference, field) is None:
            continue
        gap = (getattr(reference, field) - getattr(exported, field)).abs().max().item()
        spread = (getattr(reference, field) - getattr(others, field)).abs().max().item()
        assert gap < 1e-3 and spread > 10 * gap, (field, gap, spread)


def test_the_export_is_cached_by_weights_and_shape(tmp_path):
    model = create_model("unet", **get_model_spec("unet").smoke_kwargs).eval()
    first = exported_network(model, (3, *SIZE), tmp_path)
    modified = first.path.stat().st_mtime_ns
    again = exported_network(model, (3, *SIZE), tmp_path)
    assert again.path == first.path and again.path.stat().st_mtime_ns == modified
    assert exported_network(model, (3, 96, 96), tmp_path).path != first.path
    assert len(list(tmp_path.glob("*.onnx"))) == 2


_NETWORK_SOURCE = """
import torch
from torch import nn


class Network(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        return {{"mask_logits": {expression}}}
"""


def _network_from_source(folder: Path, name: str, expression: str, monkeypatch) -> nn.Module:
    """A one-conv network imported from its own module file, as a package's would be."""
    import importlib.util
    import sys

    path = folder / f"{name}.py"
    path.write_text(_NETWORK_SOURCE.format(expression=expression))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module.Network().eval()


def test_an_export_is_not_reused_once_the_networks_code_changes(tmp_path, monkeypatch):
    """Same weights, other code (a node upgrading skinray, timm or torch keeps its cache): the
    cached export of the old code must not run for the new."""
    old = _network_from_source(tmp_path, "old_code", "self.conv(x)", monkeypatch)
    new = _network_from_source(tmp_path, "new_code", "-self.conv(x)", monkeypatch)
    new.load_state_dict(old.state_dict())
    cache = tmp_path / "cache"
    old_export, new_export = (
        exported_network(old, (3, *SIZE), cache),
        exported_network(new, (3, *SIZE), cache),
    )
    assert new_export.path != old_export.path
    images = torch.rand(2, 3, *SIZE)
    with torch.no_grad():
        expected = new(images)["mask_logits"]
    assert torch.allclose(new_export(images)["mask_logits"], expected, atol=1e-5)


def test_an_empty_batch_gives_empty_outputs_as_eager_does(tmp_path):
    # A two-step batch in which no image has a lesion hands its classifier no ROI at all (this
    # failed the first pipeline run on OpenVINO: random weights find no lesion).
    model = create_model("classifier", **get_model_spec("classifier").smoke_kwargs).eval()
    exported = exported_network(model, (3, *SIZE), tmp_path)
    empty = torch.zeros(0, 3, *SIZE)
    with torch.no_grad():
        expected = model(empty)
    outputs = exported(empty)
    assert {k: v.shape for k, v in outputs.items()} == {k: v.shape for k, v in expected.items()}


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenVINO runs one stream a core")
@pytest.mark.parametrize("count", [1, 2, 5])
def test_streams_split_a_batch_into_parallel_requests_and_join_it_in_order(count, tmp_path):
    model = create_model("unet", **get_model_spec("unet").smoke_kwargs).eval()
    one_request = exported_network(model, (3, *SIZE), tmp_path)
    streams = exported_network(model, (3, *SIZE), tmp_path, threads=2)
    assert (one_request.streams, streams.streams) == (1, 2)
    # An actor shares its node's cores with other actors and the decode tasks: not pinned.
    assert streams.compiled.get_property("ENABLE_CPU_PINNING") is False
    images = torch.from_numpy(np.stack(_real_images(count))).permute(0, 3, 1, 2).float() / 255
    images = torch.nn.functional.interpolate(images, size=SIZE)
    # 5 images over 2 streams: chunks of 3 and 2, which must come back in the batch's order.
    expected, outputs = one_request(images), streams(images)
    for name, value in expected.items():
        assert outputs[name].shape == value.shape
        assert torch.allclose(outputs[name], value, atol=1e-4), name


def test_a_model_the_backend_cannot_take_falls_back_to_eager_and_says_why(tmp_path):
    chain = _predictor("mbdcnn_coarse_sn", tmp_path)
    torch.manual_seed(0)
    guided_model = create_model("mbdcnn_mask_cn", **get_model_spec("mbdcnn_mask_cn").smoke_kwargs)
    save_model(guided_model, str(tmp_path / "mask_cn"), input_size=SIZE, class_names=CLASSES)
    guided = Predictor.from_saved(load_model(str(tmp_path / "mask_cn")), guidance=[chain.model])
    same, used, reason = accelerated(guided, "openvino", cache_dir=tmp_path / "cache")
    assert same is guided and used == "eager"
    assert "guidance" in reason


def test_the_guard_fails_a_backend_that_changes_the_outputs(tmp_path):
    eager = _predictor("clnet", tmp_path)
    images = _real_images()
    reference = eager(images)
    shifted = eager(images)
    shifted.class_probabilities = shifted.class_probabilities.roll(1, dims=1)
    shifted.mask = 1 - shifted.mask
    result = compare_predictions(reference, shifted)
    assert not result.passed
    assert result.mask_jaccard < 0.5 and result.max_probability_difference > 0.01


def test_the_guard_holds_the_ood_score_to_the_probabilities_bound():
    # The OOD threshold was set on eager's features: a backend that moves the score (bf16
    # features moved it by up to 0.009 on 8 images) moves which images are flagged.
    from skinray.predict import Prediction

    probabilities = torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)), 1)
    scores = torch.tensor([0.30, 0.49, 0.51, 0.70])

    def prediction(shift: float) -> Prediction:
        return Prediction(None, None, probabilities, None, None, ood_score=scores + shift)

    assert compare_predictions(prediction(0), prediction(0.005)).passed
    moved = compare_predictions(prediction(0), prediction(0.02))
    assert not moved.passed and moved.max_ood_score_difference == pytest.approx(0.02)


def test_exporting_leaves_the_eager_network_in_eval_mode(tmp_path):
    eager = _predictor("unet", tmp_path)
    accelerated(eager, "openvino", cache_dir=tmp_path / "cache")
    assert not eager.model.training


def test_an_assembled_pair_runs_on_openvino_within_the_guard(tmp_path):
    torch.manual_seed(0)
    segmenter = create_model("unet", **get_model_spec("unet").smoke_kwargs)
    classifier = create_model("classifier", **get_model_spec("classifier").smoke_kwargs)
    save_model(segmenter, str(tmp_path / "seg"), input_size=SIZE)
    save_model(
        classifier,
        str(tmp_path / "clf"),
        input_size=SIZE,
        class_names=CLASSES,
        roi_source_size=SIZE,
    )
    eager = Predictor.load(str(tmp_path / "seg"), str(tmp_path / "clf"))
    images = _real_images()
    reference = eager(images)
    fast, used, _ = accelerated(eager, "openvino", cache_dir=tmp_path / "cache")
    assert used == "openvino"
    # The networks stay in eval mode (the exporter must not flip them to train mode).
    assert not any(m.training for m in eager.model.segmenter.modules())
    assert compare_predictions(reference, eager(images)).passed
    assert compare_predictions(reference, fast(images)).passed


def test_the_released_segmenter_passes_the_guard_in_bf16(tmp_path):
    # bf16 is held to the fp32 guard on a trained model (random weights give logits near 0, where
    # any rounding flips a pixel). On a CPU without bf16 OpenVINO runs f32, and says so.
    eager = Predictor.load("lesion-segmenter")
    images = _real_images(8)
    fast, used, reason = accelerated(eager, "openvino-bf16", cache_dir=tmp_path / "cache")
    if openvino_runs_bf16():
        assert (used, reason) == ("openvino-bf16", None)
    else:
        assert used == "openvino" and "runs as openvino (f32)" in reason
    result = compare_predictions(eager(images), fast(images))
    assert result.passed, result


def test_mixed_precision_runs_the_released_segmenter_in_bf16_and_its_classifier_in_f32(tmp_path):
    eager = Predictor.load("lesion-segmenter", "ham10000-classifier")
    images = _real_images(8)
    fast, used, _ = accelerated(eager, "openvino-mixed", cache_dir=tmp_path / "cache")
    assert used == ("openvino-mixed" if openvino_runs_bf16() else "openvino")
    assert fast.model.segmenter.precision == "bf16"
    assert fast.model.classifier.precision == "f32"
    result = compare_predictions(eager(images), fast(images))
    assert result.passed, result


def _conv_output_dtypes(network: nn.Module, images, predictor) -> set[torch.dtype]:
    """The dtypes the convolutions of ``network`` give while ``predictor`` runs on ``images``."""
    seen: set[torch.dtype] = set()
    convs = [m for m in network.modules() if isinstance(m, nn.Conv2d)]
    hooks = [c.register_forward_hook(lambda m, i, out: seen.add(out.dtype)) for c in convs]
    try:
        predictor(images)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_eager_runs_f32_and_bf16_autocast_is_a_backend_the_guard_judges():
    """bf16 autocast is no longer eager's on CUDA but a backend of its own, held to the guard:
    under it the released classifier's probabilities move past 0.01, and ``eager-mixed`` keeps
    the classifier in f32 and only the segmenter in bf16."""
    eager = Predictor.load("lesion-segmenter", "ham10000-classifier")
    images = _real_images(8)
    reference = eager(images)
    segmenter, classifier = eager.model.segmenter, eager.model.classifier
    assert _conv_output_dtypes(classifier, images, eager) == {torch.float32}

    every, used, reason = accelerated(eager, "eager-bf16")
    assert (used, reason) == ("eager-bf16", None)
    assert _conv_output_dtypes(segmenter, images, every) == {torch.bfloat16}
    assert _conv_output_dtypes(classifier, images, every) == {torch.bfloat16}
    result = compare_predictions(reference, every(images))
    assert result.max_probability_difference > MAX_PROBABILITY_DIFFERENCE, result
    assert not result.passed

    mixed, used, reason = accelerated(eager, "eager-mixed")
    assert (used, reason) == ("eager-mixed", None)
    assert _conv_output_dtypes(segmenter, images, mixed) == {torch.bfloat16}
    assert _conv_output_dtypes(classifier, images, mixed) == {torch.float32}
    result = compare_predictions(reference, mixed(images))
    assert result.passed and result.max_probability_difference == 0, result
    assert eager.model.segmenter is segmenter  # the eager Predictor is not changed
    assert not isinstance(eager.model.segmenter, AutocastNetwork)


def test_the_gpu_default_is_bf16_autocast_for_the_segmenter_and_falls_back_to_f32():
    assert default_backend("cuda") == "eager-mixed"
    assert GUARD_FALLBACK["eager-bf16"] == "eager-mixed"
    assert GUARD_FALLBACK["eager-mixed"] == "eager"


def test_an_actor_asked_for_bf16_ends_on_mixed_where_the_classifier_fails_the_guard():
    from skinray.score.actors import PredictActor

    actor = PredictActor(
        "lesion-segmenter", "ham10000-classifier", batch_size=8, backend="eager-bf16"
    )
    size = actor.predictor.input_size
    images = np.stack([cv2.resize(i, size[::-1]) for i in _real_images(8)])
    rows = actor(
        {
            "source_uri": np.array([f"v{i}" for i in range(8)], dtype=object),
            "image": images,
            "error_stage": np.array([""] * 8, dtype=object),
        }
    )
    assert actor.backend == "eager-mixed"
    assert actor.fallback_reason.startswith("eager-bf16 failed the accuracy guard")
    assert set(rows["backend"]) == {"eager-mixed"}
    assert set(rows["backend_versions"]) == {f"torch {torch.__version__}"}
    eager = Predictor.load("lesion-segmenter", "ham10000-classifier")
    expected = eager(images).class_probabilities.numpy()
    np.testing.assert_array_equal(rows["class_probabilities"], expected)


def test_eager_mixed_on_a_classifier_alone_runs_eager_and_says_so():
    eager = Predictor.load("ham10000-classifier")
    fast, used, reason = accelerated(eager, "eager-mixed")
    assert fast is eager and used == "eager"
    assert "has none: it runs as eager (f32)" in reason


TRAINING_IMAGES = SHARED_DATA / "isic2017" / "ISIC-2017_Training_Data"


def _fake_quantize_ops(path: Path) -> int:
    import openvino as ov

    return sum(op.get_type_name() == "FakeQuantize" for op in ov.Core().read_model(path).get_ops())


def test_int8_quantises_the_released_segmenter_and_runs_its_classifier_in_f32(tmp_path):
    eager = Predictor.load("lesion-segmenter", "ham10000-classifier")
    calibration = read_calibration_images(str(TRAINING_IMAGES), eager.input_size, count=24)
    assert calibration.shape == (24, *eager.input_size, 3)
    fast, used, reason = accelerated(
        eager, "openvino-int8", cache_dir=tmp_path, calibration_images=calibration
    )
    assert (used, reason) == ("openvino-int8", None)
    segmenter, classifier = fast.model.segmenter, fast.model.classifier
    assert segmenter.quantised and _fake_quantize_ops(segmenter.path) > 10
    assert not classifier.quantised
    assert segmenter.precision == "bf16"  # what int8 leaves unquantised runs in bf16
    assert classifier.path.suffix == ".onnx" and classifier.precision == "f32"
    images = _real_images(8)  # validation images, not the calibration ones
    result = compare_predictions(eager(images), fast(images))
    assert result.passed_for("openvino-int8"), result
    # The shipped classifier takes the whole image: its probabilities are f32's, mask or not.
    assert result.max_probability_difference <= MAX_PROBABILITY_DIFFERENCE, result


def test_the_cpu_default_is_int8_where_calibration_images_are_at_hand(tmp_path):
    assert default_backend("cpu") == "openvino-mixed"
    assert default_backend("cpu", calibrated=True) == "openvino-int8"
    assert default_backend("cuda", calibrated=True) == "eager-mixed"
    eager = Predictor.load("lesion-segmenter")
    calibration = read_calibration_images(str(TRAINING_IMAGES), eager.input_size, count=8)
    _, used, _ = accelerated(eager, cache_dir=tmp_path, calibration_images=calibration)
    assert used == "openvino-int8"
    _, used, _ = accelerated(eager, cache_dir=tmp_path)
    assert used == ("openvino-mixed" if openvino_runs_bf16() else "openvino")


def test_an_actor_given_calibration_images_runs_int8_by_default_past_its_guard(
    tmp_path, monkeypatch
):
    from skinray.score.actors import PredictActor

    monkeypatch.setenv("SKINRAY_CACHE", str(tmp_path / "cache"))
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for path in sorted(TRAINING_IMAGES.glob("*.jpg"))[:16]:
        (calibration / path.name).symlink_to(path)
    size = Predictor.load("lesion-segmenter", "ham10000-classifier").input_size
    calibration_images = read_calibration_images(str(calibration), size)
    actor = PredictActor(
        "lesion-segmenter",
        "ham10000-classifier",
        batch_size=8,
        calibration_images=calibration_images,
    )
    images = np.stack([cv2.resize(i, size[::-1]) for i in _real_images(8)])
    batch = {
        "source_uri": np.array([f"v{i}" for i in range(8)], dtype=object),
        "image": images,
        "error_stage": np.array([""] * 8, dtype=object),
    }
    rows = actor(batch)
    assert actor.backend == "openvino-int8", actor.fallback_reason
    assert set(rows["backend"]) == {"openvino-int8"}
    # Every row names the images that calibrated it.
    expected = calibration_sha256(calibration_images)
    assert set(rows["int8_calibration_sha256"]) == {expected}
    # ... and the libraries, with their versions, that quantised and ran it.
    (versions,) = set(rows["backend_versions"])
    assert versions == runtime_versions("openvino-int8")
    assert [part.split()[0] for part in versions.split("; ")] == ["torch", "openvino", "nncf"]
    assert f"nncf {importlib.metadata.version('nncf')}" in versions
    assert expected != calibration_sha256(calibration_images[:8])


def test_int8_is_cached_by_the_calibration_images(tmp_path):
    eager = Predictor.load("lesion-segmenter")
    calibration = read_calibration_images(str(TRAINING_IMAGES), eager.input_size, count=8)
    first, _, _ = accelerated(
        eager, "openvino-int8", cache_dir=tmp_path, calibration_images=calibration
    )
    written = first.model.path.stat().st_mtime_ns
    again, _, _ = accelerated(
        eager, "openvino-int8", cache_dir=tmp_path, calibration_images=calibration
    )
    assert again.model.path == first.model.path
    assert again.model.path.stat().st_mtime_ns == written  # not quantised again
    other, _, _ = accelerated(
        eager, "openvino-int8", cache_dir=tmp_path, calibration_images=calibration[:4]
    )
    assert other.model.path != first.model.path


def test_int8_is_quantised_again_by_other_nncf_settings(tmp_path, monkeypatch):
    """The same calibration images under another quantiser (NNCF's version or its settings) must
    not reuse the cached network: a node that upgrades NNCF would run another int8 model under
    the same calibration digest."""
    import nncf  # the test extra installs it, as every int8 test here assumes

    from skinray import backends

    eager = Predictor.load("lesion-segmenter")
    calibration = read_calibration_images(str(TRAINING_IMAGES), eager.input_size, count=8)
    first, _, _ = accelerated(
        eager, "openvino-int8", cache_dir=tmp_path, calibration_images=calibration
    )
    # An upgrade of either changes the name too.
    versions = f"nncf {nncf.__version__} openvino {importlib.metadata.version('openvino')} "
    assert versions in backends._quantiser()
    monkeypatch.setitem(backends._NNCF_SETTINGS, "preset", nncf.QuantizationPreset.MIXED)
    other, used, _ = accelerated(
        eager, "openvino-int8", cache_dir=tmp_path, calibration_images=calibration
    )
    assert used == "openvino-int8" and other.model.quantised
    assert other.model.path != first.model.path and first.model.path.exists()
    images = _real_images(4)
    # Asymmetric activation ranges (MIXED) give another network: the setting reached NNCF.
    assert not torch.equal(first(images).mask_probability, other(images).mask_probability)


def test_int8_without_calibration_images_falls_back_to_mixed_and_says_so(tmp_path):
    eager = Predictor.load("lesion-segmenter")
    for calibration in (None, np.zeros((0, *eager.input_size, 3), np.uint8)):  # none decoded
        fast, used, reason = accelerated(
            eager, "openvino-int8", cache_dir=tmp_path, calibration_images=calibration
        )
        assert used == ("openvino-mixed" if openvino_runs_bf16() else "openvino")
        assert fast.model.precision == "bf16"
        assert not fast.model.quantised
        assert "int8 needs calibration images" in reason


def test_int8_on_a_model_with_nothing_to_quantise_runs_and_says_openvino(tmp_path):
    """A classifier alone: int8 leaves networks with class outputs in f32, so nothing is
    quantised and its rows must not claim int8."""
    eager = Predictor.load("ham10000-classifier")
    calibration = read_calibration_images(str(TRAINING_IMAGES), eager.input_size, count=8)
    fast, used, reason = accelerated(
        eager, "openvino-int8", cache_dir=tmp_path, calibration_images=calibration
    )
    assert used == "openvino" and "has none" in reason
    assert fast.model.precision == "f32" and not fast.model.quantised
    images = _real_images(4)
    result = compare_predictions(eager(images), fast(images))
    assert result.passed_for("openvino"), result


def test_calibration_inputs_are_what_each_network_sees_in_the_prediction_path():
    eager = Predictor.load("lesion-segmenter", "ham10000-classifier")
    images = np.stack(_real_images(3))
    images = np.stack([cv2.resize(i, eager.input_size[::-1]) for i in images])
    seen = network_inputs(eager, images)
    segmenter, classifier = eager.model.segmenter, eager.model.classifier
    assert seen[segmenter].shape == (3, 3, *eager.model.segmenter_input_size)
    assert seen[classifier].shape == (3, 3, *eager.model.classifier_input_size)
    # Normalised inputs, not raw pixels: roughly centred on 0.
    assert abs(float(seen[segmenter].mean())) < 1.5 and seen[segmenter].max() < 10


def test_an_unknown_backend_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match="openvino-bf16"):
        accelerated(_predictor("unet", tmp_path), "onnxruntime")


def test_the_score_config_names_every_backend():
    from skinray.score.config import BACKEND_NAMES

    assert BACKEND_NAMES == BACKENDS


def _pair_batch(indices) -> torch.Tensor:
    eager_size = Predictor.load("lesion-segmenter", "ham10000-classifier").input_size
    images = _real_images(max(indices) + 1)
    chosen = np.stack([cv2.resize(images[i], eager_size[::-1]) for i in indices])
    return torch.from_numpy(chosen).permute(0, 3, 1, 2)


def test_one_image_is_no_verdict_the_guard_runs_over_its_first_images():
    # bf16 autocast moves the released pair's probabilities by 0.0087 on the first ISIC 2017
    # validation image alone (within 0.01) and by 0.0218 over the first 16: an actor whose first
    # batch held one healthy image ran bf16 for the rest of its run.
    eager = Predictor.load("lesion-segmenter", "ham10000-classifier")
    guarded = GuardedPredictor(eager, "eager-bf16", min_images=16)
    first = _pair_batch([0])
    bf16, _, _ = accelerated(eager, "eager-bf16")
    np.testing.assert_array_equal(
        guarded(first).class_probabilities.numpy(), bf16(first).class_probabilities.numpy()
    )
    assert guarded.backend == "eager-bf16" and guarded.guarding and guarded.result.images == 1
    rest = _pair_batch(range(1, 16))
    prediction = guarded(rest)
    assert guarded.backend == "eager-mixed"  # the classifier back in f32
    assert guarded.fallback_reason.startswith("eager-bf16 failed the accuracy guard")
    assert "images=16" in guarded.fallback_reason  # judged on all it had seen
    assert guarded.result.images == 15 and guarded.guarding  # mixed is guarded afresh
    expected = eager(rest).class_probabilities
    assert (prediction.class_probabilities - expected).abs().max() <= MAX_PROBABILITY_DIFFERENCE
    guarded(_pair_batch([16]))
    assert guarded.backend == "eager-mixed" and guarded.result.images == 16
    assert not guarded.guarding  # judged on 16 images, it runs alone now


def test_each_row_names_the_backend_that_made_it_when_the_guard_falls_back_mid_batch():
    from skinray.score.actors import PredictActor

    actor = PredictActor(
        "lesion-segmenter", "ham10000-classifier", batch_size=1, backend="eager-bf16"
    )
    images = _pair_batch([0, 2]).permute(0, 2, 3, 1).numpy()  # 2 fails the guard, 0 alone not
    rows = actor(
        {
            "source_uri": np.array(["v0", "v2"], dtype=object),
            "image": images,
            "error_stage": np.array(["", ""], dtype=object),
        }
    )
    assert list(rows["backend"]) == ["eager-bf16", "eager-mixed"]
    assert actor.backend == "eager-mixed"


def test_guard_results_combine_as_one_over_all_their_images():
    from skinray.backends import GuardResult

    first, second = GuardResult(1.0, 0.002, 1.0, 0.0, 1), GuardResult(0.97, 0.02, 0.5, 0.03, 3)
    both = first.combined(second)
    assert both.images == 4
    assert both.mask_jaccard == pytest.approx((1.0 + 3 * 0.97) / 4)
    assert both.class_agreement == pytest.approx((1.0 + 3 * 0.5) / 4)
    assert (both.max_probability_difference, both.max_ood_score_difference) == (0.02, 0.03)
    assert first.passed and not both.passed


def test_mixed_on_a_classifier_alone_is_reported_as_the_f32_it_runs(tmp_path):
    # A network with class outputs runs f32 under openvino-mixed: with no other network, rows
    # said openvino-mixed for an all-f32 run.
    eager = _predictor("classifier", tmp_path)
    fast, used, reason = accelerated(eager, "openvino-mixed", cache_dir=tmp_path / "cache")
    assert used == "openvino" and "runs as openvino (f32)" in reason
    assert {m.runs_in for m in fast.model.modules() if hasattr(m, "runs_in")} == {"f32"}


def test_int8_calibration_with_test_time_flips_is_another_calibration():
    # With flips the networks are calibrated on each image's flipped views too: a quantisation
    # cached without them was reused with them.
    from skinray.backends import _calibration

    eager = Predictor.load("lesion-segmenter")
    images = np.stack([cv2.resize(i, eager.input_size[::-1]) for i in _real_images(2)])
    flipped = Predictor.load("lesion-segmenter")
    flipped.test_time_flips = True
    plain, with_flips = _calibration(eager, images), _calibration(flipped, images)
    assert plain.digest != with_flips.digest
    counts = [len(next(iter(c.inputs().values()))) for c in (plain, with_flips)]
    assert counts == [2, 6]
