"""The nightly scoring job on Ray Data: list → read/decode → segment → ROI → classify → Parquet.

Decoding runs as CPU tasks; each model runs on an actor pool sized from the cluster (one GPU per actor
where there are GPUs, CPU actors otherwise) that Ray restarts if an actor dies, retrying its batches.
Rows stream; decoded images wait in the object store up to Ray Data's backpressure budget
when decoding outruns the models (docs/benchmarks.md), and the driver reads the staged rows (no
images, small PNG masks) to split them. The rows land in a
staging Parquet directory in one pass, then are split into ``results/run_date=…`` and
``errors/run_date=…`` with a fixed schema and a bounded number of files, replacing the partition of a
re-run (or adding to it with ``incremental``), and the staging directory is removed.
"""

from __future__ import annotations

import io as stdio
import json
import os
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from skinray import io
from skinray.models import read_model_config
from skinray.score.config import ScoreConfig, ScoreConfigError
from skinray.score.schema import error_schema, result_schema
from skinray.score.stages import (
    KILL_ACTOR_MARKER_ENV,
    ClassifyActor,
    SegmentActor,
    finish_rows,
    read_and_decode,
    roi_and_descriptors,
)

__all__ = ["RunSummary", "list_inputs", "run_scoring"]

LISTING_SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string()),
        pa.field("source_size_bytes", pa.int64()),
        pa.field("source_etag", pa.string()),
    ]
)
MANIFEST_SUFFIXES = (".csv", ".txt", ".parquet")


@dataclass
class RunSummary:
    run_id: str
    run_date: str
    inputs_listed: int
    skipped_already_scored: int
    results: int
    errors: int
    errors_by_type: dict[str, int] = field(default_factory=dict)
    errors_by_stage: dict[str, int] = field(default_factory=dict)
    wall_time_s: float = 0.0
    images_per_s: float = 0.0
    results_uri: str = ""
    errors_uri: str = ""

    def lines(self) -> list[str]:
        by_type = ", ".join(f"{k} {v}" for k, v in sorted(self.errors_by_type.items())) or "none"
        return [
            f"run {self.run_id} ({self.run_date})",
            f"  listed   {self.inputs_listed} images"
            + (
                f", {self.skipped_already_scored} already scored (incremental)"
                if self.skipped_already_scored
                else ""
            ),
            f"  results  {self.results} → {self.results_uri}",
            f"  errors   {self.errors} ({by_type}) → {self.errors_uri}",
            f"  time     {self.wall_time_s:.1f} s, {self.images_per_s:.1f} images/s",
        ]


def _pseudo_etag(info: pafs.FileInfo) -> str:
    """Where storage gives no ETag: modification time and size, which change when the file does."""
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    return f"{mtime:x}-{info.size:x}"


def _list_s3_prefix(uri: str) -> pa.Table:
    import boto3

    parsed = urlparse(uri)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client = boto3.client("s3", endpoint_url=endpoint)
    rows: dict[str, list] = {"source_uri": [], "source_size_bytes": [], "source_etag": []}
    prefix = parsed.path.lstrip("/")
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=parsed.netloc, Prefix=prefix
    ):
        for item in page.get("Contents", []):
            if item["Key"].endswith("/"):
                continue  # "folder" marker objects
            rows["source_uri"].append(f"s3://{parsed.netloc}/{item['Key']}")
            rows["source_size_bytes"].append(int(item["Size"]))
            rows["source_etag"].append(item["ETag"].strip('"'))
    return pa.table(rows, schema=LISTING_SCHEMA)


