"""Uncertainty and OOD scores against their definitions on hand-made outputs."""

from __future__ import annotations

import math

import pytest
import torch

from skinray.uncertainty import (
    energy,
    flip_disagreement,
    max_softmax,
    normalised_entropy,
    predictive_entropy,
)


def test_entropy_is_zero_for_one_hot_and_log_c_for_uniform():
    probabilities = torch.tensor([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0, 0]])
    assert predictive_entropy(probabilities).tolist() == pytest.approx(
        [0, math.log(4), math.log(2)], abs=1e-6
    )
    assert normalised_entropy(probabilities).tolist() == pytest.approx([0, 1, 0.5], abs=1e-6)


def test_energy_is_minus_log_sum_exp_and_falls_as_the_top_logit_rises():
    logits = torch.tensor([[2.0, 0.0, -1.0], [8.0, 0.0, -1.0]])
    expected = [
        -math.log(math.exp(2) + 1 + math.exp(-1)),
        -math.log(math.exp(8) + 1 + math.exp(-1)),
    ]
    assert energy(logits).tolist() == pytest.approx(expected, rel=1e-6)
    assert energy(logits, temperature=2.0)[0].item() == pytest.approx(
        -2 * math.log(math.exp(1) + 1 + math.exp(-0.5)), rel=1e-6
    )
    assert energy(logits)[1] < energy(logits)[0]  # more confident, more in-distribution


def test_max_softmax_and_flip_disagreement():
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    assert max_softmax(probabilities).tolist() == pytest.approx([0.7, 0.4])
    same = probabilities.expand(3, -1, -1)
    assert flip_disagreement(same).tolist() == pytest.approx([0, 0])
    views = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # two views, one image, opposite answers
    assert flip_disagreement(views).tolist() == pytest.approx([0.5])
