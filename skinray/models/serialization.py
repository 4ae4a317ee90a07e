"""A saved model is a directory, local or s3://: ``model.safetensors`` + ``config.json``.

``config.json`` holds what it takes to rebuild and use the model: the registry name and constructor
arguments, the input size, normalisation, class names, mask threshold, skinray version and the
SHA-256 of the weights file. ``load_model`` rebuilds the model through the registry and loads the
weights with strict key matching; nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch
from safetensors.torch import load as load_safetensors
from torch import nn

import skinray
from skinray import io
from skinray.models.registry import CLASS_LOGITS, create_model, get_model_spec
from skinray.models.zoo import resolve_model

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "SavedModelConfig",
    "load_model",
    "read_model_config",
    "save_model",
    "write_model_config",
]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class SavedModelConfig:
    model: str
    kwargs: dict[str, Any]
    input_size: tuple[int, int]
    input_channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None
    mask_threshold: float
    outputs: tuple[str, ...]
    weights_sha256: str
    skinray_version: str
    #: For a classifier trained on lesion ROIs: the ROI's margin and the size of the image it was
    #: cut from (what a two-step pipeline assembled around it decodes to). None otherwise.
    roi_margin: float | None = None
    roi_source_size: tuple[int, int] | None = None
    #: Class logits are divided by this before the softmax (``skinray.calibration``; 1: as trained).
    temperature: float = 1.0
    #: ``Predictor`` averages the logits over the image and its horizontal and vertical flips.
    test_time_flips: bool = False
    #: The out-of-distribution score's settings and bank hash (``skinray.ood``); None without one.
    ood: dict[str, Any] | None = None
    #: The validation hold-out its training drew from its data (``source``, ``fraction``,
    #: ``seed``: ``skinray.data.datasets.holdout_split``), for evaluation to draw the same one;
    #: None where training validated on a split of its own.
    holdout: dict[str, Any] | None = None
    #: The images the temperature was fitted on (``images``, and ``image_ids_sha256``:
    #: ``skinray.data.datasets.image_set_digest``), so that an evaluation on them can say its
    #: calibration figures are in-sample; None where it was not fitted.
    temperature_fitted_on: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, text: str, source: str = "config.json") -> SavedModelConfig:
        raw = json.loads(text)
        fields = {f.name for f in dataclasses.fields(cls)}
        optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        missing = sorted(fields - optional - raw.keys())
        if missing:
            raise ValueError(f"{source}: missing keys {missing}")
        raw = {k: v for k, v in raw.items() if k in fields}
        raw["input_size"] = tuple(raw["input_size"])
        raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
        raw["outputs"] = tuple(raw["outputs"])
        if raw["class_names"] is not None:
            raw["class_names"] = tuple(raw["class_names"])
        if raw.get("roi_source_size") is not None:
            raw["roi_source_size"] = tuple(raw["roi_source_size"])
        temperature = raw.get("temperature", 1.0)
        if not (isinstance(temperature, int | float) and 0 < temperature < math.inf):
            # Logits are divided by it: 0 gave NaN probabilities, a negative one the least
            # likely class.
            raise ValueError(f"{source}: temperature {temperature!r} is not a positive number")
        if not 0 <= raw["mask_threshold"] <= 1:
            raise ValueError(f"{source}: mask_threshold {raw['mask_threshold']} is not in [0, 1]")
        return cls(**raw)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @property
    def config_sha256(self) -> str:
        """SHA-256 of every setting that shapes a prediction, the weights' hash among them (not the
        skinray version that wrote it): a recalibrated temperature or test-time flips change it
        where the weights' hash stays."""
        settings = dataclasses.asdict(self)
        for record in ("skinray_version", "holdout", "temperature_fitted_on"):
            del settings[record]  # none shapes a prediction
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def replace(self, **changes: Any) -> SavedModelConfig:
        return dataclasses.replace(self, **changes)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def save_model(
    model: nn.Module,
    uri: str,
    *,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    mask_threshold: float = 0.5,
    roi_margin: float | None = None,
    roi_source_size: Sequence[int] | None = None,
    temperature: float = 1.0,
    test_time_flips: bool = False,
    holdout: dict[str, Any] | None = None,
    temperature_fitted_on: dict[str, Any] | None = None,
    weights_dtype: torch.dtype = torch.float32,
    filesystem=None,
) -> SavedModelConfig:
    """Write ``model`` (made by ``create_model``) to the directory ``uri``.

    ``input_size`` defaults to the paper's, ``mean``/``std`` to the encoder's pretraining statistics.
    A model with class logits needs one class name per logit: a model saved without them would
    pass here and fail a scoring run after the whole archive had been decoded and segmented.
    ``weights_dtype=torch.float16`` halves the file (released models); loading casts back to the
    model's float32 parameters.
    """
    name = getattr(model, "skinray_model_name", None)
    if name is None:
        raise ValueError("save_model needs a model built by skinray.models.create_model")
    spec = get_model_spec(name)
    _check_class_names(model, spec, class_names, uri)
    model_mean, model_std = getattr(
        model, "normalization", ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    )
    # Tied parameters share storage, which safetensors refuses; contiguous copies store them apart
    # and load_state_dict writes both names back into the one tensor.
    # Only parameters take ``weights_dtype``: buffers (normalisation constants, BatchNorm
    # statistics) are small and keep their precision.
    parameters = {name for name, _ in model.named_parameters()}
    state = {
        k: (v.to(weights_dtype) if k in parameters else v).detach().cpu().contiguous().clone()
        for k, v in model.state_dict().items()
    }
    weights = safetensors.torch.save(state, metadata={"skinray_model": name})
    config = SavedModelConfig(
        model=name,
        kwargs=_jsonable(model.skinray_model_kwargs),
        input_size=tuple(int(s) for s in (input_size or spec.paper_input_size)),
        input_channels=int(getattr(model, "input_channels", 3)),
        mean=tuple(float(m) for m in (mean or model_mean)),
        std=tuple(float(s) for s in (std or model_std)),
        class_names=tuple(class_names) if class_names is not None else None,
        mask_threshold=float(mask_threshold),
        outputs=spec.outputs,
        weights_sha256=hashlib.sha256(weights).hexdigest(),
        skinray_version=skinray.__version__,
        roi_margin=float(roi_margin) if roi_margin is not None else None,
        roi_source_size=tuple(int(s) for s in roi_source_size) if roi_source_size else None,
        temperature=float(temperature),
        test_time_flips=bool(test_time_flips),
        holdout=dict(holdout) if holdout is not None else None,
        temperature_fitted_on=dict(temperature_fitted_on) if temperature_fitted_on else None,
    )
    io.write_bytes(io.join(uri, WEIGHTS_FILE), weights, filesystem)
    io.write_bytes(io.join(uri, CONFIG_FILE), config.to_json().encode(), filesystem)
    return config


