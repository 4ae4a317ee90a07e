"""One self-contained HTML page about a night's scoring, for a dermatologist or an analyst.

``build_report(output_uri)`` reads the scoring job's ``results/`` and ``errors/`` tables
(Hive-partitioned Parquet) and run summaries for one ``run_date`` and returns the page as a string:

- a header: images scored, errors by stage and type, the runs, and the models with the SHA-256
  prefix of their weights;
- a grid of sample results, as even across predicted classes as the data allow (every class shows
  once ``sample_size`` reaches the number of classes): the source image with the predicted lesion
  border drawn over it, the class activation map as a heat map where the run stored one, the
  predicted class and its probability, and the ABCD descriptors;
- the predicted-class distribution and a histogram of lesion size (matplotlib, Agg backend);
- the first errors, with their URI, stage, type and message.

Everything is inside the page (images as base64 ``data:`` URIs, inline CSS, no script), so it can be
mailed or archived and opens without a network. Every string taken from the data is HTML-escaped.

Where the CAM lies: a joint model's CAM (no ROI box) covers the whole segmenter input; a two-step
run's covers the classifier's ROI, whose box in mask pixels the results record (``roi_top`` …
``roi_right``).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io as stdio
import json
import math
from collections import Counter
from collections.abc import Sequence

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from skinray import io
from skinray.data.decode import ImageDecodeError, decode, encode_png
from skinray.score.schema import ERROR_STAGES, ROI_BOX_COLUMNS

__all__ = [
    "ReportError",
    "build_report",
    "latest_run_date",
    "predicted_class_counts",
    "stratified_sample",
    "write_report",
]

TILE_PX = 256  # longer side of a tile's image; the source's aspect ratio is kept
CONTOUR_RGB = (255, 0, 255)  # magenta: found neither on skin nor in the JET map under it
CONTOUR_PX = 2
CAM_ALPHA = 0.4
MISSING_SOURCE_GREY = 128
MAX_ERROR_ROWS = 50
SHA256_PREFIX = 12
NO_CLASS = "(no class)"
PLOT_COLOUR = "#3b6ea8"

_PARTITIONING = pads.partitioning(pa.schema([("run_date", pa.string())]), flavor="hive")
# Read for every row of the run date; the heavy columns (PNGs) only for the sampled rows.
_OVERVIEW_COLUMNS = [
    "predicted_class",
    "equivalent_diameter_px",
    "segmenter",
    "segmenter_sha256",
    "classifier",
    "classifier_sha256",
    "run_id",
    "source_uri",
    "scored_at",
]
#: Read when the partition has them (rows written before issue #14 do not).
_TRUST_COLUMNS = ["class_entropy", "ood_score", "ood", "skin_tone", "classifier_config_sha256"]
_MODEL_COLUMNS = ["segmenter", "segmenter_sha256", "classifier", "classifier_sha256"]
_TILE_COLUMNS = [
    "image_id",
    "source_uri",
    "width",
    "height",
    "predicted_class",
    "predicted_probability",
    "lesion_area_fraction",
    "equivalent_diameter_px",
    "asymmetry",
    "border_irregularity",
    "mask_png",
    "cam_png",
    "mask_height",
    "mask_width",
    *ROI_BOX_COLUMNS,
]
_ERROR_COLUMNS = ["source_uri", "stage", "error_type", "error_message", "run_id"]


class ReportError(ValueError):
    """A report that cannot be made (no output root, no results for the date); says why."""


def build_report(
    output_uri: str,
    run_date: str | None = None,
    images_uri_root: str | None = None,
    sample_size: int = 24,
    seed: int = 0,
) -> str:
    """The HTML page for one run date of the scoring output at ``output_uri`` (local or s3://).

    ``run_date`` (YYYY-MM-DD) defaults to the latest ``results/run_date=…`` partition.
    ``images_uri_root``, when given, is where the source images are read from now: each tile's image
    is ``<images_uri_root>/<file name of source_uri>`` (a local copy of an S3 archive, say).
    ``sample_size`` tiles at most, picked by ``stratified_sample`` with ``seed``.

    >>> page = build_report("s3://analytics/skinray", "2026-11-24")  # doctest: +SKIP
    """
    _require_output_root(output_uri)
    run_date = _checked_date(run_date) if run_date else latest_run_date(output_uri)
    results = _partition_dataset(output_uri, "results", run_date)
    if results is None:
        raise ReportError(f"no results for run_date={run_date} under {output_uri}")
    present = set(results.schema.names)
    overview = results.to_table(
        columns=_OVERVIEW_COLUMNS + [c for c in _TRUST_COLUMNS if c in present]
    )
    kept = latest_row_per_image(overview)
    repeated = overview.num_rows - len(kept)
    overview = overview.take(pa.array(kept))
    errors = _read_errors(output_uri, run_date)
    if overview.num_rows == 0 and errors.num_rows == 0:
        raise ReportError(f"run_date={run_date} under {output_uri} has no rows")
    picked = stratified_sample(overview["predicted_class"].to_pylist(), sample_size, seed)
    tiles = results.take(pa.array(kept[picked], pa.int64()), columns=_TILE_COLUMNS).to_pylist()
    sections = [
        _header_html(output_uri, run_date, overview, errors, repeated),
        _summary_html(overview, errors, _read_summaries(output_uri, run_date)),
        _samples_html(tiles, overview, images_uri_root, seed),
        _plots_html(overview),
        _trust_html(overview),
        _errors_html(errors),
    ]
    return _page_html(f"skinray scoring report · {run_date}", sections)


def write_report(output_uri: str, run_date: str, target: str | None = None, **options) -> str:
    """Build the page and write it (default ``<output>/reports/run_date=…/report.html``); its URI."""
    page = build_report(output_uri, run_date, **options)
    target = target or io.join(output_uri, "reports", f"run_date={run_date}", "report.html")
    io.write_bytes(target, page.encode("utf-8"))
    return target


def predicted_class_counts(
    output_uri: str, run_date: str, run_id: str | None = None
) -> dict[str, int]:
    """Results per predicted class in one run date's partition (no class: ``"none"``); of one
    run's rows only with ``run_id`` (an incremental run's date also holds earlier runs' rows)."""
    results = _partition_dataset(output_uri, "results", run_date)
    if results is None:
        return {}
    chosen = None if run_id is None else pc.field("run_id") == run_id
    table = results.to_table(columns=["predicted_class"], filter=chosen)
    classes = table["predicted_class"].to_pylist()
    counts: dict[str, int] = {}
    for name in classes:
        counts[name or "none"] = counts.get(name or "none", 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


def latest_run_date(output_uri: str) -> str:
    """The newest ``run_date`` with a ``results/run_date=…`` partition under ``output_uri``."""
    _require_output_root(output_uri)
    dates = _partition_dates(output_uri, "results")
    if not dates:
        raise ReportError(f"no results partitions under {io.join(output_uri, 'results')}")
    return dates[-1]


def stratified_sample(
    predicted_classes: Sequence[str | None], sample_size: int, seed: int = 0
) -> list[int]:
    """Indices (ascending) of up to ``sample_size`` rows, taken in turn from each predicted class
    in a random order fixed by ``seed``.

    Every class shows once ``sample_size`` reaches the number of classes; below that the rarest
    classes come first, since a review is there to look at them. Classes with many rows do not
    crowd out the others: the sample is as even across classes as their sizes allow.
    """
    if sample_size <= 0:
        return []
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for index, name in enumerate(predicted_classes):
        by_class.setdefault(_class_label(name), []).append(index)
    rarest_first = sorted(by_class, key=lambda name: (len(by_class[name]), name))
    queues = [rng.permutation(by_class[name]) for name in rarest_first]
    picked: list[int] = []
    for rank in range(max((len(q) for q in queues), default=0)):
        for queue in queues:
            if rank < len(queue) and len(picked) < sample_size:
                picked.append(int(queue[rank]))
    return sorted(picked)


# Reading


def _require_output_root(output_uri: str) -> None:
    if not io.exists(output_uri):
        raise ReportError(f"output root not found: {output_uri}")


def _checked_date(run_date: str) -> str:
    try:
        return dt.date.fromisoformat(run_date).isoformat()
    except ValueError:
        raise ReportError(f"run_date must be YYYY-MM-DD, got {run_date!r}") from None


def _partition_dates(output_uri: str, table: str) -> list[str]:
    fs, path = io.resolve(io.join(output_uri, table))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path))]
    dates = []
    for name in names:
        try:
            dates.append(_checked_date(name.removeprefix("run_date=")))
        except ReportError:
            continue  # not a partition folder
    return sorted(dates)


