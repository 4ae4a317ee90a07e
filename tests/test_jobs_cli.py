"""The jobs' command lines turn user mistakes into one clear line and exit code 2, no traceback.

One check per job runs it as a process, as a user does (``_run``); the rest call its ``main`` in
this process (``_main``), which skips a fresh interpreter's imports (3–5 s a job).
"""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


@functools.cache
def _job(script: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"job_{script[:-3]}", ROOT / "jobs" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main(capsys, script: str, *args: str) -> subprocess.CompletedProcess:
    """The job's ``main`` in this process, with what it printed, as ``_run`` gives it."""
    capsys.readouterr()
    try:
        code = _job(script).main(list(args))
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess([script, *args], code, out.out, out.err)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [
                "--smoke-test",
                "--set",
                "data.source=isic2017",
                "--set",
                "data.root=/nonexistent/isic",
            ],
            "error: dataset root not found: /nonexistent/isic",
        ),
        (["--smoke-test", "--set", "optim.lrr=0.1"], "optim.lrr: unknown key"),
        (["--smoke-test", "--set", "model=segformer"], "unknown model 'segformer'"),
        (["no_such_recipe"], "unknown recipe 'no_such_recipe'"),
    ],
    ids=["missing-dataset", "bad-key", "unknown-model", "unknown-recipe"],
)
def test_train_job_reports_user_errors_in_one_line(capsys, args, message):
    result = _main(capsys, "train.py", *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_train_job_names_an_image_without_a_mask(tmp_path):
    manifest = tmp_path / "train.csv"
    manifest.write_text("image,mask,label\na.jpg,a.png,0\nb.jpg,,1\n")
    result = _run(
        "train.py",
        "--smoke-test",
        "--set",
        "data.source=manifest",
        "--set",
        f"data.root={manifest}",
    )
    assert result.returncode == 2
    assert f"image without a mask: {tmp_path}/b.jpg" in result.stderr
    assert "Traceback" not in result.stderr


def test_score_job_reports_a_missing_input(tmp_path):
    result = _run(
        "score.py",
        "--input",
        str(tmp_path / "nowhere"),
        "--output",
        str(tmp_path / "out"),
        "--segmenter",
        str(tmp_path / "model"),
    )
    assert result.returncode == 2
    assert "error:" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("calibration", "message"),
    [
        ([], "backend openvino-int8 needs int8_calibration (real images)"),
        (["--int8-calibration", "/nonexistent/calibration"], "/nonexistent/calibration"),
    ],
    ids=["none", "missing"],
)
def test_score_job_refuses_int8_without_calibration_images_at_the_door(
    capsys, tmp_path, calibration, message
):
    result = _main(
        capsys,
        "score.py",
        "--output",
        str(tmp_path / "out"),
        "--backend",
        "openvino-int8",
        *calibration,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert not (tmp_path / "out").exists()  # nothing ran


def _undecodable_calibration(tmp_path: Path) -> Path:
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    (calibration / "a.jpg").write_bytes(b"not a jpeg")
    (calibration / "notes.txt").write_text("no image")
    return calibration


def test_score_job_stops_at_the_door_where_no_calibration_image_can_be_decoded(capsys, tmp_path):
    calibration = _undecodable_calibration(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    result = _main(
        capsys,
        "score.py",
        *("--input", str(images), "--output", str(tmp_path / "out")),
        *("--segmenter", "lesion-segmenter", "--int8-calibration", str(calibration)),
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: int8 calibration: no image under {calibration} could be read and decoded"
    ], lines
    assert not (tmp_path / "out").exists()  # nothing ran


def test_evaluate_job_stops_where_no_calibration_image_can_be_decoded(capsys, tmp_path):
    calibration = _undecodable_calibration(tmp_path)
    result = _main(
        capsys,
        "evaluate.py",
        "lesion-segmenter",
        *("--data", "isic2017", "--root", str(SHARED_DATA / "isic2017"), "--limit", "2"),
        *("--backend", "openvino-int8", "--int8-calibration", str(calibration)),
        *("--json", str(tmp_path / "metrics.json")),
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines == [
        f"error: int8 calibration: no image under {calibration} could be read and decoded"
    ], lines
    assert not (tmp_path / "metrics.json").exists()  # no figures under a backend that did not run


@pytest.mark.parametrize("run_id", [None, "other"])
def test_score_job_refuses_a_resume_with_nothing_staged_or_two_run_ids(capsys, tmp_path, run_id):
    extra = ["--run-id", run_id] if run_id else []
    result = _main(
        capsys, "score.py", "--output", str(tmp_path / "out"), "--resume", "gone", *extra
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    why = "two run ids given" if run_id else f"nothing staged at {tmp_path / 'out'}/_staging/gone"
    assert lines == [f"error: --resume gone: {why}"]


@pytest.mark.parametrize("flag", ["--resume", "--run-id"])
@pytest.mark.parametrize("run_id", ["..", "../elsewhere", ""])
def test_score_job_refuses_a_run_id_that_is_no_folder_name(capsys, tmp_path, flag, run_id):
    # The run's staging folder is <output>/_staging/<run id>, deleted after the commit: with
    # "..", that was the output root, every date's results with it.
    output = tmp_path / "out"
    (output / "_staging").mkdir(parents=True)
    (output / "results").mkdir()
    (tmp_path / "elsewhere").mkdir()
    result = _main(capsys, "score.py", "--output", str(output), flag, run_id)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: invalid scoring config: run_id: {run_id!r} is not a run id: up to "
        "128 letters, digits, '.', '_' or '-', not starting with '.' (it names the run's staging "
        "folder under the output)"
    ]
    assert (output / "results").is_dir() and (tmp_path / "elsewhere").is_dir()


def _broken_classifier(folder, broken: str) -> str:
    """A copy of the released classifier, broken as ``broken`` says."""
    import json
    import shutil

    from skinray.models.zoo import zoo_root

    shutil.copytree(zoo_root() / "ham10000-classifier", folder)
    config = json.loads((folder / "config.json").read_text())
    if broken == "no OOD bank":
        (folder / "ood.safetensors").unlink()
    elif broken == "cut weights":
        (folder / "model.safetensors").write_bytes(
            (folder / "model.safetensors").read_bytes()[:999]
        )
    else:
        change = {
            "3 class names": {"class_names": ["a", "b", "c"]},
            "temperature 0": {"temperature": 0},
            "temperature -1.5": {"temperature": -1.5},
            "OOD k 0": {"ood": {**config["ood"], "k": 0}},
        }[broken]
        (folder / "config.json").write_text(json.dumps({**config, **change}))
    return str(folder)


@pytest.mark.parametrize(
    ("broken", "reason"),
    [
        ("no OOD bank", "cannot be loaded: no such file"),
        ("cut weights", "cannot be loaded"),
        ("3 class names", "cannot be loaded: 7 class logits but 3 class names"),
        ("temperature 0", "temperature 0 is not a positive number"),
        ("temperature -1.5", "temperature -1.5 is not a positive number"),
        ("OOD k 0", "OOD entry needs k >= 1"),
    ],
)
def test_score_job_refuses_a_model_its_actors_could_not_load_or_would_run_wrong(
    capsys, tmp_path, broken, reason
):
    # Before, each of these passed the door: the file ones failed later in the actors with a
    # traceback; temperature 0 gave every image NaN probabilities, -1.5 the least likely class.
    classifier = _broken_classifier(tmp_path / "classifier", broken)
    output = tmp_path / "out"
    result = _main(capsys, "score.py", "--output", str(output), "--classifier", classifier)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {classifier}: ") and reason in line, line
    assert not output.exists()  # nothing ran


def test_evaluate_job_reports_a_missing_model(tmp_path):
    result = _run(
        "evaluate.py",
        str(tmp_path / "no-model"),
        "--data",
        "manifest",
        "--root",
        str(tmp_path / "m.csv"),
    )
    assert result.returncode == 2
    assert "no-model: no saved model here (config.json not found)" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_release_job_redraws_an_older_runs_hold_out_with_its_training_seed():
    # Runs from before data.validation_seed drew their hold-out with their training seed.
    as_drawn = _job("release.py")._as_drawn
    older = {"model": "classifier", "seed": 3, "data": {"source": "ham10000"}}
    assert as_drawn(older)["data"]["validation_seed"] == 3
    newer = {**older, "data": {"source": "ham10000", "validation_seed": 0}}
    assert as_drawn(newer)["data"]["validation_seed"] == 0


def test_release_job_measures_the_hold_out_the_run_drew_and_refuses_other_data(capsys, tmp_path):
    import json

    from skinray.data.datasets import read_split
    from skinray.train.config import smoke_test_config

    root = str(SHARED_DATA / "ham10000")
    config = smoke_test_config("classifier", str(tmp_path / "run"), ["data.validation_seed=5"])
    config = config.model_copy(
        update={"data": config.data.model_copy(update={"source": "ham10000", "root": root})}
    )
    validation, training = _job("release.py").splits_as_drawn("ham10000", root, config)
    drawn = read_split("ham10000", root, fraction=config.data.validation_fraction, seed=5)
    assert validation.rows.equals(drawn.rows) and not validation.rows.equals(
        read_split("ham10000", root).rows
    )
    held = set(validation.rows.column("image_uri").to_pylist())
    assert held.isdisjoint(training.rows.column("image_uri").to_pylist())
    from skinray.data.datasets import group_digest, read_ham10000
    from skinray.train.trainer import holdout_record

    assert holdout_record(config) == {
        "source": "ham10000",
        "root": root,
        "fraction": 0.15,
        "seed": 5,
        "groups_sha256": group_digest(read_ham10000(root)),
    }
    split = config.model_copy(
        update={"data": config.data.model_copy(update={"validation": "split"})}
    )
    assert holdout_record(split) is None

    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"config": config.model_dump(mode="json")}))
    result = _main(
        capsys,
        "release.py",
        "ham10000-classifier",
        *("--name", "x", "--data", "isic2017", "--root", root),
        *("--training-metrics", str(metrics)),
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {metrics}: trained on ham10000, not isic2017"
    ]


