"""The papers' losses as pure functions of tensors.

Conventions: segmentation losses take ``mask_logits`` (N,1,H,W) as every model returns them and a target
mask (N,1,H,W) or (N,H,W) of 0/1; classification losses take ``class_logits`` (N,C) and integer
labels (N,). Every function returns a scalar averaged over the batch.

Library code is used where it computes the papers' formula: torchvision's ``sigmoid_focal_loss`` for
binary focal loss, PyTorch's cross-entropy for the softmax losses. Dice is written here because the
papers average a per-image Dice over the batch (MB-DCNN Eq. 2, ASNet Eq. 3), whereas smp's ``DiceLoss``
pools every pixel of the batch into one ratio, which lets large lesions drown small ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

__all__ = [
    "LOSSES",
    "bce_dice_loss",
    "binary_focal_loss",
    "class_weights",
    "cross_entropy",
    "dice_loss",
    "focal_dice_loss",
    "focal_loss",
    "hybrid_dice_rank_loss",
    "rank_loss",
    "softmax_cross_entropy",
]


def _as_mask_target(target: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if target.dim() == like.dim() - 1:
        target = target.unsqueeze(1)
    if target.shape != like.shape:
        raise ValueError(f"target shape {tuple(target.shape)} does not match {tuple(like.shape)}")
    return target.to(like.dtype)


def dice_loss(mask_logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per image, averaged over the batch (MB-DCNN Eq. 2).

    ``1 - 2·Σ p·y / (Σ (p + y) + ε)`` with ``p = sigmoid(logit)``. ``smooth`` (ε) is added to the
    numerator too, so an empty prediction of an empty mask costs 0 rather than 1.
    """
    target = _as_mask_target(target, mask_logits)
    probs = torch.sigmoid(mask_logits.float()).flatten(1)
    target = target.float().flatten(1)
    intersection = (probs * target).sum(1)
    total = probs.sum(1) + target.sum(1)
    return (1 - (2 * intersection + smooth) / (total + smooth)).mean()


def bce_dice_loss(
    mask_logits: torch.Tensor,
    target: torch.Tensor,
    bce_weight: float = 1.0,
    dice_weight: float = 1.0,
) -> torch.Tensor:
    """Binary cross-entropy + Dice (the two-step paper's CE+Dice; ASNet Eq. 3 weights BCE by 1/2)."""
    target = _as_mask_target(target, mask_logits)
    bce = F.binary_cross_entropy_with_logits(mask_logits.float(), target.float())
    return bce_weight * bce + dice_weight * dice_loss(mask_logits, target)


