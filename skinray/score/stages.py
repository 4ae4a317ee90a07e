"""The scoring stages as functions of numpy batches, each testable without Ray.

A batch is a dict of equal-length columns. Every row carries ``source_uri`` from listing to the end,
and an ``error_stage`` that is empty while the row is healthy; a stage that fails on a row fills
``error_stage``, ``error_type`` and ``error_message`` and later stages pass the row through untouched.
So every listed image ends as exactly one row: a result or an error.

read → decode (CPU tasks) → predict (model actor: segmenter, or segmenter → ROI → classifier) →
describe (CPU tasks: lesion descriptors, mask PNG) → finish (rows in the output schema). The model
actor lives in ``skinray.score.actors``; this module does not import torch, so the CPU tasks' workers
never load it.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from collections.abc import Iterator

import numpy as np
import pyarrow.fs as pafs

from skinray import io
from skinray.data.decode import ImageDecodeError, decode, encode_png, screen_jpeg
from skinray.score.roi import DESCRIPTOR_NAMES, lesion_descriptors
from skinray.score.schema import ROI_BOX_COLUMNS, UNCERTAINTY_COLUMNS, probability_column
from skinray.skin_tone import individual_typology_angle, ita_category

__all__ = [
    "CPU_DECODER",
    "describe_lesions",
    "device_decoder",
    "finish_rows",
    "listing_file",
    "read_and_decode",
    "read_and_decode_listing_file",
]

#: Test hook for the actor-failure test: the first model call on an actor whose marker file does
#: not exist yet creates it and exits the process, as a crashed or preempted actor would.
KILL_ACTOR_MARKER_ENV = "SKINRAY_TEST_KILL_ACTOR_MARKER"
#: Test hook for the resume test: seconds every model call waits, so that a driver can be killed
#: while a run is surely mid-way.
PREDICT_DELAY_ENV = "SKINRAY_TEST_PREDICT_DELAY_S"
#: Which decoder made a row's model input (the results' ``decode`` column). This one is
#: ``skinray.data.decode`` in the read tasks: the path training and ``jobs/evaluate.py`` take.
CPU_DECODER = "opencv"


def device_decoder(device_type: str) -> str:
    """The segmenter actor's JPEG decoder (``--jpeg-decode-in-segmenter``) on a device of this
    type: its outputs differ from ``CPU_DECODER``'s by up to 0.1 in a class probability
    (docs/benchmarks.md, "Where JPEGs are decoded")."""
    return f"torchvision-{device_type}"


def _errors(count: int) -> dict[str, np.ndarray]:
    return {
        "error_stage": np.array([""] * count, dtype=object),
        "error_type": np.array([""] * count, dtype=object),
        "error_message": np.array([""] * count, dtype=object),
    }


def mark_failed(batch: dict, index: int, stage: str, error: BaseException) -> None:
    batch["error_stage"][index] = stage
    batch["error_type"][index] = type(error).__name__
    batch["error_message"][index] = str(error)


def healthy_rows(batch: dict) -> np.ndarray:
    return np.array([stage == "" for stage in batch["error_stage"]], dtype=bool)


@functools.cache
def _filesystem(scheme: str) -> pafs.FileSystem:
    return io.s3_filesystem() if scheme == "s3" else pafs.LocalFileSystem()


def read_and_decode(
    batch: dict, image_size: tuple[int, int], max_pixels: int, jpeg_to_segmenter: bool = False
) -> dict[str, np.ndarray]:
    """Bytes from storage, decoded and resized to the segmenter's input.

    With ``jpeg_to_segmenter``, a JPEG is only screened here (size limit, truncation; its shown
    size recorded) and its bytes go on in ``jpeg`` with its EXIF ``orientation``, for the
    segmenter actor to decode on its device; other formats are decoded here as usual."""
    uris = [str(u) for u in batch["source_uri"]]
    count = len(uris)
    height, width = image_size
    out = {
        "source_uri": np.array(uris, dtype=object),
        # Copies: Ray hands batches over read-only. Sizes may be unknown (null) until read.
        "source_size_bytes": np.array(
            [None if v is None or v != v else int(v) for v in batch["source_size_bytes"]],
            dtype=object,
        ),
        "source_etag": np.array(batch["source_etag"], dtype=object),
        "content_sha256": np.array([""] * count, dtype=object),
        "width": np.zeros(count, np.int32),
        "height": np.zeros(count, np.int32),
        "image": np.zeros((count, height, width, 3), np.uint8),
        "decode_scale": np.ones(count, np.int8),  # libjpeg's DCT scaling, 1/n: see decode()
        **_errors(count),
    }
    if jpeg_to_segmenter:
        out["jpeg"] = np.array([b""] * count, dtype=object)
        out["orientation"] = np.ones(count, np.int8)
    for i, uri in enumerate(uris):
        try:
            data = io.read_bytes(uri, _filesystem("s3" if uri.startswith("s3://") else "local"))
        except (OSError, FileNotFoundError) as error:
            mark_failed(out, i, "read", error)
            continue
        out["source_size_bytes"][i] = len(data)
        out["content_sha256"][i] = hashlib.sha256(data).hexdigest()
        try:
            screened = (
                screen_jpeg(data, max_pixels=max_pixels, source=uri) if jpeg_to_segmenter else None
            )
            if screened is not None:
                out["jpeg"][i], out["orientation"][i] = data, screened.orientation
                out["height"][i], out["width"][i] = screened.shown_size
                continue
            decoded = decode(data, (height, width), max_pixels=max_pixels, source=uri)
        except ImageDecodeError as error:
            mark_failed(out, i, "decode", error)
            continue
        out["image"][i] = decoded.rgb
        out["decode_scale"][i] = decoded.scale_denominator
        out["height"][i], out["width"][i] = decoded.original_size
    return out


def listing_file(listing_uri: str, index: int) -> str:
    """The ``index``-th (from 0) file of a listing written by ``skinray.score.sources.stage_listing``."""
    return io.join(listing_uri, f"part-{index + 1:06d}.parquet")


def read_and_decode_listing_file(
    batch: dict, listing_uri: str, rows: int, **decode_kwargs
) -> Iterator[dict[str, np.ndarray]]:
    """``read_and_decode`` over listing file ``batch["id"]``, ``rows`` rows at a time, each
    batch yielded as soon as it is decoded. The task reads its file from storage itself, so
    the listing never sits in the object store (where its blocks counted against the run's
    bound and starved the decode stage at a million images)."""
    import pyarrow.parquet as pq

    (index,) = batch["id"]
    uri = listing_file(listing_uri, int(index))
    table = pq.read_table(io.resolve(uri)[1], filesystem=io.resolve(uri)[0])
    for start in range(0, table.num_rows, rows):
        yield read_and_decode(table.slice(start, rows).to_pydict(), **decode_kwargs)


def describe_lesions(batch: dict) -> dict[str, np.ndarray]:
    """ABCD descriptors of every healthy row's predicted mask, measured at the source image's
    aspect ratio and in its pixels; the skin tone (ITA of the skin around the lesion, and its
    category); the mask as PNG; the ROI box the two-step classifier used (in
    mask pixels; NaN, null in the output, without one). The decoded image and mask are dropped."""
    count = len(batch["source_uri"])
    healthy = healthy_rows(batch)
    descriptors = {name: np.full(count, np.nan, np.float32) for name in DESCRIPTOR_NAMES}
    ita = np.full(count, np.nan, np.float32)
    mask_png = np.array([b""] * count, dtype=object)
    for i in np.flatnonzero(healthy):
        image, mask = batch["image"][i], batch["mask"][i]
        source_size = (int(batch["height"][i]), int(batch["width"][i]))
        for name, value in lesion_descriptors(mask, image, source_size=source_size).items():
            descriptors[name][i] = value
        mask_png[i] = encode_png(mask * 255)
        ita[i] = individual_typology_angle(image, mask)
    boxes = batch.pop("roi_box", np.full((count, 4), np.nan, np.float32))
    boxes = np.where(healthy[:, None], boxes, np.nan)
    batch.update(descriptors)
    batch.update({name: boxes[:, k].astype(np.float32) for k, name in enumerate(ROI_BOX_COLUMNS)})
    batch["mask_png"] = mask_png
    batch["skin_ita_deg"] = ita
    batch["skin_tone"] = np.array([ita_category(float(a)) for a in ita], dtype=object)
    batch["mask_height"] = np.full(count, batch["mask"].shape[1], np.int32)
    batch["mask_width"] = np.full(count, batch["mask"].shape[2], np.int32)
    del batch["image"], batch["mask"]
    return batch


def _cam_png(cam: np.ndarray) -> bytes:
    cam = np.maximum(cam, 0)
    peak = cam.max()
    scaled = (cam / peak * 255).astype(np.uint8) if peak > 0 else np.zeros_like(cam, np.uint8)
    return encode_png(scaled)


def _per_image(batch: dict, name: str, healthy: np.ndarray) -> np.ndarray:
    """A float column of the model stage for healthy rows; NaN (null) elsewhere or without it."""
    values = batch.get(name)
    if values is None:
        return np.full(len(healthy), np.nan, np.float32)
    return np.where(healthy, values, np.nan).astype(np.float32)


def finish_rows(
    batch: dict,
    class_names: list[str],
    models: dict[str, str],
    run_id: str,
    include_cam: bool,
) -> dict[str, np.ndarray]:
    """Rows in the output schema: result columns filled for healthy rows, error columns for others
    (``error_stage`` says which table a row goes to)."""
    count = len(batch["source_uri"])
    healthy = healthy_rows(batch)
    probabilities = batch.get(
        "class_probabilities", np.zeros((count, len(class_names)), np.float32)
    )
    predicted = probabilities.argmax(1) if probabilities.shape[1] else np.zeros(count, int)
    ood = batch.get("ood", np.zeros(count, bool))
    # A NaN score (features that are not finite) is no verdict: null, not "in distribution".
    judged = healthy & ("ood" in batch) & np.isfinite(batch.get("ood_score", np.zeros(count)))
    now = np.datetime64(dt.datetime.now(dt.UTC).replace(tzinfo=None), "ms")
    out = {
        "image_id": np.array(
            [str(u).rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0] for u in batch["source_uri"]],
            dtype=object,
        ),
        "source_uri": batch["source_uri"],
        "source_size_bytes": batch["source_size_bytes"],
        "source_etag": batch["source_etag"],
        "content_sha256": batch["content_sha256"],
        "width": batch["width"],
        "height": batch["height"],
        "predicted_class": np.array(
            [
                class_names[p] if ok and class_names else None
                for p, ok in zip(predicted, healthy, strict=True)
            ],
            dtype=object,
        ),
        "predicted_probability": np.where(
            healthy & bool(class_names),
            probabilities[np.arange(count), predicted] if count and class_names else 0,
            np.nan,
        ).astype(np.float32),
        **{
            probability_column(name): np.where(healthy, probabilities[:, c], np.nan).astype(
                np.float32
            )
            for c, name in enumerate(class_names)
        },
        **{name: _per_image(batch, name, healthy) for name in UNCERTAINTY_COLUMNS},
        "ood": np.array(
            [bool(flag) if ok else None for flag, ok in zip(ood, judged, strict=True)],
            dtype=object,
        ),
        **{name: batch[name] for name in DESCRIPTOR_NAMES},
        "skin_ita_deg": batch["skin_ita_deg"],
        "skin_tone": batch["skin_tone"],
        "mask_png": batch["mask_png"],
        "mask_height": batch["mask_height"],
        "mask_width": batch["mask_width"],
        **{name: batch[name] for name in ROI_BOX_COLUMNS},
        "cam_png": np.array(
            [
                _cam_png(batch["cam"][i]) if include_cam and "cam" in batch and healthy[i] else None
                for i in range(count)
            ],
            dtype=object,
        ),
        **{key: np.array([value] * count, dtype=object) for key, value in models.items()},
        "decode": batch.get("decode", np.array([None] * count, dtype=object)),
        "decode_scale": batch.get("decode_scale", np.ones(count, np.int8)),
        "backend": batch.get("backend", np.array([None] * count, dtype=object)),
        "int8_calibration_sha256": batch.get(
            "int8_calibration_sha256", np.array([None] * count, dtype=object)
        ),
        "backend_versions": batch.get("backend_versions", np.array([None] * count, dtype=object)),
        "run_id": np.array([run_id] * count, dtype=object),
        "scored_at": np.full(count, now),
        "error_stage": batch["error_stage"],
        "error_type": batch["error_type"],
        "error_message": batch["error_message"],
    }
    return out
