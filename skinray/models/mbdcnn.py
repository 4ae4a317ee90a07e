"""MB-DCNN (Xie et al.): coarse-SN → mask-CN → enhanced-SN, segmentation and classification
bootstrapping each other.

- coarse-SN (Sec. III-A): DeepLabv3+ with a new one-channel sigmoid output layer.
- mask-CN (Sec. III-B, Fig. 2): Xception with a 4th input channel for the coarse mask, whose first-conv
  weights start as the mean of the RGB weights; the last pooling layer removed and the last two
  separable convolutions dilated (rate 2); GAP → a new FC layer; class activation maps (CAM, Zhou et
  al., the paper's [45]) from the last convolutional features weighted by the FC weights.
- enhanced-SN (Sec. III-C, Fig. 3): coarse-SN's encoder and decoder with an E-layer between them that
  concatenates the encoder's features with the CAMs and fuses them by 1×1 conv + BN + ReLU.
- Segmenters train with the hybrid loss Dice + λ·rank (Eqs. 1–3, ``hybrid_dice_rank``); mask-CN with
  cross-entropy.

Each stage is a registered model of its own, for staged training, and ``mbdcnn`` chains the three for
inference. Guidance enters a stage as extra input channels, so every stage keeps ``forward(x)``:
mask-CN takes (N, 3+1, H, W) = image + coarse lesion probability; enhanced-SN takes (N, 3+C, H, W) =
image + the C class maps resized to the image.

Choices where the paper is silent:
- The coarse mask handed to mask-CN is coarse-SN's sigmoid probability, not a thresholded mask, which
  keeps the chain differentiable and loses nothing the threshold would keep.
- CAMs handed to enhanced-SN are ReLU'd and scaled to [0, 1] per image and class (the usual CAM
  normalisation), since raw CAM magnitudes depend on the classifier's training; ``cam`` in the outputs
  is the raw map at the feature resolution.
- The E-layer sits on the deepest encoder feature (the input of DeepLabv3+'s ASPP) and keeps its width.
- "Same architecture and parameters as coarse-SN": enhanced-SN starts from a trained coarse-SN's weights
  (:meth:`EnhancedSN.load_coarse_sn`) and is then trained on its own, as the staged training implies.
- Encoders other than Xception (tests use ResNet18) reach output stride 16 through timm's
  ``output_stride=16``, which is the same surgery: last downsampling removed, what follows dilated.
"""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from skinray.models.backbones import (
    create_timm_model,
    last_feature_layer,
    normalization_of,
    read_backbone_weights,
    require_timm_model,
)
from skinray.models.registry import CAM, CLASS_LOGITS, MASK_LOGITS, register_model

__all__ = ["MBDCNN", "CoarseSN", "EnhancedSN", "MaskCN", "expand_input_conv"]

PAPER = "Xie et al., MB-DCNN: mutual bootstrapping of segmentation and classification"
SMOKE_ENCODER = {"encoder": "resnet18"}


def _deeplab(encoder: str, encoder_weights: str | None, in_chans: int, decoder_channels: int):
    require_timm_model(encoder)
    pretrained = {}
    if encoder_weights is not None:
        state = read_backbone_weights(encoder, encoder_weights)
        pretrained = dict(pretrained_cfg_overlay=dict(state_dict=state), pretrained_strict=False)
    return smp.DeepLabV3Plus(
        encoder_name=f"tu-{encoder}",
        encoder_weights=True if pretrained else None,
        in_channels=in_chans,
        classes=1,
        decoder_channels=decoder_channels,
        **pretrained,
    )


@register_model(
    "mbdcnn_coarse_sn",
    outputs=(MASK_LOGITS,),
    paper=PAPER + " (coarse-SN)",
    paper_input_size=(224, 224),
    paper_kwargs={"encoder": "xception65"},
    smoke_kwargs={**SMOKE_ENCODER, "decoder_channels": 32},
    segmentation_loss="hybrid_dice_rank",
)
class CoarseSN(nn.Module):
    """DeepLabv3+ lesion segmenter (smp) over a timm encoder at output stride 16."""

    def __init__(
        self,
        encoder: str = "xception65",
        encoder_weights: str | None = None,
        in_chans: int = 3,
        decoder_channels: int = 256,
    ) -> None:
        super().__init__()
        self.net = _deeplab(encoder, encoder_weights, in_chans, decoder_channels)
        self.normalization = normalization_of(self.net.encoder.model)
        self.input_channels = in_chans

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {MASK_LOGITS: self.net(x)}