def focal_loss(
    class_logits: torch.Tensor,
    labels: torch.Tensor,
    gamma: float = 2.0,
    alpha: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-class softmax focal loss, ``-α_t (1 - p_t)^γ log p_t`` (Lin et al.; CLNet's classifier loss).

    ``alpha`` is an optional per-class weight (C,); with ``gamma=0`` and no ``alpha`` this is exactly
    cross-entropy.
    """
    log_pt = -F.cross_entropy(class_logits.float(), labels, reduction="none")
    pt = log_pt.exp()
    loss = -((1 - pt) ** gamma) * log_pt
    if alpha is not None:
        loss = alpha.to(loss)[labels] * loss
    return loss.mean()


def binary_focal_loss(
    mask_logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = -1.0
) -> torch.Tensor:
    """Per-pixel sigmoid focal loss, averaged (torchvision's; ``alpha < 0`` turns the α term off)."""
    target = _as_mask_target(target, mask_logits)
    return sigmoid_focal_loss(
        mask_logits.float(), target.float(), alpha=alpha, gamma=gamma, reduction="mean"
    )


def focal_dice_loss(
    mask_logits: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    focal_weight: float = 1.0,
    dice_weight: float = 1.0,
) -> torch.Tensor:
    """Binary focal + Dice, CLNet's segmentation loss."""
    focal = binary_focal_loss(mask_logits, target, gamma=gamma)
    return focal_weight * focal + dice_weight * dice_loss(mask_logits, target)


def rank_loss(
    mask_logits: torch.Tensor, target: torch.Tensor, top_k: int = 30, margin: float = 0.3
) -> torch.Tensor:
    """MB-DCNN's rank loss (Eq. 3): hinge between the hardest background and lesion pixels.

    Per image, the ``top_k`` lesion pixels with the largest error (lowest probability) give
    ``H¹`` and the ``top_k`` background pixels with the largest error (highest probability) give
    ``H⁰``; the loss is ``1/K² Σ_i Σ_j max(0, H⁰_i - H¹_j + margin)``, which asks every hard lesion
    pixel to score ``margin`` above every hard background pixel. An image with fewer than ``top_k``
    pixels of a class uses the ones it has, and its sum is divided by the pairs it has rather than
    K² (a departure: Eq. 3 does not say; it weights a lesion smaller than K by K/n); an image
    lacking a class contributes 0. The result is the mean over images.
    """
    target = _as_mask_target(target, mask_logits).flatten(1).bool()
    probs = torch.sigmoid(mask_logits.float()).flatten(1)
    k = min(top_k, probs.shape[1])
    inf = torch.finfo(probs.dtype).max
    # Masked top-k: pixels of the other class are pushed to the far end so top-k never picks them.
    hard_lesion, lesion_idx = torch.where(target, probs, inf).topk(k, dim=1, largest=False)
    hard_background, bg_idx = torch.where(~target, probs, -inf).topk(k, dim=1, largest=True)
    lesion_valid = target.gather(1, lesion_idx)
    background_valid = (~target).gather(1, bg_idx)
    pair_valid = background_valid[:, :, None] & lesion_valid[:, None, :]
    hinge = F.relu(hard_background[:, :, None] - hard_lesion[:, None, :] + margin)
    hinge = torch.where(pair_valid, hinge, torch.zeros_like(hinge))
    pairs = pair_valid.sum((1, 2)).clamp_min(1)
    return (hinge.sum((1, 2)) / pairs).mean()


def hybrid_dice_rank_loss(
    mask_logits: torch.Tensor,
    target: torch.Tensor,
    rank_weight: float = 0.05,
    top_k: int = 30,
    margin: float = 0.3,
) -> torch.Tensor:
    """MB-DCNN's segmentation loss, ``L_dice + λ·L_rank`` (Eq. 1), with λ=0.05, K=30, margin=0.3."""
    rank = rank_loss(mask_logits, target, top_k=top_k, margin=margin)
    return dice_loss(mask_logits, target) + rank_weight * rank


def softmax_cross_entropy(mask_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-wise softmax loss of the 2-channel FCN (Qi et al., Sec. 2.2).

    Takes the FCN's (N,2,H,W) background/lesion scores, or the (N,1,H,W) ``mask_logits`` every
    segmenter returns, read as the lesion-minus-background score difference: softmax over
    ``(z₀, z₁)`` depends only on ``z₁ - z₀``, so both give the same loss.
    """
    if mask_logits.shape[1] == 1:
        mask_logits = torch.cat([torch.zeros_like(mask_logits), mask_logits], dim=1)
    if mask_logits.shape[1] != 2:
        raise ValueError(f"expected 1 or 2 channels, got {mask_logits.shape[1]}")
    if target.dim() == 4:
        target = target[:, 0]
    return F.cross_entropy(mask_logits.float(), target.long())


def cross_entropy(
    class_logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax cross-entropy of class logits (the two-step classifier's and mask-CN's loss);
    ``weight`` (C,) weighs each class (PyTorch's weighted mean over the batch)."""
    if weight is not None:
        weight = weight.to(class_logits.device, torch.float32)
    return F.cross_entropy(class_logits.float(), labels, weight=weight)


def class_weights(counts: Sequence[int], power: float = 1.0) -> torch.Tensor:
    """Per-class loss weights ``(N / (C · n_c))^power`` from the training counts: 1 inverse
    frequency (every class weighs as much in total), 0.5 its square root (a milder correction);
    a class absent from training gets weight 0."""
    counts_t = torch.tensor(counts, dtype=torch.float64)
    present = counts_t > 0
    weights = torch.zeros_like(counts_t)
    weights[present] = (counts_t.sum() / (present.sum() * counts_t[present])) ** power
    return weights.float()


#: Every loss by the name recipes and the model registry use for it.
LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "dice": dice_loss,
    "bce_dice": bce_dice_loss,
    # ASNet Eq. 3: ½·BCE + Dice.
    "bce_dice_asnet": partial(bce_dice_loss, bce_weight=0.5),
    "binary_focal": binary_focal_loss,
    "focal_dice": focal_dice_loss,
    "rank": rank_loss,
    "hybrid_dice_rank": hybrid_dice_rank_loss,
    "softmax_cross_entropy": softmax_cross_entropy,
    "cross_entropy": cross_entropy,
    "focal": focal_loss,
}
