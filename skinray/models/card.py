"""A released model's card (``MODEL_CARD.md``) and reliability diagram, from its measured report.

The card follows Mitchell et al., *Model Cards for Model Reporting* (FAT* 2019): what the model is,
the data and split it was measured on, the figures with their 95 % bootstrap intervals, per-class
sensitivity, specificity, PPV and NPV, calibration, intended use, limits and licence. Every figure is
read from the report ``skinray.models.release`` measured; nothing is typed in by hand.
"""

from __future__ import annotations

import io as stdio
import math

import numpy as np
from scipy.special import softmax

from skinray import metrics

__all__ = ["reliability_png", "render_model_card"]

_FIGURE_NAMES = {
    "segmentation": {
        "jaccard": "per-image Jaccard (mean)",
        "threshold_jaccard": "thresholded Jaccard (ISIC 2018: < 0.65 counts 0)",
        "dice": "Dice (mean per image)",
        "sensitivity": "pixel sensitivity",
        "specificity": "pixel specificity",
        "accuracy": "pixel accuracy",
    },
    "classification": {
        "accuracy": "accuracy",
        "balanced_accuracy": "balanced accuracy (mean per-class sensitivity)",
        "auc_mean": "mean one-vs-rest AUC",
        "ece": "expected calibration error (15 bins)",
    },
}
_PER_CLASS = ("sensitivity", "specificity", "ppv", "npv", "auc", "auc_sens_80", "ap")


def _interval(entry) -> str:
    if isinstance(entry, dict):
        value, low, high = entry.get("value"), entry.get("low"), entry.get("high")
    else:
        value, low, high = entry, None, None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _outside_its_interval(entry) -> bool:
    if not isinstance(entry, dict):
        return False
    value, low, high = (entry.get(k, math.nan) for k in ("value", "low", "high"))
    return not any(map(math.isnan, (value, low, high))) and not low <= value <= high


def _lesions(report: dict) -> str:
    """What the card's bootstrap drew: lesions with all their images, or (a report from before
    lesions were recorded) images."""
    lesions = report.get("report", {}).get("bootstrap", {}).get("lesions")
    return f"{lesions} lesions, each drawn with all its images" if lesions else "images"


def _headline_table(report: dict) -> list[str]:
    rows, outside = ["| metric | value [95 % CI] |", "|---|---|"], False
    for section, names in _FIGURE_NAMES.items():
        for key, entry in report["report"].get(section, {}).items():
            # ECE's resamples are biased upward whether or not its range holds the figure.
            mark = " †" if key == "ece" or _outside_its_interval(entry) else ""
            outside = outside or bool(mark)
            rows.append(f"| {names.get(key, key)} | {_interval(entry)}{mark} |")
    if outside:
        rows += [
            "",
            "† The resamples' spread, not a confidence interval. An expected calibration error "
            "is biased on resamples (resampling only adds noise to it, the more so on few "
            "images), so its range sits above it, holding it or not: a perfectly calibrated "
            "model simulated on 150 and on 1,276 images gave 0.069 [0.068, 0.164] and 0.045 "
            "[0.033, 0.078]. Any other figure marked so lies outside its own range.",
        ]
    return rows


def _per_class_table(report: dict) -> list[str]:
    per_class = report["report"].get("per_class") or {}
    if not per_class:
        return []
    header = "| class | n | " + " | ".join(_PER_CLASS) + " |"
    rows = [header, "|" + "---|" * (len(_PER_CLASS) + 2)]
    for name, entry in per_class.items():
        cells = " | ".join(_interval(entry.get(key)) for key in _PER_CLASS)
        rows.append(f"| {name} | {entry.get('n', '')} | {cells} |")
    return rows


def _calibration_lines(report: dict) -> list[str]:
    calibration = report.get("calibration")
    if not calibration:
        return ["Not applicable: the model has no class output."]
    before, after = calibration["before"], calibration["after"]
    rows = [
        f"| before | {before['ece']:.4f} | {before['nll']:.4f} |",
        f"| after, fitted and measured on the same images | {after['ece']:.4f} | {after['nll']:.4f} |",
    ]
    held = calibration.get("after_out_of_fold")
    if held:  # releases before it lack it
        rows.append(
            f"| after, out of fold ({calibration['folds']} folds: each measured with the T of the "
            f"others) | {held['ece']:.4f} | {held['nll']:.4f} |"
        )
    return [
        f"Temperature scaling (Guo et al. 2017) fitted on the validation split: T = "
        f"{calibration['temperature']:.3f}, stored in `config.json` and applied by `Predictor`.",
        "",
        "| | ECE (15 bins) | NLL |",
        "|---|---|---|",
        *rows,
        "",
        "![reliability diagram](reliability.png)",
        "",
        "Fitted and measured on the same validation images, the ECE after is optimistic; the "
        "out-of-fold row is not.",
    ]


def _mask_resolution(report: dict, config) -> str:
    if "segmentation" not in (report.get("report") or {}):
        return ""
    height, width = config.input_size
    return (
        f" Masks are compared with the truth resized to the model's {height}×{width} input "
        "(`jobs/evaluate.py --at-source-size` compares at the truth's own resolution)."
    )


