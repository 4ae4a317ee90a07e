"""The HTML report on a scoring output: built here from Parquet written by hand, with no Ray."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import subprocess
import sys
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from skinray import io
from skinray.data.decode import encode_png
from skinray.data.synthetic import synthetic_sample
from skinray.models.two_step import lesion_boxes
from skinray.models.zoo import zoo_root
from skinray.report.html import (
    CONTOUR_RGB,
    MISSING_SOURCE_GREY,
    TILE_PX,
    ReportError,
    build_report,
    latest_run_date,
    predicted_class_counts,
    stratified_sample,
)
from skinray.score.schema import ROI_BOX_COLUMNS, error_schema, probability_column, result_schema

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["melanoma", "seborrheic_keratosis", "nevus"]
RUN_DATE, OLD_RUN_DATE = "2026-11-24", "2026-11-23"
RUN_ID, OLD_RUN_ID = "run-new-4f2a", "run-old-9c1b"
SEGMENTER_SHA, CLASSIFIER_SHA = "a1" * 32, "c3" * 32
MASK_PX = 96  # the segmenter's input size: masks are stored smaller than the 128 px sources
# (image_id, predicted class index, synthetic seed, (height, width), with a CAM)
IMAGES = [
    ("lesion_00", 0, 100, (128, 128), True),
    ("lesion_01", 0, 101, (128, 128), False),
    ("lesion_02", 0, 102, (128, 128), False),
    ("lesion_03", 1, 103, (128, 128), False),
    ("lesion_04", 2, 104, (128, 128), True),
    ("lesion_05", 2, 105, (96, 128), False),
    ("lesion_06", 2, 106, (128, 128), False),
    ("lesion_07", 2, 107, (128, 128), False),
    ("lesion_08", 2, 108, (128, 128), False),
    ("lesion_00_copy", 0, 100, (128, 128), False),  # lesion_00 again, without its CAM
]
MISSING_SOURCE = "lesion_08"
ERRORS = [
    ("corrupt.jpg", "decode", "CorruptImage", "corrupt.jpg: not a decodable JPEG (812 bytes)"),
    ("gone.jpg", "read", "FileNotFoundError", "no such file: gone.jpg"),
    ("evil.jpg", "decode", "CorruptImage", "<script>alert('owned')</script> in the header"),
]


def _box(mask: np.ndarray) -> list[int]:
    """The scoring job's ROI box with its default 10 % margin."""
    return [int(v) for v in lesion_boxes(torch.from_numpy(mask[None] > 0), 0.1)[0]]


@pytest.fixture(scope="module")
def scoring_output(tmp_path_factory) -> Path:
    """A scoring output root as ``jobs/score.py`` lays it out, with its source images beside it."""
    root = tmp_path_factory.mktemp("scoring")
    images = root / "archive"
    images.mkdir()
    rows = [_result_row(images, *spec) for spec in IMAGES]
    _write_partition(root / "results", RUN_DATE, pa.Table.from_pylist(rows, result_schema(CLASSES)))
    old = _result_row(images, "old_lesion", 1, 200, (128, 128), False) | {"run_id": OLD_RUN_ID}
    _write_partition(
        root / "results", OLD_RUN_DATE, pa.Table.from_pylist([old], result_schema(CLASSES))
    )
    errors = [_error_row(images, *spec) for spec in ERRORS]
    _write_partition(root / "errors", RUN_DATE, pa.Table.from_pylist(errors, error_schema()))
    summary = {"run_id": RUN_ID, "run_date": RUN_DATE, "inputs_listed": 13, "wall_time_s": 41.5}
    summaries = root / "summaries" / f"run_date={RUN_DATE}"
    summaries.mkdir(parents=True)
    (summaries / f"summary-{RUN_ID}.json").write_text(json.dumps(summary))
    (images / f"{MISSING_SOURCE}.jpg").unlink()  # the archive moved on since the run
    return root


