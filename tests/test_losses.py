"""Facts about the losses, each stated as a test."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from skinray.losses import (
    bce_dice_loss,
    binary_focal_loss,
    dice_loss,
    focal_dice_loss,
    focal_loss,
    hybrid_dice_rank_loss,
    rank_loss,
    softmax_cross_entropy,
)

BIG = 30.0  # a logit whose sigmoid is 1 to float precision


def _disc_mask(size: int = 32) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    return (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 4) ** 2).float()[None, None]


def _perfect_logits(mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask > 0, BIG, -BIG)


def test_dice_of_a_perfect_mask_is_zero():
    mask = _disc_mask()
    assert dice_loss(_perfect_logits(mask), mask).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_of_the_complement_is_nearly_one():
    mask = _disc_mask()
    assert dice_loss(-_perfect_logits(mask), mask).item() == pytest.approx(1.0, abs=1e-2)


def test_dice_matches_a_hand_computed_value():
    # p = sigmoid(0) = 0.5 everywhere; 4 pixels, 2 of them lesion.
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    # 1 - (2·(0.5+0.5) + 1) / ((2 + 2) + 1) = 1 - 3/5
    assert dice_loss(logits, target).item() == pytest.approx(0.4)


def test_dice_is_averaged_per_image_not_pooled_over_the_batch():
    mask = _disc_mask()
    empty_prediction = torch.full_like(mask, -BIG)
    batch = torch.cat([_perfect_logits(mask), empty_prediction])
    targets = torch.cat([mask, mask])
    # One perfect image (0) and one empty prediction (≈1) average to ≈0.5.
    assert dice_loss(batch, targets).item() == pytest.approx(0.5, abs=1e-2)


def test_dice_accepts_masks_without_a_channel_axis():
    mask = _disc_mask()
    logits = torch.randn_like(mask)
    assert dice_loss(logits, mask[:, 0]).item() == pytest.approx(dice_loss(logits, mask).item())


def test_bce_dice_is_bce_plus_dice_with_weights():
    torch.manual_seed(0)
    logits, mask = torch.randn(2, 1, 16, 16), (torch.rand(2, 1, 16, 16) > 0.5).float()
    bce = F.binary_cross_entropy_with_logits(logits, mask)
    dice = dice_loss(logits, mask)
    assert bce_dice_loss(logits, mask).item() == pytest.approx((bce + dice).item())
    asnet_eq3 = bce_dice_loss(logits, mask, bce_weight=0.5)
    assert asnet_eq3.item() == pytest.approx((0.5 * bce + dice).item())


def test_focal_with_gamma_zero_equals_cross_entropy():
    torch.manual_seed(1)
    logits, labels = torch.randn(16, 7), torch.randint(0, 7, (16,))
    assert focal_loss(logits, labels, gamma=0.0).item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), rel=1e-6
    )


def test_focal_down_weights_easy_examples():
    labels = torch.tensor([0])
    easy = torch.tensor([[5.0, 0.0, 0.0]])
    hard = torch.tensor([[0.0, 2.0, 0.0]])
    ce_ratio = F.cross_entropy(hard, labels) / F.cross_entropy(easy, labels)
    focal_ratio = focal_loss(hard, labels) / focal_loss(easy, labels)
    assert focal_ratio > 10 * ce_ratio


def test_focal_alpha_weights_each_class():
    logits, labels = torch.zeros(2, 2), torch.tensor([0, 1])
    alpha = torch.tensor([1.0, 3.0])
    # Both examples have p_t = 0.5, so the loss is the mean of α_t · 0.25 · log 2.
    expected = (1.0 + 3.0) / 2 * 0.25 * torch.log(torch.tensor(2.0))
    assert focal_loss(logits, labels, gamma=2.0, alpha=alpha).item() == pytest.approx(
        expected.item()
    )


def test_binary_focal_with_gamma_zero_equals_bce():
    torch.manual_seed(2)
    logits, mask = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    assert binary_focal_loss(logits, mask, gamma=0.0).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, mask).item(), rel=1e-6
    )


def test_focal_dice_is_binary_focal_plus_dice():
    torch.manual_seed(3)
    logits, mask = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    expected = binary_focal_loss(logits, mask) + dice_loss(logits, mask)
    assert focal_dice_loss(logits, mask).item() == pytest.approx(expected.item())


def test_rank_loss_is_zero_when_margin_satisfied():
    mask = _disc_mask()
    # Lesion at probability 0.9, background at 0.1: every pair is 0.8 apart, above the 0.3 margin.
    logits = torch.where(mask > 0, torch.logit(torch.tensor(0.9)), torch.logit(torch.tensor(0.1)))
    assert rank_loss(logits, mask).item() == 0.0


def test_rank_loss_is_the_hinge_on_the_hardest_pairs():
    mask = _disc_mask()
    probabilities = torch.where(mask > 0, 0.9, 0.1)
    flat = probabilities.flatten().clone()
    lesion_pixels = torch.nonzero(mask.flatten()).flatten()
    background_pixels = torch.nonzero(mask.flatten() == 0).flatten()
    flat[lesion_pixels[:2]] = 0.2  # two hard lesion pixels
    flat[background_pixels[:1]] = 0.7  # one hard background pixel
    logits = torch.logit(flat.view_as(mask))
    # K=30: hard lesion = two at 0.2 and 28 at 0.9; hard background = one at 0.7 and 29 at 0.1.
    pairs = {
        (0.7, 0.2): 1 * 2 * max(0, 0.7 - 0.2 + 0.3),
        (0.7, 0.9): 1 * 28 * max(0, 0.7 - 0.9 + 0.3),
        (0.1, 0.2): 29 * 2 * max(0, 0.1 - 0.2 + 0.3),
        (0.1, 0.9): 29 * 28 * max(0, 0.1 - 0.9 + 0.3),
    }
    expected = sum(pairs.values()) / 30**2
    assert rank_loss(logits, mask, top_k=30, margin=0.3).item() == pytest.approx(expected, rel=1e-4)


def test_rank_loss_ignores_an_image_without_lesion_and_handles_fewer_than_k_pixels():
    empty = torch.zeros(1, 1, 8, 8)
    assert rank_loss(torch.randn(1, 1, 8, 8), empty).item() == 0.0
    tiny = torch.zeros(1, 1, 8, 8)
    tiny[0, 0, 0, 0] = 1  # one lesion pixel, K=30 asks for more than exist
    logits = torch.where(tiny > 0, -2.0, 2.0)  # lesion scored lower than background
    loss = rank_loss(logits, tiny, top_k=30, margin=0.3)
    p_lesion, p_background = torch.sigmoid(torch.tensor(-2.0)), torch.sigmoid(torch.tensor(2.0))
    assert loss.item() == pytest.approx((p_background - p_lesion + 0.3).item(), rel=1e-5)


def test_rank_loss_gradients_reach_only_the_selected_pixels():
    mask = _disc_mask(16)
    logits = torch.zeros_like(mask, requires_grad=True)
    rank_loss(logits, mask, top_k=4).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad != 0).sum().item() == 8  # 4 lesion + 4 background pixels


def test_hybrid_loss_is_dice_plus_lambda_rank():
    torch.manual_seed(4)
    mask = _disc_mask()
    logits = torch.randn_like(mask)
    expected = dice_loss(logits, mask) + 0.05 * rank_loss(logits, mask, top_k=30, margin=0.3)
    assert hybrid_dice_rank_loss(logits, mask).item() == pytest.approx(expected.item())


def test_softmax_ce_on_two_channels_equals_bce_on_their_difference():
    torch.manual_seed(5)
    two_channel = torch.randn(2, 2, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    difference = two_channel[:, 1:2] - two_channel[:, 0:1]
    from_two = softmax_cross_entropy(two_channel, mask)
    assert from_two.item() == pytest.approx(
        softmax_cross_entropy(difference, mask).item(), rel=1e-5
    )
    assert from_two.item() == pytest.approx(
        F.binary_cross_entropy_with_logits(difference, mask).item(), rel=1e-5
    )


def test_mismatched_target_shape_is_an_error():
    with pytest.raises(ValueError, match="does not match"):
        dice_loss(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 4, 4))


def test_class_weights_make_every_class_weigh_the_same_in_total():
    from skinray.losses import class_weights

    counts = [60, 30, 10, 0]
    weights = class_weights(counts, power=1.0)
    totals = weights * torch.tensor(counts, dtype=torch.float32)
    torch.testing.assert_close(totals[:3], torch.full((3,), 100 / 3))
    assert weights[3] == 0  # absent from training
    torch.testing.assert_close(class_weights(counts, 0.5)[:3], weights[:3].sqrt())
    torch.testing.assert_close(class_weights(counts, 0.0)[:3], torch.ones(3))


def test_weighted_cross_entropy_is_the_weighted_mean_of_per_image_losses():
    from skinray.losses import cross_entropy

    torch.manual_seed(0)
    logits, labels = torch.randn(8, 3), torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    weight = torch.tensor([0.5, 1.0, 4.0])
    per_image = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    expected = (weight[labels] * per_image).sum() / weight[labels].sum()
    torch.testing.assert_close(cross_entropy(logits, labels, weight), expected)
