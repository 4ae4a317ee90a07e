"""One way to create any skinray model: a dict registry and ``create_model(name, **kwargs)``.

Every registered model's ``forward(x)`` returns a dict with the same keys, each present where the model
produces it, so training, evaluation and scoring never name a paper:

- ``mask_logits``: (N, 1, H, W) lesion logits at the input size (models that segment);
- ``class_logits``: (N, C) (models that classify);
- ``cam``: (N, C, h, w) class localisation maps (models that yield them);
- ``roi_box``: (N, 4) the lesion box (y0, x0, y1, x1) in input pixels a composite cut its
  classifier's input from (the two-step pipeline).

Every model also carries ``normalization`` (mean, std) and ``input_channels``: 3 for RGB, more for
stages that take guidance channels after RGB (MB-DCNN's mask-CN and enhanced-SN).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

__all__ = [
    "CAM",
    "CLASS_LOGITS",
    "FEATURES",
    "MASK_LOGITS",
    "ROI_BOX",
    "ModelConfigError",
    "ModelSpec",
    "create_model",
    "get_model_spec",
    "list_models",
    "register_model",
]

MASK_LOGITS = "mask_logits"
CLASS_LOGITS = "class_logits"
CAM = "cam"
ROI_BOX = "roi_box"
#: A classifier's pooled features (N, D), the input of its last layer: what ``skinray.ood`` measures.
FEATURES = "features"
OUTPUT_KEYS = (MASK_LOGITS, CLASS_LOGITS, CAM, ROI_BOX, FEATURES)

#: Constructor arguments that point at ImageNet weights: they shape a model's start, not its
#: architecture, so a saved model does not record them.
INITIALISATION_KWARGS = frozenset({"encoder_weights"})


class ModelConfigError(ValueError):
    """An unknown model name, or arguments a model does not take."""


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model besides how to build it."""

    name: str
    builder: Callable[..., nn.Module]
    outputs: tuple[str, ...]
    paper: str
    paper_input_size: tuple[int, int]
    paper_kwargs: dict[str, Any] = field(default_factory=dict)
    #: The smallest sensible configuration: tests and smoke runs build this.
    smoke_kwargs: dict[str, Any] = field(default_factory=dict)
    #: Parameter count the paper itself states, in millions, or None where it states none.
    paper_params_millions: float | None = None
    #: The paper's losses, as names in ``skinray.losses.LOSSES`` (None where the model has no such head).
    segmentation_loss: str | None = None
    classification_loss: str | None = None

    @property
    def segments(self) -> bool:
        return MASK_LOGITS in self.outputs

    @property
    def classifies(self) -> bool:
        return CLASS_LOGITS in self.outputs

    def accepted_kwargs(self) -> dict[str, Any]:
        """Constructor arguments and their defaults (``inspect.Parameter.empty`` when required)."""
        signature = inspect.signature(self.builder)
        return {
            name: p.default
            for name, p in signature.parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    outputs: tuple[str, ...],
    paper: str,
    paper_input_size: tuple[int, int],
    paper_kwargs: dict[str, Any] | None = None,
    smoke_kwargs: dict[str, Any] | None = None,
    paper_params_millions: float | None = None,
    segmentation_loss: str | None = None,
    classification_loss: str | None = None,
):
    """Class or function decorator adding a model builder to the registry under ``name``."""
    from skinray.losses import LOSSES

    unknown = set(outputs) - set(OUTPUT_KEYS)
    if unknown:
        raise ValueError(f"{name}: outputs {sorted(unknown)} are not in the contract {OUTPUT_KEYS}")
    for loss in (segmentation_loss, classification_loss):
        if loss is not None and loss not in LOSSES:
            raise ValueError(f"{name}: loss {loss!r} is not one of {sorted(LOSSES)}")
    if MASK_LOGITS in outputs and segmentation_loss is None:
        raise ValueError(f"{name}: a segmenter needs its paper's segmentation_loss")
    if CLASS_LOGITS in outputs and classification_loss is None:
        raise ValueError(f"{name}: a classifier needs its paper's classification_loss")

    def decorate(builder):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(
            name=name,
            builder=builder,
            outputs=tuple(outputs),
            paper=paper,
            paper_input_size=tuple(paper_input_size),
            paper_kwargs=dict(paper_kwargs or {}),
            smoke_kwargs=dict(smoke_kwargs or {}),
            paper_params_millions=paper_params_millions,
            segmentation_loss=segmentation_loss,
            classification_loss=classification_loss,
        )
        return builder

    return decorate


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelConfigError(
            f"unknown model {name!r}; known models: {', '.join(list_models())}"
        ) from None


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model. Random initialisation unless ``encoder_weights`` names a file.

    >>> import torch
    >>> model = create_model("unet", encoder="resnet18")
    >>> sorted(model(torch.zeros(1, 3, 64, 64)))
    ['mask_logits']
    """
    spec = get_model_spec(name)
    accepted = spec.accepted_kwargs()
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        allowed = ", ".join(
            k if v is inspect.Parameter.empty else f"{k}={v!r}" for k, v in accepted.items()
        )
        raise ModelConfigError(
            f"model {name!r} does not take {', '.join(map(repr, unknown))}; it takes: {allowed}"
        )
    model = spec.builder(**kwargs)
    model.skinray_model_name = name
    model.skinray_model_kwargs = {
        k: copy.deepcopy(v) for k, v in kwargs.items() if k not in INITIALISATION_KWARGS
    }
    return model