def test_release_job_refuses_a_model_whose_hold_out_was_drawn_from_other_lesions(tmp_path, capsys):
    import json
    import shutil

    from skinray.train.config import smoke_test_config

    model = tmp_path / "run" / "model"
    shutil.copytree(ROOT / "models" / "ham10000-classifier", model)
    config = json.loads((model / "config.json").read_text())
    config["holdout"]["groups_sha256"] = "0" * 64  # drawn from another copy of HAM10000
    (model / "config.json").write_text(json.dumps(config))
    root = str(SHARED_DATA / "ham10000")
    run = smoke_test_config("classifier", str(tmp_path / "run"))
    run = run.model_copy(
        update={"data": run.data.model_copy(update={"source": "ham10000", "root": root})}
    )
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"config": run.model_dump()}))
    result = _main(
        capsys, "release.py", str(model), *("--name", "x", "--data", "ham10000", "--root", root)
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert f"{root}: its lesions are not those the model's hold-out was drawn from" in line


def test_release_job_refuses_a_pair_whose_models_drew_other_hold_outs(tmp_path, capsys):
    import json
    import shutil

    segmenter = tmp_path / "segmenter"
    shutil.copytree(ROOT / "models" / "lesion-segmenter", segmenter)
    config = json.loads((segmenter / "config.json").read_text())
    config["holdout"] = {"source": "ham10000", "fraction": 0.15, "seed": 1}
    (segmenter / "config.json").write_text(json.dumps(config))
    root = str(SHARED_DATA / "ham10000")
    result = _main(
        capsys,
        "release.py",
        "ham10000-classifier",
        *("--segmenter", str(segmenter), "--name", "x", "--data", "ham10000", "--root", root),
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert f"{segmenter} and ham10000-classifier drew different hold-outs from ham10000" in line

    # A classifier with no record, from a run that drew seed 0: the segmenter's seed-1 record is
    # the pair's hold-out, and the run's validation images are its training images.
    from skinray.train.config import smoke_test_config

    model = tmp_path / "run" / "model"
    shutil.copytree(ROOT / "models" / "ham10000-classifier", model)
    unrecorded = json.loads((model / "config.json").read_text()) | {"holdout": None}
    (model / "config.json").write_text(json.dumps(unrecorded))
    run = smoke_test_config("classifier", str(tmp_path / "run"))  # seed 0, fraction 0.15
    run = run.model_copy(
        update={"data": run.data.model_copy(update={"source": "ham10000", "root": root})}
    )
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"config": run.model_dump()}))
    argv = ["--segmenter", str(segmenter), "--name", "x", "--data", "ham10000", "--root", root]
    result = _main(capsys, "release.py", str(model), *argv)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "the run drew its ham10000 hold-out at fraction 0.15, seed 0" in line
    assert "a model of the pair drew fraction 0.15, seed 1" in line