def _result_row(images: Path, image_id, class_index, seed, size, with_cam) -> dict:
    sample = synthetic_sample(seed, size, label=class_index)
    path = images / f"{image_id}.jpg"
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR))
    assert ok
    path.write_bytes(jpeg.tobytes())
    mask = cv2.resize(sample.mask, (MASK_PX, MASK_PX), interpolation=cv2.INTER_NEAREST)
    probabilities = np.full(len(CLASSES), 0.1, np.float32)
    probabilities[class_index] = 0.8
    ys, xs = np.mgrid[0:14, 0:14]
    cam = np.exp(-((ys - 6.0) ** 2 + (xs - 7.0) ** 2) / 12)
    area = float(mask.mean())
    return {
        "image_id": image_id,
        "source_uri": str(path),
        "source_size_bytes": path.stat().st_size,
        "source_etag": f"{seed:x}-etag",
        "content_sha256": "0" * 64,
        "width": size[1],
        "height": size[0],
        "predicted_class": CLASSES[class_index],
        "predicted_probability": 0.8,
        **{probability_column(c): float(p) for c, p in zip(CLASSES, probabilities, strict=True)},
        "lesion_area_fraction": area,
        "equivalent_diameter_px": float(np.sqrt(4 * mask.sum() / np.pi)),
        "asymmetry": 0.05 + 0.01 * (seed % 7),
        "border_irregularity": 1.1 + 0.02 * (seed % 5),
        "colour_variegation": 0.08,
        "component_count": 1,
        "mask_png": encode_png(mask * 255),
        "mask_height": MASK_PX,
        "mask_width": MASK_PX,
        # The scoring job's ROI box with its default 10 % margin.
        **dict(zip(ROI_BOX_COLUMNS, _box(mask), strict=True)),
        "cam_png": encode_png((cam / cam.max() * 255).astype(np.uint8)) if with_cam else None,
        "segmenter": "unet",
        "segmenter_sha256": SEGMENTER_SHA,
        "classifier": "classifier",
        "classifier_sha256": CLASSIFIER_SHA,
        "run_id": RUN_ID,
        "scored_at": dt.datetime(2026, 11, 24, 2, 30, tzinfo=dt.UTC),
    }


def _error_row(images: Path, name, stage, error_type, message) -> dict:
    return {
        "source_uri": str(images / name),
        "stage": stage,
        "error_type": error_type,
        "error_message": message,
        "source_size_bytes": 812,
        "source_etag": None,
        "run_id": RUN_ID,
        "failed_at": dt.datetime(2026, 11, 24, 2, 31, tzinfo=dt.UTC),
    }


def _write_partition(table_root: Path, run_date: str, table: pa.Table) -> None:
    folder = table_root / f"run_date={run_date}"
    folder.mkdir(parents=True)
    pq.write_table(table, folder / f"part-{table['run_id'][0]}-00000.parquet")


@pytest.fixture(scope="module")
def page(scoring_output) -> str:
    """The page with every row sampled."""
    return build_report(str(scoring_output), sample_size=100)


def _tiles(page: str) -> dict[str, str]:
    """image_id → the tile's HTML."""
    pattern = r'<figure class="tile"[^>]*data-image-id="([^"]+)".*?</figure>'
    return {m.group(1): m.group(0) for m in re.finditer(pattern, page, re.S)}


def _png_of(fragment: str) -> np.ndarray:
    """The first embedded PNG in an HTML fragment, decoded to RGB."""
    data = re.search(r'src="data:image/png;base64,([^"]+)"', fragment).group(1)
    png = base64.b64decode(data)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    return cv2.cvtColor(
        cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
    )


class _TagBalance(HTMLParser):
    VOID: ClassVar[set[str]] = {"meta", "img", "br", "hr", "link", "input", "source", "col", "wbr"}

    def __init__(self):
        super().__init__()
        self.open: list[str] = []
        self.mismatched: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open.pop() != tag:
            self.mismatched.append(tag)


# The page