def expand_input_conv(conv: nn.Conv2d, extra_channels: int) -> nn.Conv2d:
    """A copy of ``conv`` with ``extra_channels`` more inputs, each initialised as the mean of the
    existing input channels' weights (MB-DCNN Sec. III-B: the mask channel gets the mean of RGB)."""
    expanded = nn.Conv2d(
        conv.in_channels + extra_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        mean = conv.weight.mean(dim=1, keepdim=True)
        expanded.weight.copy_(torch.cat([conv.weight, mean.expand(-1, extra_channels, -1, -1)], 1))
        if conv.bias is not None:
            expanded.bias.copy_(conv.bias)
    return expanded


def _dilate_legacy_xception(net: nn.Module) -> None:
    """Remove the last pooling of Chollet's Xception and dilate its last two separable convs (rate 2)."""
    net.block12.rep[-1] = nn.Identity()
    net.block12.skip.stride = (1, 1)
    for separable in (net.conv3, net.conv4):
        separable.conv1.dilation = (2, 2)
        separable.conv1.padding = (2, 2)


@register_model(
    "mbdcnn_mask_cn",
    outputs=(CLASS_LOGITS, CAM),
    paper=PAPER + " (mask-CN)",
    paper_input_size=(224, 224),
    paper_kwargs={"encoder": "legacy_xception", "num_classes": 3},
    smoke_kwargs={**SMOKE_ENCODER, "num_classes": 3},
    classification_loss="cross_entropy",
)
class MaskCN(nn.Module):
    """Mask-guided classifier: input (N, 3 + mask_channels, H, W), outputs class logits and CAMs.

    Args:
        encoder: a timm classifier whose head is global average pooling + one linear layer
            (``legacy_xception`` in the paper).
        num_classes: 3 for ISIC 2017 (melanoma, seborrheic keratosis, nevus).
        mask_channels: guidance channels appended to RGB (1: the coarse mask).
        encoder_weights: local or s3:// safetensors file with the RGB trunk's ImageNet weights.
    """

    def __init__(
        self,
        encoder: str = "legacy_xception",
        num_classes: int = 3,
        mask_channels: int = 1,
        encoder_weights: str | None = None,
    ) -> None:
        super().__init__()
        extra = {} if encoder == "legacy_xception" else {"output_stride": 16}
        self.net = create_timm_model(
            encoder, weights=encoder_weights, num_classes=num_classes, **extra
        )
        if encoder == "legacy_xception":
            _dilate_legacy_xception(self.net)
        head = self.net.get_classifier()
        if not isinstance(head, nn.Linear):
            raise ValueError(f"mask-CN needs a GAP + linear head for CAMs; {encoder!r} has {head}")
        stem_name = self.net.pretrained_cfg["first_conv"]
        stem = self.net.get_submodule(stem_name)
        parent_name, _, attribute = stem_name.rpartition(".")
        parent = self.net.get_submodule(parent_name) if parent_name else self.net
        setattr(parent, attribute, expand_input_conv(stem, mask_channels))
        self.stem_name = stem_name
        self.mask_channels = mask_channels
        self.normalization = normalization_of(self.net)
        self.input_channels = 3 + mask_channels

    def cam_target_layer(self) -> nn.Module:
        return last_feature_layer(self.net)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.net.forward_features(x)
        logits = self.net.forward_head(features)
        # CAM (Zhou et al.): M_c = Σ_k w_{c,k} f_k, the FC weights applied at every position.
        cam = torch.einsum("nkhw,ck->nchw", features, self.net.get_classifier().weight)
        return {CLASS_LOGITS: logits, CAM: cam}


def normalise_cam(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """ReLU, resize to ``size`` and scale each (image, class) map to [0, 1]."""
    cam = F.interpolate(F.relu(cam), size=size, mode="bilinear", align_corners=False)
    peak = cam.flatten(2).amax(2).clamp_min(1e-6)[..., None, None]
    return cam / peak


@register_model(
    "mbdcnn_enhanced_sn",
    outputs=(MASK_LOGITS,),
    paper=PAPER + " (enhanced-SN)",
    paper_input_size=(224, 224),
    paper_kwargs={"encoder": "xception65", "num_classes": 3},
    smoke_kwargs={**SMOKE_ENCODER, "decoder_channels": 32, "num_classes": 3},
    segmentation_loss="hybrid_dice_rank",
)
class EnhancedSN(nn.Module):
    """Coarse-SN's encoder and decoder with the E-layer; input (N, 3 + num_classes, H, W)."""

    def __init__(
        self,
        encoder: str = "xception65",
        num_classes: int = 3,
        encoder_weights: str | None = None,
        decoder_channels: int = 256,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.net = _deeplab(encoder, encoder_weights, 3, decoder_channels)
        deepest = self.net.encoder.out_channels[-1]
        self.e_layer = nn.Sequential(
            nn.Conv2d(deepest + num_classes, deepest, 1, bias=False),
            nn.BatchNorm2d(deepest),
            nn.ReLU(inplace=True),
        )
        self.normalization = normalization_of(self.net.encoder.model)
        self.input_channels = 3 + num_classes

    def load_coarse_sn(self, coarse: CoarseSN) -> None:
        """Start from a trained coarse-SN's encoder, decoder and head (Sec. III-C)."""
        self.net.load_state_dict(coarse.net.state_dict())

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[1] != 3 + self.num_classes:
            raise ValueError(
                f"enhanced-SN takes RGB + {self.num_classes} CAM channels, got {x.shape[1]} channels"
            )
        image, cams = x[:, :3], x[:, 3:]
        features = self.net.encoder(image)
        cams = F.interpolate(
            cams, size=features[-1].shape[-2:], mode="bilinear", align_corners=False
        )
        features = [*features[:-1], self.e_layer(torch.cat([features[-1], cams], dim=1))]
        decoded = self.net.decoder(features)
        return {MASK_LOGITS: self.net.segmentation_head(decoded)}


@register_model(
    "mbdcnn",
    outputs=(MASK_LOGITS, CLASS_LOGITS, CAM),
    paper=PAPER + " (the whole chain, for inference)",
    paper_input_size=(224, 224),
    paper_kwargs={
        "segmentation_encoder": "xception65",
        "classification_encoder": "legacy_xception",
        "num_classes": 3,
    },
    smoke_kwargs={
        "segmentation_encoder": "resnet18",
        "classification_encoder": "resnet18",
        "num_classes": 3,
        "decoder_channels": 32,
    },
    segmentation_loss="hybrid_dice_rank",
    classification_loss="cross_entropy",
)
class MBDCNN(nn.Module):
    """coarse-SN → mask-CN → enhanced-SN on RGB input; returns the enhanced mask, classes and CAMs.

    ``mask_logits`` is enhanced-SN's; ``cam`` is mask-CN's raw map (N, C, h, w).
    Build from trained stages with :meth:`from_stages`.
    """

    def __init__(
        self,
        segmentation_encoder: str = "xception65",
        classification_encoder: str = "legacy_xception",
        num_classes: int = 3,
        decoder_channels: int = 256,
    ) -> None:
        super().__init__()
        self.coarse_sn = CoarseSN(segmentation_encoder, decoder_channels=decoder_channels)
        self.mask_cn = MaskCN(classification_encoder, num_classes=num_classes)
        self.enhanced_sn = EnhancedSN(
            segmentation_encoder, num_classes=num_classes, decoder_channels=decoder_channels
        )
        self.normalization = self.coarse_sn.normalization
        self.input_channels = 3

    @classmethod
    def from_stages(cls, coarse_sn: CoarseSN, mask_cn: MaskCN, enhanced_sn: EnhancedSN) -> MBDCNN:
        """Assemble trained stages (each made by ``create_model``) into the inference chain."""
        chain = cls.__new__(cls)
        nn.Module.__init__(chain)
        chain.coarse_sn, chain.mask_cn, chain.enhanced_sn = coarse_sn, mask_cn, enhanced_sn
        chain.normalization = coarse_sn.normalization
        chain.input_channels = 3
        chain.skinray_model_name = "mbdcnn"
        chain.skinray_model_kwargs = {
            "segmentation_encoder": coarse_sn.skinray_model_kwargs.get("encoder", "xception65"),
            "classification_encoder": mask_cn.skinray_model_kwargs.get(
                "encoder", "legacy_xception"
            ),
            "num_classes": enhanced_sn.num_classes,
            "decoder_channels": coarse_sn.skinray_model_kwargs.get("decoder_channels", 256),
        }
        return chain.train(coarse_sn.training)  # nn.Module starts in train mode; its stages may not

    def cam_target_layer(self) -> nn.Module:
        return self.mask_cn.cam_target_layer()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: the image normalised with coarse-SN's statistics (the chain's ``normalization``);
        each later stage gets it in its own, as it was trained and as ``Predictor``'s guidance
        chain gives it."""
        coarse_probability = torch.sigmoid(self.coarse_sn(x)[MASK_LOGITS])
        rgb = _renormalised(x, self.normalization, self.mask_cn.normalization)
        classified = self.mask_cn(torch.cat([rgb, coarse_probability], dim=1))
        guidance = normalise_cam(classified[CAM], size=x.shape[-2:])
        rgb = _renormalised(x, self.normalization, self.enhanced_sn.normalization)
        enhanced = self.enhanced_sn(torch.cat([rgb, guidance], dim=1))
        return {
            MASK_LOGITS: enhanced[MASK_LOGITS],
            CLASS_LOGITS: classified[CLASS_LOGITS],
            CAM: classified[CAM],
        }


def _renormalised(x: torch.Tensor, source, target) -> torch.Tensor:
    """``x`` standardised with ``source`` (mean, std) → the same pixels standardised with
    ``target``: (x·σ_s + μ_s − μ_t) / σ_t; ``x`` itself where the two agree."""
    if tuple(map(tuple, source)) == tuple(map(tuple, target)):
        return x

    def column(values):
        return torch.tensor(values, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)

    (source_mean, source_std), (target_mean, target_std) = source, target
    pixels = x * column(source_std) + column(source_mean)
    return (pixels - column(target_mean)) / column(target_std)
