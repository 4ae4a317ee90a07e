"""Out-of-distribution score: how far an input lies from the classifier's training data.

Deep nearest neighbours (Sun et al., "Out-of-distribution detection with deep nearest neighbors",
ICML 2022): the classifier's pooled features (``FEATURES``), L2-normalised, against a bank of
normalised training features; the score is 1 − the mean cosine similarity of the ``k`` nearest
(their Eq. 2 takes the k-th distance; the mean of the k nearest is steadier with a small bank).
The threshold is the ``quantile`` of the validation split's scores: that share of in-distribution
images passes, and an image above it is flagged.

Chosen by measurement on the released ``ham10000-classifier`` (docs/benchmarks.md): of 31
non-dermoscopy images (scikit-image's sample photographs, noise, a text page, an X-ray-like grey
image) at 97.5 % of the validation images passing, energy (Liu et al. 2020) flagged 13 %, maximum
softmax 3 %, a class-conditional Mahalanobis distance (Lee et al. 2018) 71 %, and this score 100 %.

The bank (``bank_size`` training images drawn with ``seed``) ships beside the weights as
``ood.safetensors``; ``config.json``'s ``ood`` entry holds its SHA-256, ``k``, the quantile and
the threshold, so a refitted bank changes the model's config hash.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from skinray import io

__all__ = [
    "OOD_FILE",
    "NearestNeighbourOOD",
    "fit_ood",
    "load_ood",
    "quantile_threshold",
    "save_ood",
]

OOD_FILE = "ood.safetensors"
METHOD = "knn_cosine"


@dataclass(frozen=True)
class NearestNeighbourOOD:
    bank: torch.Tensor  # (N, D) float32, unit rows: training images' features
    k: int
    threshold: float
    quantile: float

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """(M, D) features → (M,) scores in [0, 2]: 0 for an input whose features match the bank's."""
        queries = F.normalize(features.float(), dim=1)
        similarity = queries @ self.bank.to(queries.device).T
        nearest = similarity.topk(min(self.k, len(self.bank)), dim=1).values
        return 1.0 - nearest.mean(1)

    def flags(self, scores: torch.Tensor) -> torch.Tensor:
        return scores > self.threshold


def fit_ood(
    training_features: torch.Tensor,
    validation_features: torch.Tensor,
    *,
    k: int = 10,
    bank_size: int = 1000,
    quantile: float = 0.975,
    seed: int = 0,
) -> NearestNeighbourOOD:
    """A bank of ``bank_size`` training features (drawn with ``seed``) and the threshold that lets
    ``quantile`` of the validation images pass."""
    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(training_features), generator=generator)[:bank_size]
    bank = F.normalize(training_features[chosen].float(), dim=1)
    unthresholded = NearestNeighbourOOD(bank, k, float("inf"), quantile)
    scores = unthresholded.score(validation_features).numpy()
    return NearestNeighbourOOD(bank, k, quantile_threshold(scores, quantile), quantile)


def quantile_threshold(scores: np.ndarray, quantile: float) -> float:
    """The score that ``quantile`` of ``scores`` are at or below: the flag's threshold."""
    return float(np.quantile(scores, quantile, method="higher"))


def save_ood(ood: NearestNeighbourOOD, uri: str) -> dict:
    """Write the bank (fp16) beside a saved model; returns the ``config.json`` entry."""
    data = save_safetensors({"bank": ood.bank.half().contiguous()})
    io.write_bytes(io.join(uri, OOD_FILE), data)
    return {
        "method": METHOD,
        "k": ood.k,
        "threshold": ood.threshold,
        "quantile": ood.quantile,
        "bank_size": len(ood.bank),
        "bank_sha256": hashlib.sha256(data).hexdigest(),
    }


def load_ood(uri: str, entry: dict) -> NearestNeighbourOOD:
    """The bank beside a saved model, checked against its ``config.json`` entry."""
    if entry.get("method") != METHOD:
        raise ValueError(f"{uri}: unknown OOD method {entry.get('method')!r} in config.json")
    data = io.read_bytes(io.join(uri, OOD_FILE))
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["bank_sha256"]:
        raise ValueError(
            f"{io.join(uri, OOD_FILE)}: SHA-256 {digest} does not match config.json "
            f"({entry['bank_sha256']})"
        )
    bank = load_safetensors(data)["bank"].float()
    if not (int(entry["k"]) >= 1 and math.isfinite(float(entry["threshold"]))):
        raise ValueError(
            f"{uri}: config.json's OOD entry needs k >= 1 and a finite threshold, not k "
            f"{entry['k']}, threshold {entry['threshold']}"
        )
    return NearestNeighbourOOD(bank, int(entry["k"]), float(entry["threshold"]), entry["quantile"])