def _class_logit_count(model: nn.Module) -> int:
    """The width of the model's class logits, from one forward pass on a small blank input."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(1, getattr(model, "input_channels", 3), 64, 64)
            parameter = next(model.parameters(), None)
            if parameter is not None:
                x = x.to(parameter.device)
            return int(model(x)[CLASS_LOGITS].shape[1])
    finally:
        model.train(was_training)


def _check_class_names(model: nn.Module, spec, class_names, uri: str) -> None:
    if not spec.classifies:
        return
    count = _class_logit_count(model)
    given = 0 if class_names is None else len(class_names)
    if given != count:
        raise ValueError(
            f"save_model {uri}: {spec.name} has {count} class logits but {given} class names "
            "were given; pass class_names with one name per class"
        )


def write_model_config(uri: str, config: SavedModelConfig, filesystem=None) -> None:
    """Rewrite ``config.json`` (e.g. a fitted temperature); the weights, and their SHA-256, stay."""
    io.write_bytes(io.join(resolve_model(uri), CONFIG_FILE), config.to_json().encode(), filesystem)


def read_model_config(uri: str, filesystem=None) -> SavedModelConfig:
    uri = resolve_model(uri)
    path = io.join(uri, CONFIG_FILE)
    return SavedModelConfig.from_json(io.read_bytes(path, filesystem).decode(), source=path)


def load_model(uri: str, *, device: str | torch.device = "cpu", filesystem=None) -> nn.Module:
    """Rebuild a saved model through the registry; its config is ``model.saved_config``.

    ``uri`` is a directory (local or s3://) or the short name of a released model
    (``skinray.models.zoo``). The model comes back in eval mode.
    """
    uri = resolve_model(uri)
    config = read_model_config(uri, filesystem)
    weights = io.read_bytes(io.join(uri, WEIGHTS_FILE), filesystem)
    digest = hashlib.sha256(weights).hexdigest()
    if digest != config.weights_sha256:
        raise ValueError(
            f"{io.join(uri, WEIGHTS_FILE)}: SHA-256 {digest} does not match config.json "
            f"({config.weights_sha256}); the directory mixes two saves"
        )
    model = create_model(config.model, **config.kwargs)
    model.load_state_dict(load_safetensors(weights), strict=True)
    model.saved_config = config
    if config.ood:
        from skinray.ood import load_ood

        model.ood = load_ood(uri, config.ood)
    return model.to(device).eval()