def _partition_dataset(output_uri: str, table: str, run_date: str) -> pads.Dataset | None:
    """The ``run_date`` partition of ``table`` alone (other dates are not even listed)."""
    root = io.join(output_uri, table)
    fs, root_path = io.resolve(root)
    _, path = io.resolve(io.join(root, f"run_date={run_date}"), fs)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    options = {"filesystem": fs, "format": "parquet", "partitioning": _PARTITIONING}
    dataset = pads.dataset(path, partition_base_dir=root_path, **options)
    if not dataset.files:
        return None
    # Every file's columns: a date an incremental run added to holds files from before a column
    # was added, and the first file's schema alone would hide the column in all of them.
    schemas = [f.physical_schema for f in dataset.get_fragments()] + [dataset.schema]
    try:  # dataset.schema brings the run_date partition field; a widened type is read as widened
        schema = pa.unify_schemas(schemas, promote_options="permissive")
    except pa.ArrowException as error:
        raise ReportError(f"{path}: its files' columns do not agree ({error})") from None
    return pads.dataset(path, partition_base_dir=root_path, schema=schema, **options)


def _read_errors(output_uri: str, run_date: str) -> pa.Table:
    dataset = _partition_dataset(output_uri, "errors", run_date)
    if dataset is None:
        return pa.table({name: pa.array([], pa.string()) for name in _ERROR_COLUMNS})
    return dataset.to_table(columns=_ERROR_COLUMNS)


