"""The two-step pipeline (Innani et al.) as one model: segmenter → lesion ROI → classifier.

The ROI is defined here once, and training, evaluation and scoring all cut it with these functions:

- the lesion is the segmenter's predicted mask (sigmoid > the segmenter's threshold) at the
  resolution of the image the model was given, never a ground-truth mask;
- the box spans every lesion pixel, enlarged by ``roi_margin`` × its height (width) above and below
  (left and right), clipped to the image (``lesion_boxes``);
- pixels outside the mask are set to black, as the paper's ROI (mask × image, Sec. 3.2) does, and the
  box is resampled to the classifier's input with ``torchvision.ops.roi_align`` (bilinear, adaptive
  sampling, so a large box is averaged rather than aliased) (``cut_rois``);
- a mask with no lesion pixel gives the whole, unmasked image: an all-black input would make the
  classifier's answer meaningless.

Why crop and mask rather than the paper's whole frame × mask: a lesion covering 5 % of a
dermoscopy frame would reach a 224 px classifier as a ~50 px speck in black; the box brings it at
the classifier's resolution, and the mask keeps what the paper's classifier was shown (lesion
pixels only). docs/models.md gives the choice with its reasons.

A classifier trained on whole images (no ROI) is paired with ``classifier_input="image"``: it is
given the whole image, resized to its input size, as it was trained, and the pair adds only the mask.

The composite is registered as ``two_step``: ``save_model`` writes both networks into one directory,
and ``TwoStep.from_stages`` assembles it from a separately saved segmenter and classifier, so
``--segmenter X --classifier Y`` and one saved two-step model are the same model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from skinray.models.registry import (
    CAM,
    CLASS_LOGITS,
    FEATURES,
    MASK_LOGITS,
    ROI_BOX,
    create_model,
    register_model,
)

__all__ = [
    "DEFAULT_ROI_MARGIN",
    "TwoStep",
    "cut_rois",
    "lesion_boxes",
    "predicted_lesion",
    "segment_at",
]

PAPER = "Innani et al., two-step segmentation then classification (segmenter → ROI → classifier)"
DEFAULT_ROI_MARGIN = 0.1
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def lesion_boxes(lesion: torch.Tensor, margin: float = DEFAULT_ROI_MARGIN) -> torch.Tensor:
    """Boxes (N, 4) = (y0, x0, y1, x1) in pixels, end-exclusive, around every lesion pixel of each
    (H, W) boolean mask, enlarged by ``margin`` and clipped; the whole image where there is none."""
    count, height, width = lesion.shape
    rows, cols = lesion.any(2), lesion.any(1)
    y = torch.arange(height, device=lesion.device).expand(count, -1)
    x = torch.arange(width, device=lesion.device).expand(count, -1)
    y0 = torch.where(rows, y, height).amin(1)
    y1 = torch.where(rows, y + 1, 0).amax(1)
    x0 = torch.where(cols, x, width).amin(1)
    x1 = torch.where(cols, x + 1, 0).amax(1)
    pad_y, pad_x = torch.round(margin * (y1 - y0)), torch.round(margin * (x1 - x0))
    boxes = torch.stack(
        [
            (y0 - pad_y).clamp_min(0),
            (x0 - pad_x).clamp_min(0),
            (y1 + pad_y).clamp_max(height),
            (x1 + pad_x).clamp_max(width),
        ],
        dim=1,
    ).float()
    whole = torch.tensor([0.0, 0.0, height, width], device=lesion.device)
    return torch.where(rows.any(1)[:, None], boxes, whole)


def cut_rois(
    images: torch.Tensor,
    lesion: torch.Tensor,
    boxes: torch.Tensor,
    output_size: Sequence[int],
) -> torch.Tensor:
    """The ROIs (N, C, h, w): ``images`` (N, C, H, W) with pixels outside ``lesion`` set to 0
    (unmasked where the mask is empty), each ``boxes`` row resampled to ``output_size``."""
    found = lesion.flatten(1).any(1)[:, None, None]
    keep = torch.where(found, lesion, torch.ones_like(lesion))
    masked = images * keep[:, None].to(images.dtype)
    y0, x0, y1, x1 = boxes.to(images.dtype).unbind(1)
    index = torch.arange(len(images), device=images.device, dtype=images.dtype)
    # roi_align takes (batch index, x0, y0, x1, y1); with aligned=True, pixel i spans [i, i+1).
    rois = torch.stack([index, x0, y0, x1, y1], dim=1)
    return roi_align(masked, rois, tuple(output_size), spatial_scale=1.0, aligned=True)


def segment_at(segmenter: nn.Module, x: torch.Tensor, input_size: Sequence[int]) -> torch.Tensor:
    """Mask logits (N, 1, H, W) at ``x``'s size; ``segmenter`` runs at its ``input_size``."""
    logits = segmenter(_resize(x, input_size))[MASK_LOGITS]
    return _resize(logits.float(), x.shape[-2:])


