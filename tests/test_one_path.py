"""One prediction path: training's validation step, ``jobs/evaluate.py`` and the scoring job's stages
give the same masks and class probabilities for the same images, for every registered model and the
two-step pair; the ROI fed to the classifier is the same in training and scoring; ground truth never
reaches a model input; broken models are refused at the door.

The scoring side runs the job's own stage functions and actor class in this process (read/decode →
``PredictActor`` → descriptors → rows); ``tests/e2e/test_score.py`` runs the same classes on Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from skinray.data.datasets import read_manifest
from skinray.data.loading import decode_samples
from skinray.data.synthetic import synthetic_sample
from skinray.evaluation import Evaluator
from skinray.models import (
    create_model,
    get_model_spec,
    list_models,
    load_model,
    save_model,
)
from skinray.models.two_step import lesion_boxes
from skinray.predict import Predictor
from skinray.score.actors import PredictActor
from skinray.score.schema import probability_column
from skinray.score.stages import describe_lesions, finish_rows, read_and_decode
from skinray.train.config import smoke_test_config
from skinray.train.loop import StagePredictor, _Objective, validate
from skinray.train.roi_masks import cache_predicted_masks
from skinray.train.staged import _save_two_step
from skinray.train.trainer import _saved_settings

ROOT = Path(__file__).resolve().parents[1]
SIZE = (64, 64)
CLASSES = ("class_0", "class_1", "class_2")
#: Source images of several sizes and aspects: every path resizes them the same way.
SOURCES = ((64, 64), (90, 120), (120, 80), (75, 100), (64, 96), (100, 100))
#: Registered stages that take guidance channels: validated through their chain, refused alone.
GUIDED = {"mbdcnn_mask_cn", "mbdcnn_enhanced_sn"}
UNITS = [*sorted(set(list_models()) - GUIDED - {"classifier", "two_step"}), "two_step_pair"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> str:
    """PNG images of several sizes with masks and labels, and a manifest CSV naming them."""
    folder = tmp_path_factory.mktemp("labelled")
    lines = ["image,mask,label"]
    for seed, size in enumerate(SOURCES):
        sample = synthetic_sample(seed, size, label=seed % 3)
        cv2.imwrite(str(folder / f"{seed}.png"), cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR))
        cv2.imwrite(str(folder / f"{seed}_mask.png"), sample.mask * 255)
        lines.append(f"{seed}.png,{seed}_mask.png,{CLASSES[seed % 3]}")
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    return str(folder / "manifest.csv")


def _smoke_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **get_model_spec(name).smoke_kwargs).eval()


def _save(model, folder: Path, **settings) -> str:
    classes = CLASSES if get_model_spec(model.skinray_model_name).classifies else None
    save_model(model, str(folder), class_names=classes, **{"input_size": SIZE, **settings})
    return str(folder)


def _unit(name: str, folder: Path, segmenter: str | None = None):
    """(training config, the in-memory model training validates, what evaluate and score load:
    (model URI, classifier URI or None)); ``segmenter``: the pair's (a random one by default)."""
    if name != "two_step_pair":
        config = smoke_test_config(name, overrides=[f"data.image_size={list(SIZE)}"])
        model = _smoke_model(name)
        return config, model, (_save(model, folder / name), None)
    segmenter_uri = segmenter or _save(_smoke_model("unet"), folder / "segmenter")
    config = smoke_test_config(
        "classifier",
        overrides=[
            "data.image_size=[80, 80]",  # the ROI is cut from an image larger than its input
            "data.input=roi",
            f"data.roi_segmenter={segmenter_uri}",
            "data.roi_size=[48, 48]",
            "data.roi_margin=0.2",
        ],
    )
    classifier = _smoke_model("classifier", seed=1)
    settings = _saved_settings(config, list(CLASSES))
    save_model(classifier, str(folder / "classifier"), **settings)
    return config, classifier, (segmenter_uri, str(folder / "classifier"))