def test_the_page_is_one_balanced_html_document_with_nothing_fetched_from_outside(page):
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    checker = _TagBalance()
    checker.feed(page)
    assert checker.open == [] and checker.mismatched == []
    assert "<script" not in page and "<link" not in page
    assert not re.search(r'(src|href)="(?!data:)', page)


def test_the_latest_run_date_is_reported_by_default(scoring_output, page):
    assert latest_run_date(str(scoring_output)) == RUN_DATE
    assert f"run date {RUN_DATE}" in page
    assert RUN_ID in page and OLD_RUN_ID not in page
    older = build_report(str(scoring_output), OLD_RUN_DATE)
    assert OLD_RUN_ID in older and len(_tiles(older)) == 1


def test_the_header_summarises_runs_models_and_errors(page):
    header = page.split('<section id="samples">')[0]
    assert re.search(r"images scored</dt><dd>10</dd>", header)
    assert re.search(r"errors</dt><dd>3</dd>", header)
    assert SEGMENTER_SHA[:12] in header and CLASSIFIER_SHA[:12] in header
    assert SEGMENTER_SHA not in header  # a prefix, not the whole digest
    assert re.search(r"<td>decode</td><td>CorruptImage</td><td class=\"num\">2</td>", header)
    assert re.search(r"<td>read</td><td>FileNotFoundError</td><td class=\"num\">1</td>", header)
    assert "41.5" in header and '<td class="num">13</td>' in header  # from the run's summary


def test_one_tile_per_sampled_row(scoring_output, page):
    assert len(_tiles(page)) == len(IMAGES)
    assert page.count('<figure class="tile"') == len(IMAGES)
    small = build_report(str(scoring_output), sample_size=5)
    assert small.count('<figure class="tile"') == 5


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_predicted_class_is_in_the_grid_once_the_sample_can_hold_them(scoring_output, seed):
    small = build_report(str(scoring_output), sample_size=len(CLASSES), seed=seed)
    shown = re.findall(r'<figure class="tile" data-class="([^"]+)"', small)
    assert sorted(shown) == sorted(CLASSES)


def test_the_sample_is_fixed_by_the_seed(scoring_output):
    def sampled(seed):
        return sorted(_tiles(build_report(str(scoring_output), sample_size=4, seed=seed)))

    assert sampled(7) == sampled(7)
    assert len({tuple(sampled(seed)) for seed in range(6)}) > 1


def test_tiles_embed_pngs_of_the_tile_size_keeping_the_aspect_ratio(page):
    for image_id, _, _, (height, width), _ in IMAGES:
        tile = _tiles(page)[image_id]
        expected = (
            round(TILE_PX * height / max(height, width)),
            round(TILE_PX * width / max(height, width)),
        )
        assert _png_of(tile).shape == (*expected, 3)
        assert f'width="{expected[1]}" height="{expected[0]}"' in tile
    assert _png_of(_tiles(page)["lesion_05"]).shape[:2] == (192, 256)  # 96×128 source