def predicted_lesion(mask_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N, 1, H, W) logits → (N, H, W) boolean lesion mask."""
    return torch.sigmoid(mask_logits[:, 0]) > threshold


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


def _stats(normalization) -> torch.Tensor:
    return torch.tensor(normalization, dtype=torch.float32).view(2, 1, -1, 1, 1)


@register_model(
    "two_step",
    outputs=(MASK_LOGITS, CLASS_LOGITS, ROI_BOX, FEATURES),
    paper=PAPER,
    paper_input_size=(512, 512),
    paper_kwargs={
        "segmenter": {"model": "unet", "kwargs": {"encoder": "efficientnet_b4"}},
        "classifier": {
            "model": "classifier",
            "kwargs": {"encoder": "legacy_xception", "num_classes": 7},
        },
        "segmenter_input_size": (512, 512),
        "classifier_input_size": (224, 224),
    },
    smoke_kwargs={
        "segmenter": {
            "model": "unet",
            "kwargs": {"encoder": "resnet18", "decoder_channels": (32, 16, 16, 8, 8)},
        },
        "classifier": {"model": "classifier", "kwargs": {"encoder": "resnet18", "num_classes": 3}},
        "segmenter_input_size": (64, 64),
        "classifier_input_size": (64, 64),
    },
    segmentation_loss="bce_dice",
    classification_loss="cross_entropy",
)
class TwoStep(nn.Module):
    """Segmenter and ROI classifier in one module: ``forward(x)`` with ``x`` the image normalised
    with the segmenter's statistics, at any size (the size the ROI is cut at).

    Args:
        segmenter, classifier: ``{"model": registry name, "kwargs": {...}}`` of each network.
        segmenter_input_size, classifier_input_size: (height, width) each network was trained at.
        segmenter_normalization, classifier_normalization: ((mean), (std)) of each network.
        mask_threshold: the segmenter's lesion threshold on its sigmoid.
        roi_margin: the ROI box's margin, a fraction of the lesion box.
        classifier_input: ``"roi"`` (the classifier was trained on ROIs) or ``"image"`` (on whole
            images: it is given the whole image, and there is no ROI box).
    """

    def __init__(
        self,
        segmenter: dict[str, Any],
        classifier: dict[str, Any],
        segmenter_input_size: Sequence[int] = (512, 512),
        classifier_input_size: Sequence[int] = (224, 224),
        segmenter_normalization: Sequence[Sequence[float]] = _IMAGENET,
        classifier_normalization: Sequence[Sequence[float]] = _IMAGENET,
        mask_threshold: float = 0.5,
        roi_margin: float = DEFAULT_ROI_MARGIN,
        classifier_input: str = "roi",
    ) -> None:
        super().__init__()
        self._wire(
            create_model(segmenter["model"], **segmenter.get("kwargs", {})),
            create_model(classifier["model"], **classifier.get("kwargs", {})),
            segmenter_input_size,
            classifier_input_size,
            mask_threshold,
            roi_margin,
            segmenter_normalization,
            classifier_normalization,
            classifier_input,
        )

    def _wire(
        self,
        segmenter: nn.Module,
        classifier: nn.Module,
        segmenter_input_size,
        classifier_input_size,
        mask_threshold: float,
        roi_margin: float,
        segmenter_normalization=None,
        classifier_normalization=None,
        classifier_input: str = "roi",
    ) -> None:
        if getattr(classifier, "input_channels", 3) != 3:
            raise ValueError("the two-step classifier must take RGB ROIs (3 input channels)")
        if classifier_input not in ("roi", "image"):
            raise ValueError(f"classifier_input must be 'roi' or 'image', not {classifier_input!r}")
        self.classifier_input = classifier_input
        self.segmenter, self.classifier = segmenter, classifier
        self.segmenter_input_size = tuple(int(s) for s in segmenter_input_size)
        self.classifier_input_size = tuple(int(s) for s in classifier_input_size)
        self.mask_threshold, self.roi_margin = float(mask_threshold), float(roi_margin)
        seg_norm = segmenter_normalization or segmenter.normalization
        cls_norm = classifier_normalization or classifier.normalization
        self.normalization = (tuple(seg_norm[0]), tuple(seg_norm[1]))
        self.input_channels = 3
        self.register_buffer("_segmenter_stats", _stats(seg_norm), persistent=False)
        self.register_buffer("_classifier_stats", _stats(cls_norm), persistent=False)

    @classmethod
    def from_stages(
        cls,
        segmenter: nn.Module,
        classifier: nn.Module,
        *,
        segmenter_input_size: Sequence[int],
        classifier_input_size: Sequence[int],
        mask_threshold: float = 0.5,
        roi_margin: float = DEFAULT_ROI_MARGIN,
        segmenter_normalization: Sequence[Sequence[float]] | None = None,
        classifier_normalization: Sequence[Sequence[float]] | None = None,
        classifier_input: str = "roi",
    ) -> TwoStep:
        """Assemble two networks made by ``create_model`` (shared, not copied) into the pipeline;
        each network's normalisation defaults to its encoder's."""
        chain = cls.__new__(cls)
        nn.Module.__init__(chain)
        chain._wire(
            segmenter,
            classifier,
            segmenter_input_size,
            classifier_input_size,
            mask_threshold,
            roi_margin,
            segmenter_normalization,
            classifier_normalization,
            classifier_input,
        )
        chain.skinray_model_name = "two_step"
        chain.skinray_model_kwargs = {
            "segmenter": {
                "model": segmenter.skinray_model_name,
                "kwargs": segmenter.skinray_model_kwargs,
            },
            "classifier": {
                "model": classifier.skinray_model_name,
                "kwargs": classifier.skinray_model_kwargs,
            },
            "segmenter_input_size": chain.segmenter_input_size,
            "classifier_input_size": chain.classifier_input_size,
            "segmenter_normalization": chain.normalization,
            "classifier_normalization": tuple(
                tuple(v) for v in chain._classifier_stats.view(2, -1).tolist()
            ),
            "mask_threshold": chain.mask_threshold,
            "roi_margin": chain.roi_margin,
        }
        if classifier_input != "roi":  # saved two-step models from before stay as they were
            chain.skinray_model_kwargs["classifier_input"] = classifier_input
        return chain

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Mask logits (N, 1, H, W) at ``x``'s size; the segmenter runs at its own input size."""
        return segment_at(self.segmenter, x, self.segmenter_input_size)

    def roi_input(
        self,
        x: torch.Tensor,
        mask_logits: torch.Tensor | None = None,
        lesion: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier's input (its normalisation, its input size) and the ROI boxes, cut from
        ``x`` with the segmenter's predicted lesion: ``lesion`` (N, H, W) where given (a predicted
        mask made earlier, e.g. cached for training), else from ``mask_logits`` or the segmenter."""
        if lesion is None:
            if mask_logits is None:
                mask_logits = self.segment(x)
            lesion = predicted_lesion(mask_logits, self.mask_threshold)
        boxes = lesion_boxes(lesion, self.roi_margin)
        seg_mean, seg_std = self._segmenter_stats
        cls_mean, cls_std = self._classifier_stats
        pixels = x.float() * seg_std + seg_mean  # back to [0, 1]
        rois = cut_rois(pixels, lesion, boxes, self.classifier_input_size)
        return (rois - cls_mean) / cls_std, boxes

    def image_input(self, x: torch.Tensor) -> torch.Tensor:
        """The whole image as the classifier's input (its normalisation, its input size)."""
        seg_mean, seg_std = self._segmenter_stats
        cls_mean, cls_std = self._classifier_stats
        pixels = _resize(x.float() * seg_std + seg_mean, self.classifier_input_size)
        return (pixels - cls_mean) / cls_std

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mask_logits = self.segment(x)
        if self.classifier_input == "image":
            classified = self.classifier(self.image_input(x))
            outputs = {MASK_LOGITS: mask_logits}
        else:
            rois, boxes = self.roi_input(x, mask_logits)
            classified = self.classifier(rois)
            outputs = {MASK_LOGITS: mask_logits, ROI_BOX: boxes}
        outputs[CLASS_LOGITS] = classified[CLASS_LOGITS]
        for key in (CAM, FEATURES):
            if key in classified:
                outputs[key] = classified[key]
        return outputs
