"""Temperature scaling (Guo et al., *On Calibration of Modern Neural Networks*, ICML 2017).

One scalar T > 0 divides a classifier's logits before the softmax: the argmax, so accuracy and the
ranking behind every AUC, is unchanged, and the confidence is made to match the accuracy. T is fitted
on the validation split by minimising the negative log-likelihood (Guo et al. Sec. 4.2), stored in the
saved model's ``config.json`` (``temperature``) and applied by ``skinray.predict.Predictor``.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

__all__ = [
    "at_search_bound",
    "fit_temperature",
    "negative_log_likelihood",
    "out_of_fold_probabilities",
    "split_in_folds",
]

#: Search range of log T: T from 1/20 to 20 covers every temperature Guo et al. report (1.1–4.5).
_LOG_T_BOUNDS = (-np.log(20.0), np.log(20.0))


def negative_log_likelihood(
    logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0
) -> float:
    """Mean NLL of ``labels`` (N,) under softmax(``logits`` (N, C) / ``temperature``)."""
    log_probabilities = log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    return float(-log_probabilities[np.arange(len(labels)), np.asarray(labels)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T that minimises the validation NLL of softmax(logits / T). Refused: logits that are
    not finite and labels outside the classes. It may stop at a bound of its search
    (``at_search_bound``)."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} do not pair up")
    if not np.isfinite(logits).all():
        raise ValueError(f"{int((~np.isfinite(logits)).sum())} logits are not finite")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels outside 0..{logits.shape[1] - 1}")
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t))),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(result.x))


def at_search_bound(temperature: float) -> bool:
    """Whether ``fit_temperature`` stopped at a bound of its search: the NLL fell all the way
    there (every image right, or every one wrong), and the bound is no fitted temperature."""
    return min(abs(np.log(temperature) - bound) for bound in _LOG_T_BOUNDS) < 1e-3


def split_in_folds(count: int, folds: int = 2, seed: int = 0) -> list[np.ndarray]:
    """``count`` indices in ``folds`` random folds of near-equal size (drawn with ``seed``)."""
    if not 2 <= folds <= count:
        raise ValueError(f"need 2 <= folds <= {count} items, got {folds} folds")
    return np.array_split(np.random.default_rng(seed).permutation(count), folds)


def out_of_fold_probabilities(
    logits: np.ndarray, labels: np.ndarray, folds: int = 2, seed: int = 0
) -> np.ndarray:
    """softmax(logits / T) for each image with T fitted on the other folds only: calibration
    measured on images its temperature never saw, where fitting and measuring on the same split
    flatters the figures after scaling."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.int64)
    calibrated = np.empty_like(logits)
    for held in split_in_folds(len(labels), folds, seed):
        fitting = np.setdiff1d(np.arange(len(labels)), held)
        temperature = fit_temperature(logits[fitting], labels[fitting])
        calibrated[held] = np.exp(log_softmax(logits[held] / temperature, axis=1))
    return calibrated