def test_the_mask_contour_is_drawn_on_the_lesion_border_and_nowhere_else(page):
    tile = _png_of(_tiles(page)["lesion_01"])
    drawn = np.all(tile == CONTOUR_RGB, axis=2)
    truth = synthetic_sample(101, 128, label=0).mask
    truth = cv2.resize(truth, (TILE_PX, TILE_PX), interpolation=cv2.INTER_NEAREST)
    border = cv2.morphologyEx(truth, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    to_border = cv2.distanceTransform((~border).astype(np.uint8), cv2.DIST_L2, 5)
    to_drawn = cv2.distanceTransform((~drawn).astype(np.uint8), cv2.DIST_L2, 5)
    assert drawn.sum() > 0.8 * border.sum() / 2  # a line all the way round, not a few dots
    assert to_border[drawn].max() <= 4  # every contour pixel is near the true border
    assert np.mean(to_drawn[border] <= 4) > 0.98  # and the border is covered all the way round


def test_the_cam_is_a_heat_map_over_the_roi_only(page):
    with_cam, without = (
        _png_of(_tiles(page)[i]).astype(int) for i in ("lesion_00", "lesion_00_copy")
    )
    changed = np.abs(with_cam - without).sum(axis=2) > 0
    assert changed.mean() > 0.05
    ys, xs = np.nonzero(changed)
    mask = cv2.resize(synthetic_sample(100, 128, label=0).mask, (TILE_PX, TILE_PX))
    lesion_ys, lesion_xs = np.nonzero(mask)
    # The ROI is the lesion's box enlarged by the 10 % scoring margin: nothing changes far outside it.
    margin = 0.1 * max(np.ptp(lesion_ys), np.ptp(lesion_xs)) + 4
    assert ys.min() >= lesion_ys.min() - margin and ys.max() <= lesion_ys.max() + margin
    assert xs.min() >= lesion_xs.min() - margin and xs.max() <= lesion_xs.max() + margin
    assert "CAM" in _tiles(page)["lesion_00"] and "CAM" not in _tiles(page)["lesion_00_copy"]


def test_each_tile_shows_the_prediction_and_descriptors(page):
    tile = _tiles(page)["lesion_03"]
    assert "<strong>seborrheic_keratosis</strong>" in tile and "p = 0.80" in tile
    for label in ("area", "asymmetry", "border irregularity", "diameter"):
        assert f"<th>{label}</th>" in tile


def test_a_tile_whose_source_is_gone_shows_the_mask_on_grey_and_says_so(page):
    tile = _tiles(page)[MISSING_SOURCE]
    assert "source image not readable" in tile and f"{MISSING_SOURCE}.jpg" in tile
    picture = _png_of(tile)
    assert tuple(picture[2, 2]) == (MISSING_SOURCE_GREY,) * 3
    assert np.all(picture == CONTOUR_RGB, axis=2).any()
    for image_id in ("lesion_01", "lesion_05"):
        assert "not readable" not in _tiles(page)[image_id]


def test_the_plots_are_embedded_pngs(page):
    plots = re.findall(r'<figure class="plot">.*?</figure>', page, re.S)
    assert len(plots) == 2
    assert "Predicted class" in plots[0] and "Lesion size" in plots[1]
    for plot in plots:
        assert min(_png_of(plot).shape[:2]) > 100


def test_the_errors_table_lists_every_error_with_markup_escaped(scoring_output, page):
    errors = page.split('<section id="errors">')[1]
    for name, *_ in ERRORS:
        assert str(scoring_output / "archive" / name) in errors
    assert "<script>" not in page
    assert "&lt;script&gt;alert(&#x27;owned&#x27;)&lt;/script&gt;" in errors


def test_a_missing_output_root_or_run_date_is_a_report_error(tmp_path, scoring_output):
    with pytest.raises(ReportError, match="output root not found"):
        build_report(str(tmp_path / "nowhere"))
    with pytest.raises(ReportError, match="no results partitions"):
        build_report(str(tmp_path))
    with pytest.raises(ReportError, match="no results for run_date=2020-01-01"):
        build_report(str(scoring_output), "2020-01-01")
    with pytest.raises(ReportError, match="YYYY-MM-DD"):
        build_report(str(scoring_output), "../results")


def test_an_output_root_on_s3_reads_like_a_local_one(scoring_output, page, s3_bucket):
    output = f"{s3_bucket}/scoring"
    for path in scoring_output.rglob("*"):
        relative = path.relative_to(scoring_output).as_posix()
        if path.is_file() and relative.startswith(("results/", "errors/", "summaries/")):
            io.write_bytes(f"{output}/{relative}", path.read_bytes())
    on_s3 = build_report(output, sample_size=100)
    assert on_s3.replace(output, str(scoring_output)) == page
    done = _run_cli("--output", output, "--sample-size", "2")
    assert done.returncode == 0, done.stderr
    assert io.exists(f"{output}/reports/run_date={RUN_DATE}/report.html")


# The sample


def test_the_stratified_sample_favours_no_class_and_keeps_the_rarest_when_short():
    classes = ["nevus"] * 50 + ["melanoma"] * 3 + ["seborrheic_keratosis"] * 1
    picked = stratified_sample(classes, 9, seed=3)
    shown = [classes[i] for i in picked]
    assert shown.count("seborrheic_keratosis") == 1 and shown.count("melanoma") == 3
    assert shown.count("nevus") == 5 and len(set(picked)) == 9 and picked == sorted(picked)
    assert {classes[i] for i in stratified_sample(classes, 2, seed=3)} == {
        "melanoma",
        "seborrheic_keratosis",
    }
    assert stratified_sample(classes, 9, seed=3) == picked
    assert stratified_sample(classes, 0) == [] and len(stratified_sample(classes, 500)) == 54


# The command line


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "jobs" / "report.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_the_cli_writes_the_report_under_the_output_root_by_default(scoring_output):
    done = _run_cli("--output", str(scoring_output), "--sample-size", "4")
    assert done.returncode == 0, done.stderr
    written = scoring_output / "reports" / f"run_date={RUN_DATE}" / "report.html"
    assert str(written) in done.stdout
    assert written.read_text().count('<figure class="tile"') == 4


def test_the_cli_writes_where_it_is_told(scoring_output, tmp_path):
    target = tmp_path / "out" / "report.html"
    done = _run_cli(
        "--output", str(scoring_output), "--run-date", OLD_RUN_DATE, "--html", str(target)
    )
    assert done.returncode == 0, done.stderr
    assert OLD_RUN_ID in target.read_text()


@pytest.mark.parametrize("make_root", ["missing", "empty"])
def test_the_cli_says_error_in_one_line_and_exits_2_without_results(tmp_path, make_root):
    root = tmp_path / "scoring"
    if make_root == "empty":
        root.mkdir()
    done = _run_cli("--output", str(root))
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr


_TRUST_COLUMNS = ("class_entropy", "ood_score", "ood", "skin_tone")


def test_the_trust_section_shows_calibration_uncertainty_ood_and_skin_tone(tmp_path):
    from skinray.models import read_model_config

    images = tmp_path / "archive"
    images.mkdir()
    tones = ["very_light"] * 6 + ["light", "intermediate", "tan", None]
    released = read_model_config("ham10000-classifier").config_sha256
    rows = [
        _result_row(images, *spec)
        | {
            # As the pipeline writes it: the architecture, and the released model's config hash,
            # by which its reliability diagram is found.
            "classifier": "classifier",
            "classifier_config_sha256": released,
            "class_entropy": 0.1 * i,
            "ood_score": 0.3 + 0.03 * i,
            "ood": i >= 8,
            "skin_tone": tones[i],
        }
        for i, spec in enumerate(IMAGES)
    ]
    _write_partition(
        tmp_path / "results", RUN_DATE, pa.Table.from_pylist(rows, result_schema(CLASSES))
    )
    page = build_report(str(tmp_path))
    section = re.search(r'<section id="trust">.*?</section>', page, re.S).group(0)
    plots = re.findall(r'<figure class="plot">.*?</figure>', section, re.S)
    assert len(plots) == 4
    assert "Calibration" in plots[0] and "2 of 10 images flagged (20.0%)" in plots[2]
    assert "Skin tone" in plots[3]
    diagram = (zoo_root() / "ham10000-classifier" / "reliability.png").read_bytes()
    assert base64.b64encode(diagram).decode() in plots[0]
    # Its temperature was fitted on the images it shows: the caption says so, with the release's
    # out-of-fold ECE beside it.
    assert "Calibration of ham10000-classifier" in plots[0] and "in-sample" in plots[0]
    released = json.loads((zoo_root() / "ham10000-classifier" / "metrics.json").read_text())
    out_of_fold = released["calibration"]["after_out_of_fold"]["ece"]
    assert f"ECE out of fold: {out_of_fold:.4f}" in plots[0]
    # Recalibrated (another config hash): the released diagram does not describe it.
    other = [row | {"classifier_config_sha256": "0" * 64} for row in rows]
    _write_partition(
        tmp_path / "other" / "results",
        RUN_DATE,
        pa.Table.from_pylist(other, result_schema(CLASSES)),
    )
    section = re.search(
        r'<section id="trust">.*?</section>', build_report(str(tmp_path / "other")), re.S
    )
    assert "Calibration" not in section.group(0)
    # An incremental run added to a date scored before the trust columns: its first file lacks
    # them, and they are still read from the files that have them.
    later = {*_TRUST_COLUMNS, "classifier_config_sha256"}
    before = pa.schema([f for f in result_schema(CLASSES) if f.name not in later])
    folder = tmp_path / "mixed" / "results" / f"run_date={RUN_DATE}"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:1], before), folder / "part-a-old-00000.parquet")
    newer = pa.Table.from_pylist(rows[1:], result_schema(CLASSES))
    newer = newer.set_column(  # and a file whose writer widened a column (Spark, DuckDB)
        newer.schema.get_field_index("width"), "width", newer["width"].cast(pa.int64())
    )
    pq.write_table(newer, folder / "part-b-new-00000.parquet")
    page = build_report(str(tmp_path / "mixed"))
    section = re.search(r'<section id="trust">.*?</section>', page, re.S).group(0)
    assert len(re.findall(r'<figure class="plot">', section)) == 4


