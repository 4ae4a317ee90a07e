"""The scoring job end to end on a real local Ray cluster, reading from and writing to a real S3 server
(moto): every input lands in exactly one of results or errors, bad files are named with their stage,
DuckDB reads what was written, a dying actor loses nothing, re-runs replace and --incremental adds."""

from __future__ import annotations

import io as stdio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import duckdb
import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image

from skinray import io
from skinray.backends import (
    calibration_sha256,
    default_backend,
    openvino_runs_bf16,
    read_calibration_images,
    runtime_versions,
)
from skinray.data.synthetic import synthetic_sample
from skinray.models import (
    create_model,
    get_model_spec,
    read_model_config,
    save_model,
)
from skinray.models.serialization import write_model_config
from skinray.models.two_step import lesion_boxes
from skinray.score.commit import staged_uris
from skinray.score.config import make_score_config
from skinray.score.pipeline import run_scoring
from skinray.score.plan import read_scoring_models
from skinray.score.schema import ROI_BOX_COLUMNS
from skinray.score.stages import KILL_ACTOR_MARKER_ENV, PREDICT_DELAY_ENV

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["melanoma", "seborrheic_keratosis", "nevus"]
GOOD = 24
MAX_PIXELS = 2_000_000


def _jpeg(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def _pil(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = stdio.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _archive(prefix: str, start: int = 0, count: int = GOOD) -> dict[str, str]:
    """Synthetic dermoscopy JPEGs plus one file of every awkward kind; returns name -> expectation."""
    expected = {}
    for seed in range(start, start + count):
        io.write_bytes(f"{prefix}/good/{seed:04d}.jpg", _jpeg(synthetic_sample(seed, 160).image))
        expected[f"good/{seed:04d}.jpg"] = "result"
    if start:
        return expected
    image = synthetic_sample(999, 160).image
    rgba = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    exif = Image.Exif()
    exif[0x0112] = 6
    awkward = {
        "bad/zero.jpg": (b"", "decode:EmptyImage"),
        "bad/truncated.jpg": (_jpeg(image)[:2000], "decode:CorruptImage"),
        "bad/random.jpg": (np.random.default_rng(0).bytes(5000), "decode:CorruptImage"),
        "bad/notes.txt": (b"clinic notes, not an image\n", "decode:CorruptImage"),
        "bad/huge.jpg": (_jpeg(np.zeros((1500, 1500, 3), np.uint8)), "decode:TooManyPixels"),
        "odd/alpha.png": (_pil(Image.fromarray(rgba, "RGBA"), "PNG"), "result"),
        "odd/sixteen_bit.png": (
            cv2.imencode(".png", image.astype(np.uint16) * 257)[1].tobytes(),
            "result",
        ),
        "odd/grey.jpg": (
            cv2.imencode(".jpg", image.mean(2).astype(np.uint8))[1].tobytes(),
            "result",
        ),
        "odd/cmyk.jpg": (_pil(Image.fromarray(image).convert("CMYK"), "JPEG"), "result"),
        "odd/exif_rotated.jpg": (
            _pil(Image.fromarray(image[:, :120]), "JPEG", exif=exif),
            "result",
        ),
    }
    for name, (data, outcome) in awkward.items():
        io.write_bytes(f"{prefix}/{name}", data)
        expected[name] = outcome
    return expected


@pytest.fixture(scope="module")
def models(tmp_path_factory, fitted_segmenter):
    """A segmenter that finds lesions (a random one's ROI box is every image's whole frame) and
    an ROI classifier."""
    folder = tmp_path_factory.mktemp("models")
    shutil.copytree(fitted_segmenter, folder / "segmenter")
    return _with_classifier(folder)


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    """A random segmenter, whose masks are nearly all lesion, and the same classifier. For what
    int8 rows record, not int8's accuracy: asked for int8 calibrated on the test's 29 images, the
    20-step fitted segmenter's actor ran openvino-mixed (a fallback); docs/benchmarks.md measures
    int8 on the released segmenter."""
    folder = tmp_path_factory.mktemp("random_models")
    torch.manual_seed(0)
    segmenter = create_model("unet", **get_model_spec("unet").smoke_kwargs)
    save_model(segmenter, str(folder / "segmenter"), input_size=(64, 64))
    return _with_classifier(folder)


def _with_classifier(folder):
    torch.manual_seed(0)
    classifier = create_model("classifier", encoder="resnet18", num_classes=3)
    save_model(
        classifier,
        str(folder / "classifier"),
        input_size=(64, 64),
        class_names=CLASSES,
        roi_source_size=(64, 64),  # an ROI classifier: the pair cuts it the lesion's box
    )
    return str(folder / "segmenter"), str(folder / "classifier")


def _config(bucket, models, **extra):
    segmenter, classifier = models
    return make_score_config(
        input=f"{bucket}/archive/",
        output=f"{bucket}/scored",
        segmenter=segmenter,
        classifier=classifier,
        run_date="2026-11-24",
        max_pixels=MAX_PIXELS,
        include_cam=True,
        max_actors=1,
        **extra,
    )


def _read(bucket: str, table: str):
    fs, path = io.resolve(f"{bucket}/scored/{table}")
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()


def test_every_input_lands_in_results_or_errors(ray_cluster, s3_bucket, models, tmp_path):
    expected = _archive(f"{s3_bucket}/archive")
    summary = run_scoring(_config(s3_bucket, models))

    results, errors = _read(s3_bucket, "results"), _read(s3_bucket, "errors")
    result_uris = results["source_uri"].to_pylist()
    error_uris = errors["source_uri"].to_pylist()
    inputs = {f"{s3_bucket}/archive/{name}" for name in expected}
    assert summary.inputs_listed == len(inputs)
    assert len(result_uris) + len(error_uris) == len(inputs)
    assert set(result_uris) | set(error_uris) == inputs
    assert not set(result_uris) & set(error_uris)
    assert len(set(result_uris)) == len(result_uris) and len(set(error_uris)) == len(error_uris)

    by_uri = {row["source_uri"]: row for row in errors.to_pylist()}
    for name, outcome in expected.items():
        uri = f"{s3_bucket}/archive/{name}"
        if outcome == "result":
            assert uri in result_uris, f"{name} should have been scored: {by_uri.get(uri)}"
        else:
            stage, error_type = outcome.split(":")
            row = by_uri[uri]
            assert (row["stage"], row["error_type"]) == (stage, error_type), name
            assert uri in row["error_message"]  # the message names the file

    rows = {r["source_uri"]: r for r in results.to_pylist()}
    rotated = rows[f"{s3_bucket}/archive/odd/exif_rotated.jpg"]
    assert (rotated["height"], rotated["width"]) == (120, 160)  # EXIF turned 160 tall × 120 wide
    assert all(r["predicted_class"] in CLASSES for r in rows.values())
    probabilities = np.array([[r[f"prob_{c}"] for c in CLASSES] for r in rows.values()])
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
    some = next(iter(rows.values()))
    mask = cv2.imdecode(np.frombuffer(some["mask_png"], np.uint8), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
    assert some["cam_png"] is None  # the ROI classifier yields no CAM of its own
    boxes = []
    for row in rows.values():  # the recorded ROI box is the one cut from the stored mask
        stored = cv2.imdecode(np.frombuffer(row["mask_png"], np.uint8), cv2.IMREAD_UNCHANGED)
        box = tuple(int(v) for v in lesion_boxes(torch.from_numpy(stored[None] > 0), 0.1)[0])
        assert tuple(row[c] for c in ROI_BOX_COLUMNS) == box, row["source_uri"]
        boxes.append(box)
    assert sum(box != (0, 0, 64, 64) for box in boxes) > len(boxes) // 2  # lesion crops
    assert summary.errors_by_type == {"CorruptImage": 3, "EmptyImage": 1, "TooManyPixels": 1}

    # One line per stage: the images that reached it, its errors, and Ray Data's task time.
    stages = {s.stage: s for s in summary.stages}
    assert list(stages) == ["list", "read", "decode", "predict", "describe", "write"]
    assert [stages[s].images_in for s in stages] == [len(inputs)] * 3 + [len(inputs) - 5] * 2 + [
        len(inputs)
    ]
    assert {s: stages[s].errors for s in stages if stages[s].errors} == {"decode": 5}
    for timed in ("decode", "predict", "describe"):
        assert stages[timed].task_s > 0 and stages[timed].span_s > 0, (timed, summary.lines())
    assert all(stage.line() in summary.lines() for stage in summary.stages)
    assert summary.object_store_budget_mib > 0
    bound = f"object store bounded at {summary.object_store_budget_mib:.0f} MiB"
    assert any(line.startswith("  pool ") and bound in line for line in summary.lines())
    # The run's settings are recorded with its figures: a reader can tell how its inputs decoded.
    recorded = json.loads(_summary_json(s3_bucket, summary.run_id))["settings"]
    assert (recorded["segmenter"], recorded["classifier"]) == tuple(models)
    assert recorded["jpeg_decode_in_segmenter"] is False and recorded["backend"] is None

    # DuckDB reads the output as written, partition column included.
    local = _download(f"{s3_bucket}/scored", tmp_path / "scored")
    counts = duckdb.sql(
        f"SELECT predicted_class, count(*) FROM read_parquet('{local}/results/*/*.parquet', "
        "hive_partitioning = true) WHERE run_date = DATE '2026-11-24' GROUP BY 1"
    ).fetchall()
    written = {c: sum(r["predicted_class"] == c for r in rows.values()) for c in CLASSES}
    assert dict(counts) == {c: n for c, n in written.items() if n}
    assert sum(n for _, n in counts) == summary.results

    # The README's example queries run against this output (they query runs/example, the default
    # pair's, in HAM10000's classes; this test's models have ISIC 2017's).
    queries = re.findall(r"```sql\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(queries) == 4
    isic2017 = {"runs/example": str(local), "prob_mel,": "prob_melanoma,", "'mel'": "'melanoma'"}
    for old, new in isic2017.items():
        queries = [q.replace(old, new) for q in queries]
    per_class, melanoma, untrusted, failures = (duckdb.sql(q).fetchall() for q in queries)
    assert sum(row[2] for row in per_class) == summary.results
    assert len(melanoma) == min(10, written["melanoma"])
    # This test's classifier ships no OOD bank (ood is null): the uncertain ones are listed.
    uncertain = sum(
        r["class_entropy"] is not None and r["class_entropy"] > 0.5 for r in rows.values()
    )
    assert len(untrusted) == min(20, uncertain) and all(row[5] >= 0.5 for row in untrusted)
    assert {(stage, kind): n for stage, kind, n, _ in failures} == {
        ("decode", "CorruptImage"): 3,
        ("decode", "EmptyImage"): 1,
        ("decode", "TooManyPixels"): 1,
    }


def _download(uri: str, target: Path) -> Path:
    fs, path = io.resolve(uri)
    for info in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        if info.type == pafs.FileType.File:
            local = target / info.path.removeprefix(path + "/")
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_bytes(io.read_bytes("s3://" + info.path))
    return target


def test_a_dying_actor_loses_nothing(ray_cluster, s3_bucket, models, tmp_path, monkeypatch):
    expected = _archive(f"{s3_bucket}/archive")
    marker = tmp_path / "actor-killed"
    monkeypatch.setenv(KILL_ACTOR_MARKER_ENV, str(marker))
    summary = run_scoring(_config(s3_bucket, models))
    assert marker.exists()  # an actor really exited mid-run
    results, errors = _read(s3_bucket, "results"), _read(s3_bucket, "errors")
    uris = results["source_uri"].to_pylist() + errors["source_uri"].to_pylist()
    assert sorted(uris) == sorted(f"{s3_bucket}/archive/{name}" for name in expected)
    assert summary.results == sum(v == "result" for v in expected.values())


def test_rerun_replaces_and_incremental_scores_only_new_images(
    ray_cluster, s3_bucket, random_models, tmp_path
):
    models = random_models
    _archive(f"{s3_bucket}/archive")
    first = run_scoring(_config(s3_bucket, models))
    second = run_scoring(_config(s3_bucket, models))
    assert _read(s3_bucket, "results").num_rows == first.results == second.results
    assert _read(s3_bucket, "errors").num_rows == first.errors

    _archive(f"{s3_bucket}/archive", start=GOOD, count=5)
    incremental = run_scoring(_config(s3_bucket, models, incremental=True))
    assert incremental.skipped_already_scored == first.results
    assert incremental.results == 5  # the errors are retried and fail again; nothing else is scored
    assert incremental.errors == first.errors
    results = _read(s3_bucket, "results")
    assert results.num_rows == first.results + 5
    assert len(set(results["source_uri"].to_pylist())) == results.num_rows
    # openvino-mixed, or openvino on a CPU OpenVINO runs no bf16 on
    ran_as = default_backend("cpu") if openvino_runs_bf16() else "openvino"
    assert set(results["backend"].to_pylist()) == {ran_as}
    assert set(results["decode"].to_pylist()) == {"opencv"}
    assert set(results["int8_calibration_sha256"].to_pylist()) == {None}  # not int8: no images
    assert set(results["backend_versions"].to_pylist()) == {runtime_versions(ran_as)}

    # The same weights with a new temperature are new predictions: nothing is skipped. This run
    # is int8, calibrated on images the door reads once from S3 and hands every actor.
    recalibrated = shutil.copytree(models[1], tmp_path / "recalibrated")
    config = read_model_config(str(recalibrated))
    write_model_config(str(recalibrated), config.replace(temperature=2.0))
    calibration = f"{s3_bucket}/archive/good/"
    again_config = _config(
        s3_bucket, (models[0], str(recalibrated)), incremental=True, int8_calibration=calibration
    )
    again = run_scoring(again_config)
    assert again.skipped_already_scored == 0 and again.results == first.results + 5
    new_hash = read_model_config(str(recalibrated)).config_sha256
    assert new_hash != config.config_sha256
    results = _read(s3_bucket, "results")
    hashes = results["classifier_config_sha256"].to_pylist()
    assert hashes.count(new_hash) == again.results  # beside the earlier model's rows
    ran = results.filter(pc.field("classifier_config_sha256") == new_hash)
    images = read_calibration_images(calibration, read_scoring_models(again_config).input_size)
    assert len(images) == GOOD + 5
    assert set(ran["backend"].to_pylist()) == {"openvino-int8"}
    assert set(ran["int8_calibration_sha256"].to_pylist()) == {calibration_sha256(images)}
    assert set(ran["backend_versions"].to_pylist()) == {runtime_versions("openvino-int8")}


def test_jpegs_decoded_in_the_segmenter_end_as_on_cpu(ray_cluster, s3_bucket, models):
    expected = _archive(f"{s3_bucket}/archive")
    summary = run_scoring(_config(s3_bucket, models, jpeg_decode_in_segmenter=True))
    results, errors = _read(s3_bucket, "results"), _read(s3_bucket, "errors")
    outcome = {uri: "result" for uri in results["source_uri"].to_pylist()}
    outcome |= {
        row["source_uri"]: f"{row['stage']}:{row['error_type']}" for row in errors.to_pylist()
    }
    assert outcome == {f"{s3_bucket}/archive/{name}": o for name, o in expected.items()}
    rows = {r["source_uri"]: r for r in results.to_pylist()}
    rotated = rows[f"{s3_bucket}/archive/odd/exif_rotated.jpg"]
    assert (rotated["height"], rotated["width"]) == (120, 160)
    assert summary.results + summary.errors == len(expected)
    good = {row["decode"] for uri, row in rows.items() if "/good/" in uri}
    assert good == {"torchvision-cpu"}  # each row names its decoder
    assert {rows[f"{s3_bucket}/archive/odd/alpha.png"]["decode"]} == {"opencv"}
    assert json.loads(_summary_json(s3_bucket, summary.run_id))["settings"][
        "jpeg_decode_in_segmenter"
    ]


def _summary_json(bucket: str, run_id: str) -> bytes:
    return io.read_bytes(f"{bucket}/scored/summaries/run_date=2026-11-24/summary-{run_id}.json")


def test_a_manifest_naming_missing_files_ends_them_as_read_errors(ray_cluster, s3_bucket, models):
    images = [f"{s3_bucket}/archive/good/{seed:04d}.jpg" for seed in range(3)]
    for seed, uri in enumerate(images):
        io.write_bytes(uri, _jpeg(synthetic_sample(seed, 160).image))
    missing = [f"{s3_bucket}/archive/gone/{i}.jpg" for i in range(2)]
    io.write_bytes(f"{s3_bucket}/lists/tonight.txt", "\n".join(images + missing).encode())
    config = _config(s3_bucket, models).model_copy(
        update={"input": f"{s3_bucket}/lists/tonight.txt"}
    )
    summary = run_scoring(config)
    assert (summary.results, summary.errors) == (3, 2)
    errors = _read(s3_bucket, "errors").to_pylist()
    assert sorted(row["source_uri"] for row in errors) == missing
    for row in errors:
        assert row["stage"] == "read" and row["source_size_bytes"] is None
        assert row["source_uri"].removeprefix("s3://") in row["error_message"]


def _score_command(bucket, models, output: str, run_id: str) -> list[str]:
    segmenter, classifier = models
    return [
        sys.executable,
        str(ROOT / "jobs" / "score.py"),
        "--input",
        f"{bucket}/archive/",
        "--output",
        output,
        "--segmenter",
        segmenter,
        "--classifier",
        classifier,
        "--run-date",
        "2026-11-24",
        "--run-id",
        run_id,
        "--max-pixels",
        str(MAX_PIXELS),
        "--max-actors",
        "1",
        "--batch-size",
        "8",
        "--decode-batch-size",
        "8",
        "--rows-per-file",
        "4",
        "--backend",
        "eager",
        "--no-report",
    ]


def test_a_killed_driver_leaves_the_partition_unchanged_and_its_run_resumes_to_a_clean_runs_rows(
    ray_cluster, s3_bucket, models
):
    import ray

    expected = _archive(f"{s3_bucket}/archive")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    output = f"{s3_bucket}/nightly"
    fs, root = io.resolve(output)

    def exists(path: str) -> bool:
        return bool(fs.get_file_info(pafs.FileSelector(f"{root}/{path}", allow_not_found=True)))

    def partition_bytes() -> dict[str, bytes]:
        infos = fs.get_file_info(pafs.FileSelector(f"{root}/results", recursive=True))
        return {i.path: fs.open_input_file(i.path).read() for i in infos if i.is_file}

    def run(command: list[str]) -> subprocess.CompletedProcess:
        done = subprocess.run(
            command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    segmenter, classifier = models
    settings = dict(segmenter=segmenter, classifier=classifier, max_pixels=MAX_PIXELS)
    settings |= dict(max_actors=1, batch_size=8, decode_batch_size=8, rows_per_file=4)
    settings |= dict(backend="eager")
    run_scoring(  # the partition a good run left, with the settings of _score_command
        make_score_config(
            input=f"{s3_bucket}/archive/",
            output=output,
            run_date="2026-11-24",
            run_id="clean",
            **settings,
        )
    )
    clean, before = _rows(output), partition_bytes()

    driver = subprocess.Popen(
        _score_command(s3_bucket, models, output, "resumable"),
        env={**env, PREDICT_DELAY_ENV: "1.0"},  # each model call of 8 images waits a second
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not exists("_staging/resumable/results"):
        assert driver.poll() is None and time.monotonic() < deadline, "nothing was staged"
        time.sleep(0.2)
    os.kill(driver.pid, signal.SIGKILL)  # mid-run, before its commit
    driver.wait()
    staged = len(staged_uris(f"{output}/_staging/resumable"))
    assert 0 < staged < len(expected)
    assert partition_bytes() == before and _rows(output) == clean  # unchanged and readable

    command = _score_command(s3_bucket, models, output, "resumable")
    resumed = run(["--resume" if arg == "--run-id" else arg for arg in command])
    assert f"resumed  {staged} staged" in resumed.stdout
    assert _rows(output) == clean  # every input once, as the clean run scored it
    names = [path.rsplit("/", 1)[1] for path in partition_bytes()]
    assert names and all(name.startswith("part-resumable-") for name in names)
    assert not exists("_staging")


def _rows(output: str) -> dict[str, list[tuple]]:
    """Each table's rows without what differs between runs (run id, times, messages), sorted."""
    rows = {}
    for table in ("results", "errors"):
        fs, path = io.resolve(f"{output}/{table}")
        data = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()
        ignored = {"run_id", "scored_at", "failed_at", "error_message"}
        rows[table] = sorted(
            (tuple(str(v) for k, v in row.items() if k not in ignored) for row in data.to_pylist()),
        )
    return rows
