"""The scoring run's output: written once by Ray Data's write into the run's staging directory,
then committed into the run date's partitions from file listings (an incremental commit also reads
the earlier files of the date, to drop the rows of images it scored again).

Write (``StagedRunSink``, on Ray's write tasks): each task splits its rows into the fixed results
and errors schemas and writes one Parquet file of each, ``part-<run id>-<attempt>-<task>.parquet``,
under ``_staging/<run id>/results/`` and ``…/errors/``. A file is complete or absent: a temporary
name renamed on a local disk, a single PUT on S3. Ray Data bundles ``rows_per_file`` rows for a
task, so the files hold tens of MB, not thousands of small ones, and a retried task rewrites its
own file names rather than adding rows.

Commit (``commit_run``, on the driver): every staged file is moved into ``results/run_date=…`` and
``errors/run_date=…`` (a rename on a local disk, a server-side copy on S3); then the files of
earlier runs in those partitions are deleted (with ``incremental`` the results partition is kept
and added to, less the rows of images this run scored again); then the staging directory. Until
the commit starts, the previous partitions are untouched: a run that dies before it leaves them
readable and unchanged, and its staged files are picked up when the run id is given again (``staged_uris``), so nothing staged is scored twice.
Between the moves and the deletes a reader may see both runs' rows; each row names its run.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data import Datasink

from skinray import io
from skinray.score.config import ScoreConfig
from skinray.score.schema import error_schema, result_schema

__all__ = ["Committed", "StagedRunSink", "commit_run", "remove_staging", "staged_uris"]

TABLES = ("results", "errors")
_RENAMED = {"stage": "error_stage", "failed_at": "scored_at"}  # error column ← staged row column


def _partition(output: str, table: str, run_date: str) -> str:
    return io.join(output, table, f"run_date={run_date}")


class StagedRunSink(Datasink):
    """Ray Data's write of a scoring run's rows (``finish_rows``) into its staging directory."""

    def __init__(self, staging: str, class_names: list[str], run_id: str, rows_per_file: int):
        self.staging, self.run_id, self.rows_per_file = staging, run_id, rows_per_file
        self.schemas = {"results": result_schema(class_names), "errors": error_schema()}
        self.attempt = uuid.uuid4().hex[:8]  # a resumed run's files never take an earlier name

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def write(self, blocks: Iterable[pa.Table], ctx) -> dict[str, int]:
        tables = [_untyped_if_missing(pa.table(block)) for block in blocks]
        table = pa.concat_tables(tables, promote_options="default")
        failed = pc.not_equal(table["error_stage"], "")
        written = {}
        for name, rows in (
            ("results", table.filter(pc.invert(failed))),
            ("errors", table.filter(failed)),
        ):
            if rows.num_rows:
                path = io.join(
                    self.staging,
                    name,
                    f"part-{self.run_id}-{self.attempt}-{ctx.task_idx:05d}.parquet",
                )
                _write_whole(self._in_schema(rows, self.schemas[name]), path)
            written[name] = rows.num_rows
        return written

    @staticmethod
    def _in_schema(rows: pa.Table, schema: pa.Schema) -> pa.Table:
        return pa.table(
            {f.name: _as_field(rows[_RENAMED.get(f.name, f.name)], f) for f in schema},
            schema=schema,
        )


def _untyped_if_missing(block: pa.Table) -> pa.Table:
    """A block's float columns with no value at all as null-typed columns. Ray turns a block's
    all-None column into float NaN, so a block of error rows alone carries ``backend`` as float
    where the others carry strings, and the blocks of one file would not concatenate."""
    for index, field in enumerate(block.schema):
        column = block.column(index)
        if pa.types.is_floating(field.type) and block.num_rows:
            missing = pc.sum(pc.or_(pc.is_null(column), pc.is_nan(column))).as_py()
            if missing == block.num_rows:
                block = block.set_column(index, field.name, pa.nulls(block.num_rows))
    return block


def _write_whole(table: pa.Table, uri: str) -> None:
    """The file appears whole or not at all: S3 makes an object visible when its upload completes;
    on a local disk it is written under a temporary name and renamed."""
    fs, path = io.resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    if isinstance(fs, pafs.S3FileSystem):
        pq.write_table(table, path, filesystem=fs)
        return
    partial = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    pq.write_table(table, partial, filesystem=fs)
    fs.move(partial, path)


def _as_field(column: pa.ChunkedArray, target: pa.Field) -> pa.ChunkedArray:
    if pa.types.is_floating(column.type):
        # NaN is stored as null, which every engine reads as missing: a descriptor of an empty mask,
        # or a size never read (Ray turns a block's all-None column into float NaN).
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
    return column.cast(target.type)


def _staged_files(staging: str, table: str) -> list[pafs.FileInfo]:
    fs, path = io.resolve(io.join(staging, table))
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(
        (i for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")),
        key=lambda i: i.path,
    )


def staged_uris(staging: str) -> pa.Array:
    """The source URIs a run with this staging directory has already written (results and errors
    alike): those of a run whose driver died, to leave out when it resumes."""
    fs, _ = io.resolve(staging)
    arrays = [
        pq.read_table(info.path, columns=["source_uri"], filesystem=fs)[
            "source_uri"
        ].combine_chunks()
        for table in TABLES
        for info in _staged_files(staging, table)
    ]
    return pa.concat_arrays(arrays) if arrays else pa.array([], pa.string())


@dataclass
class Committed:
    """What the commit published: rows and partition of each table, and the errors by type and stage."""

    results: int
    errors: int
    results_uri: str
    errors_uri: str
    errors_by_type: Counter
    errors_by_stage: Counter


def commit_run(staging: str, config: ScoreConfig, class_names: list[str]) -> Committed:
    """Publish the staged files into the run date's partitions (see the module's docstring)."""
    run_date = config.run_date.isoformat()
    fs, _ = io.resolve(staging)
    counts, by_type, by_stage, uris = {}, Counter(), Counter(), {}
    schemas = {"results": result_schema(class_names), "errors": error_schema()}
    superseded = staged_uris(staging) if config.incremental else None  # before the moves
    for table in TABLES:
        files = _staged_files(staging, table)
        counts[table] = sum(pq.read_metadata(i.path, filesystem=fs).num_rows for i in files)
        if table == "errors":
            for info in files:  # counted per file in Arrow: no per-row objects on the driver
                kinds = pq.read_table(info.path, columns=["stage", "error_type"], filesystem=fs)
                by_type.update(_value_counts(kinds["error_type"]))
                by_stage.update(_value_counts(kinds["stage"]))
        keep_old = table == "results" and config.incremental
        uris[table] = _partition(config.output, table, run_date)
        _publish(
            files, fs, uris[table], schemas[table], config.run_id, superseded if keep_old else None
        )
    return Committed(
        counts["results"], counts["errors"], uris["results"], uris["errors"], by_type, by_stage
    )


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    counts = pc.value_counts(column)
    return dict(
        zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True)
    )


def _publish(
    files: list[pafs.FileInfo],
    staging_fs: pafs.FileSystem,
    partition: str,
    schema: pa.Schema,
    run_id: str,
    superseded: pa.Array | None,
) -> None:
    """Move ``files`` into ``partition``, then delete what it held before; an empty file with the
    schema where the run staged none, so the partition always exists. With ``superseded`` (the
    images this run scored, ``incremental``) earlier files are kept but for those images' rows:
    an image scored again (its file changed) is in one table, once, per date."""
    fs, path = io.resolve(partition)
    existing = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    old = [i.path for i in existing if i.type == pafs.FileType.File]
    fs.create_dir(path, recursive=True)
    if superseded is not None:
        old = _rewritten_without(old, fs, partition, superseded, run_id)
    for info in files:
        fs.move(info.path, f"{path}/{info.base_name}")
    if not files:
        pq.write_table(schema.empty_table(), f"{path}/part-{run_id}-empty.parquet", filesystem=fs)
    new = {f"{path}/{info.base_name}" for info in files} | {f"{path}/part-{run_id}-empty.parquet"}
    for stale in old:
        if stale not in new:
            fs.delete_file(stale)


def _rewritten_without(
    files: list[str], fs: pafs.FileSystem, partition: str, uris: pa.Array, run_id: str
) -> list[str]:
    """The files of ``partition`` that hold earlier runs' rows of images this run scored again,
    each first rewritten without them: the files to delete. The images are ``uris`` (still
    staged) and those whose rows an earlier attempt of this commit already moved in (rows of
    ``run_id``). A rewritten file is named after its source, and written whole, so that an attempt
    repeated after a crash writes the same file again, not a second copy of its rows. Only the
    key columns of the other files are read."""
    keys = {f: pq.read_table(f, columns=["source_uri", "run_id"], filesystem=fs) for f in files}
    moved = [t.filter(pc.equal(t["run_id"], run_id))["source_uri"] for t in keys.values()]
    chunks = [uris.cast(pa.string()), *(chunk for column in moved for chunk in column.chunks)]
    scored = pa.chunked_array(chunks, pa.string()).combine_chunks()
    replaced = []
    for file, table in keys.items():
        earlier = pc.not_equal(table["run_id"], run_id)
        hits = pc.and_(pc.is_in(table["source_uri"], scored), earlier)
        if not pc.any(hits).as_py():
            continue
        rows = pq.read_table(file, filesystem=fs).filter(pc.invert(hits))
        if rows.num_rows:
            name = file.rsplit("/", 1)[-1].removesuffix(".parquet")
            _write_whole(rows, io.join(partition, f"{name}-without-{run_id}.parquet"))
        replaced.append(file)
    return replaced


def remove_staging(staging: str) -> None:
    """The run's staging directory removed, and its parent (``_staging``) once no run has one."""
    staging_fs, staging_path = io.resolve(staging)
    if staging_fs.get_file_info(staging_path).type == pafs.FileType.NotFound:
        return
    staging_fs.delete_dir(staging_path)
    parent = staging_path.rsplit("/", 1)[0]
    if not staging_fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True)):
        staging_fs.delete_dir(parent)
