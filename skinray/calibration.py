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


def at_search_bound(temperature: float, logits: np.ndarray, labels: np.ndarray) -> bool:
    """Whether the NLL falls all the way to a bound of ``fit_temperature``'s search (every image
    right, or every one wrong), so that no temperature was fitted: the fit stopped at a bound, or
    the NLL is as low there as at the fit. Every image right by a wide margin has an NLL of 0 in
    float64 for every small T, and the search stops anywhere on that flat stretch."""
    if min(abs(np.log(temperature) - bound) for bound in _LOG_T_BOUNDS) < 1e-3:
        return True
    fitted = negative_log_likelihood(logits, labels, temperature)
    return any(
        negative_log_likelihood(logits, labels, float(np.exp(bound))) <= fitted + 1e-12
        for bound in _LOG_T_BOUNDS
    )


def split_in_folds(
    count: int, folds: int = 2, seed: int = 0, groups: np.ndarray | None = None
) -> list[np.ndarray]:
    """``count`` indices in ``folds`` random folds of near-equal size (drawn with ``seed``). With
    ``groups`` (one label an index: a lesion), every group falls whole in one fold, the folds
    near-equal in groups; with every index its own group, the folds are those drawn without."""
    if groups is not None:
        if len(groups) != count:
            raise ValueError(f"{len(groups)} groups for {count} items")
        # An item without a group is a group of its own.
        groups = [f"item:{i}" if g is None else f"group:{g}" for i, g in enumerate(groups)]
    if groups is not None and len(set(groups)) < count:
        unique, index_group = np.unique(np.asarray(groups), return_inverse=True)
        chosen = split_in_folds(len(unique), folds, seed)
        return [np.flatnonzero(np.isin(index_group, fold)) for fold in chosen]
    if not 2 <= folds <= count:
        raise ValueError(f"need 2 <= folds <= {count} items, got {folds} folds")
    return np.array_split(np.random.default_rng(seed).permutation(count), folds)


def out_of_fold_probabilities(
    logits: np.ndarray,
    labels: np.ndarray,
    folds: int = 2,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> np.ndarray:
    """softmax(logits / T) for each image with T fitted on the other folds only: calibration
    measured on images its temperature never saw, where fitting and measuring on the same split
    flatters the figures after scaling. ``groups``: each image's lesion, whose images stay in one
    fold (a lesion's other images would have fitted the T it is measured with)."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.int64)
    calibrated = np.empty_like(logits)
    for held in split_in_folds(len(labels), folds, seed, groups):
        fitting = np.setdiff1d(np.arange(len(labels)), held)
        temperature = fit_temperature(logits[fitting], labels[fitting])
        calibrated[held] = np.exp(log_softmax(logits[held] / temperature, axis=1))
    return calibrated
