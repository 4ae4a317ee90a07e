"""CLNet (Zhang et al.): a classification branch and a segmentation branch fused at every stage.

- Classification branch (Sec. 2.1): ResNet50 stages ``EC_i``; the classifier is GAP over the
  concatenated fusion outputs ``FM_1 … FM_d`` followed by one FC layer (Eq. 1).
- Segmentation branch (Sec. 2.2): ResUNet, a U-Net with a ResNet50 encoder ``ES_i``, whose skip
  connections are replaced by the fusion outputs: ``De_i = De(Concat(Up(De_{i-1}), FM_i))`` (Eq. 4),
  with bilinear upsampling and a final bilinear resize to the input size.
- Feature fusion module (Sec. 2.3, Fig. 2): upsample the smaller of ``EC_i``/``ES_i`` to the other,
  concatenate, 1×1 convolution to reduce channels, an SE block (Hu et al.) to weight channels, then
  3×3 convolutions.
- Losses (Sec. 3.1): focal loss for classification, focal + Dice for segmentation. Grad-CAM++ maps come
  from :mod:`skinray.models.cam` on the deepest fusion output (the features before GAP).

Choices where the paper is silent:
- ``d = 5`` fusion modules, one per ResNet stage (reductions 2, 4, 8, 16, 32).
- Fusion widths ``fusion_channels`` = (64, 128, 256, 512, 512): the 1×1 convolution reduces each
  concatenation to these, keeping the 3×3 convolutions affordable (at 2048+2048 channels two full-width
  3×3 convolutions alone would cost 75 M parameters).
- Two 3×3 conv + BN + ReLU after the SE block; SE reduction 16.
- Decoder blocks are two 3×3 conv + BN + ReLU, widths ``decoder_channels``, as in smp's U-Net.
- ``fusion=False`` builds the paper's baselines side by side, ResNet50 (GAP over ``EC_d`` → FC) and
  ResUNet (skips from ``ES_i``), sharing nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import SqueezeExcite
from torch import nn

from skinray.models.backbones import create_timm_model, normalization_of
from skinray.models.layers import conv_bn_relu
from skinray.models.registry import CLASS_LOGITS, MASK_LOGITS, register_model

__all__ = ["CLNet", "FeatureFusion"]


class FeatureFusion(nn.Module):
    """FM(EC_i, ES_i): resize, concatenate, 1×1 conv, SE block, 3×3 convs (Fig. 2)."""

    def __init__(self, classification_channels: int, segmentation_channels: int, out_channels: int):
        super().__init__()
        self.reduce = conv_bn_relu(classification_channels + segmentation_channels, out_channels, 1)
        self.squeeze_excite = SqueezeExcite(out_channels, rd_ratio=1 / 16)
        self.refine = nn.Sequential(
            conv_bn_relu(out_channels, out_channels), conv_bn_relu(out_channels, out_channels)
        )

    def forward(self, classification: torch.Tensor, segmentation: torch.Tensor) -> torch.Tensor:
        if classification.shape[-2:] != segmentation.shape[-2:]:
            if classification.shape[-1] < segmentation.shape[-1]:
                classification = F.interpolate(
                    classification,
                    size=segmentation.shape[-2:],
                    mode="bilinear",
                    align_corners=False,
                )
            else:
                segmentation = F.interpolate(
                    segmentation,
                    size=classification.shape[-2:],
                    mode="bilinear",
                    align_corners=False,
                )
        fused = self.reduce(torch.cat([classification, segmentation], dim=1))
        return self.refine(self.squeeze_excite(fused))


class _DecoderBlock(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            conv_bn_relu(in_channels + skip_channels, out_channels),
            conv_bn_relu(out_channels, out_channels),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.convs(torch.cat([x, skip], dim=1))


@register_model(
    "clnet",
    outputs=(MASK_LOGITS, CLASS_LOGITS),
    paper="Zhang et al., CLNet: feature fusion for segmentation and classification",
    paper_input_size=(224, 224),
    paper_kwargs={"encoder": "resnet50", "num_classes": 3},
    smoke_kwargs={
        "encoder": "resnet18",
        "num_classes": 3,
        "fusion_channels": (16, 16, 32, 32, 64),
        "decoder_channels": (64, 32, 16, 16),
    },
    segmentation_loss="focal_dice",
    classification_loss="focal",
)
class CLNet(nn.Module):
    """Args:
    encoder: timm architecture of both branches (``resnet50`` in the paper), five stages at
        reductions 2…32.
    num_classes: 3 for ISIC 2017.
    encoder_weights: local or s3:// safetensors ImageNet weights, loaded into both branches.
    in_chans: input channels.
    fusion_channels: output width of the five fusion modules, shallowest first.
    decoder_channels: widths of the four decoder blocks, deepest first.
    fusion: False builds the unfused baselines (ResNet classifier and ResUNet side by side).
    """

    def __init__(
        self,
        encoder: str = "resnet50",
        num_classes: int = 3,
        encoder_weights: str | None = None,
        in_chans: int = 3,
        fusion_channels: Sequence[int] = (64, 128, 256, 512, 512),
        decoder_channels: Sequence[int] = (256, 128, 64, 32),
        fusion: bool = True,
    ) -> None:
        super().__init__()
        if len(fusion_channels) != 5 or len(decoder_channels) != 4:
            raise ValueError(
                "fusion_channels needs 5 widths and decoder_channels 4, got "
                f"{tuple(fusion_channels)} and {tuple(decoder_channels)}"
            )
        branches = dict(weights=encoder_weights, features_only=True, in_chans=in_chans)
        self.classification_encoder = create_timm_model(encoder, **branches)
        self.segmentation_encoder = create_timm_model(encoder, **branches)
        reductions = self.segmentation_encoder.feature_info.reduction()
        if list(reductions) != [2, 4, 8, 16, 32]:
            raise ValueError(f"clnet needs stages at reductions 2…32; {encoder!r} has {reductions}")
        classification_channels = self.classification_encoder.feature_info.channels()
        segmentation_channels = self.segmentation_encoder.feature_info.channels()
        self.fusion = fusion
        if fusion:
            self.fusions = nn.ModuleList(
                FeatureFusion(c, s, f)
                for c, s, f in zip(
                    classification_channels, segmentation_channels, fusion_channels, strict=True
                )
            )
            skips, pooled = list(fusion_channels), sum(fusion_channels)
        else:
            self.fusions = None
            skips, pooled = list(segmentation_channels), classification_channels[-1]
        self.classifier = nn.Linear(pooled, num_classes)
        widths = [skips[-1], *decoder_channels]
        self.decoder = nn.ModuleList(
            _DecoderBlock(widths[i], skips[-2 - i], widths[i + 1]) for i in range(4)
        )
        self.segmentation_head = nn.Conv2d(decoder_channels[-1], 1, 1)
        self.normalization = normalization_of(self.classification_encoder)
        self.input_channels = in_chans

    def cam_target_layer(self) -> nn.Module:
        """The deepest features before GAP: the last fusion module (or, unfused, the last stage)."""
        if self.fusions is not None:
            return self.fusions[-1]
        encoder = self.classification_encoder
        return encoder.get_submodule(encoder.feature_info.module_name()[-1].replace(".", "_"))

    def fused_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(features the classifier pools, skip features the decoder reads), shallowest first."""
        classification = self.classification_encoder(x)
        segmentation = self.segmentation_encoder(x)
        if self.fusions is None:
            return [classification[-1]], segmentation
        fused = [
            fm(c, s) for fm, c, s in zip(self.fusions, classification, segmentation, strict=True)
        ]
        return fused, fused

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled_features, skips = self.fused_features(x)
        # Eq. 1: GAP of every fusion output, concatenated, then one FC layer.
        pooled = torch.cat([f.mean(dim=(2, 3)) for f in pooled_features], dim=1)
        y = skips[-1]
        for block, skip in zip(self.decoder, skips[-2::-1], strict=True):
            y = block(y, skip)  # Eq. 4
        mask_logits = F.interpolate(
            self.segmentation_head(y), size=x.shape[-2:], mode="bilinear", align_corners=False
        )
        return {MASK_LOGITS: mask_logits, CLASS_LOGITS: self.classifier(pooled)}