def _list_folder(uri: str) -> pa.Table:
    fs, path = io.resolve(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(
        (i for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith(".")),
        key=lambda i: i.path,
    )
    return pa.table(
        {
            "source_uri": [i.path for i in files],
            "source_size_bytes": [i.size for i in files],
            "source_etag": [_pseudo_etag(i) for i in files],
        },
        schema=LISTING_SCHEMA,
    )


def _list_manifest(uri: str) -> pa.Table:
    data = io.read_bytes(uri)
    if uri.endswith((".parquet", ".csv")):
        reader = pq.read_table if uri.endswith(".parquet") else pacsv.read_csv
        table = reader(stdio.BytesIO(data))
        column = next((c for c in ("uri", "source_uri", "image") if c in table.column_names), None)
        if column is None:
            raise ScoreConfigError(f"{uri}: needs a 'uri' column, has {table.column_names}")
        uris = [str(u) for u in table[column].to_pylist()]
    else:
        uris = [line.strip() for line in data.decode().splitlines() if line.strip()]
    base = uri.rsplit("/", 1)[0]
    uris = [u if u.startswith(("s3://", "/")) else io.join(base, u) for u in uris]
    sizes, etags = [], []
    for u in uris:
        fs, path = io.resolve(u)
        info = fs.get_file_info(path)
        found = info.type == pafs.FileType.File
        sizes.append(info.size if found else None)
        etags.append(_pseudo_etag(info) if found else None)
    return pa.table(
        {"source_uri": uris, "source_size_bytes": sizes, "source_etag": etags},
        schema=LISTING_SCHEMA,
    )


def list_inputs(uri: str) -> pa.Table:
    """Every object under an ``s3://`` prefix or local folder, or every URI in a manifest file,
    once, with its size and ETag (a modification-time/size tag where storage has no ETag)."""
    if uri.endswith(MANIFEST_SUFFIXES):
        table = _list_manifest(uri)
    elif uri.startswith("s3://"):
        table = _list_s3_prefix(uri)
    else:
        if not io.exists(uri):
            raise ScoreConfigError(f"input not found: {uri}")
        table = _list_folder(uri)
    # The same URI listed twice (a repeated manifest line) is one input.
    _, first = np.unique(np.array(table["source_uri"].to_pylist(), dtype=object), return_index=True)
    return table.take(pa.array(np.sort(first)))


def _partition(output: str, table: str, run_date: str) -> str:
    return io.join(output, table, f"run_date={run_date}")


def _already_scored(config: ScoreConfig, models: dict[str, str]) -> set[tuple[str, str]]:
    """(source_uri, etag) pairs some earlier run scored with the same models."""
    fs, path = io.resolve(io.join(config.output, "results"))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return set()
    dataset = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
    columns = ["source_uri", "source_etag", "segmenter_sha256", "classifier_sha256"]
    table = dataset.to_table(columns=columns)
    same_models = pc.and_(
        pc.equal(table["segmenter_sha256"], models["segmenter_sha256"]),
        pc.equal(pc.fill_null(table["classifier_sha256"], ""), models["classifier_sha256"] or ""),
    )
    table = table.filter(same_models)
    return set(zip(table["source_uri"].to_pylist(), table["source_etag"].to_pylist(), strict=True))


def _actor_pool(config: ScoreConfig) -> dict:
    """map_batches arguments for a model stage: pool bounds, and a GPU per actor where wanted."""
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    use_gpu = config.use_gpu if config.use_gpu is not None else gpus > 0
    upper = config.max_actors or (max(1, gpus) if use_gpu else max(1, cpus // 4))
    return dict(
        compute=ray.data.ActorPoolStrategy(min_size=min(config.min_actors, upper), max_size=upper),
        num_gpus=1 if use_gpu else 0,
        # On CPU a model actor takes half a CPU, so that on a small machine both model stages and
        # the decode tasks all get to run. Ray sets OMP_NUM_THREADS from this (minimum 1), so each
        # CPU actor runs torch on one thread (measured: bench/score_pipeline.py). Ray Data
        # restarts a dead actor and retries its batches by default (max_restarts=-1).
        num_cpus=1 if use_gpu else 0.5,
    )


def _write_table(table: pa.Table, uri: str, run_id: str, rows_per_file: int, replace: bool) -> None:
    fs, path = io.resolve(uri)
    if replace and fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir_contents(path)
    fs.create_dir(path, recursive=True)
    for index, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        chunk = table.slice(start, rows_per_file)
        if chunk.num_rows == 0 and index > 0:
            break
        pq.write_table(chunk, f"{path}/part-{run_id}-{index:05d}.parquet", filesystem=fs)


def _models(config: ScoreConfig) -> tuple[dict[str, str], list[str], tuple[int, int], tuple | None]:
    segmenter = read_model_config(config.segmenter)
    if "mask_logits" not in segmenter.outputs:
        raise ScoreConfigError(f"segmenter {config.segmenter} ({segmenter.model}) does not segment")
    classifier = read_model_config(config.classifier) if config.classifier else None
    if classifier is None and "class_logits" not in segmenter.outputs:
        raise ScoreConfigError(
            f"segmenter {config.segmenter} ({segmenter.model}) does not classify: give a classifier"
        )
    if classifier is not None and classifier.input_channels != 3:
        raise ScoreConfigError(
            f"classifier {config.classifier} takes {classifier.input_channels} channels; scoring "
            "feeds it RGB ROIs"
        )
    source = classifier or segmenter
    class_names = list(source.class_names or [str(i) for i in range(_num_classes(source))])
    models = {
        "segmenter": segmenter.model,
        "segmenter_sha256": segmenter.weights_sha256,
        "classifier": classifier.model if classifier else None,
        "classifier_sha256": classifier.weights_sha256 if classifier else None,
    }
    return models, class_names, segmenter.input_size, classifier.input_size if classifier else None


def _num_classes(config) -> int:
    return int(config.kwargs.get("num_classes", 0)) or 1


def run_scoring(config: ScoreConfig) -> RunSummary:
    """Score ``config.input`` into ``config.output``; every listed image ends in results or errors."""
    import ray
    import ray.data

    started = time.perf_counter()
    models, class_names, segment_size, roi_size = _models(config)
    run_date = config.run_date.isoformat()
    listing = list_inputs(config.input)
    listed = listing.num_rows
    skipped = 0
    if config.incremental:
        done = _already_scored(config, models)
        keep = [
            (uri, etag) not in done
            for uri, etag in zip(
                listing["source_uri"].to_pylist(), listing["source_etag"].to_pylist(), strict=True
            )
        ]
        skipped = len(keep) - sum(keep)
        listing = listing.filter(pa.array(keep, pa.bool_()))

    if not ray.is_initialized():
        ray.init()  # the cluster in RAY_ADDRESS (as under `ray job submit`), or a local one
    staging = io.join(config.output, "_staging", config.run_id)
    kill_marker = os.environ.get(KILL_ACTOR_MARKER_ENV)
    actor_args = dict(batch_size=config.batch_size, **_actor_pool(config))
    if listing.num_rows:
        rows = (
            ray.data.from_arrow(listing)
            .repartition(max(1, listing.num_rows // config.decode_batch_size))
            .map_batches(
                read_and_decode,
                batch_size=config.decode_batch_size,
                fn_kwargs={"image_size": tuple(segment_size), "max_pixels": config.max_pixels},
            )
            .map_batches(
                SegmentActor,
                fn_constructor_kwargs={
                    "model_uri": config.segmenter,
                    "batch_size": config.batch_size,
                    "kill_marker": kill_marker,
                },
                **actor_args,
            )
            .map_batches(
                roi_and_descriptors,
                batch_size=config.decode_batch_size,
                fn_kwargs={
                    "roi_size": tuple(roi_size) if roi_size else None,
                    "margin": config.roi_margin,
                },
            )
        )
        if config.classifier:
            rows = rows.map_batches(
                ClassifyActor,
                fn_constructor_kwargs={
                    "model_uri": config.classifier,
                    "batch_size": config.batch_size,
                    "kill_marker": kill_marker,
                },
                **actor_args,
            )
        rows = rows.map_batches(
            finish_rows,
            batch_size=config.decode_batch_size,
            fn_kwargs={
                "class_names": class_names,
                "models": models,
                "run_id": config.run_id,
                "include_cam": config.include_cam,
            },
        )
        staging_fs, staging_path = io.resolve(staging)
        rows.write_parquet(
            staging if staging.startswith("s3://") else staging_path,
            filesystem=staging_fs if staging.startswith("s3://") else None,
        )
        staged = pads.dataset(staging_path, filesystem=staging_fs, format="parquet").to_table()
    else:
        staging_fs, staging_path, staged = None, None, None

    results, errors = _split(staged, class_names, config)
    _write_table(
        results,
        _partition(config.output, "results", run_date),
        config.run_id,
        config.rows_per_file,
        replace=not config.incremental,
    )
    _write_table(
        errors,
        _partition(config.output, "errors", run_date),
        config.run_id,
        config.rows_per_file,
        True,
    )
    if staging_fs is not None:
        staging_fs.delete_dir(staging_path)
        parent = staging_path.rsplit("/", 1)[0]
        if not staging_fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True)):
            staging_fs.delete_dir(parent)

    wall_time_s = time.perf_counter() - started
    error_types = errors["error_type"].to_pylist()
    error_stages = errors["stage"].to_pylist()
    summary = RunSummary(
        run_id=config.run_id,
        run_date=run_date,
        inputs_listed=listed,
        skipped_already_scored=skipped,
        results=results.num_rows,
        errors=errors.num_rows,
        errors_by_type={t: error_types.count(t) for t in sorted(set(error_types))},
        errors_by_stage={s: error_stages.count(s) for s in sorted(set(error_stages))},
        wall_time_s=wall_time_s,
        images_per_s=(listed - skipped) / wall_time_s if wall_time_s else 0.0,
        results_uri=_partition(config.output, "results", run_date),
        errors_uri=_partition(config.output, "errors", run_date),
    )
    io.write_bytes(
        io.join(
            config.output, "summaries", f"run_date={run_date}", f"summary-{config.run_id}.json"
        ),
        json.dumps(asdict(summary), indent=2).encode(),
    )
    return summary


def _split(staged: pa.Table | None, class_names: list[str], config: ScoreConfig):
    result_fields = result_schema(class_names)
    error_fields = error_schema()
    if staged is None or staged.num_rows == 0:
        return result_fields.empty_table(), error_fields.empty_table()
    # Ray retries a failed task from scratch, so no row should repeat; keep the guarantee anyway.
    _, first = np.unique(
        np.array(staged["source_uri"].to_pylist(), dtype=object), return_index=True
    )
    staged = staged.take(pa.array(np.sort(first)))
    failed = pc.not_equal(staged["error_stage"], "")
    ok = staged.filter(pc.invert(failed))
    bad = staged.filter(failed)
    results = pa.table({f.name: _column(ok, f) for f in result_fields}, schema=result_fields)
    errors = pa.table(
        {
            "source_uri": bad["source_uri"],
            "stage": bad["error_stage"],
            "error_type": bad["error_type"],
            "error_message": bad["error_message"],
            "source_size_bytes": bad["source_size_bytes"],
            "source_etag": bad["source_etag"],
            "run_id": bad["run_id"],
            "failed_at": bad["scored_at"],
        }
    ).cast(error_fields)
    return results, errors


def _column(table: pa.Table, target: pa.Field) -> pa.ChunkedArray:
    column = table[target.name]
    if pa.types.is_floating(column.type):
        # NaN (a descriptor of an empty mask) is stored as null, which every engine reads as missing.
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    return column.cast(target.type)
