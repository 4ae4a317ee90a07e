"""Class activation maps for any registered classifier: plain CAM (MB-DCNN) and Grad-CAM++ (CLNet).

- Plain CAM (Zhou et al. 2016; MB-DCNN Sec. III-C): the classifier's FC weights for a class applied to
  the feature maps that feed global average pooling. Models that yield ``cam`` themselves (MB-DCNN's
  mask-CN) are read as they are; a timm ``classifier`` gets it from its features and linear head.
- Grad-CAM++ (Chattopadhyay et al. 2018), the method CLNet names (Sec. 2.1), through the ``grad-cam``
  package on the layer each model names in ``cam_target_layer()``: its channel weights are the
  α-weighted positive gradients, and the ReLU follows the channel sum. CLNet's Eqs. 2–3 as printed
  are another map (plain gradient means, a ReLU on each channel's term); the named method is
  followed. CLNet's target is its last fusion module, 512 of the 1,472 channels its classifier
  pools (Eq. 1), so the shallower fusion maps do not enter the map.

Both return (N, H, W) maps at the input size, ReLU'd and scaled to [0, 1] per image, for the target
class of each image (the ground-truth label as CLNet uses it, or the predicted class when none is given).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from skinray.models.registry import CAM, CLASS_LOGITS

__all__ = ["class_activation_map", "grad_cam_plus_plus"]


def _scale(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    maps = F.interpolate(F.relu(maps)[:, None], size=size, mode="bilinear", align_corners=False)[
        :, 0
    ]
    low = maps.flatten(1).amin(1)[:, None, None]
    high = maps.flatten(1).amax(1)[:, None, None]
    return (maps - low) / (high - low).clamp_min(1e-7)


def _targets(targets: Sequence[int] | torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    if targets is None:
        return logits.argmax(1)
    targets = torch.as_tensor(targets, device=logits.device).long()
    if targets.shape != (logits.shape[0],):
        raise ValueError(f"need one target class per image, got shape {tuple(targets.shape)}")
    return targets


@torch.no_grad()
def class_activation_map(
    model: nn.Module, x: torch.Tensor, targets: Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """Plain CAM of each image's target class, (N, H, W) in [0, 1]."""
    outputs = model(x)
    if CAM in outputs:
        cams = outputs[CAM]
    elif hasattr(model, "net") and hasattr(model.net, "forward_features"):
        head = model.net.get_classifier()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"plain CAM needs a GAP + linear head, this model has {head}")
        features = model.net.forward_features(x)
        cams = torch.einsum("nkhw,ck->nchw", features, head.weight)
    else:
        raise ValueError(
            f"{type(model).__name__} yields no 'cam' and has no GAP + linear head; "
            "use grad_cam_plus_plus"
        )
    chosen = _targets(targets, outputs[CLASS_LOGITS])
    selected = cams[torch.arange(len(chosen), device=cams.device), chosen]
    return _scale(selected, x.shape[-2:])


class _ClassLogits(nn.Module):
    """The model seen as ``x -> class_logits``, as the grad-cam package expects."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[CLASS_LOGITS]


def grad_cam_plus_plus(
    model: nn.Module,
    x: torch.Tensor,
    targets: Sequence[int] | torch.Tensor | None = None,
    target_layer: nn.Module | None = None,
) -> torch.Tensor:
    """Grad-CAM++ of each image's target class, (N, H, W) in [0, 1].

    ``target_layer`` defaults to the model's ``cam_target_layer()`` (the features before GAP).
    """
    if target_layer is None:
        if not hasattr(model, "cam_target_layer"):
            raise ValueError(
                f"{type(model).__name__} names no cam_target_layer(); pass target_layer"
            )
        target_layer = model.cam_target_layer()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)[CLASS_LOGITS]
        chosen = _targets(targets, logits)
        with GradCAMPlusPlus(model=_ClassLogits(model), target_layers=[target_layer]) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in chosen])
    finally:
        model.train(was_training)
    return torch.from_numpy(maps).to(x.device)