def render_model_card(spec, config, report: dict) -> str:
    """``MODEL_CARD.md`` text for the released model ``spec.name``."""
    training = spec.training or {}
    best = training.get("best", {})
    lines = [
        f"# {spec.name}: {spec.title}",
        "",
        "```python",
        "from skinray.predict import Predictor",
        "",
        (
            f'predictor = Predictor.load("{spec.segmenter}", "{spec.name}")  # ROIs from the segmenter'
            if spec.segmenter
            else f'predictor = Predictor.load("{spec.name}")'
        ),
        "```",
        "",
        "## Model",
        f"- Architecture: `{config.model}` {config.kwargs}; input {config.input_size[0]}×"
        f"{config.input_size[1]}, normalisation mean {list(config.mean)}, std {list(config.std)}.",
        f"- Outputs: {', '.join(config.outputs)}"
        + (f"; classes: {list(config.class_names)}" if "class_logits" in config.outputs else "")
        + (
            f"; mask threshold {config.mask_threshold}." if "mask_logits" in config.outputs else "."
        ),
        f"- Weights: `model.safetensors`, {report['weights_dtype']} (fp16 against fp32: the largest "
        f"change of a headline figure was {report['fp16_change']:.4f}), "
        f"SHA-256 `{report['weights_sha256']}`.",
        "- Test-time flips: "
        + (
            "on (`Predictor` averages the logits over the image and its two flips"
            + ("" if config.test_time_flips else "; the segmenter's setting, for the pair")
            + ")."
            if report.get("test_time_flips", config.test_time_flips)
            else "off."
        ),
        f"- Code: trained with skinray commit `{training.get('commit', 'not recorded')}`, "
        f"released with `{report['commit']}`.",
        "",
        "## Training",
        f"- Recipe: {spec.recipe}."
        + (
            " Every setting of the run: `training_config` in `metrics.json`."
            if "training_config" in report
            else ""
        ),
        f"- Reproduce: `{spec.reproduce}`." if spec.reproduce else "",
        f"- Best epoch {best.get('epoch', 'n/a')} of {training.get('epochs_run', 'n/a')}; "
        f"wall time {training.get('wall_time_s', float('nan')) / 60:.1f} min on "
        f"{training.get('machine', 'the machine named in docs/benchmarks.md')}.",
        "",
        "## Data",
        f"- {spec.data}",
        f"- Licence of the training data: {spec.licence}",
        "",
        "## Results",
        f"On {int(report['metrics'].get('images', 0))} validation images, through "
        "`skinray.predict.Predictor` (the path `jobs/score.py` runs); 95 % percentile bootstrap "
        f"intervals over {_lesions(report)}. This split also chose the checkpoint"
        f"{' (and fitted the temperature)' if report.get('calibration') else ''}; "
        f"nothing was tuned on it by hand.{_mask_resolution(report, config)}",
        "",
        *_headline_table(report),
        "",
        *_per_class_table(report),
        "",
        "## Calibration",
        *_calibration_lines(report),
        "",
        *_ood_lines(report),
        "## Intended use",
        spec.intended_use
        or "Research and batch triage of dermoscopy images; not a medical device, not for diagnosis.",
        "",
        "## Limits",
        *[f"- {limit}" for limit in spec.limits],
        "",
    ]
    return "\n".join(lines)


def _ood_lines(report: dict) -> list[str]:
    ood = report.get("ood")
    if not ood:
        return []
    return [
        "## Out-of-distribution flag",
        f"`ood_score` is 1 − the mean cosine similarity of an image's features to the {ood['k']} "
        f"nearest of {ood['bank_size']} training images' features (`ood.safetensors`, SHA-256 "
        f"`{ood['bank_sha256']}`; `skinray.ood`). Images scoring above {ood['threshold']:.4f} are "
        f"flagged `ood`: the threshold lets {ood['quantile']:.1%} of the validation images pass "
        f"({ood['validation_pass']:.1%} did{_out_of_fold_pass(ood)}). A flagged image is unlike "
        "the training data; its class probabilities should not be trusted.",
        "",
    ]


def _out_of_fold_pass(ood: dict) -> str:
    rate = ood.get("validation_pass_out_of_fold")
    return (
        ""
        if rate is None
        else f"; {rate:.1%} did of each fold, under a threshold set on the others"
    )


def reliability_png(labels: np.ndarray, probabilities: np.ndarray, calibration: dict) -> bytes:
    """Reliability diagram before and after temperature scaling (``probabilities`` are after)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temperature = calibration["temperature"]
    before = softmax(np.log(np.clip(probabilities, 1e-12, 1)) * temperature, axis=1)
    figure, axes = plt.subplots(1, 2, figsize=(8, 4), sharey=True)
    for axis, values, title in (
        (axes[0], before, "before"),
        (axes[1], probabilities, f"T = {temperature:.2f}"),
    ):
        bins = metrics.reliability_bins(labels, values)
        axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
        filled = np.asarray(bins["count"]) > 0
        axis.bar(
            np.asarray(bins["confidence"])[filled],
            np.asarray(bins["accuracy"])[filled],
            width=1 / len(bins["count"]),
            edgecolor="black",
            alpha=0.7,
        )
        ece = metrics.expected_calibration_error(labels, values)
        axis.set_title(f"{title}: ECE {ece:.3f}")
        axis.set_xlabel("confidence")
    axes[0].set_ylabel("accuracy")
    figure.tight_layout()
    buffer = stdio.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()
