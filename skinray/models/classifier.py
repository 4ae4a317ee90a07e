"""Any timm image classifier: the two-step paper's ROI classifier and a plain baseline.

Innani et al. classify HAM10000's seven classes at 224×224 with ResNet, Xception, MobileNet and
EfficientNet-B0/B3, each on the whole image and on the ROI (predicted mask × image, Table 3).
"""

from __future__ import annotations

import torch
from torch import nn

from skinray.models.backbones import create_timm_model, last_feature_layer, normalization_of
from skinray.models.registry import CLASS_LOGITS, FEATURES, register_model

__all__ = ["Classifier"]


@register_model(
    "classifier",
    outputs=(CLASS_LOGITS, FEATURES),
    paper="Innani et al., two-step segmentation then classification (ROI classifier)",
    paper_input_size=(224, 224),
    paper_kwargs={"encoder": "legacy_xception", "num_classes": 7},
    smoke_kwargs={"encoder": "resnet18", "num_classes": 3},
    classification_loss="cross_entropy",
)
class Classifier(nn.Module):
    """A timm classifier with a new ``num_classes`` head.

    Args:
        encoder: timm architecture name (``resnet50``, ``xception65``, ``mobilenetv2_100``,
            ``efficientnet_b0``, ``efficientnet_b3`` …).
        num_classes: output classes (7 for HAM10000, 3 for ISIC 2017).
        in_chans: input channels (4 for an image with its mask as an extra channel).
        encoder_weights: local or s3:// safetensors file with ImageNet weights for the trunk.
        drop_rate: dropout before the head.
    """

    def __init__(
        self,
        encoder: str = "resnet50",
        num_classes: int = 7,
        in_chans: int = 3,
        encoder_weights: str | None = None,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.net = create_timm_model(
            encoder,
            weights=encoder_weights,
            num_classes=num_classes,
            in_chans=in_chans,
            drop_rate=drop_rate,
        )
        self.normalization = normalization_of(self.net)
        self.input_channels = in_chans

    def cam_target_layer(self) -> nn.Module:
        return last_feature_layer(self.net)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # timm's forward split at its last layer (pooling and dropout stay in forward_head), so
        # the pooled features come out beside the logits for the OOD score (skinray.ood).
        features = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        return {CLASS_LOGITS: self.net.get_classifier()(features), FEATURES: features}
