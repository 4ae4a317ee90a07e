"""Qi et al.'s multi-scale FCN: six 2-channel prediction maps from VGG16, upsampled and concatenated.

Sec. 2.1–2.2 of the paper: VGG16 with its fully connected layers turned into randomly initialised
convolutions (fc6: 7×7, fc7: 1×1); a 1×1 convolution to a 2-channel (background, lesion) map after
each of the five pooling layers and after the last convolution (six maps); learned deconvolutions
bring each map to the input size; the six maps are concatenated (12 channels) and a final 1×1
convolution predicts the 2-channel output, trained with a pixel-wise softmax loss.

Choices where the paper is silent:
- fc6 is padded (padding 3) so its map keeps pool5's size, and an input must be a multiple of 32.
- Each deconvolution has kernel 2r and stride r for its map's reduction r, which lands exactly on the
  input size, and starts as bilinear interpolation (as in FCN, Long et al. 2015, the paper's [15]);
  the paper initialises them randomly, but both are learned, and a bilinear start trains faster.
- ``mask_logits`` is the lesion-minus-background score ``z₁ - z₀``: a two-way softmax depends only on
  that difference, so ``sigmoid(mask_logits)`` is the paper's softmax lesion probability and
  :func:`skinray.losses.softmax_cross_entropy` is the paper's loss on it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from skinray.models.backbones import create_timm_model, normalization_of
from skinray.models.registry import MASK_LOGITS, register_model

__all__ = ["MultiScaleFCN"]

_STRIDE = 32


def _bilinear_kernel(channels: int, kernel_size: int) -> torch.Tensor:
    """Weights making a transposed convolution an (align_corners=False) bilinear upsampler."""
    factor = (kernel_size + 1) // 2
    centre = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    grid = torch.arange(kernel_size, dtype=torch.float32)
    line = 1 - (grid - centre).abs() / factor
    kernel = line[:, None] * line[None, :]
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    for c in range(channels):
        weight[c, c] = kernel
    return weight


@register_model(
    "fcn_multiscale",
    outputs=(MASK_LOGITS,),
    paper="Qi et al., global and local information based FCN (VGG16, six fused maps)",
    paper_input_size=(384, 384),
    paper_kwargs={"encoder": "vgg16", "fc_channels": 4096},
    smoke_kwargs={"encoder": "vgg11", "fc_channels": 32},
    segmentation_loss="softmax_cross_entropy",
)
class MultiScaleFCN(nn.Module):
    """Args:
    encoder: a timm VGG (``vgg16`` in the paper; ``vgg11``/``vgg13``/``vgg19``, ``*_bn``).
    fc_channels: width of the convolutionalised fc6/fc7 (4096 in VGG16).
    in_chans: input channels.
    encoder_weights: local or s3:// safetensors file with the VGG's ImageNet weights.
    """

    def __init__(
        self,
        encoder: str = "vgg16",
        fc_channels: int = 4096,
        in_chans: int = 3,
        encoder_weights: str | None = None,
    ) -> None:
        super().__init__()
        if not encoder.startswith("vgg"):
            raise ValueError(
                f"fcn_multiscale needs a timm VGG encoder (vgg11 … vgg19), got {encoder!r}"
            )
        # timm's VGG features are the ReLU outputs just before each pool (reductions 1…16);
        # pooling them here gives the paper's pool1…pool5 (reductions 2…32).
        self.encoder = create_timm_model(
            encoder,
            weights=encoder_weights,
            features_only=True,
            out_indices=(0, 1, 2, 3, 4),
            in_chans=in_chans,
        )
        pool_channels = self.encoder.feature_info.channels()
        # VGG16's fully connected layers as convolutions (Sec. 2.1), each with its element-wise
        # dropout: Dropout2d would drop whole fc channels.
        self.fc6 = nn.Sequential(
            nn.Conv2d(pool_channels[-1], fc_channels, 7, padding=3),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        )
        self.fc7 = nn.Sequential(
            nn.Conv2d(fc_channels, fc_channels, 1), nn.ReLU(inplace=True), nn.Dropout(0.5)
        )
        map_channels = [*pool_channels, fc_channels]
        reductions = [2, 4, 8, 16, 32, 32]
        self.score_maps = nn.ModuleList(nn.Conv2d(c, 2, 1) for c in map_channels)
        self.upsamplers = nn.ModuleList(
            nn.ConvTranspose2d(2, 2, kernel_size=2 * r, stride=r, padding=r // 2, bias=False)
            for r in reductions
        )
        for upsampler, r in zip(self.upsamplers, reductions, strict=True):
            upsampler.weight.data.copy_(_bilinear_kernel(2, 2 * r))
        self.fuse = nn.Conv2d(2 * len(map_channels), 2, 1)
        self.normalization = normalization_of(self.encoder)
        self.input_channels = in_chans

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        if height % _STRIDE or width % _STRIDE:
            raise ValueError(f"fcn_multiscale needs sides divisible by 32, got {height}×{width}")
        pools = [F.max_pool2d(f, 2) for f in self.encoder(x)]
        top = self.fc7(self.fc6(pools[-1]))
        maps = [
            upsample(score(feature))
            for feature, score, upsample in zip(
                [*pools, top], self.score_maps, self.upsamplers, strict=True
            )
        ]
        scores = self.fuse(torch.cat(maps, dim=1))
        return {MASK_LOGITS: scores[:, 1:2] - scores[:, 0:1]}