def test_evaluate_job_refuses_a_classifier_on_data_of_other_classes(capsys):
    result = _main(
        capsys,
        "evaluate.py",
        "isic2017-classifier",
        *("--data", "ham10000", "--root", str(SHARED_DATA / "ham10000"), "--limit", "2"),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: isic2017-classifier: its classes [")
    assert "are not ham10000's ['akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc']" in lines[0]


def test_train_job_continues_a_run_in_its_output_only_with_the_same_settings(capsys, tmp_path):
    # Ray Train continues a run already in <output>/ray/train from its last checkpoint: its
    # weights, optimiser, learning rate and epoch, whatever the new settings say.
    from skinray.train.config import smoke_test_config
    from skinray.train.trainer import RUN_RECORD, check_run_folder, run_name, with_absolute_paths

    output = tmp_path / "run"
    config = with_absolute_paths(smoke_test_config("unet", overrides=[f"output={output}"]))
    (output / "ray" / "train").mkdir(parents=True)
    (output / RUN_RECORD).write_text(config.model_dump_json())
    check_run_folder(config, "train")  # the same run again: a driver that restarts
    check_run_folder(config.model_copy(update={"max_failures": 9}), "train")  # how it recovers

    args = ["--smoke-test", "--output", str(output)]
    other = _main(capsys, "train.py", *args, "--set", "optim.lr=0.1", "--set", "epochs=3")
    resumed = _main(capsys, "train.py", *args, "--resume", str(tmp_path / "checkpoint"))
    assert (other.returncode, resumed.returncode) == (2, 2)
    assert "holds a training run of other settings (settings differ: epochs, optim.lr)" in (
        other.stderr
    )
    assert f"instead of resuming from {tmp_path / 'checkpoint'}" in resumed.stderr
    assert len(other.stderr.splitlines()) == len(resumed.stderr.splitlines()) == 1
    assert not list((output / "ray" / "train").iterdir())  # refused before Ray ran anything
    assert (output / RUN_RECORD).read_text() == config.model_dump_json()

    # A run that began with --resume continues with the same command, or without the flag.
    began = config.model_copy(update={"resume": str(tmp_path / "checkpoint")})
    (output / RUN_RECORD).write_text(began.model_dump_json())
    check_run_folder(began, "train")
    check_run_folder(config, "train")
    # Outputs sharing a storage_path (a staged chain's stages) get a run folder each.
    shared = [
        config.model_copy(update={"storage_path": str(tmp_path / "ray"), "output": str(o)})
        for o in (tmp_path / "coarse", tmp_path / "mask")
    ]
    assert run_name(config) == "train" and run_name(shared[0]) != run_name(shared[1])