def _training_validation(config, model, manifest: str) -> dict[str, np.ndarray]:
    stage = StagePredictor(config, model, list(CLASSES), torch.device("cpu"))
    samples = read_manifest(manifest, list(CLASSES))
    decoded = decode_samples(samples.rows.to_pydict(), config.data.image_size, len(CLASSES))
    batches = [
        (
            torch.from_numpy(decoded["image"]).permute(0, 3, 1, 2),
            torch.from_numpy(decoded["mask"]),
            torch.from_numpy(decoded["label"]),
            0,
        )
    ]
    evaluator = Evaluator(list(CLASSES), keep_predictions=True)
    validate(stage, batches, _Objective(config), evaluator)
    (prediction,) = evaluator.predictions
    return prediction


def _evaluate_main():
    """``jobs/evaluate.py``'s ``main``, imported from its file (``jobs/`` is scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_job", ROOT / "jobs" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _evaluate_job(uri: str, classifier: str | None, manifest: str, out: Path) -> dict:
    main = _evaluate_main()
    predictions = out / "predictions.parquet"
    argv = [uri, "--data", "manifest", "--root", manifest, "--predictions", str(predictions)]
    argv += ["--json", str(out / "metrics.json"), "--batch-size", "4"]
    assert main(argv + (["--classifier", classifier] if classifier else [])) == 0
    table = pq.read_table(predictions).to_pydict()
    masks = [cv2.imdecode(np.frombuffer(m, np.uint8), 0) // 255 for m in table["mask_png"]]
    return {"uri": table["image_uri"], "mask": np.stack(masks), "probabilities": table}


def _scoring_stages(uri: str, classifier: str | None, manifest: str) -> dict:
    from skinray.score.config import make_score_config
    from skinray.score.plan import read_scoring_models

    folder = Path(manifest).parent
    uris = [str(folder / f"{seed}.png") for seed in range(len(SOURCES))]
    config = make_score_config(
        input=str(folder), output=str(folder / "out"), segmenter=uri, classifier=classifier
    )
    models = read_scoring_models(config)
    listing = {
        "source_uri": np.array(uris, dtype=object),
        "source_size_bytes": np.array([None] * len(uris), dtype=object),
        "source_etag": np.array(["e"] * len(uris), dtype=object),
    }
    batch = read_and_decode(listing, models.input_size, config.max_pixels)
    # Eager, as training and evaluation run: the CPU default (bf16 segmenter) is held to eager by
    # the accuracy guard (tests/test_backends.py), not to bit-equality.
    batch = PredictActor(uri, classifier, batch_size=4, backend="eager")(batch)
    masks = batch["mask"].copy()
    rows = finish_rows(describe_lesions(batch), models.class_names, models.identity, "r", False)
    columns = [rows[probability_column(name)] for name in models.class_names]
    probabilities = np.stack(columns, axis=1) if columns else None
    return {"mask": masks, "probabilities": probabilities, "rows": rows}


@pytest.mark.parametrize("name", UNITS)
def test_training_validation_evaluate_and_scoring_agree(name, labelled, tmp_path):
    config, model, (uri, classifier) = _unit(name, tmp_path)
    trained = _training_validation(config, model, labelled)
    evaluated = _evaluate_job(uri, classifier, labelled, tmp_path)
    scored = _scoring_stages(uri, classifier, labelled)

    assert trained["mask"].shape == (len(SOURCES), *config.data.image_size)
    assert np.array_equal(trained["mask"], evaluated["mask"])
    assert np.array_equal(trained["mask"], scored["mask"])
    if "class_probabilities" in trained:
        probabilities = np.array(evaluated["probabilities"]["class_probabilities"])
        np.testing.assert_allclose(trained["class_probabilities"], probabilities, atol=1e-4)
        np.testing.assert_allclose(
            trained["class_probabilities"], scored["probabilities"], atol=1e-4
        )
    assert not any(scored["rows"]["error_stage"])


def test_a_segmenter_saved_with_flips_flips_the_pair_in_training_validation_too(labelled, tmp_path):
    # Evaluation and scoring flip the whole pair when its segmenter was saved with flips; the
    # classifier's validation during training must see the same pair.
    flipping = _save(_smoke_model("unet"), tmp_path / "flipping", test_time_flips=True)
    config, model, (segmenter, classifier) = _unit("two_step_pair", tmp_path, flipping)
    trained = _training_validation(config, model, labelled)
    evaluated = _evaluate_job(segmenter, classifier, labelled, tmp_path)
    assert np.array_equal(trained["mask"], evaluated["mask"])
    probabilities = np.array(evaluated["probabilities"]["class_probabilities"])
    np.testing.assert_allclose(trained["class_probabilities"], probabilities, atol=1e-4)


def test_the_saved_two_step_composite_is_the_pair(labelled, tmp_path):
    _, _, (segmenter, classifier) = _unit("two_step_pair", tmp_path)
    uris = {"segmenter": segmenter, "classifier": classifier, "two_step": str(tmp_path / "pair")}
    _save_two_step(uris)
    pair = _scoring_stages(segmenter, classifier, labelled)
    composite = _scoring_stages(uris["two_step"], None, labelled)
    assert np.array_equal(pair["mask"], composite["mask"])
    np.testing.assert_allclose(pair["probabilities"], composite["probabilities"], atol=1e-6)
    assert json.loads((tmp_path / "pair" / "config.json").read_text())["input_size"] == [80, 80]


@pytest.mark.parametrize("roi_masks", ["live", "cached"])
def test_the_roi_fed_to_the_classifier_is_the_same_in_training_and_scoring(
    labelled, tmp_path, roi_masks, fitted_segmenter
):
    # A segmenter that finds the lesions: a random one marks nearly every pixel, and a box of the
    # whole frame hides where and with what margin the ROI is cut.
    config, model, (segmenter, classifier) = _unit("two_step_pair", tmp_path, fitted_segmenter)
    config = config.model_copy(
        update={"data": config.data.model_copy(update={"roi_masks": roi_masks})}
    )
    folder = Path(labelled).parent
    uris = [str(folder / f"{seed}.png") for seed in range(len(SOURCES))]

    # Training: the decoded batch (augmentation aside) through the stage's own input. Live, the
    # ground-truth masks ride along in the batch and must be ignored; cached, the batch's masks
    # are the segmenter's, predicted before training.
    samples = read_manifest(labelled, list(CLASSES))
    if roi_masks == "cached":
        run = str(tmp_path / "run")
        samples = cache_predicted_masks(samples, segmenter, config.data.image_size, run)
        assert all(uri.startswith(run) for uri in samples.rows["mask_uri"].to_pylist())
    decoded = decode_samples(samples.rows.to_pydict(), config.data.image_size, len(CLASSES))
    stage = StagePredictor(config, model, list(CLASSES), torch.device("cpu"))
    trained = stage.train_input(
        torch.from_numpy(decoded["image"]).permute(0, 3, 1, 2), torch.from_numpy(decoded["mask"])
    )

    # Scoring: what the actor's classifier receives, recorded by a forward hook.
    actor = PredictActor(segmenter, classifier, batch_size=len(uris), backend="eager")
    seen = []
    actor.predictor.model.classifier.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    listing = {
        "source_uri": np.array(uris, dtype=object),
        "source_size_bytes": np.array([None] * len(uris), dtype=object),
        "source_etag": np.array(["e"] * len(uris), dtype=object),
    }
    scored = actor(read_and_decode(listing, (80, 80), 10**8))

    assert trained.shape == (len(uris), 3, 48, 48)
    torch.testing.assert_close(seen[0], trained, atol=1e-5, rtol=0)
    # The boxes are lesion crops, cut with the classifier's saved margin (0.2; the default 0.1).
    boxes = torch.from_numpy(scored["roi_box"]).float()
    lesion = torch.from_numpy(scored["mask"]).bool()
    torch.testing.assert_close(boxes, lesion_boxes(lesion, 0.2))
    assert not torch.equal(boxes, lesion_boxes(lesion, 0.1))
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert (areas < 0.5 * 80 * 80).sum() >= 3, areas  # measured: 4 of 6, under 45 % each


def _no_lesion_segmenter(folder: Path) -> str:
    """A U-Net whose output layer says 'no lesion' everywhere (logit -20)."""
    model = _smoke_model("unet")
    head = model.net.segmentation_head[0]
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.constant_(head.bias, -20.0)
    return _save(model, folder)


def test_evaluating_a_two_step_model_uses_its_own_segmenter_not_the_truth(
    labelled, tmp_path, fitted_segmenter
):
    main = _evaluate_main()
    _, _, (_, classifier) = _unit("two_step_pair", tmp_path)
    segmenter = fitted_segmenter
    blind = _no_lesion_segmenter(tmp_path / "blind")
    figures = {}
    for name, uri in (("own", segmenter), ("blind", blind)):
        out = tmp_path / f"{name}.json"
        predictions = tmp_path / f"{name}.parquet"
        argv = [uri, "--classifier", classifier, "--data", "manifest", "--root", labelled]
        assert main([*argv, "--json", str(out), "--predictions", str(predictions)]) == 0
        figures[name] = json.loads(out.read_text())["metrics"]
        figures[name]["p"] = pq.read_table(predictions)["class_probabilities"].to_pylist()
    assert figures["own"]["jaccard"] > 0.5
    assert figures["blind"]["jaccard"] == 0.0
    assert figures["blind"]["dice"] < figures["own"]["dice"]
    # With no lesion found, the classifier sees whole images, not lesion ROIs: other answers.
    assert not np.allclose(figures["own"]["p"], figures["blind"]["p"], atol=1e-3)


@pytest.mark.parametrize("name", sorted(GUIDED))
def test_a_guided_stage_is_refused_alone_and_runs_on_its_chain(name, tmp_path, labelled):
    main = _evaluate_main()
    model = _smoke_model(name)
    uri = _save(model, tmp_path / name)
    with pytest.raises(ValueError, match="guidance"):
        Predictor.load(uri)
    assert main([uri, "--data", "manifest", "--root", labelled]) == 2
    chain = [_save(_smoke_model("mbdcnn_coarse_sn"), tmp_path / "coarse")]
    if name == "mbdcnn_enhanced_sn":
        chain.append(_save(_smoke_model("mbdcnn_mask_cn"), tmp_path / "mask_cn"))
    predictor = Predictor(
        load_model(uri),
        input_size=SIZE,
        mean=model.normalization[0],
        std=model.normalization[1],
        class_names=CLASSES,
        guidance=[load_model(u) for u in chain],
    )
    image = synthetic_sample(0, SIZE).image
    prediction = predictor([image, image])
    outputs = prediction.mask if prediction.mask is not None else prediction.class_probabilities
    assert outputs.shape[0] == 2


def test_save_model_refuses_class_logits_without_matching_class_names(tmp_path):
    model = _smoke_model("classifier")
    with pytest.raises(ValueError, match="3 class logits but 0 class names"):
        save_model(model, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="3 class logits but 2 class names"):
        save_model(model, str(tmp_path / "b"), class_names=["a", "b"])
    assert not (tmp_path / "a").exists()


def test_scoring_with_a_classifier_without_class_names_exits_2_at_once(labelled, tmp_path):
    segmenter = _save(_smoke_model("unet"), tmp_path / "segmenter")
    classifier = _save(_smoke_model("classifier"), tmp_path / "classifier")
    config = json.loads((tmp_path / "classifier" / "config.json").read_text())
    config["class_names"] = None  # as a hand-made or older save would have it
    (tmp_path / "classifier" / "config.json").write_text(json.dumps(config))
    output = tmp_path / "scored"
    # "At once": before Ray. The job is pointed at a cluster that is not there, so a door that had
    # moved behind ray.init would hang in its retries (and time out) rather than exit 2.
    dead_cluster = {**os.environ, "RAY_ADDRESS": "127.0.0.1:9"}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "score.py"),
            "--input",
            str(Path(labelled).parent),
            "--output",
            str(output),
            "--segmenter",
            segmenter,
            "--classifier",
            classifier,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=dead_cluster,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and classifier in lines[0] and "class names" in lines[0]
    assert not output.exists()
