"""The scoring stages as plain functions (no Ray): JPEGs passed undecoded to the segmenter actor come
out as the CPU decode would make them, and every row still ends exactly once."""

from __future__ import annotations

import io as stdio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ray.data._internal.batcher import Batcher  # what joins blocks into a stage's batches
from ray.data.block import BlockAccessor

from skinray.backends import openvino_runs_bf16
from skinray.data.synthetic import synthetic_sample
from skinray.score.actors import PredictActor
from skinray.score.stages import describe_lesions, finish_rows, read_and_decode

SIZE = (64, 64)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _jpeg(rgb: np.ndarray, orientation: int = 1) -> bytes:
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = stdio.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", exif=exif, quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archive")
    image = synthetic_sample(4, (120, 160)).image
    files = {
        "plain.jpg": _jpeg(image),
        "turned.jpg": _jpeg(image, orientation=6),
        "cmyk.jpg": _cmyk(image),
        "picture.png": _png(image),
        "cut.jpg": _jpeg(image)[:1500],
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {name: str(folder / name) for name in files}


def _cmyk(rgb):
    buffer = stdio.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def _png(rgb):
    buffer = stdio.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def segmenter_dir(fitted_segmenter):
    return fitted_segmenter  # finds lesions: masks from another decode or backend can differ


@pytest.fixture(scope="module")
def segmenter(segmenter_dir):
    return PredictActor(segmenter_dir, None, batch_size=4, backend="eager")


def _listing(archive):
    uris = list(archive.values())
    return {
        "source_uri": np.array(uris, dtype=object),
        "source_size_bytes": np.array([None] * len(uris), dtype=object),
        "source_etag": np.array(["e"] * len(uris), dtype=object),
    }


def test_jpegs_go_on_undecoded_and_everything_else_as_before(archive):
    batch = read_and_decode(_listing(archive), SIZE, max_pixels=10**8, jpeg_to_segmenter=True)
    rows = {uri.rsplit("/", 1)[1]: i for i, uri in enumerate(batch["source_uri"])}
    for name in ("plain.jpg", "turned.jpg", "cmyk.jpg"):
        assert len(batch["jpeg"][rows[name]]) > 0 and not batch["image"][rows[name]].any(), name
    assert batch["orientation"][rows["turned.jpg"]] == 6
    assert (batch["height"][rows["turned.jpg"]], batch["width"][rows["turned.jpg"]]) == (160, 120)
    assert batch["jpeg"][rows["picture.png"]] == b"" and batch["image"][rows["picture.png"]].any()
    assert batch["error_stage"][rows["cut.jpg"]] == "decode"  # refused by the header screen
    assert batch["error_type"][rows["cut.jpg"]] == "CorruptImage"


def test_the_segmenter_decodes_them_as_the_cpu_would(archive, segmenter):
    listing = _listing(archive)
    on_cpu = read_and_decode(listing, SIZE, max_pixels=10**8)
    passed_on = read_and_decode(listing, SIZE, max_pixels=10**8, jpeg_to_segmenter=True)
    reference = segmenter({k: v.copy() for k, v in on_cpu.items()})
    segmented = segmenter(passed_on)
    assert "jpeg" not in segmented and "orientation" not in segmented
    assert list(segmented["error_stage"]) == list(reference["error_stage"])
    for i, stage in enumerate(reference["error_stage"]):
        if stage:
            continue
        difference = np.abs(segmented["image"][i].astype(int) - reference["image"][i]).mean()
        assert difference < 4, (segmented["source_uri"][i], difference)
        assert (segmented["height"][i], segmented["width"][i]) == (
            reference["height"][i],
            reference["width"][i],
        )
        agreement = (segmented["mask"][i] == reference["mask"][i]).mean()
        assert agreement > 0.9, (segmented["source_uri"][i], agreement)


@pytest.mark.parametrize(
    "module",
    ["skinray.score.stages", "skinray.score.commit", "skinray.score.sources"],
    ids=["decode-describe-rows", "staging-write", "listing"],
)
def test_the_cpu_tasks_modules_never_import_torch(module):
    # Ray pickles task functions (and the staging sink) by module: importing torch there would
    # load it in every decode, describe, listing and write worker (~4 s of start-up each, hundreds
    # of MiB; the staging write paid it at the end of every run).
    probe = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_an_openvino_actor_gives_the_eager_actors_rows(
    archive, segmenter, segmenter_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("SKINRAY_CACHE", str(tmp_path))
    fast = PredictActor(segmenter_dir, None, batch_size=4, backend="openvino")
    assert fast.backend == "openvino" and segmenter.backend == "eager"
    batch = read_and_decode(_listing(archive), SIZE, max_pixels=10**8)
    reference = segmenter({k: v.copy() for k, v in batch.items()})
    rows = fast(batch)
    assert fast.backend == "openvino"  # passed the guard on its first batch
    assert list(rows["error_stage"]) == list(reference["error_stage"])
    for i, stage in enumerate(reference["error_stage"]):
        if not stage:
            assert (rows["mask"][i] == reference["mask"][i]).mean() > 0.99
    assert list(tmp_path.glob("onnx/*.onnx"))  # exported once, into the cache


@pytest.mark.skipif(
    not openvino_runs_bf16(),
    reason="OpenVINO runs no bf16 on this CPU: openvino-bf16 runs, and is reported, as openvino",
)
def test_an_actor_whose_backend_fails_the_guard_tries_the_full_precision_one_next(
    archive, segmenter, segmenter_dir, tmp_path, monkeypatch
):
    # The guard's verdict is forced for the first two comparisons (bf16, then mixed, which for a
    # segmenter alone is bf16 too; whether bf16 really fails depends on the CPU); the f32 fallback
    # and its guard run for real.
    import skinray.backends as backends
    from skinray.backends import GuardResult, compare_predictions

    calls = []

    def first_fails(reference, candidate):
        calls.append(candidate)
        real = compare_predictions(reference, candidate)
        return GuardResult(0.5, real.max_probability_difference) if len(calls) <= 2 else real

    monkeypatch.setattr(backends, "compare_predictions", first_fails)
    monkeypatch.setenv("SKINRAY_CACHE", str(tmp_path))
    fast = PredictActor(segmenter_dir, None, batch_size=4, backend="openvino-bf16")
    batch = read_and_decode(_listing(archive), SIZE, max_pixels=10**8)
    reference = segmenter({k: v.copy() for k, v in batch.items()})
    rows = fast(batch)
    assert fast.backend == "openvino" and len(calls) == 3
    assert fast.fallback_reason.startswith("openvino-bf16 failed the accuracy guard")
    assert "; openvino-mixed failed the accuracy guard" in fast.fallback_reason
    assert set(rows["backend"][rows["error_stage"] == ""]) == {"openvino"}
    for i, stage in enumerate(reference["error_stage"]):
        if not stage:
            assert (rows["mask"][i] == reference["mask"][i]).mean() > 0.99


@pytest.fixture
def pair():  # a new actor: the first batch it gets is the test's
    return PredictActor("lesion-segmenter", "ham10000-classifier", batch_size=4, backend="eager")


def _decoded_batch(actor, count: int = 0, broken: list[str] = ()) -> dict:
    """The first ``count`` ISIC 2017 validation images and the files ``broken``, as the decode
    stage hands them to the actor."""
    folder = SHARED_DATA / "isic2017" / "ISIC-2017_Validation_Data"
    uris = [str(p) for p in sorted(folder.glob("*.jpg"))[:count]] + list(broken)
    listing = {
        "source_uri": np.array(uris, dtype=object),
        "source_size_bytes": np.array([None] * len(uris), dtype=object),
        "source_etag": np.array(["e"] * len(uris), dtype=object),
    }
    return read_and_decode(listing, actor.predictor.input_size, 10**8)


def test_a_batch_whose_images_all_failed_joins_healthy_ones_in_the_next_stage(pair, tmp_path):
    broken = [tmp_path / "notes.jpg", tmp_path / "empty.jpg"]
    broken[0].write_bytes(b"not an image")
    broken[1].write_bytes(b"")
    failed = pair(_decoded_batch(pair, broken=[str(path) for path in broken]))  # the first batch
    healthy = pair(_decoded_batch(pair, 3))
    assert set(failed) == set(healthy)
    for key, column in healthy.items():
        assert (failed[key].shape[1:], failed[key].dtype) == (column.shape[1:], column.dtype), key
    # Joined as the next stage's batches are (batch_size 64 holds both blocks), with Ray's own
    # batcher: before, this raised TypeError and failed the run.
    batcher = Batcher(batch_size=64)
    for batch in (healthy, failed):
        batcher.add(BlockAccessor.batch_to_block(batch))
    batcher.done_adding()
    joined = BlockAccessor.for_block(batcher.next_batch()).to_batch_format("numpy")
    rows = finish_rows(describe_lesions(joined), pair.predictor.class_names, {}, "r", False)
    assert list(rows["error_stage"]) == ["", "", "", "decode", "decode"]
    assert np.isfinite(rows["predicted_probability"][:3]).all()
    assert np.isnan(rows["predicted_probability"][3:]).all()


class _FailsOnBlackImages:
    """A predictor that raises on any batch holding an all-black image (as a GPU out of memory
    would on one too large a batch), and otherwise is ``predictor``."""

    def __init__(self, predictor):
        self._predictor = predictor

    def __getattr__(self, name):
        return getattr(self._predictor, name)

    def __call__(self, images):
        if (images.flatten(1).amax(1) == 0).any():
            raise RuntimeError("CUDA out of memory (on purpose)")
        return self._predictor(images)


def test_a_failing_batch_costs_only_the_images_that_fail_alone(pair):
    clean = pair(_decoded_batch(pair, 4))
    batch = _decoded_batch(pair, 4)
    batch["image"][2] = 0
    eager = pair.guarded.predictor
    pair.guarded.predictor = _FailsOnBlackImages(eager)
    try:
        scored = pair(batch)
    finally:
        pair.guarded.predictor = eager
    assert list(scored["error_stage"]) == ["", "", "predict", ""]
    assert scored["error_type"][2] == "RuntimeError"
    assert list(scored["backend"]) == ["eager", "eager", None, "eager"]
    for key in ("mask", "class_probabilities", "ood_score"):
        np.testing.assert_allclose(scored[key][[0, 1, 3]], clean[key][[0, 1, 3]], atol=1e-5)


def test_a_row_records_the_scale_its_jpeg_was_decoded_at(segmenter, tmp_path):
    # A 480×640 JPEG for a 64×64 input is decoded at 1/4 (1/8 would leave 60 rows); a PNG has no
    # reduced decode. The reduced decode moves a class probability by up to 0.17 against a full
    # one (docs/benchmarks.md), so a row says which it had.
    image = synthetic_sample(5, (480, 640)).image
    (tmp_path / "big.jpg").write_bytes(_jpeg(image))
    (tmp_path / "big.png").write_bytes(_png(image))
    uris = [str(tmp_path / "big.jpg"), str(tmp_path / "big.png")]
    listing = {
        "source_uri": np.array(uris, dtype=object),
        "source_size_bytes": np.array([None, None], dtype=object),
        "source_etag": np.array(["e", "e"], dtype=object),
    }
    batch = segmenter(read_and_decode(listing, SIZE, 10**8))
    rows = finish_rows(describe_lesions(batch), [], {}, "r", False)
    assert rows["decode_scale"].tolist() == [4, 1]


def test_an_image_without_a_finite_ood_score_has_no_ood_verdict(pair):
    batch = pair(_decoded_batch(pair, 3))
    batch["ood_score"] = np.array(batch["ood_score"])
    batch["ood_score"][1] = np.nan  # features that were not finite
    rows = finish_rows(describe_lesions(batch), pair.predictor.class_names, {}, "r", False)
    flags = rows["ood"].tolist()
    assert flags[1] is None and all(isinstance(flag, bool) for flag in flags[::2])


def test_a_uri_no_file_system_reads_is_a_read_error_of_its_row(archive, tmp_path):
    # Another scheme, a NUL byte and a symlink loop raised out of the read step (ValueError,
    # RuntimeError), failing the task on every retry; a manifest line of another scheme was
    # joined to the manifest's folder and stopped the listing with a traceback.
    from skinray.score.sources import list_inputs

    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    plain = archive["plain.jpg"]
    uris = [plain, "http://example.com/a.jpg", f"{tmp_path}/a\0b.jpg", str(loop)]
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join([*uris[:2], "archive-relative.jpg"]) + "\n")
    listed = list_inputs(str(manifest))["source_uri"].to_pylist()
    assert listed == [plain, "http://example.com/a.jpg", f"{tmp_path}/archive-relative.jpg"]

    listing = _listing({str(i): uri for i, uri in enumerate(uris)})
    batch = read_and_decode(listing, SIZE, max_pixels=10**8)
    assert list(batch["error_stage"]) == ["", "read", "read", "read"]
    assert set(batch["error_type"][1:]) == {"UnreadableURI"}
    assert "http://example.com/a.jpg" in batch["error_message"][1]
    assert "unsupported URI scheme" in batch["error_message"][1]
    assert "null byte" in batch["error_message"][2]
