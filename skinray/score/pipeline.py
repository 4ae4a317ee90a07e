"""The nightly scoring job on Ray Data: list → read/decode → segment → ROI → classify → Parquet.

Decoding runs as CPU tasks; each model runs on an actor pool sized from the cluster (one GPU per actor
where there are GPUs, CPU actors otherwise) that Ray restarts if an actor dies, retrying its batches.
Rows stream, and the run's object store is bounded by the pool, not the archive: decoded images wait
for the models only ``prefetch_batches`` batches per actor deep (docs/benchmarks.md). The rows land
in a staging Parquet directory in one pass, then are streamed, a batch at a time, into
``results/run_date=…`` and ``errors/run_date=…`` with a fixed schema and a bounded number of files,
replacing the partition of a re-run (or adding to it with ``incremental``), and the staging
directory is removed.
"""

from __future__ import annotations

import io as stdio
import json
import os
import time
from collections import Counter
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
from skinray.score.actors import ClassifyActor, SegmentActor
from skinray.score.config import ScoreConfig, ScoreConfigError
from skinray.score.schema import error_schema, result_schema
from skinray.score.stages import (
    KILL_ACTOR_MARKER_ENV,
    finish_rows,
    read_and_decode_slice,
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
#: CPUs claimed by the ROI, row-building and write tasks: milliseconds an image, they must not wait for a
#: whole free CPU behind the decode tasks (on 2 CPUs, 440 images: 45.0 s at 0.25, 49.2 s at 1).
LIGHT_TASK_CPUS = 0.25
STAGING_ROWS_PER_FILE = 1024


#: The stages an image passes, in order, and the Ray Data operator that runs each (None: the driver).
STAGES = (
    ("list", None),
    ("read", "read_and_decode"),
    ("decode", "read_and_decode"),
    ("segment", "SegmentActor"),
    ("roi", "roi_and_descriptors"),
    ("classify", "ClassifyActor"),
    ("write", "Write"),
)


@dataclass
class StageSummary:
    """One stage of a run: images that reached it, errors it recorded, and the Ray Data operator's
    task time (summed over tasks) and span (first task start to last task end)."""

    stage: str
    images_in: int
    errors: int
    task_s: float | None = None
    span_s: float | None = None

    def line(self) -> str:
        timing = (
            f"{self.task_s:8.1f} s in tasks, {self.span_s:6.1f} s span"
            if self.task_s is not None and self.span_s is not None
            else ""
        )
        return f"  {self.stage:9}{self.images_in:>9} in {self.errors:>7} errors  {timing}".rstrip()


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
    stages: list[StageSummary] = field(default_factory=list)
    #: The object-store bound the run's Ray Data execution ran under; 0 when nothing was scored.
    object_store_budget_mib: float = 0.0

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
            *(stage.line() for stage in self.stages),
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


def decoded_images(listing: pa.Table, config: ScoreConfig, image_size: tuple[int, int]):
    """The listing read and decoded by Ray Data tasks, a ``decode_batch_size`` slice a task.

    Measured driver memory for a 20,000-image listing (local Ray, 2 CPUs): one Arrow block per slice
    through ``from_arrow`` +143 MiB, ``repartition`` +78 MiB, a range of slice indices over the
    listing put once +44 MiB."""
    import ray

    slices = -(-listing.num_rows // config.decode_batch_size)
    return ray.data.range(slices, override_num_blocks=slices).map_batches(
        read_and_decode_slice,
        batch_size=1,
        fn_kwargs={
            "listing": ray.put(listing),
            "rows": config.decode_batch_size,
            "image_size": tuple(image_size),
            "max_pixels": config.max_pixels,
            "jpeg_to_segmenter": config.jpeg_decode_in_segmenter,
        },
    )


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


@dataclass(frozen=True)
class _Placement:
    """Where the model stages run: actors per stage, a GPU each or CPU threads each."""

    use_gpu: bool
    max_actors: int
    cpu_threads: int
    decode_slots: int

    def pool_args(self, config: ScoreConfig) -> dict:
        """map_batches arguments for a model stage."""
        import ray

        return dict(
            compute=ray.data.ActorPoolStrategy(
                min_size=min(config.min_actors, self.max_actors), max_size=self.max_actors
            ),
            num_gpus=1 if self.use_gpu else 0,
            # On CPU a model actor claims half a CPU so that both model stages and the decode
            # tasks get scheduled on a small node; its torch threads are set apart (Ray would set
            # OMP_NUM_THREADS to 1 from this). Ray Data restarts a dead actor and retries its
            # batches (max_restarts=-1).
            num_cpus=1 if self.use_gpu else 0.5,
        )


def _placement(config: ScoreConfig) -> _Placement:
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    node_cpus = max(
        (int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]), default=1
    )
    use_gpu = config.use_gpu if config.use_gpu is not None else gpus > 0
    upper = config.max_actors or (max(1, gpus) if use_gpu else max(1, cpus // 4))
    nodes = max(1, round(cpus / max(node_cpus, 1)))
    per_node = -(-upper // nodes)
    threads = config.cpu_threads_per_actor or max(1, node_cpus // per_node)
    return _Placement(use_gpu, upper, threads, decode_slots=max(1, cpus))


def _object_store_budget(
    config: ScoreConfig,
    placement: _Placement,
    segment_size: tuple[int, int],
    roi_size: tuple[int, int] | None,
    mean_source_bytes: float = 0.0,
) -> int:
    """Bytes of object store the run may hold: ``prefetch_batches`` batches queued for every
    model actor (a decoded image and its mask, then its ROI) and one output per decode task. A
    bound that depends on the pool, not on the archive, keeps memory flat however many images
    there are; decoding runs ahead of the models only that far. Where the segmenter decodes the
    JPEGs, their bytes (``mean_source_bytes`` a file) queue for it too."""
    if config.object_store_memory_mib:
        return int(config.object_store_memory_mib * 2**20)
    segment_row = 4 * segment_size[0] * segment_size[1]  # RGB + mask, uint8
    if config.jpeg_decode_in_segmenter:
        segment_row += int(mean_source_bytes)
    roi_row = 3 * roi_size[0] * roi_size[1] if roi_size else 0
    queued = config.prefetch_batches * config.batch_size * (segment_row + roi_row)
    decoding = placement.decode_slots * config.decode_batch_size * segment_row
    return queued * placement.max_actors + decoding


class _PartitionWriter:
    """Rows appended batch by batch into ``part-<run id>-NNNNN.parquet`` files of at most
    ``rows_per_file`` rows under one partition directory (replaced first when ``replace``); an
    empty file when no row comes, so the partition always exists with its schema."""

    def __init__(
        self, uri: str, schema: pa.Schema, run_id: str, rows_per_file: int, replace: bool
    ) -> None:
        self.fs, self.path = io.resolve(uri)
        if replace and self.fs.get_file_info(self.path).type == pafs.FileType.Directory:
            self.fs.delete_dir_contents(self.path)
        self.fs.create_dir(self.path, recursive=True)
        self.schema, self.run_id, self.rows_per_file = schema, run_id, rows_per_file
        self.files, self.rows, self._writer, self._in_file = 0, 0, None, 0

    def write(self, table: pa.Table) -> None:
        while table.num_rows:
            if self._writer is None:
                name = f"{self.path}/part-{self.run_id}-{self.files:05d}.parquet"
                self._writer = pq.ParquetWriter(name, self.schema, filesystem=self.fs)
                self.files += 1
            chunk = table.slice(0, self.rows_per_file - self._in_file)
            self._writer.write_table(chunk)
            self._in_file += chunk.num_rows
            self.rows += chunk.num_rows
            table = table.slice(chunk.num_rows)
            if self._in_file == self.rows_per_file:
                self._writer.close()
                self._writer, self._in_file = None, 0

    def close(self) -> None:
        if self._writer is None and self.files == 0:
            name = f"{self.path}/part-{self.run_id}-00000.parquet"
            pq.write_table(self.schema.empty_table(), name, filesystem=self.fs)
            self.files = 1
        if self._writer is not None:
            self._writer.close()
            self._writer = None


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
    placement = _placement(config)
    actor_args = dict(batch_size=config.batch_size, **placement.pool_args(config))
    if listing.num_rows:
        rows = (
            decoded_images(listing, config, segment_size)
            .map_batches(
                SegmentActor,
                fn_constructor_kwargs={
                    "model_uri": config.segmenter,
                    "batch_size": config.batch_size,
                    "kill_marker": kill_marker,
                    "cpu_threads": placement.cpu_threads,
                },
                **actor_args,
            )
            .map_batches(
                roi_and_descriptors,
                batch_size=config.decode_batch_size,
                num_cpus=LIGHT_TASK_CPUS,
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
                    "cpu_threads": placement.cpu_threads,
                },
                **actor_args,
            )
        rows = rows.map_batches(
            finish_rows,
            batch_size=config.decode_batch_size,
            num_cpus=LIGHT_TASK_CPUS,
            fn_kwargs={
                "class_names": class_names,
                "models": models,
                "run_id": config.run_id,
                "include_cam": config.include_cam,
            },
        )
        staging_fs, staging_path = io.resolve(staging)
        # Datasets snapshot the DataContext when created: this run's budget goes on its own copy.
        options = rows.context.execution_options
        sizes = pc.mean(listing["source_size_bytes"]).as_py() or 0.0
        budget = _object_store_budget(config, placement, segment_size, roi_size, sizes)
        options.resource_limits = options.resource_limits.copy(object_store_memory=budget)
        rows.write_parquet(
            staging if staging.startswith("s3://") else staging_path,
            filesystem=staging_fs if staging.startswith("s3://") else None,
            ray_remote_args={"num_cpus": LIGHT_TASK_CPUS},
            # Rows are small (a mask PNG and scalars): a staging file per decode batch would mean
            # thousands of tiny files, each a PUT and a GET on S3 and a fragment in the split.
            min_rows_per_file=STAGING_ROWS_PER_FILE,
        )
        operator_times = _operator_times(rows)
        staged = pads.dataset(staging_path, filesystem=staging_fs, format="parquet")
    else:
        staging_fs, staging_path, staged, operator_times, budget = None, None, None, {}, 0

    result_rows = _PartitionWriter(
        _partition(config.output, "results", run_date),
        result_schema(class_names),
        config.run_id,
        config.rows_per_file,
        replace=not config.incremental,
    )
    error_rows = _PartitionWriter(
        _partition(config.output, "errors", run_date),
        error_schema(),
        config.run_id,
        config.rows_per_file,
        replace=True,
    )
    try:
        errors_by_type, errors_by_stage = _split_staged(staged, result_rows, error_rows)
    finally:
        result_rows.close()
        error_rows.close()
    if staging_fs is not None:
        staging_fs.delete_dir(staging_path)
        parent = staging_path.rsplit("/", 1)[0]
        if not staging_fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True)):
            staging_fs.delete_dir(parent)

    wall_time_s = time.perf_counter() - started
    summary = RunSummary(
        run_id=config.run_id,
        run_date=run_date,
        inputs_listed=listed,
        skipped_already_scored=skipped,
        results=result_rows.rows,
        errors=error_rows.rows,
        errors_by_type=dict(sorted(errors_by_type.items())),
        errors_by_stage=dict(sorted(errors_by_stage.items())),
        wall_time_s=wall_time_s,
        images_per_s=(listed - skipped) / wall_time_s if wall_time_s else 0.0,
        results_uri=_partition(config.output, "results", run_date),
        errors_uri=_partition(config.output, "errors", run_date),
        stages=_stage_summaries(
            listed,
            skipped,
            errors_by_stage,
            result_rows.rows + error_rows.rows,
            config.classifier is not None,
            operator_times,
        ),
        object_store_budget_mib=round(budget / 2**20, 1),
    )
    io.write_bytes(
        io.join(
            config.output, "summaries", f"run_date={run_date}", f"summary-{config.run_id}.json"
        ),
        json.dumps(asdict(summary), indent=2).encode(),
    )
    return summary


def _operator_times(dataset) -> dict[str, tuple[float, float]]:
    """Ray Data operator name → (summed task wall time, span), from the executed dataset."""

    def operators_of(summary):  # the write's summary holds the stages before it as parents
        for parent in summary.parents:
            yield from operators_of(parent)
        yield from summary.operators_stats

    try:
        operators = list(operators_of(dataset.get_stats_summary()))
    except Exception:  # stats are a report, never a reason to fail a finished run
        return {}
    times = {}
    for op in operators:
        if op.wall_time is None or op.earliest_start_time is None or op.latest_end_time is None:
            continue
        times[op.operator_name] = (
            float(op.wall_time.sum),
            float(op.latest_end_time - op.earliest_start_time),
        )
    return times


def _stage_summaries(
    listed: int,
    skipped: int,
    errors_by_stage: dict[str, int],
    written: int,
    with_classifier: bool,
    operator_times: dict[str, tuple[float, float]],
) -> list[StageSummary]:
    stages, reaching = [], listed
    for stage, operator in STAGES:
        if stage == "classify" and not with_classifier:
            continue
        errors = errors_by_stage.get(stage, 0)
        summary = StageSummary(stage, written if stage == "write" else reaching, errors)
        if operator and stage != "read":  # read and decode are one task, timed as decode
            match = next((t for name, t in operator_times.items() if operator in name), None)
            if match:
                summary.task_s, summary.span_s = match
        stages.append(summary)
        reaching = (reaching - skipped if stage == "list" else reaching) - errors
    return stages


def _split_staged(
    staged: pads.Dataset | None,
    results: _PartitionWriter,
    errors: _PartitionWriter,
) -> tuple[Counter, Counter]:
    """Stream the staged rows into the results and errors partitions, a batch at a time: the driver
    holds one batch of rows and the URI column, not the run. Returns errors by type and by stage.

    No row should repeat (Ray reruns a failed task from scratch and a write task's files have fixed
    names), so duplicates are only looked for, in the URI column, and dropped if ever found."""
    by_type, by_stage = Counter(), Counter()
    if staged is None:
        return by_type, by_stage
    uris = staged.to_table(columns=["source_uri"])["source_uri"]
    keep = None
    if pc.count_distinct(uris).as_py() != len(uris):
        _, first = np.unique(np.array(uris.to_pylist(), dtype=object), return_index=True)
        keep = np.zeros(len(uris), bool)
        keep[first] = True
    del uris
    result_fields, error_fields, offset = results.schema, errors.schema, 0
    for batch in staged.to_batches(batch_size=4096, use_threads=False):
        table = pa.Table.from_batches([batch])
        if keep is not None:
            table = table.filter(pa.array(keep[offset : offset + table.num_rows]))
        offset += batch.num_rows
        failed = pc.not_equal(table["error_stage"], "")
        ok, bad = table.filter(pc.invert(failed)), table.filter(failed)
        results.write(
            pa.table(
                {f.name: _as_field(ok[f.name], f) for f in result_fields}, schema=result_fields
            )
        )
        renamed = {"stage": "error_stage", "failed_at": "scored_at"}
        errors.write(
            pa.table(
                {f.name: _as_field(bad[renamed.get(f.name, f.name)], f) for f in error_fields},
                schema=error_fields,
            )
        )
        by_type.update(bad["error_type"].to_pylist())
        by_stage.update(bad["error_stage"].to_pylist())
    return by_type, by_stage


def _as_field(column: pa.ChunkedArray, target: pa.Field) -> pa.ChunkedArray:
    if pa.types.is_floating(column.type):
        # NaN is stored as null, which every engine reads as missing: a descriptor of an empty mask,
        # or a size never read (Ray turns a block's all-None column into float NaN).
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    return column.cast(target.type)
