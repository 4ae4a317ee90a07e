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

__all__ = ["fit_temperature", "negative_log_likelihood"]

#: Search range of log T: T from 1/20 to 20 covers every temperature Guo et al. report (1.1–4.5).
_LOG_T_BOUNDS = (-np.log(20.0), np.log(20.0))


def negative_log_likelihood(
    logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0
) -> float:
    """Mean NLL of ``labels`` (N,) under softmax(``logits`` (N, C) / ``temperature``)."""
    log_probabilities = log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    return float(-log_probabilities[np.arange(len(labels)), np.asarray(labels)].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T that minimises the validation NLL of softmax(logits / T)."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.int64)
    if logits.ndim != 2 or len(logits) != len(labels) or len(labels) == 0:
        raise ValueError(f"logits {logits.shape} and labels {labels.shape} do not pair up")
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, labels, float(np.exp(log_t))),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(result.x))
