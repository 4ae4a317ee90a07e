"""Training on a real local Ray cluster: two CPU workers, data on a real S3 server (moto), a killed
worker, an explicit resume, and the saved model scored by jobs/evaluate.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from skinray import io
from skinray.data.synthetic import synthetic_sample
from skinray.models import load_model
from skinray.train.config import smoke_test_config
from skinray.train.loop import KILL_AT_EPOCH_ENV, KILL_MARKER_ENV
from skinray.train.trainer import run_training

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64


def _upload_synthetic(prefix: str, name: str, seeds: range, corrupt: int = 0) -> str:
    """Write synthetic JPEG images, PNG masks and a manifest CSV under ``prefix``; return its URI.
    ``corrupt`` more rows point at files that are not images (with valid masks)."""
    lines = ["image,mask,label"]
    for index in range(corrupt):
        _, png = cv2.imencode(".png", synthetic_sample(index, SIZE).mask * 255)
        io.write_bytes(f"{prefix}/images/{name}-corrupt-{index}.jpg", b"\xff\xd8\xff not a jpeg")
        io.write_bytes(f"{prefix}/masks/{name}-corrupt-{index}.png", png.tobytes())
        lines.append(f"images/{name}-corrupt-{index}.jpg,masks/{name}-corrupt-{index}.png,class_0")
    for seed in seeds:
        sample = synthetic_sample(seed, SIZE, label=seed % 3)
        _, jpeg = cv2.imencode(".jpg", cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR))
        _, png = cv2.imencode(".png", sample.mask * 255)
        io.write_bytes(f"{prefix}/images/{seed}.jpg", jpeg.tobytes())
        io.write_bytes(f"{prefix}/masks/{seed}.png", png.tobytes())
        lines.append(f"images/{seed}.jpg,masks/{seed}.png,class_{seed % 3}")
    uri = f"{prefix}/{name}.csv"
    io.write_bytes(uri, ("\n".join(lines) + "\n").encode())
    return uri


def _config(output: str, train: str, validation: str, extra: list[str] = ()):
    return smoke_test_config(
        "unet",
        output=output,
        overrides=[
            "data.source=manifest",
            f"data.root={train}",
            "data.validation=split",
            f"data.validation_manifest={validation}",
            "data.class_names=[class_0, class_1, class_2]",
            "scaling.num_workers=2",
            "batch_size=4",
            *extra,
        ],
    )


@pytest.fixture
def s3_dataset(s3_bucket):
    train = _upload_synthetic(f"{s3_bucket}/data", "train", range(0, 22), corrupt=2)
    validation = _upload_synthetic(f"{s3_bucket}/data", "validation", range(100, 108))
    return s3_bucket, train, validation


def test_two_workers_train_from_s3_and_the_saved_model_scores_the_same(
    ray_cluster, s3_dataset, tmp_path
):
    bucket, train, validation = s3_dataset
    output = f"{bucket}/runs/unet"
    outcome = run_training(_config(output, train, validation, ["epochs=2"]))

    assert [row["epoch"] for row in outcome.history] == [1, 2]
    assert all(row["train_images"] == 22 for row in outcome.history)  # both shards together
    # Two unreadable images among 24 are skipped, logged and counted, every epoch.
    assert all(row["train_skipped"] == 2 for row in outcome.history)
    assert all(row["val_images"] == 8 for row in outcome.history)
    summary = json.loads(io.read_bytes(f"{output}/metrics.json"))
    assert summary["train_images"] == 24 and len(summary["history"]) == 2  # listed, bad included
    assert io.read_bytes(f"{output}/training_curve.png").startswith(b"\x89PNG")

    model = load_model(outcome.model_uri)
    assert model.saved_config.class_names == ("class_0", "class_1", "class_2")
    assert model.saved_config.input_size == (SIZE, SIZE)
    assert model.saved_config.holdout is None  # validated on a split of its own

    report = tmp_path / "evaluation.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs" / "evaluate.py"),
            outcome.model_uri,
            "--data",
            "manifest",
            "--root",
            validation,
            "--json",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "jaccard" in result.stdout
    evaluated = json.loads(report.read_text())["metrics"]
    # The same images, model and metric code: evaluate.py agrees with training's validation.
    assert evaluated["images"] == 8
    assert evaluated["jaccard"] == pytest.approx(outcome.best_metrics["val_jaccard"], abs=1e-9)
    assert evaluated["dice"] == pytest.approx(outcome.best_metrics["val_dice"], abs=1e-9)


def test_two_workers_stay_in_step_over_a_batch_with_no_readable_image(
    ray_cluster, s3_bucket, tmp_path
):
    # Unshuffled, the 8 unreadable rows come first: whichever rank holds them meets two batches of
    # 4 with nothing to train on, while the other rank's batches are whole. A rank that skipped its
    # step alone would leave the other waiting in DDP's gradient all-reduce for ever.
    train = _upload_synthetic(f"{s3_bucket}/data", "train", range(0, 16), corrupt=8)
    validation = _upload_synthetic(f"{s3_bucket}/data", "validation", range(100, 104))
    extra = ["epochs=1", "data.shuffle=false"]
    outcome = run_training(_config(str(tmp_path / "out"), train, validation, extra))
    (epoch,) = outcome.history
    assert epoch["train_skipped"] == 8
    # Every step both ranks took was a real one; the skipped batches were skipped by both.
    assert 0 < epoch["train_images"] <= 16 and epoch["global_step"] < 24 / 4


def test_runs_with_one_seed_train_on_the_same_batches_and_stop_early_alike(ray_cluster, tmp_path):
    # Two behaviours, one pair of runs (each Ray Train run costs half a minute of start-up here).
    # Decode tasks finish in any order; the ingest preserves the shuffled order, so two runs with
    # one seed train on the same batches and print the same losses. val_images never changes, so
    # no epoch after the first is better: with a patience of 1 each run stops after epoch 2 of 6
    # and saves its model as any run does.
    overrides = [
        *("epochs=6", "early_stopping_patience=1", "checkpoint.metric=val_images"),
        *("data.synthetic_count=32", "max_steps_per_epoch=3"),
    ]
    runs = [
        run_training(smoke_test_config("unet", str(tmp_path / name), overrides))
        for name in ("first", "second")
    ]
    assert [[row["epoch"] for row in run.history] for run in runs] == [[1, 2], [1, 2]]
    losses = [[row["train_loss"] for row in run.history] for run in runs]
    assert losses[0] == losses[1]
    assert losses[0][0] != losses[0][1]

    saved = load_model(runs[0].model_uri).saved_config
    assert saved.model == "unet"
    # its validation images were drawn from its data: the model says how, for evaluation
    drawn = {key: saved.holdout[key] for key in ("source", "fraction", "seed")}
    assert drawn == {"source": "synthetic", "fraction": 0.15, "seed": 0}


def test_a_killed_worker_resumes_from_the_last_checkpoint(
    ray_cluster, s3_dataset, tmp_path, monkeypatch
):
    _bucket, train, validation = s3_dataset
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_AT_EPOCH_ENV, "1")
    monkeypatch.setenv(KILL_MARKER_ENV, str(marker))
    outcome = run_training(
        _config(str(tmp_path / "out"), train, validation, ["epochs=2", "max_failures=1"])
    )
    assert marker.exists()  # rank 1 really died at the start of epoch 2
    # Each epoch is reported once: epoch 1 came from the checkpoint, 2 from the restarted group.
    assert [row["epoch"] for row in outcome.history] == [1, 2]
    steps = outcome.history[0]["global_step"]
    assert [row["global_step"] for row in outcome.history] == [steps, 2 * steps]


def test_resume_continues_optimiser_schedule_and_epoch(ray_cluster, s3_dataset, tmp_path):
    _bucket, train, validation = s3_dataset
    poly = ["optim.schedule=poly", "optim.poly_power=0.9", "optim.lr=0.001"]
    first = run_training(_config(str(tmp_path / "first"), train, validation, ["epochs=1", *poly]))
    assert [row["epoch"] for row in first.history] == [1]
    steps = first.history[0]["global_step"]

    resumed = run_training(
        _config(
            str(tmp_path / "resumed"),
            train,
            validation,
            ["epochs=2", f"resume={first.best_checkpoint}", *poly],
        )
    )
    assert [row["epoch"] for row in resumed.history] == [1, 2]
    assert (
        resumed.history[0] == first.history[0]
    )  # the first epoch's record came with the checkpoint
    # The second epoch's lr is the poly schedule after one epoch of two, not a fresh schedule's.
    row = resumed.history[1]
    assert row["lr"] == pytest.approx(0.001 * (1 - steps / (2 * steps)) ** 0.9, rel=1e-6)
    assert row["global_step"] == 2 * steps
