"""CLNet: the fusion modules feed both heads, and the paper's losses."""

from __future__ import annotations

import pytest
import torch

from skinray.losses import LOSSES, focal_dice_loss, focal_loss
from skinray.models import CLASS_LOGITS, MASK_LOGITS, create_model, get_model_spec

SIZE = 64


def _model(fusion: bool):
    torch.manual_seed(0)
    return create_model("clnet", **get_model_spec("clnet").smoke_kwargs, fusion=fusion).eval()


def _outputs_after_perturbing(model, branch: str, x):
    with torch.no_grad():
        before = model(x)
        for p in getattr(model, branch).parameters():
            p.add_(0.5 * torch.randn_like(p))
        after = model(x)
    return before, after


@pytest.mark.parametrize("fusion", [True, False])
def test_classification_branch_feeds_the_mask_only_through_fusion(fusion):
    model, x = _model(fusion), torch.randn(2, 3, SIZE, SIZE)
    before, after = _outputs_after_perturbing(model, "classification_encoder", x)
    changed = not torch.allclose(before[MASK_LOGITS], after[MASK_LOGITS])
    assert changed == fusion
    assert not torch.allclose(before[CLASS_LOGITS], after[CLASS_LOGITS])


@pytest.mark.parametrize("fusion", [True, False])
def test_segmentation_branch_feeds_the_classes_only_through_fusion(fusion):
    model, x = _model(fusion), torch.randn(2, 3, SIZE, SIZE)
    before, after = _outputs_after_perturbing(model, "segmentation_encoder", x)
    changed = not torch.allclose(before[CLASS_LOGITS], after[CLASS_LOGITS])
    assert changed == fusion
    assert not torch.allclose(before[MASK_LOGITS], after[MASK_LOGITS])


def test_removing_the_fusion_changes_both_heads():
    fused, plain = _model(True), _model(False)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = fused(x), plain(x)
    assert a[MASK_LOGITS].shape == b[MASK_LOGITS].shape == (2, 1, SIZE, SIZE)
    assert a[CLASS_LOGITS].shape == b[CLASS_LOGITS].shape == (2, 3)
    assert not torch.allclose(a[MASK_LOGITS], b[MASK_LOGITS])
    assert not torch.allclose(a[CLASS_LOGITS], b[CLASS_LOGITS])


def test_classifier_pools_every_fusion_output():
    model = _model(True)
    assert model.classifier.in_features == sum(
        get_model_spec("clnet").smoke_kwargs["fusion_channels"]
    )


def test_paper_losses_are_focal_and_focal_plus_dice():
    spec = get_model_spec("clnet")
    assert LOSSES[spec.classification_loss] is focal_loss
    assert LOSSES[spec.segmentation_loss] is focal_dice_loss


def test_bad_widths_are_rejected():
    with pytest.raises(ValueError, match="fusion_channels needs 5 widths"):
        create_model("clnet", encoder="resnet18", fusion_channels=(8, 8))
