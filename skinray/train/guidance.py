"""Frozen saved models whose outputs feed a model in training: MB-DCNN's bootstrapping and the
two-step paper's ROIs.

- A guidance chain runs saved models in order on each batch; each sees the image plus the previous
  model's guidance, and hands on its own: a segmenter its lesion probability (coarse-SN → mask-CN),
  a model with CAMs its normalised class maps (mask-CN → enhanced-SN), MB-DCNN Sec. III-B and III-C.
- A ROI segmenter's thresholded mask multiplies the image (Innani et al., Sec. 3.2): the classifier
  trains on the ROIs the segmenter produces, as it will see them when scoring.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from skinray.data.transforms import normalise
from skinray.models import CAM, MASK_LOGITS, load_model
from skinray.models.mbdcnn import normalise_cam

__all__ = ["GuidanceChain", "RoiSegmenter"]


class GuidanceChain:
    def __init__(self, model_uris: Sequence[str], device: torch.device | str = "cpu") -> None:
        self.models = [load_model(uri, device=device) for uri in model_uris]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N,3,H,W) → guidance channels (N,C,H,W) in [0, 1]."""
        guidance = None
        size = tuple(images.shape[-2:])
        for model in self.models:
            config = model.saved_config
            x = normalise(images, config.mean, config.std)
            if guidance is not None:
                x = torch.cat([x, guidance], dim=1)
            outputs = model(x)
            if CAM in outputs:
                guidance = normalise_cam(outputs[CAM].float(), size)
            else:
                guidance = torch.sigmoid(outputs[MASK_LOGITS].float())
        return guidance


class RoiSegmenter:
    def __init__(self, model_uri: str, device: torch.device | str = "cpu") -> None:
        self.model = load_model(model_uri, device=device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (N,3,H,W) → predicted lesion masks (N,H,W) uint8."""
        config = self.model.saved_config
        logits = self.model(normalise(images, config.mean, config.std))[MASK_LOGITS]
        return (torch.sigmoid(logits.float())[:, 0] > config.mask_threshold).to(torch.uint8)
