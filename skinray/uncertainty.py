"""Per-image uncertainty and out-of-distribution scores of a classifier's outputs (pure functions).

- Predictive entropy of the calibrated class probabilities, in nats and normalised by log(C) to
  [0, 1], so that models with different class counts compare.
- Energy, −T·logsumexp(logits / T) (Liu et al., NeurIPS 2020, Eq. 1 with the model's temperature):
  lower for inputs like the training data, higher for inputs unlike it.
- Maximum softmax probability (Hendrycks & Gimpel, ICLR 2017), the baseline OOD score.
- Disagreement over views (test-time flips): the mean total-variation distance between each view's
  probabilities and their mean.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "energy",
    "flip_disagreement",
    "max_softmax",
    "normalised_entropy",
    "predictive_entropy",
]


def predictive_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """(N, C) probabilities → (N,) entropy in nats."""
    p = probabilities.clamp_min(1e-12)
    return -(p * p.log()).sum(1)


def normalised_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Entropy over its maximum, log(C): 0 for a one-hot prediction, 1 for a uniform one."""
    classes = probabilities.shape[1]
    return (
        predictive_entropy(probabilities) / math.log(classes)
        if classes > 1
        else 0 * probabilities[:, 0]
    )


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(N, C) logits → (N,) free energy −T·logsumexp(logits / T)."""
    return -temperature * torch.logsumexp(logits / temperature, dim=1)


def max_softmax(probabilities: torch.Tensor) -> torch.Tensor:
    return probabilities.max(1).values


def flip_disagreement(view_probabilities: torch.Tensor) -> torch.Tensor:
    """(V, N, C) probabilities of V views of N images → (N,) mean total-variation distance of each
    view from the views' mean: 0 when the views agree, at most 1."""
    mean = view_probabilities.mean(0, keepdim=True)
    return 0.5 * (view_probabilities - mean).abs().sum(2).mean(0)
