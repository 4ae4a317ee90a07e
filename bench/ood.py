"""The released classifier's OOD flag and uncertainty, measured (issue #14; docs/benchmarks.md).

    python bench/ood.py [--model ham10000-classifier] [--root ../shared/data/ham10000]

Prints: the share of the whole HAM10000 validation split that passes the flag; each non-dermoscopy
image's score and whether it is flagged; what energy and maximum softmax flag at the same share
of validation passing; and on the validation images, blurred (Gaussian σ 3 px)
and noised (Gaussian σ 25), the mean OOD score and entropy and how often each rose.
"""

from __future__ import annotations

import argparse
import json

import cv2
import numpy as np
import torch

from skinray.data.datasets import read_split
from skinray.data.loading import decode_samples
from skinray.data.non_dermoscopy import non_dermoscopy_images
from skinray.models import CLASS_LOGITS
from skinray.predict import Predictor
from skinray.uncertainty import energy, max_softmax, normalised_entropy


def _predict(predictor: Predictor, images, baselines: dict | None = None):
    """OOD scores and normalised entropies; with ``baselines``, also the energy and the negative
    maximum softmax appended to its lists (higher: less like the training data, for both)."""
    scores, entropies = [], []
    for start in range(0, len(images), 64):
        with torch.inference_mode():
            outputs, prediction = predictor.run(images[start : start + 64])
        scores.append(prediction.ood_score.numpy())
        entropies.append(normalised_entropy(prediction.class_probabilities).numpy())
        if baselines is not None:
            logits = outputs[CLASS_LOGITS]
            baselines["energy"].append(energy(logits, predictor.temperature).numpy())
            baselines["max_softmax"].append(-max_softmax(prediction.class_probabilities).numpy())
    return np.concatenate(scores), np.concatenate(entropies)


def _baseline_figures(validation: dict, others: dict) -> dict:
    """Each baseline score's threshold at the same 97.5 % validation pass, and what it flags."""
    figures = {}
    for name in validation:
        inside, outside = np.concatenate(validation[name]), np.concatenate(others[name])
        threshold = np.quantile(inside, 0.975, method="higher")
        figures[name] = {
            "validation_pass": float(np.mean(inside <= threshold)),
            "non_dermoscopy_flagged": float(np.mean(outside > threshold)),
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ham10000-classifier")
    parser.add_argument("--root", default="../shared/data/ham10000")
    args = parser.parse_args()
    torch.set_num_threads(2)
    predictor = Predictor.load(args.model)
    threshold = predictor.ood.threshold
    samples = read_split("ham10000", args.root, "validation")
    decoded = decode_samples(samples.rows.to_pydict(), predictor.input_size, 7)
    validation = decoded["image"][decoded["ok"]]
    validation_baselines = {"energy": [], "max_softmax": []}
    other_baselines = {"energy": [], "max_softmax": []}
    scores, entropy = _predict(predictor, validation, validation_baselines)
    figures = {"threshold": threshold, "validation_images": len(validation)}
    figures["validation_pass"] = float(np.mean(scores <= threshold))
    others = non_dermoscopy_images()
    other_scores, _ = _predict(predictor, list(others.values()), other_baselines)
    figures["non_dermoscopy_flagged"] = float(np.mean(other_scores > threshold))
    figures["baselines_at_97.5_percent_pass"] = _baseline_figures(
        validation_baselines, other_baselines
    )
    figures["non_dermoscopy"] = {
        n: round(float(s), 4) for n, s in zip(others, other_scores, strict=True)
    }
    rng = np.random.default_rng(0)
    degraded = {
        "blur_sigma3": np.stack([cv2.GaussianBlur(i, (0, 0), 3) for i in validation]),
        "noise_sigma25": np.clip(validation + rng.normal(0, 25, validation.shape), 0, 255).astype(
            np.uint8
        ),
    }
    figures["original"] = {"ood_score": float(scores.mean()), "entropy": float(entropy.mean())}
    for name, images in degraded.items():
        s, e = _predict(predictor, images)
        figures[name] = {
            "ood_score": float(s.mean()),
            "ood_score_rose": float(np.mean(s > scores)),
            "flagged": float(np.mean(s > threshold)),
            "entropy": float(e.mean()),
            "entropy_rose": float(np.mean(e > entropy)),
        }
    figures["test_time_flips_cost"] = _flips_cost(args.model, validation[:128])
    print(json.dumps(figures, indent=2))


def _flips_cost(model: str, images: np.ndarray) -> dict:
    """Images/s of the shipped pair (the segmenter and ``model``) on ``images`` without and with
    test-time flips (best of 2 passes each, eager, 2 threads, after a warm-up)."""
    import time

    predictor = Predictor.load("lesion-segmenter", model)
    rates = {}
    for flips in (False, True, False, True):
        predictor.test_time_flips = flips
        predictor(images[:16])  # warm-up
        started = time.perf_counter()
        for start in range(0, len(images), 16):
            predictor(images[start : start + 16])
        rate = len(images) / (time.perf_counter() - started)
        key = "with_flips" if flips else "without_flips"
        rates[key] = max(rates.get(key, 0.0), rate)
    rates["cost"] = rates["without_flips"] / rates["with_flips"] - 1
    return rates


if __name__ == "__main__":
    main()
