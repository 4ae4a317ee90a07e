"""U-Net with a deep timm encoder: the segmenter of the two-step paper (Innani et al., Sec. 3.1).

The paper pairs a U-Net decoder with ResNet50/101, MobileNet, InceptionResNetV2 or EfficientNet-B4
encoders at 512×512 input (EfficientNet-B4 scored best, Dice 89.56, Table 2). smp's U-Net decoder over
smp's ``tu-`` timm encoders is that architecture, so nothing is written by hand here.
"""

from __future__ import annotations

from collections.abc import Sequence

import segmentation_models_pytorch as smp
import torch
from torch import nn

from skinray.models.backbones import normalization_of, read_backbone_weights, require_timm_model
from skinray.models.registry import MASK_LOGITS, register_model

__all__ = ["UNet"]


@register_model(
    "unet",
    outputs=(MASK_LOGITS,),
    paper="Innani et al., two-step segmentation then classification (U-Net, deep encoders)",
    paper_input_size=(512, 512),
    paper_kwargs={"encoder": "efficientnet_b4"},
    smoke_kwargs={"encoder": "resnet18", "decoder_channels": (32, 16, 16, 8, 8)},
    segmentation_loss="bce_dice",
)
class UNet(nn.Module):
    """U-Net over any timm encoder with five feature stages.

    Args:
        encoder: timm architecture name (``resnet50``, ``efficientnet_b4``, ``mobilenetv2_100`` …).
        encoder_weights: local or s3:// safetensors file with the encoder's ImageNet weights;
            None starts from random initialisation.
        in_chans: input channels.
        decoder_channels: widths of the five decoder blocks, deepest first.
    """

    def __init__(
        self,
        encoder: str = "resnet50",
        encoder_weights: str | None = None,
        in_chans: int = 3,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    ) -> None:
        super().__init__()
        require_timm_model(encoder)
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 widths, got {tuple(decoder_channels)}")
        pretrained = {}
        if encoder_weights is not None:
            state = read_backbone_weights(encoder, encoder_weights)
            pretrained = dict(
                pretrained_cfg_overlay=dict(state_dict=state), pretrained_strict=False
            )
        self.net = smp.Unet(
            encoder_name=f"tu-{encoder}",
            encoder_weights=True if pretrained else None,
            in_channels=in_chans,
            classes=1,
            decoder_channels=tuple(decoder_channels),
            **pretrained,
        )
        self.normalization = normalization_of(self.net.encoder.model)
        self.input_channels = in_chans

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {MASK_LOGITS: self.net(x)}