def _read_summaries(output_uri: str, run_date: str) -> dict[str, dict]:
    """The run summaries written for ``run_date``, by run id; unreadable ones are left out."""
    folder = io.join(output_uri, "summaries", f"run_date={run_date}")
    fs, path = io.resolve(folder)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return {}
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path)))
    summaries = {}
    for name in (n for n in names if n.endswith(".json")):
        try:
            summary = json.loads(io.read_bytes(io.join(folder, name)))
        except (OSError, ValueError):
            continue
        if isinstance(summary, dict) and "run_id" in summary:
            summaries[str(summary["run_id"])] = summary
    return summaries


# Tile images


def _tile_image(row: dict, images_uri_root: str | None) -> tuple[np.ndarray, list[str]]:
    """The tile's RGB picture and notes on what could not be shown."""
    size = _tile_size(row["height"], row["width"])
    stored_mask = _stored_mask(row["mask_png"])
    notes = [] if stored_mask is not None else ["no readable mask stored"]
    try:
        rgb = _source_rgb(_image_uri(row["source_uri"], images_uri_root), size)
    except (OSError, ValueError) as error:  # gone, unreadable, or no longer decodes
        rgb = _grey_canvas(stored_mask, size)
        notes.append(f"source image not readable, mask shown on grey: {error}")
    if row["cam_png"]:
        rgb = _overlay_cam(rgb, row["cam_png"], _cam_box(row))
    if stored_mask is not None:
        _draw_contour(rgb, _resize_mask(stored_mask, size))
    return rgb, notes


def _tile_size(height: int | None, width: int | None) -> tuple[int, int]:
    if not height or not width:
        return TILE_PX, TILE_PX
    scale = TILE_PX / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _image_uri(source_uri: str, images_uri_root: str | None) -> str:
    if images_uri_root is None:
        return source_uri
    return io.join(images_uri_root, source_uri.rstrip("/").rsplit("/", 1)[-1])


def _source_rgb(uri: str, size: tuple[int, int]) -> np.ndarray:
    return decode(io.read_bytes(uri), size, source=uri).rgb.copy()


