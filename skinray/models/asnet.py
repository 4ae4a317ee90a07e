"""ASNet (Zhu et al.): a ResNet34 U-shape with an adaptive scale module at the top of the encoder.

Adaptive scale module (Sec. 2.2): three parallel 3×3 convolutions with dilation rates 1, 2 and 4 share one
weight, so the branches differ only in receptive field; two cascaded scale-aware modules fuse the three
branches; a residual connection with a learnable β gives the module's output, ``x + β·fused``.

Scale-aware module (Sec. 2.3): each of the two inputs passes through convolutions to a one-channel score
map (A, B); a softmax across the two maps at every pixel gives attention maps (Eq. 1) and the output is
``a_A ⊙ M_A + a_B ⊙ M_B`` (Eq. 2).

Decoder (Fig. 2): per stage, bilinear ×2 upsampling, concatenation with the encoder skip, 3×3
convolutions; a final 1×1 convolution gives the score map.

Choices where the paper is silent:
- Each dilated branch has its own BatchNorm after the shared convolution: the three receptive fields
  see different statistics, and sharing the convolution alone keeps the paper's parameter saving.
- The score convolutions of a scale-aware module are conv3×3 (C→C/4) + BN + ReLU + conv1×1 (C/4→1),
  separate for A and B.
- β starts at 0, so the module starts as the identity and learns how much multi-scale context to add
  (as DANet's γ, which the design follows).
- Two 3×3 conv+BN+ReLU per decoder stage, widths ``decoder_channels``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from skinray.models.backbones import create_timm_model, normalization_of
from skinray.models.layers import conv_bn_relu
from skinray.models.registry import MASK_LOGITS, register_model

__all__ = ["ASNet", "AdaptiveScaleModule", "ScaleAwareModule"]


class ScaleAwareModule(nn.Module):
    """Spatial softmax attention between two same-shaped feature maps (Eqs. 1–2)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.score_a = nn.Sequential(conv_bn_relu(channels, hidden), nn.Conv2d(hidden, 1, 1))
        self.score_b = nn.Sequential(conv_bn_relu(channels, hidden), nn.Conv2d(hidden, 1, 1))

    def forward(self, features_a: torch.Tensor, features_b: torch.Tensor) -> torch.Tensor:
        attention = torch.cat([self.score_a(features_a), self.score_b(features_b)], 1).softmax(1)
        return attention[:, 0:1] * features_a + attention[:, 1:2] * features_b


class AdaptiveScaleModule(nn.Module):
    """Shared-weight dilated branches fused by two cascaded scale-aware modules, plus β-residual."""

    def __init__(self, channels: int, dilation_rates: Sequence[int] = (1, 2, 4)) -> None:
        super().__init__()
        if len(dilation_rates) != 3:
            raise ValueError(f"the module fuses three branches, got rates {tuple(dilation_rates)}")
        self.dilation_rates = tuple(dilation_rates)
        self.shared_weight = nn.Parameter(torch.empty(channels, channels, 3, 3))
        nn.init.kaiming_normal_(self.shared_weight, mode="fan_out", nonlinearity="relu")
        self.branch_norms = nn.ModuleList(nn.BatchNorm2d(channels) for _ in dilation_rates)
        self.fuse_first = ScaleAwareModule(channels)
        self.fuse_second = ScaleAwareModule(channels)
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        small, medium, large = (
            F.relu(norm(F.conv2d(x, self.shared_weight, padding=rate, dilation=rate)))
            for rate, norm in zip(self.dilation_rates, self.branch_norms, strict=True)
        )
        fused = self.fuse_second(self.fuse_first(small, medium), large)
        return x + self.beta * fused


class _DecoderStage(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            conv_bn_relu(in_channels + skip_channels, out_channels),
            conv_bn_relu(out_channels, out_channels),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)


@register_model(
    "asnet",
    outputs=(MASK_LOGITS,),
    paper="Zhu et al., ASNet: adaptive scale network (ResNet34 U-shape + adaptive scale module)",
    paper_input_size=(192, 256),
    paper_kwargs={"encoder": "resnet34"},
    smoke_kwargs={"encoder": "resnet18", "decoder_channels": (32, 16, 16, 8, 8)},
    segmentation_loss="bce_dice_asnet",
)
class ASNet(nn.Module):
    """Args:
    encoder: timm encoder with five stages at reductions 2…32 (``resnet34`` in the paper).
    encoder_weights: local or s3:// safetensors file with the encoder's ImageNet weights.
    in_chans: input channels.
    decoder_channels: widths of the five decoder stages, deepest first.
    """

    def __init__(
        self,
        encoder: str = "resnet34",
        encoder_weights: str | None = None,
        in_chans: int = 3,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
    ) -> None:
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 widths, got {tuple(decoder_channels)}")
        self.encoder = create_timm_model(
            encoder, weights=encoder_weights, features_only=True, in_chans=in_chans
        )
        reductions = self.encoder.feature_info.reduction()
        if list(reductions) != [2, 4, 8, 16, 32]:
            raise ValueError(
                f"asnet needs an encoder with stages at reductions 2,4,8,16,32; "
                f"{encoder!r} has {reductions}"
            )
        channels = self.encoder.feature_info.channels()
        self.scale_module = AdaptiveScaleModule(channels[-1])
        skips = [*channels[-2::-1], 0]  # reductions 16, 8, 4, 2, then the input size
        widths = [channels[-1], *decoder_channels]
        self.decoder = nn.ModuleList(
            _DecoderStage(widths[i], skips[i], widths[i + 1]) for i in range(5)
        )
        self.head = nn.Conv2d(decoder_channels[-1], 1, 1)
        self.normalization = normalization_of(self.encoder)
        self.input_channels = in_chans

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.encoder(x)
        y = self.scale_module(features[-1])
        skips = [*features[-2::-1], None]
        for stage, skip in zip(self.decoder, skips, strict=True):
            size = skip.shape[-2:] if skip is not None else x.shape[-2:]
            y = stage(y, skip, size)
        return {MASK_LOGITS: self.head(y)}
