"""The scoring job's output tables: fixed Arrow schemas with only standard types.

Results and errors are Hive-partitioned by ``run_date`` (``results/run_date=2026-11-24/part-….parquet``),
so DuckDB, Spark and Athena read them with no plug-in. ``docs/output-schema.md`` documents every
column; a test checks the two agree.

The result table has one ``prob_<class>`` column per class of the classifier that scored the run, in
the classifier's class order (``prob_melanoma``, ``prob_seborrheic_keratosis``, ``prob_nevus`` for an
ISIC 2017 model), so its exact column list is fixed by the models a run uses.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import pyarrow as pa

from skinray.score.roi import DESCRIPTOR_NAMES

__all__ = [
    "ERROR_STAGES",
    "ROI_BOX_COLUMNS",
    "UNCERTAINTY_COLUMNS",
    "error_schema",
    "probability_column",
    "result_schema",
]

ERROR_STAGES = ("list", "read", "decode", "predict", "write")
#: The classifier's ROI in mask pixels (bottom and right exclusive), as
#: ``skinray.models.two_step.lesion_boxes`` cut it.
ROI_BOX_COLUMNS = ("roi_top", "roi_left", "roi_bottom", "roi_right")
#: Per-image uncertainty of the classification (``skinray.uncertainty``, ``skinray.ood``).
UNCERTAINTY_COLUMNS = ("class_entropy", "ood_score", "flip_disagreement")
TIMESTAMP = pa.timestamp("ms", tz="UTC")

_RESULT_HEAD = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("source_size_bytes", pa.int64()),
    pa.field("source_etag", pa.string()),
    pa.field("content_sha256", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("predicted_class", pa.string()),
    pa.field("predicted_probability", pa.float32()),
]
_RESULT_TAIL = [
    *(pa.field(name, pa.float32()) for name in UNCERTAINTY_COLUMNS),
    pa.field("ood", pa.bool_()),
    *(pa.field(name, pa.float32()) for name in DESCRIPTOR_NAMES if name != "component_count"),
    pa.field("component_count", pa.int32()),
    pa.field("skin_ita_deg", pa.float32()),
    pa.field("skin_tone", pa.string()),
    pa.field("mask_png", pa.binary()),
    pa.field("mask_height", pa.int32()),
    pa.field("mask_width", pa.int32()),
    *(pa.field(name, pa.int32()) for name in ROI_BOX_COLUMNS),
    pa.field("cam_png", pa.binary()),
    pa.field("segmenter", pa.string()),
    pa.field("segmenter_sha256", pa.string()),
    pa.field("segmenter_config_sha256", pa.string()),
    pa.field("classifier", pa.string()),
    pa.field("classifier_sha256", pa.string()),
    pa.field("classifier_config_sha256", pa.string()),
    pa.field("decode", pa.string()),
    pa.field("decode_scale", pa.int8()),
    pa.field("backend", pa.string()),
    pa.field("int8_calibration_sha256", pa.string()),
    pa.field("backend_versions", pa.string()),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("scored_at", TIMESTAMP),
]


def probability_column(class_name: str) -> str:
    """``prob_<class>``, with anything but letters, digits and ``_`` turned into ``_``, lower case."""
    return "prob_" + re.sub(r"[^0-9a-zA-Z_]", "_", class_name).lower()


def result_schema(class_names: Sequence[str]) -> pa.Schema:
    columns = [probability_column(c) for c in class_names]
    if len(set(columns)) != len(columns):
        raise ValueError(f"class names {list(class_names)} collide as columns {columns}")
    return pa.schema([*_RESULT_HEAD, *(pa.field(c, pa.float32()) for c in columns), *_RESULT_TAIL])


def error_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("source_uri", pa.string(), nullable=False),
            pa.field("stage", pa.string(), nullable=False),
            pa.field("error_type", pa.string(), nullable=False),
            pa.field("error_message", pa.string()),
            pa.field("source_size_bytes", pa.int64()),
            pa.field("source_etag", pa.string()),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("failed_at", TIMESTAMP),
        ]
    )
