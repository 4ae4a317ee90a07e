"""The scoring run's commit: staged rows into the output partitions, then the staging removed.

The Ray Data graph lands its rows in a staging Parquet directory in one pass; they are then
streamed, a batch at a time, into ``results/run_date=…`` and ``errors/run_date=…`` with a fixed
schema and a bounded number of files, replacing the partition of a re-run (or adding to it with
``incremental``), and the staging directory is removed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from skinray import io
from skinray.score.config import ScoreConfig
from skinray.score.schema import error_schema, result_schema

__all__ = [
    "STAGING_ROWS_PER_FILE",
    "Committed",
    "PartitionWriter",
    "commit_partitions",
    "remove_staging",
    "split_staged",
]

STAGING_ROWS_PER_FILE = 1024


def _partition(output: str, table: str, run_date: str) -> str:
    return io.join(output, table, f"run_date={run_date}")


class PartitionWriter:
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


@dataclass
class Committed:
    """What the commit wrote: rows and partition of each table, and the errors by type and stage."""

    results: int
    errors: int
    results_uri: str
    errors_uri: str
    errors_by_type: Counter
    errors_by_stage: Counter


def commit_partitions(
    staged: pads.Dataset | None, config: ScoreConfig, class_names: list[str]
) -> Committed:
    """The staged rows (None: nothing was scored) split into the run date's results partition
    (replaced, or added to with ``incremental``) and errors partition (replaced); each gets at
    least an empty file with its schema."""
    run_date = config.run_date.isoformat()
    results_uri = _partition(config.output, "results", run_date)
    errors_uri = _partition(config.output, "errors", run_date)
    result_rows = PartitionWriter(
        results_uri,
        result_schema(class_names),
        config.run_id,
        config.rows_per_file,
        replace=not config.incremental,
    )
    error_rows = PartitionWriter(
        errors_uri, error_schema(), config.run_id, config.rows_per_file, replace=True
    )
    try:
        errors_by_type, errors_by_stage = split_staged(staged, result_rows, error_rows)
    finally:
        result_rows.close()
        error_rows.close()
    return Committed(
        result_rows.rows, error_rows.rows, results_uri, errors_uri, errors_by_type, errors_by_stage
    )


def remove_staging(staging: str) -> None:
    """The run's staging directory removed, and its parent (``_staging``) once no run has one."""
    staging_fs, staging_path = io.resolve(staging)
    staging_fs.delete_dir(staging_path)
    parent = staging_path.rsplit("/", 1)[0]
    if not staging_fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True)):
        staging_fs.delete_dir(parent)


def split_staged(
    staged: pads.Dataset | None,
    results: PartitionWriter,
    errors: PartitionWriter,
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