def _stored_mask(mask_png: bytes | None) -> np.ndarray | None:
    """The mask as stored (segmenter resolution), 1 inside the lesion."""
    if not mask_png:
        return None
    try:
        return (decode(mask_png, source="mask_png").rgb[..., 0] > 127).astype(np.uint8)
    except ImageDecodeError:
        return None


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    # Linear then threshold: a smooth border rather than nearest-neighbour steps when upsampling.
    scaled = cv2.resize(mask * 255, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return (scaled > 127).astype(np.uint8)


def _grey_canvas(mask: np.ndarray | None, size: tuple[int, int]) -> np.ndarray:
    """Grey stand-in for a source image that is gone, the lesion a lighter grey."""
    canvas = np.full((*size, 3), MISSING_SOURCE_GREY, np.uint8)
    if mask is not None:
        canvas[_resize_mask(mask, size) > 0] = MISSING_SOURCE_GREY + 48
    return canvas


def _cam_box(row: dict) -> tuple[float, float, float, float]:
    """(top, left, bottom, right) of the CAM's frame as fractions of the image."""
    box = [row[name] for name in ROI_BOX_COLUMNS]
    if any(v is None for v in box) or not row["mask_height"] or not row["mask_width"]:
        return 0.0, 0.0, 1.0, 1.0  # a joint model's CAM covers its whole input
    top, left, bottom, right = box
    height, width = row["mask_height"], row["mask_width"]
    return top / height, left / width, bottom / height, right / width


def _overlay_cam(
    rgb: np.ndarray, cam_png: bytes, box: tuple[float, float, float, float]
) -> np.ndarray:
    height, width = rgb.shape[:2]
    y0, y1 = round(box[0] * height), max(round(box[2] * height), round(box[0] * height) + 1)
    x0, x1 = round(box[1] * width), max(round(box[3] * width), round(box[1] * width) + 1)
    try:
        cam = decode(cam_png, source="cam_png").rgb[..., 0]
    except ImageDecodeError:
        return rgb
    # Bilinear: a CAM is a coarse grid (14×14 for Xception) of a smooth map, not of blocks.
    cam = cv2.resize(cam, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    heat = cv2.cvtColor(cv2.applyColorMap(cam, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    rgb[y0:y1, x0:x1] = cv2.addWeighted(rgb[y0:y1, x0:x1], 1 - CAM_ALPHA, heat, CAM_ALPHA, 0)
    return rgb


def _draw_contour(rgb: np.ndarray, mask: np.ndarray) -> None:
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(rgb, contours, -1, CONTOUR_RGB, CONTOUR_PX)


def _png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# Plots


def _figure_png(figure: Figure) -> bytes:
    buffer = stdio.BytesIO()
    FigureCanvasAgg(figure).print_png(buffer)
    return buffer.getvalue()


def _class_distribution_png(classes: Sequence[str | None]) -> bytes:
    counts = Counter(_class_label(c) for c in classes)
    names = sorted(counts, key=lambda name: (counts[name], name))  # largest bar on top
    return _bar_chart_png(names, counts, "Predicted class")


def _bar_chart_png(names: Sequence[str], counts: Counter, title: str) -> bytes:
    """Horizontal bars of ``counts`` in the order of ``names`` (the first at the bottom)."""
    figure = Figure(figsize=(5.6, 1.2 + 0.45 * len(names)), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    bars = axes.barh(names, [counts.get(n, 0) for n in names], color=PLOT_COLOUR)
    axes.bar_label(bars, padding=3)
    axes.set_xlabel("images")
    axes.set_title(title)
    axes.margins(x=0.15)
    axes.spines[["top", "right"]].set_visible(False)
    return _figure_png(figure)


# HTML


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _class_label(name: str | None) -> str:
    return NO_CLASS if name is None else name


def _number(value: float | None, spec: str, unit: str = "") -> str:
    """``value`` formatted, with ``unit``; a dash for a missing value (null or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec) + unit


def _sha_prefix(sha256: str | None) -> str:
    return "–" if not sha256 else sha256[:SHA256_PREFIX] + "…"


def _table_html(headers: Sequence[str], rows: Sequence[Sequence[object]], css: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_e(c)}</td>' if isinstance(c, int | float) else f"<td>{_e(c)}</td>"
            for c in row
        )
        + "</tr>\n"
        for row in rows
    )
    return f'<table class="{_e(css)}">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>'


def _page_html(title: str, sections: Sequence[str]) -> str:
    body = "\n".join(s for s in sections if s)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n{body}\n"
        "</body>\n</html>\n"
    )


def latest_row_per_image(results: pa.Table) -> np.ndarray:
    """Row indices of ``results`` (``source_uri``, ``scored_at``), the latest row of each image,
    in row order. A date holds two rows of an image only after a commit cut short between its
    moves and its deletes (``skinray.score.commit``); counting both would count it twice."""
    if not results.num_rows:
        return np.zeros(0, np.int64)
    ordered = results.select(["source_uri", "scored_at"]).append_column(
        "row", pa.array(np.arange(results.num_rows))
    )
    ordered = ordered.sort_by([("source_uri", "ascending"), ("scored_at", "descending")])
    uris = ordered["source_uri"].to_numpy(zero_copy_only=False)
    first = np.ones(len(uris), bool)
    first[1:] = uris[1:] != uris[:-1]
    return np.sort(ordered["row"].to_numpy()[first])


def _header_html(
    output_uri: str, run_date: str, overview: pa.Table, errors: pa.Table, repeated: int = 0
) -> str:
    classes = len(set(overview["predicted_class"].drop_null().to_pylist()))
    facts = [
        ("images scored", f"{overview.num_rows:,}"),
        ("errors", f"{errors.num_rows:,}"),
        ("predicted classes", f"{classes}"),
        ("runs", f"{len(_run_ids(overview, errors))}"),
    ]
    if repeated:  # a commit cut short: the date holds an image's rows from two runs
        facts.append(("older rows of images scored again, left out", f"{repeated:,}"))
    items = "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in facts)
    return (
        f"<header>\n<h1>Scoring report · run date {_e(run_date)}</h1>\n"
        f'<p class="source">output <code>{_e(output_uri)}</code></p>\n'
        f'<dl class="facts">{items}</dl>\n</header>'
    )


def _run_ids(overview: pa.Table, errors: pa.Table) -> list[str]:
    return sorted(set(overview["run_id"].to_pylist()) | set(errors["run_id"].to_pylist()))


def _summary_html(overview: pa.Table, errors: pa.Table, summaries: dict[str, dict]) -> str:
    return (
        '<section class="summary">\n'
        f"<div>\n<h2>Runs</h2>\n{_runs_table(overview, errors, summaries)}\n</div>\n"
        f"<div>\n<h2>Models</h2>\n{_models_table(overview)}\n</div>\n"
        f"<div>\n<h2>Errors by stage and type</h2>\n{_error_counts_table(errors)}\n</div>\n"
        "</section>"
    )


def _runs_table(overview: pa.Table, errors: pa.Table, summaries: dict[str, dict]) -> str:
    results_by_run = Counter(overview["run_id"].to_pylist())
    errors_by_run = Counter(errors["run_id"].to_pylist())
    rows = []
    for run_id in _run_ids(overview, errors):  # a run whose rows a re-run replaced is gone
        summary = summaries.get(run_id, {})
        rows.append(
            [
                run_id,
                results_by_run[run_id],
                errors_by_run[run_id],
                summary.get("inputs_listed", "–"),
                _number(summary.get("wall_time_s"), ".1f"),
                _number(summary.get("images_per_s"), ".1f"),
            ]
        )
    headers = ["run id", "scored", "errors", "listed", "wall time (s)", "images/s"]
    return _table_html(headers, rows, "runs")


def _models_table(overview: pa.Table) -> str:
    classifies = [c is not None for c in overview["predicted_class"].to_pylist()]
    columns = [overview[c].to_pylist() for c in _MODEL_COLUMNS]
    counts = Counter(zip(*columns, classifies, strict=True))
    rows = [
        [
            segmenter,
            _sha_prefix(seg_sha),
            _classifier_label(classifier, diagnoses),
            _sha_prefix(cls_sha),
            n,
        ]
        for (segmenter, seg_sha, classifier, cls_sha, diagnoses), n in sorted(
            counts.items(), key=lambda item: -item[1]
        )
    ]
    headers = ["segmenter", "weights sha256", "classifier", "weights sha256", "images"]
    return _table_html(headers, rows, "models")


def _classifier_label(classifier: str | None, diagnoses: bool) -> str:
    if classifier:
        return classifier
    return "(joint model)" if diagnoses else "(none: masks only)"


def _error_counts_table(errors: pa.Table) -> str:
    if errors.num_rows == 0:
        return '<p class="quiet">No errors.</p>'
    counts = Counter(
        zip(errors["stage"].to_pylist(), errors["error_type"].to_pylist(), strict=True)
    )
    rows = [[stage, error_type, n] for (stage, error_type), n in counts.items()]
    rows.sort(key=lambda row: (_stage_order(row[0]), -row[2], row[1]))
    return _table_html(["stage", "error type", "count"], rows, "error-counts")


def _stage_order(stage: str) -> int:
    return ERROR_STAGES.index(stage) if stage in ERROR_STAGES else len(ERROR_STAGES)


def _samples_html(
    tiles: list[dict], overview: pa.Table, images_uri_root: str | None, seed: int
) -> str:
    counts = Counter(_class_label(c) for c in overview["predicted_class"].to_pylist())
    lede = (
        f"{len(tiles)} of {overview.num_rows:,} results, picked at random (seed {seed}) as evenly "
        "across predicted classes as the data allow. Magenta line: predicted lesion border; "
        "heat map (where shown): class activation map of the predicted class."
    )
    groups = []
    for name in sorted({_class_label(t["predicted_class"]) for t in tiles}):
        group = [t for t in tiles if _class_label(t["predicted_class"]) == name]
        group.sort(key=lambda t: (-(t["predicted_probability"] or 0.0), t["source_uri"]))
        figures = "\n".join(_tile_html(t, images_uri_root) for t in group)
        groups.append(
            f'<h3>{_e(name)} <span class="quiet">({len(group)} of {counts[name]:,} shown)'
            f'</span></h3>\n<div class="grid">\n{figures}\n</div>'
        )
    body = "\n".join(groups) or '<p class="quiet">No results on this date.</p>'
    return f'<section id="samples">\n<h2>Sample results</h2>\n<p class="lede">{_e(lede)}</p>\n{body}\n</section>'


def _tile_html(row: dict, images_uri_root: str | None) -> str:
    rgb, notes = _tile_image(row, images_uri_root)
    height, width = rgb.shape[:2]
    name = _class_label(row["predicted_class"])
    descriptors = [
        ("area", _number(_percent(row["lesion_area_fraction"]), ".1f", " %")),
        ("diameter", _number(row["equivalent_diameter_px"], ".0f", " px")),
        ("asymmetry", _number(row["asymmetry"], ".2f")),
        ("border irregularity", _number(row["border_irregularity"], ".2f")),
    ]
    cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in descriptors)
    note_html = "".join(f'<p class="note">{_e(n)}</p>' for n in notes)
    cam = ' <span class="badge">CAM</span>' if row["cam_png"] else ""
    return (
        f'<figure class="tile" data-class="{_e(name)}" data-image-id="{_e(row["image_id"])}">\n'
        f'<div class="picture" style="height: {TILE_PX}px">'
        f'<img src="{_png_data_uri(encode_png(rgb))}" width="{width}" height="{height}" '
        f'alt="{_e(row["image_id"])}: predicted lesion border over the source image"></div>\n'
        f'<figcaption>\n<p class="prediction"><strong>{_e(name)}</strong> '
        f'<span class="probability">p = {_e(_number(row["predicted_probability"], ".2f"))}</span>'
        f"{cam}</p>\n"
        f'<table class="descriptors">{cells}</table>\n'
        f'<p class="uri" title="{_e(row["source_uri"])}">{_e(row["image_id"])}</p>\n'
        f"{note_html}</figcaption>\n</figure>"
    )


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else fraction * 100


def _plots_html(overview: pa.Table) -> str:
    if overview.num_rows == 0:
        return ""
    plots = [
        (
            "Predicted class of every scored image",
            _class_distribution_png(overview["predicted_class"].to_pylist()),
        ),
        (
            "Lesion size: equivalent diameter of the largest lesion component",
            _histogram_png(
                overview,
                "equivalent_diameter_px",
                "equivalent diameter (px of the source image)",
                "Lesion size",
            ),
        ),
    ]
    return _plots_section("distributions", "Distributions", plots)


def _trust_html(overview: pa.Table) -> str:
    """How far to trust the run's predictions: the classifier's reliability diagram (from its
    release), the entropy and OOD-score distributions, and the archive's skin-tone mix."""
    plots = [
        _reliability(overview),
        (
            "Predictive entropy of the class probabilities (0: certain, 1: uniform)",
            _histogram_png(overview, "class_entropy", "normalised entropy", "Uncertainty"),
        ),
        (
            _ood_caption(overview),
            _histogram_png(
                overview,
                "ood_score",
                "ood_score (distance from the training data)",
                "Out-of-distribution score",
            ),
        ),
        ("Skin tone of the skin around the lesion (ITA category)", _skin_tone_png(overview)),
    ]
    return _plots_section("trust", "Uncertainty, out-of-distribution images and skin tone", plots)


def _plots_section(section_id: str, title: str, plots: list[tuple[str, bytes | None]]) -> str:
    """A section of embedded PNG figures with captions; empty when no plot has a PNG."""
    figures = "\n".join(
        f'<figure class="plot"><img src="{_png_data_uri(png)}" alt="{_e(caption)}">'
        f"<figcaption>{_e(caption)}</figcaption></figure>"
        for caption, png in plots
        if png is not None
    )
    if not figures:
        return ""
    return (
        f'<section id="{section_id}">\n<h2>{_e(title)}</h2>\n<div class="plots">\n{figures}\n'
        "</div>\n</section>"
    )


def _reliability(overview: pa.Table) -> tuple[str, bytes | None]:
    """(caption, PNG) of the reliability diagram a released classifier of the run shipped with.
    Rows name the classifier's architecture, not its release, so it is found by its config hash
    (weights, temperature and every other setting the diagram depends on). Its temperature was
    fitted on the images the diagram shows, which the caption says, with the out-of-fold ECE
    where the release measured one."""
    from skinray.models import read_model_config
    from skinray.models.zoo import released_models, zoo_root

    column = "classifier_config_sha256"
    if not overview.num_rows or column not in overview.column_names:
        return "", None
    hashes = set(overview[column].drop_null().to_pylist())
    for name in released_models():
        folder = str(zoo_root() / name)
        try:
            if read_model_config(folder).config_sha256 in hashes:
                return _reliability_caption(name, folder), io.read_bytes(
                    io.join(folder, "reliability.png")
                )
        except (FileNotFoundError, OSError, ValueError):  # a report, never a reason to fail
            continue
    return "", None


def _reliability_caption(name: str, folder: str) -> str:
    caption = (
        f"Calibration of {name} on its validation split (from its release; the temperature was "
        "fitted on these images, so the 'after' panel is in-sample"
    )
    try:
        held = json.loads(io.read_bytes(io.join(folder, "metrics.json")))["calibration"]
        caption += f"; ECE out of fold: {held['after_out_of_fold']['ece']:.4f}"
    except (FileNotFoundError, OSError, ValueError, KeyError, TypeError):
        pass
    return caption + ")"


def _ood_caption(overview: pa.Table) -> str:
    if "ood" not in overview.column_names:
        return "Out-of-distribution score"
    flags = [f for f in overview["ood"].to_pylist() if f is not None]
    flagged = sum(flags)
    share = f" ({flagged / len(flags):.1%})" if flags else ""
    return f"Out-of-distribution score: {flagged} of {len(flags)} images flagged{share}"


def _histogram_png(overview: pa.Table, column: str, label: str, title: str) -> bytes | None:
    if column not in overview.column_names:
        return None
    values = overview[column].to_numpy(zero_copy_only=False).astype(float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    figure = Figure(figsize=(5.6, 3.2), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    axes.hist(values, bins=min(40, max(5, int(math.sqrt(values.size)))), color=PLOT_COLOUR)
    axes.set_xlabel(label)
    axes.set_ylabel("images")
    axes.set_title(title)
    axes.spines[["top", "right"]].set_visible(False)
    return _figure_png(figure)


def _skin_tone_png(overview: pa.Table) -> bytes | None:
    from skinray.skin_tone import ITA_CATEGORIES

    if "skin_tone" not in overview.column_names:
        return None
    counts = Counter(t for t in overview["skin_tone"].to_pylist() if t)
    if not counts:
        return None
    names = [name for _, name in reversed(ITA_CATEGORIES)]  # dark at the bottom
    return _bar_chart_png(names, counts, "Skin tone (ITA)")


def _errors_html(errors: pa.Table) -> str:
    if errors.num_rows == 0:
        return '<section id="errors">\n<h2>Errors</h2>\n<p class="quiet">No errors.</p>\n</section>'
    rows = [
        [r["source_uri"], r["stage"], r["error_type"], r["error_message"] or ""]
        for r in errors.to_pylist()
    ]
    rows.sort(key=lambda row: (_stage_order(row[1]), row[2], row[0]))
    shown = rows[:MAX_ERROR_ROWS]
    lede = f"{len(shown)} of {len(rows):,} errors, by stage and type."
    table = _table_html(["source uri", "stage", "error type", "message"], shown, "errors")
    return f'<section id="errors">\n<h2>Errors</h2>\n<p class="lede">{_e(lede)}</p>\n{table}\n</section>'


_CSS = """
:root { color-scheme: light; --ink: #1d2330; --quiet: #5b6577; --line: #d9dee7; --panel: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1400px; padding: 24px 32px 48px; color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 28px 0 10px; }
h3 { font-size: 15px; margin: 20px 0 8px; }
code { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.source { color: var(--quiet); margin: 0 0 12px; overflow-wrap: anywhere; }
.quiet, .lede { color: var(--quiet); }
.facts { display: flex; flex-wrap: wrap; gap: 12px; margin: 0; }
.facts div { background: var(--panel); border: 1px solid var(--line); border-radius: 6px;
  padding: 8px 16px; min-width: 140px; }
.facts dt { color: var(--quiet); font-size: 12px; }
.facts dd { margin: 0; font-size: 22px; font-weight: 600; }
.summary { display: flex; flex-wrap: wrap; gap: 8px 40px; align-items: flex-start; }
.summary h2 { margin-top: 20px; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: 4px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
thead th { font-weight: 600; background: var(--panel); }
td.num, table.runs td + td { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(272px, 1fr)); gap: 16px; }
.tile { margin: 0; padding: 8px; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
.picture { display: flex; align-items: center; justify-content: center; background: var(--panel); }
.picture img { display: block; max-width: 100%; max-height: 100%; width: auto; height: auto; }
.tile figcaption { margin-top: 6px; }
.tile p { margin: 2px 0; }
.prediction strong { font-size: 15px; }
.probability { color: var(--quiet); margin-left: 4px; }
.badge { font-size: 11px; background: #fde8c8; color: #7a4a00; border-radius: 3px; padding: 0 5px; }
.descriptors { width: 100%; font-size: 12px; }
.descriptors th, .descriptors td { padding: 1px 4px; border: 0; font-weight: normal; }
.descriptors th { color: var(--quiet); }
.descriptors td { text-align: right; font-variant-numeric: tabular-nums; }
.uri { font-size: 12px; color: var(--quiet); overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.note { font-size: 12px; color: #9b1c1c; background: #fdecec; border-radius: 3px; padding: 2px 6px;
  overflow-wrap: anywhere; }
.plots { display: flex; flex-wrap: wrap; gap: 24px; }
.plot { margin: 0; }
.plot img { display: block; max-width: 100%; height: auto; }
.plot figcaption { color: var(--quiet); font-size: 12px; }
table.errors { width: 100%; font-size: 12px; }
table.errors td:first-child, table.errors td:last-child { overflow-wrap: anywhere; }
"""