def test_a_segmenter_alone_is_described_as_giving_masks_only(tmp_path):
    images = tmp_path / "archive"
    images.mkdir()
    rows = [
        _result_row(images, *spec) | {"predicted_class": None, "classifier": None}
        for spec in IMAGES
    ]
    _write_partition(
        tmp_path / "results", RUN_DATE, pa.Table.from_pylist(rows, result_schema(CLASSES))
    )
    header = build_report(str(tmp_path)).split('<section id="samples">')[0]
    assert re.search(r"predicted classes</dt><dd>0</dd>", header)
    assert "(none: masks only)" in header and "(joint model)" not in header


def test_rows_without_uncertainty_or_skin_tone_give_no_trust_section(page):
    assert 'id="trust"' not in page


def test_the_class_counts_of_one_run_leave_out_the_rows_earlier_runs_left_on_its_date(tmp_path):
    # An incremental run adds its rows to the date's partition: the job's "classes" line is
    # about what this run scored.
    images = tmp_path / "archive"
    images.mkdir()
    rows = [
        _result_row(images, *spec) | {"run_id": "earlier" if i < 4 else "this"}
        for i, spec in enumerate(IMAGES)
    ]
    _write_partition(
        tmp_path / "results", RUN_DATE, pa.Table.from_pylist(rows, result_schema(CLASSES))
    )
    this = Counter(row["predicted_class"] for row in rows[4:])
    assert predicted_class_counts(str(tmp_path), RUN_DATE, "this") == dict(this)
    assert sum(predicted_class_counts(str(tmp_path), RUN_DATE).values()) == len(rows)


def test_an_image_with_rows_from_two_runs_is_counted_once_at_its_latest(tmp_path):
    # A commit cut short between its moves and its deletes leaves both runs' rows on the date.
    images = tmp_path / "archive"
    images.mkdir()
    scored = [dt.datetime(2026, 11, 24, hour) for hour in (1, 2)]
    rows = [
        _result_row(images, *spec)
        | {"run_id": run, "scored_at": at, "ood": run == "b" and i == 0, "ood_score": 0.5}
        for run, at in zip("ab", scored, strict=True)
        for i, spec in enumerate(IMAGES)
    ]
    _write_partition(
        tmp_path / "results", RUN_DATE, pa.Table.from_pylist(rows, result_schema(CLASSES))
    )
    page = build_report(str(tmp_path))
    header = page.split('<section id="samples">')[0]
    assert re.search(rf"images scored</dt><dd>{len(IMAGES)}</dd>", header)
    assert re.search(rf"left out</dt><dd>{len(IMAGES)}</dd>", header)
    assert f"1 of {len(IMAGES)} images flagged" in page  # run b's flags, each image once
