"""``Evaluator.report``: training's figures with bootstrap intervals, ISIC's per-class figures and
calibration, on synthetic predictions (no model, no Ray)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from skinray import metrics
from skinray.evaluation import (
    CLASSIFICATION_FIGURES,
    PER_CLASS_FIGURES,
    SEGMENTATION_FIGURES,
    Evaluator,
)
from skinray.predict import Prediction

CLASSES = ["MEL", "NV", "SK"]
SIZE = 16


def _batch(seed: int, count: int, classify: bool = True, segment: bool = True):
    """(Prediction, truth masks, labels): square lesions predicted with varied shifts (per-image
    Jaccard on both sides of 0.65) and class probabilities that favour the label."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((count, SIZE, SIZE), np.uint8)
    truth[:, 4:12, 4:12] = 1
    predicted = np.stack([np.roll(m, int(rng.integers(0, 4)), axis=1) for m in truth])
    labels = rng.integers(0, len(CLASSES), count)
    logits = rng.normal(size=(count, len(CLASSES))) + 1.5 * np.eye(len(CLASSES))[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    prediction = Prediction(
        mask_probability=None,
        mask=torch.from_numpy(predicted) if segment else None,
        class_probabilities=torch.from_numpy(probabilities).float() if classify else None,
        cam=None,
        roi_box=None,
    )
    return prediction, torch.from_numpy(truth), torch.from_numpy(labels)


def _evaluator(batches=((0, 40), (1, 60)), **kind) -> Evaluator:
    evaluator = Evaluator(CLASSES)
    for seed, count in batches:
        evaluator.update(*_batch(seed, count, **kind))
    return evaluator


def test_report_values_are_the_result_figures_with_intervals_around_them():
    evaluator = _evaluator()
    result, report = evaluator.result(), evaluator.report(resamples=300)
    assert report["images"] == 100
    assert report["bootstrap"] == {"resamples": 300, "confidence": 0.95, "seed": 0, "lesions": 100}
    assert list(report["segmentation"]) == list(SEGMENTATION_FIGURES)
    for name in ("jaccard", "threshold_jaccard", "dice", "sensitivity", "specificity"):
        figure = report["segmentation"][name]
        assert figure["value"] == pytest.approx(result[name], abs=1e-12), name
        assert figure["low"] < figure["value"] < figure["high"], name
    classification = report["classification"]
    assert list(classification) == list(CLASSIFICATION_FIGURES)
    # a model that segments and classifies keeps both accuracies apart in the flat result
    pixel = report["segmentation"]["accuracy"]["value"]
    assert pixel == pytest.approx(result["pixel_accuracy"], abs=1e-12)
    assert classification["accuracy"]["value"] == pytest.approx(result["accuracy"])
    assert abs(pixel - result["accuracy"]) > 1e-3
    assert classification["balanced_accuracy"]["value"] == pytest.approx(
        result["balanced_accuracy"]
    )
    assert classification["auc_mean"]["value"] == pytest.approx(result["auc_mean"], abs=1e-9)
    for figure in classification.values():
        assert figure["low"] <= figure["value"] <= figure["high"]
    for name in CLASSES:
        per_class = report["per_class"][name]
        assert list(per_class) == ["n", *PER_CLASS_FIGURES]
        assert per_class["auc"]["value"] == pytest.approx(result[f"auc_{name}"], abs=1e-9)
        for figure in PER_CLASS_FIGURES:
            assert 0 <= per_class[figure]["low"] <= per_class[figure]["high"] <= 1, figure
    labels, _ = evaluator.labels_and_probabilities()
    assert [report["per_class"][n]["n"] for n in CLASSES] == np.bincount(labels).tolist()
    assert sum(report["reliability"]["count"]) == 100


def test_report_thresholded_jaccard_is_isics():
    evaluator = _evaluator()
    report = evaluator.report(resamples=0)
    jaccard = np.concatenate(evaluator._per_image["jaccard"])
    assert (jaccard < 0.65).any() and (jaccard >= 0.65).any()
    expected = np.where(jaccard >= 0.65, jaccard, 0.0).mean()
    assert report["segmentation"]["threshold_jaccard"]["value"] == pytest.approx(expected)
    assert report["segmentation"]["jaccard"]["value"] == pytest.approx(jaccard.mean())


def test_report_classification_matches_the_metric_functions():
    evaluator = _evaluator()
    labels, probabilities = evaluator.labels_and_probabilities()
    report = evaluator.report(resamples=0)
    ece = metrics.expected_calibration_error(labels, probabilities)
    assert report["classification"]["ece"]["value"] == pytest.approx(ece)
    expected = metrics.per_class_report(labels, probabilities, CLASSES)
    for name in CLASSES:
        for figure in PER_CLASS_FIGURES:
            assert report["per_class"][name][figure]["value"] == pytest.approx(
                expected[name][figure]
            )


def test_report_is_seeded_and_without_resamples_has_no_intervals():
    evaluator = _evaluator()

    def text(seed):  # as text: NaN (empty reliability bins) never equals itself
        return json.dumps(evaluator.report(resamples=100, seed=seed))

    assert text(1) == text(1)
    assert text(1) != text(2)
    bare = evaluator.report(resamples=0)
    figure = bare["segmentation"]["dice"]
    assert math.isnan(figure["low"]) and math.isnan(figure["high"])
    assert not math.isnan(figure["value"])


def test_the_bootstrap_draws_each_lesion_with_all_its_images():
    # Four images of each of 25 lesions, predicted alike: as independent images the interval
    # would be about half as wide as it is over the 25 lesions.
    prediction, truth, labels = _batch(0, 25)
    by_image, by_lesion = Evaluator(CLASSES), Evaluator(CLASSES)
    for _ in range(4):
        by_image.update(prediction, truth, labels)
        by_lesion.update(prediction, truth, labels, lesions=[f"L{i}" for i in range(25)])
    image, lesion = by_image.report(resamples=400), by_lesion.report(resamples=400)
    assert (image["bootstrap"]["lesions"], lesion["bootstrap"]["lesions"]) == (100, 25)
    for section, name in (("segmentation", "jaccard"), ("classification", "accuracy")):
        narrow, wide = image[section][name], lesion[section][name]
        assert narrow["value"] == wide["value"]
        ratio = (wide["high"] - wide["low"]) / (narrow["high"] - narrow["low"])
        assert 1.6 < ratio < 2.5, (section, ratio)
    tone = ["a"] * 50 + ["b"] * 50  # subgroups draw their own images' lesions
    subgroups = Evaluator(CLASSES)
    for half in range(2):
        subgroups.update(
            prediction,
            truth,
            labels,
            subgroups={"tone": tone[50 * half : 50 * half + 25]},
            lesions=[f"L{i % 5}" for i in range(25)],
        )
    by_tone = subgroups.subgroup_report(resamples=10)["tone"]
    assert {value: r["bootstrap"]["lesions"] for value, r in by_tone.items()} == {"a": 5, "b": 5}


def _report_with_one_rare_image(resamples: int = 400) -> dict:
    """40 images, one of them of the rare class (SK): draws without it (about (39/40)^40 = 36 %
    of them) leave its figures undefined."""
    prediction, truth, labels = _batch(0, 40)
    labels = torch.where(labels == 2, 0, labels)
    labels[7] = 2
    evaluator = Evaluator(CLASSES)
    evaluator.update(prediction, truth, labels)
    return evaluator.report(resamples=resamples)


def test_an_interval_says_over_how_many_resamples_its_figure_was_defined():
    # Draws without the rare image leave its sensitivity undefined, which its interval leaves
    # out and the report counts.
    report = _report_with_one_rare_image()
    rare = report["per_class"]["SK"]["sensitivity"]
    assert 0.55 * 400 < rare["resamples_defined"] < 0.75 * 400
    assert "resamples_defined" not in report["classification"]["accuracy"]  # always defined
    text = _evaluate_job().format_report(report)
    assert "]*" in text and text.endswith("as resamples_defined")


def test_mean_auc_of_a_resample_is_over_the_classes_of_the_whole_sample():
    # A draw without the rare class has no AUC for it: averaging the other classes' AUCs would
    # put a mean over two classes in an interval of means over three.
    report = _report_with_one_rare_image()
    rare_auc = report["per_class"]["SK"]["auc"]
    mean_auc = report["classification"]["auc_mean"]
    assert mean_auc["resamples_defined"] == rare_auc["resamples_defined"] < 0.75 * 400
    aucs = [report["per_class"][name]["auc"]["value"] for name in CLASSES]
    assert mean_auc["value"] == pytest.approx(sum(aucs) / 3)


def test_report_sections_follow_what_the_model_predicts():
    segmenter = _evaluator(classify=False).report(resamples=20)
    assert "segmentation" in segmenter and "per_class" not in segmenter
    assert "classification" not in segmenter and "reliability" not in segmenter
    classifier = _evaluator(segment=False).report(resamples=20)
    assert "segmentation" not in classifier and set(classifier["per_class"]) == set(CLASSES)
    assert Evaluator(CLASSES).report() == {
        "images": 0,
        "bootstrap": {"resamples": 1000, "confidence": 0.95, "seed": 0, "lesions": 0},
    }


def test_an_absent_class_reports_nan_not_an_error():
    evaluator = Evaluator([*CLASSES, "BCC"])  # no image is BCC, and none is predicted BCC
    prediction, masks, labels = _batch(0, 30)
    probabilities = torch.cat([prediction.class_probabilities, torch.zeros(30, 1)], dim=1)
    prediction.class_probabilities = probabilities
    evaluator.update(prediction, masks, labels)
    report = evaluator.report(resamples=50)
    bcc = report["per_class"]["BCC"]
    assert bcc["n"] == 0
    assert math.isnan(bcc["auc"]["value"]) and math.isnan(bcc["auc"]["low"])
    assert bcc["specificity"]["value"] == 1.0
    assert not math.isnan(report["classification"]["auc_mean"]["value"])


def _evaluate_job():
    """``jobs/evaluate.py`` imported from its file (``jobs/`` is scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "jobs" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("evaluate_job", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_evaluate_job_prints_and_writes_the_report():
    job = _evaluate_job()
    report = _evaluator().report(resamples=50)
    text = job.format_report(report, skipped=2)
    jaccard = report["segmentation"]["jaccard"]
    assert "images 100, skipped 2" in text
    expected = f"{jaccard['value']:.4f} [{jaccard['low']:.4f}, {jaccard['high']:.4f}]"
    assert any(line.startswith("jaccard") and line.endswith(expected) for line in text.splitlines())
    header = next(line for line in text.splitlines() if line.startswith("class "))
    assert header.split() == ["class", "n", *PER_CLASS_FIGURES]
    assert "[" not in job.format_report(_evaluator().report(resamples=0))
    # NaN (an undefined figure) is written as JSON null.
    assert json.loads(json.dumps(job._json_safe({"a": [float("nan"), 1.0]}))) == {"a": [None, 1.0]}


def test_figures_at_source_size_compare_the_resized_prediction_with_full_size_truth():
    from skinray.evaluation import mask_at_size

    predicted = np.zeros((1, 4, 4), np.uint8)
    predicted[0, :2, :2] = 1  # the top-left quarter, at the model's 4×4
    truth = np.zeros((12, 16), bool)
    truth[:6, :6] = True  # 36 px; the resized prediction covers 6×8 = 48 px of which 36 overlap
    assert mask_at_size(predicted[0], truth.shape).sum() == 48
    evaluator = Evaluator(None)
    prediction = Prediction(None, torch.from_numpy(predicted), None, None, None)
    evaluator.update(prediction, [truth], torch.zeros(1, dtype=torch.long))
    assert evaluator.result()["jaccard"] == pytest.approx(36 / 48)


def test_the_evaluate_job_measures_a_backend_beside_eager(tmp_path):
    # The released segmenter on 8 ISIC 2017 validation images: OpenVINO f32 gives eager's figures.
    job = _evaluate_job()
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "isic2017"
    figures = {}
    for backend in ("eager", "openvino"):
        out = tmp_path / f"{backend}.json"
        common = ["--data", "isic2017", "--root", str(root), "--limit", "8", "--bootstrap", "0"]
        argv = ["lesion-segmenter", *common, "--backend", backend, "--json", str(out)]
        assert job.main(argv) == 0
        payload = json.loads(out.read_text())
        assert payload["backend"] == payload["backend_requested"] == backend
        # Held to a scoring actor's guard on the images measured (8 here), as an actor is.
        guard = payload["guard"]
        assert guard is None if backend == "eager" else guard["images"] == 8
        assert backend == "eager" or guard["mask_jaccard"] >= 0.99
        # The libraries that computed the figures, with their versions.
        libraries = [part.split()[0] for part in payload["backend_versions"].split("; ")]
        assert libraries == (["torch"] if backend == "eager" else ["torch", "openvino"])
        figures[backend] = payload["metrics"]["jaccard"]
    assert figures["openvino"] == pytest.approx(figures["eager"], abs=1e-3)
    assert 0.3 < figures["eager"] < 1.0


def test_a_segmenter_is_measured_on_masks_whatever_class_names_it_carries(tmp_path):
    # The released segmenter was saved with ISIC 2017's class names but has no class output:
    # HAM10000's masks measure it, and no class figure is made up.
    job = _evaluate_job()
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"
    out = tmp_path / "figures.json"
    argv = ["lesion-segmenter", "--data", "ham10000", "--root", str(root), "--limit", "95"]
    assert job.main([*argv, "--bootstrap", "0", "--no-subgroups", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert 0.3 < payload["metrics"]["jaccard"] < 1.0
    assert not set(CLASSIFICATION_FIGURES) & set(payload["metrics"])
    # The job hands the data's lesions to the bootstrap: 95 images drawn with seed 0, of 93
    # lesions (images of one lesion are not independent).
    from skinray.data.datasets import read_split

    drawn = read_split("ham10000", str(root)).random_subset(95, seed=0)
    lesions = set(drawn.rows["group"].to_pylist())
    assert payload["report"]["images"] == 95
    assert payload["report"]["bootstrap"]["lesions"] == len(lesions) == 93


def test_the_evaluate_job_says_when_calibration_is_measured_where_it_was_fitted(tmp_path, capsys):
    # The released HAM10000 classifier's temperature was fitted on its hold-out: an ECE measured
    # there is in-sample, and one measured on other images is not.
    job = _evaluate_job()
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"
    out = tmp_path / "figures.json"
    argv = ["ham10000-classifier", "--data", "ham10000", "--root", str(root), "--limit", "4"]
    argv += ["--bootstrap", "0", "--no-subgroups", "--json", str(out)]
    for split, in_sample in (("validation", True), ("training", False)):
        assert job.main([*argv, "--split", split]) == 0
        assert json.loads(out.read_text())["settings"]["calibration_in_sample"] is in_sample
        assert ("ece is in-sample" in capsys.readouterr().out) is in_sample


def test_the_evaluate_job_draws_the_hold_out_the_models_training_drew(tmp_path):
    # A HAM10000 classifier trained with seed 5 and a 0.3 hold-out is measured on that hold-out,
    # not on the recipes' default (0.15, seed 0), whose images it may have trained on.
    import pyarrow.parquet as pq

    from skinray.data.datasets import HAM10000_CLASSES, group_digest, read_ham10000, read_split
    from skinray.models import create_model, get_model_spec, load_model, save_model

    root = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000")
    kwargs = {**get_model_spec("classifier").smoke_kwargs, "num_classes": 7}
    model = create_model("classifier", **kwargs)
    uri = str(tmp_path / "model")
    lesions = group_digest(read_ham10000(root))
    holdout = {"source": "ham10000", "fraction": 0.3, "seed": 5, "groups_sha256": lesions}
    save_model(model, uri, input_size=(32, 32), class_names=HAM10000_CLASSES, holdout=holdout)
    common = ["--data", "ham10000", "--root", root, "--limit", "3", "--bootstrap", "0"]
    evaluated = {}
    for flags, expected in (([], (0.3, 5)), (["--holdout-seed", "0"], (0.3, 0))):
        out, predictions = tmp_path / "out.json", tmp_path / f"p{len(flags)}.parquet"
        argv = [
            uri,
            *common,
            "--no-subgroups",
            "--json",
            str(out),
            "--predictions",
            str(predictions),
        ]
        assert _evaluate_job().main(argv + flags) == 0
        assert json.loads(out.read_text())["holdout"] == {
            "fraction": expected[0],
            "seed": expected[1],
        }
        drawn = read_split("ham10000", root, fraction=expected[0], seed=expected[1])
        evaluated[expected] = pq.read_table(predictions).column("image_uri").to_pylist()
        chosen = drawn.random_subset(3, seed=0)  # --limit 3 with the default --seed 0
        assert evaluated[expected] == chosen.rows.column("image_uri").to_pylist()
    default = read_split("ham10000", root).random_subset(3, seed=0).rows["image_uri"].to_pylist()
    assert evaluated[(0.3, 5)] != default
    # What else shaped the figures is in the JSON beside them.
    settings = json.loads(out.read_text())["settings"]
    assert settings["classifier"] is None and settings["limit"] == 3
    assert settings["config_sha256"] == [load_model(uri).saved_config.config_sha256]
    assert (settings["test_time_flips"], settings["temperature"]) == (False, 1.0)


def test_a_pair_whose_models_drew_other_hold_outs_is_refused_and_one_drawn_by_either_is_used(
    tmp_path, capsys
):
    from skinray.data.datasets import HAM10000_CLASSES
    from skinray.models import create_model, get_model_spec, save_model

    root = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000")
    segmenter, classifier = str(tmp_path / "segmenter"), str(tmp_path / "classifier")

    def save(seed: int | None, classifier_seed: int | None = 5) -> None:
        def drawn(seed):
            return (
                {"source": "ham10000", "fraction": 0.3, "seed": seed} if seed is not None else None
            )

        torch.manual_seed(0)
        unet = create_model("unet", **get_model_spec("unet").smoke_kwargs)
        save_model(unet, segmenter, input_size=(32, 32), holdout=drawn(seed))
        kwargs = {**get_model_spec("classifier").smoke_kwargs, "num_classes": 7}
        model = create_model("classifier", **kwargs)
        save_model(
            model,
            classifier,
            input_size=(32, 32),
            class_names=HAM10000_CLASSES,
            holdout=drawn(classifier_seed),
        )

    out = tmp_path / "out.json"
    argv = [segmenter, "--classifier", classifier, "--data", "ham10000", "--root", root]
    argv += ["--limit", "2", "--bootstrap", "0", "--no-subgroups", "--json", str(out)]
    save(seed=1)  # the segmenter trained on most of the classifier's hold-out
    assert _evaluate_job().main(argv) == 2
    error = capsys.readouterr().err
    assert "drew different hold-outs from ham10000" in error and "seed 1" in error
    # The same hold-out; the segmenter drew none from this data; only the segmenter drew one.
    for seed, classifier_seed in ((5, 5), (None, 5), (5, None)):
        save(seed=seed, classifier_seed=classifier_seed)
        assert _evaluate_job().main(argv) == 0
        assert json.loads(out.read_text())["holdout"] == {"fraction": 0.3, "seed": 5}


def test_the_evaluate_job_refuses_to_draw_a_models_hold_out_from_other_lesions(tmp_path, capsys):
    # Its hold-out was drawn from other lesions (a copy with more or fewer images): the same
    # fraction and seed would draw another hold-out here, mostly of images it trained on.
    from skinray.data.datasets import HAM10000_CLASSES
    from skinray.models import create_model, get_model_spec, save_model

    root = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000")
    kwargs = {**get_model_spec("classifier").smoke_kwargs, "num_classes": 7}
    uri = str(tmp_path / "model")
    holdout = {"source": "ham10000", "fraction": 0.15, "seed": 0, "groups_sha256": "0" * 64}
    save_model(
        create_model("classifier", **kwargs),
        uri,
        input_size=(32, 32),
        class_names=HAM10000_CLASSES,
        holdout=holdout,
    )
    argv = [uri, "--data", "ham10000", "--root", root, "--limit", "2", "--bootstrap", "0"]
    assert _evaluate_job().main([*argv, "--no-subgroups"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "its lesions are not those the model's hold-out was drawn from" in line
    # Asked for another draw by name, it draws it: the choice is the user's, and on record.
    assert _evaluate_job().main([*argv, "--no-subgroups", "--holdout-seed", "0"]) == 0


def test_a_manifest_the_model_drew_its_validation_from_is_evaluated_on_that_hold_out(tmp_path):
    # Trained with validation: holdout on a manifest, a model is measured on the manifest's
    # hold-out, not on the whole manifest (its training images included); another manifest is
    # evaluated whole.
    import shutil

    import cv2
    import pyarrow.parquet as pq

    from skinray import io
    from skinray.data.datasets import read_split
    from skinray.data.synthetic import synthetic_sample
    from skinray.models import create_model, get_model_spec, save_model

    lines = ["image,label"]
    for seed in range(12):
        sample = synthetic_sample(seed, (40, 40), label=seed % 3)
        cv2.imwrite(str(tmp_path / f"{seed}.png"), cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR))
        lines.append(f"{seed}.png,{CLASSES[seed % 3]}")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    shutil.copy(manifest, tmp_path / "other.csv")
    model = create_model("classifier", **get_model_spec("classifier").smoke_kwargs)
    holdout = {"source": "manifest", "root": io.absolute(manifest), "fraction": 0.25, "seed": 3}
    uri = str(tmp_path / "model")
    save_model(model, uri, input_size=(32, 32), class_names=CLASSES, holdout=holdout)

    def evaluated(root):
        out = tmp_path / "p.parquet"
        argv = [uri, "--data", "manifest", "--root", str(root), "--bootstrap", "0"]
        assert _evaluate_job().main([*argv, "--no-subgroups", "--predictions", str(out)]) == 0
        return pq.read_table(out).column("image_uri").to_pylist()

    drawn = read_split("manifest", str(manifest), fraction=0.25, seed=3, manifest_holdout=True)
    assert evaluated(manifest) == drawn.rows.column("image_uri").to_pylist()
    assert len(drawn) == 3  # 12 images, each its own group: a quarter held out
    assert len(evaluated(tmp_path / "other.csv")) == 12


def test_data_without_truth_masks_gets_class_figures_only_and_a_partial_set_is_refused(
    tmp_path, capsys
):
    # The reader gives an image without a mask an empty one: scored against it, a predicted
    # lesion would count as a Jaccard of 0.
    import cv2

    from skinray.data.synthetic import synthetic_sample
    from skinray.models import create_model, get_model_spec, save_model

    lines = ["image,mask,label"]
    for seed in range(6):
        sample = synthetic_sample(seed, (40, 40), label=seed % 3)
        cv2.imwrite(str(tmp_path / f"{seed}.png"), cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(tmp_path / f"{seed}_mask.png"), sample.mask * 255)
        lines.append(f"{seed}.png,,{CLASSES[seed % 3]}")
    unmasked = tmp_path / "unmasked.csv"
    unmasked.write_text("\n".join(lines) + "\n")
    partial = tmp_path / "partial.csv"
    partial.write_text("\n".join([*lines[:-1], f"5.png,5_mask.png,{CLASSES[2]}"]) + "\n")
    joint, segmenter = str(tmp_path / "clnet"), str(tmp_path / "unet")
    classifier = str(tmp_path / "classifier")
    for name, uri in (("clnet", joint), ("unet", segmenter), ("classifier", classifier)):
        model = create_model(name, **get_model_spec(name).smoke_kwargs)
        classes = CLASSES if get_model_spec(name).classifies else None
        save_model(model, uri, input_size=(32, 32), class_names=classes)

    def evaluate(model, manifest):
        out = tmp_path / "out.json"
        argv = [model, "--data", "manifest", "--root", str(manifest), "--bootstrap", "0"]
        code = _evaluate_job().main([*argv, "--no-subgroups", "--json", str(out)])
        return code, json.loads(out.read_text())["metrics"] if code == 0 else None

    code, figures = evaluate(joint, unmasked)
    assert code == 0 and figures["images"] == 6 and "accuracy" in figures
    assert "jaccard" not in figures and "dice" not in figures
    capsys.readouterr()
    assert evaluate(segmenter, unmasked)[0] == 2
    assert "no truth masks, and" in capsys.readouterr().err
    assert evaluate(joint, partial)[0] == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "5 of 6 images have no truth mask (the first: " in line
    # A classifier alone takes no mask: the same data is its to measure.
    code, figures = evaluate(classifier, partial)
    assert code == 0 and figures["images"] == 6 and "jaccard" not in figures


def test_subgroup_figures_are_the_figures_of_each_groups_images_alone():
    whole, groups = Evaluator(CLASSES), {"sex": [], "site": []}
    parts = {"female": Evaluator(CLASSES), "male": Evaluator(CLASSES)}
    for seed, count in ((0, 40), (1, 60)):
        prediction, masks, labels = _batch(seed, count)
        sex = ["female" if i % 3 else "male" for i in range(count)]
        sex[0] = None  # unknown: in no group
        site = ["back"] * count if seed == 0 else None  # only the first batch knows the site
        whole.update(prediction, masks, labels, {"sex": sex, **({"site": site} if site else {})})
        groups["sex"] += sex
        for value, part in parts.items():
            keep = [i for i, s in enumerate(sex) if s == value]
            part.update(_subset(prediction, keep), masks[keep], labels[keep])
    report = whole.subgroup_report(resamples=0)
    assert list(report["sex"]) == ["female", "male"]  # by count, descending
    for value, part in parts.items():
        expected = part.report(resamples=0)
        assert report["sex"][value]["images"] == expected["images"] == part.images
        for section in ("segmentation", "classification"):
            for name, figure in expected[section].items():
                got = report["sex"][value][section][name]["value"]
                assert got == pytest.approx(figure["value"], nan_ok=True), (value, name)
    assert list(report["site"]) == ["back"] and report["site"]["back"]["images"] == 40
    with_intervals = whole.subgroup_report(resamples=50)["sex"]["male"]["classification"]
    assert with_intervals["accuracy"]["low"] <= with_intervals["accuracy"]["value"]


def _subset(prediction: Prediction, keep: list[int]) -> Prediction:
    return Prediction(
        mask_probability=None,
        mask=prediction.mask[keep],
        class_probabilities=prediction.class_probabilities[keep],
        cam=None,
        roi_box=None,
    )


def test_the_evaluate_job_measures_only_a_backend_that_passes_the_guard(tmp_path):
    # bf16 autocast moves the released pair's class probabilities by over 0.01: as a scoring actor
    # would, the job falls back, and measures every image on the backend that passed.
    job = _evaluate_job()
    root = Path(__file__).resolve().parents[2] / "shared" / "data" / "ham10000"
    out = tmp_path / "figures.json"
    argv = ["lesion-segmenter", "--classifier", "ham10000-classifier", "--data", "ham10000"]
    argv += ["--root", str(root), "--limit", "16", "--bootstrap", "0", "--no-subgroups"]
    assert job.main([*argv, "--backend", "eager-bf16", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["backend_requested"] == "eager-bf16" and payload["backend"] != "eager-bf16"
    assert payload["fallback_reason"].startswith("eager-bf16 failed the accuracy guard")
    guard = payload["guard"]
    assert guard is None if payload["backend"] == "eager" else guard["images"] == 16
