"""timm backbones with ImageNet weights from a local or s3:// safetensors file, never a download.

timm is the single source of encoders: classifiers come from ``timm.create_model`` and encoders from
``timm.create_model(..., features_only=True)`` with ``feature_info`` as the contract between encoder
and decoder. Pretrained weights are a *configuration*: the file is read here, checked against the
architecture with strict key matching, and handed to timm as ``pretrained_cfg_overlay=dict(
state_dict=...)`` so timm's own loader places it (before any ``features_only`` wrapping).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

import timm
import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from skinray import io

__all__ = [
    "PretrainedWeightsError",
    "create_timm_model",
    "last_feature_layer",
    "normalization_of",
    "read_backbone_weights",
    "require_timm_model",
]


class PretrainedWeightsError(ValueError):
    """A weights file that does not fit the architecture it was given for."""


def require_timm_model(name: str) -> None:
    """Raise a ``ValueError`` naming close timm architectures when ``name`` is not one."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise ValueError(f"unknown timm architecture {name!r}{hint} (see timm.list_models())")


def read_backbone_weights(timm_name: str, uri: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file and check that it holds exactly the trunk of ``timm_name``.

    Strict key matching on the trunk: every parameter and buffer of the architecture (without its
    classifier) must be in the file with the same shape, and the file may hold nothing else but
    that classifier. The classifier is dropped here, since skinray always fits a new head.
    """
    require_timm_model(timm_name)
    try:
        state = load_safetensors(io.read_bytes(uri))
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise PretrainedWeightsError(f"{uri}: not a readable safetensors file ({error})") from error

    with torch.device("meta"):
        reference = timm.create_model(timm_name, pretrained=False, num_classes=0)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    classifier = reference.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    head_keys = {f"{c}.{p}" for c in classifier for p in ("weight", "bias")}
    trunk = {k: v for k, v in state.items() if k not in head_keys}

    missing = sorted(expected.keys() - trunk.keys())
    unexpected = sorted(trunk.keys() - expected.keys())
    mismatched = sorted(
        f"{k}: file {tuple(trunk[k].shape)} vs model {expected[k]}"
        for k in expected.keys() & trunk.keys()
        if tuple(trunk[k].shape) != expected[k]
    )
    if missing or unexpected or mismatched:
        problems = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape", mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:5]) + (f" … ({len(keys)} in all)" if len(keys) > 5 else "")
                problems.append(f"{label}: {shown}")
        raise PretrainedWeightsError(
            f"{uri} does not match timm architecture {timm_name!r}: " + "; ".join(problems)
        )
    return trunk


def create_timm_model(name: str, weights: str | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, from ``weights`` (a safetensors URI) or random init."""
    require_timm_model(name)
    if weights is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    state = read_backbone_weights(name, weights)
    # The head was dropped from ``state``; timm adds a fresh one and adapts the stem to in_chans.
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(state_dict=state), pretrained_strict=False, **kwargs)  # fmt: skip
    return model


def normalization_of(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) a timm model (or a module holding one) was pretrained with."""
    cfg: Mapping = getattr(model, "pretrained_cfg", None) or {}
    mean = cfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN)
    std = cfg.get("std", timm.data.IMAGENET_DEFAULT_STD)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def last_feature_layer(model: nn.Module) -> nn.Module:
    """The module of a timm classifier whose output feeds global pooling (its last ``feature_info``)."""
    return model.get_submodule(model.feature_info[-1]["module"])
