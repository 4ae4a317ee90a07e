"""The scoring job's inputs: what to score, listed once, on a worker, into Parquet files that the
run's Ray Data graph reads back (``stage_listing``).

An input is an ``s3://`` prefix, a local folder, or a manifest file (``.csv``, ``.txt``,
``.parquet``) of URIs. Each image is one row of :data:`LISTING_SCHEMA` with its size and ETag (a
modification-time/size tag where storage has no ETag). With ``incremental``, images an earlier run
scored with the same models (same URI and ETag) from input decoded the way this run would decode it
are dropped from the listing.
"""

from __future__ import annotations

import io as stdio
import os
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from skinray import io
from skinray.score.config import ScoreConfig, ScoreConfigError
from skinray.score.stages import CPU_DECODER, device_decoder, listing_file

__all__ = [
    "LISTING_SCHEMA",
    "MANIFEST_SUFFIXES",
    "StagedListing",
    "check_input",
    "list_inputs",
    "listing_rows_per_file",
    "reusable_decoders",
    "stage_listing",
]

LISTING_SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string()),
        pa.field("source_size_bytes", pa.int64()),
        pa.field("source_etag", pa.string()),
    ]
)
MANIFEST_SUFFIXES = (".csv", ".txt", ".parquet")
_EARLIER_RESULT_COLUMNS = (
    "source_uri",
    "source_etag",
    "segmenter_config_sha256",
    "classifier_config_sha256",
    "decode",
)


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
    uris = [io.in_manifest(uri, u) for u in uris]
    sizes, etags = [], []
    for u in uris:
        try:
            _, _, info = io.file_info(u)
        except io.UnreadableURI:  # another scheme, a NUL byte: a read error of its row
            sizes.append(None), etags.append(None)
            continue
        found = info.type == pafs.FileType.File
        sizes.append(info.size if found else None)
        etags.append(_pseudo_etag(info) if found else None)
    return pa.table(
        {"source_uri": uris, "source_size_bytes": sizes, "source_etag": etags},
        schema=LISTING_SCHEMA,
    )


def check_input(uri: str) -> None:
    """At the door, before any Ray work: a local folder or a manifest that does not exist (an
    ``s3://`` prefix may list empty)."""
    if (uri.endswith(MANIFEST_SUFFIXES) or not uri.startswith("s3://")) and not io.exists(uri):
        raise ScoreConfigError(f"input not found: {uri}")


def list_inputs(uri: str) -> pa.Table:
    """Every object under an ``s3://`` prefix or local folder, or every URI in a manifest file,
    once, with its size and ETag (a modification-time/size tag where storage has no ETag)."""
    if uri.endswith(MANIFEST_SUFFIXES):
        table = _list_manifest(uri)
    elif uri.startswith("s3://"):
        table = _list_s3_prefix(uri)
    else:
        check_input(uri)
        table = _list_folder(uri)
    # The same URI listed twice (a repeated manifest line) is one input: its first line.
    table = table.append_column(_ORDER, pa.array(np.arange(table.num_rows)))
    first = table.group_by("source_uri", use_threads=False).aggregate([(_ORDER, "min")])
    kept = np.sort(first[f"{_ORDER}_min"].to_numpy())
    return table.take(pa.array(kept)).drop_columns([_ORDER])


_ORDER = "__listing_order"


def reusable_decoders(config: ScoreConfig, use_gpu: bool) -> tuple[str, ...]:
    """The ``decode`` values of earlier rows that an incremental run keeps: the decoder this run
    gives JPEGs, and ``CPU_DECODER``, the path training and evaluation take, which every run gives
    other formats. A row decoded in a segmenter actor differs from the CPU path's by up to 0.1 in
    a class probability, so a run that decodes on CPU scores its image again."""
    if not config.jpeg_decode_in_segmenter:
        return (CPU_DECODER,)
    return (CPU_DECODER, device_decoder("cuda" if use_gpu else "cpu"))


def _earlier_results(
    config: ScoreConfig, models: dict[str, str], decoders: tuple[str, ...]
) -> pa.Table | None:
    """(source_uri, source_etag) of what earlier runs under ``config.output`` scored with the same
    models (the same config hashes: weights, temperature, test-time flips and every other setting)
    from input made by one of ``decoders``. Rows written before a key column was recorded read it
    as null and never match, so their images are scored again. None where nothing was scored."""
    fs, path = io.resolve(io.join(config.output, "results"))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    # The key columns named, not inferred: inferred from the first file found, a schema from
    # before a column was added would have left it out of every file's rows.
    schema = pa.schema([pa.field(name, pa.string()) for name in _EARLIER_RESULT_COLUMNS])
    dataset = pads.dataset(path, filesystem=fs, format="parquet", schema=schema)
    keys = ["segmenter_config_sha256", "classifier_config_sha256"]
    same_models = (pc.field(keys[0]) == models[keys[0]]) & (
        pc.coalesce(pc.field(keys[1]), pc.scalar("")) == (models[keys[1]] or "")
    )
    same_input = pc.field("decode").isin(list(decoders))
    return dataset.to_table(columns=["source_uri", "source_etag"], filter=same_models & same_input)


def _without(listing: pa.Table, done: pa.Table | None, keys: list[str]) -> pa.Table:
    """``listing`` less the rows whose ``keys`` are in ``done``: a hash anti-join (Acero), which
    keeps the listing's order through its order column."""
    if done is None or not done.num_rows or not listing.num_rows:
        return listing
    done = done.select(keys).cast(pa.schema([listing.schema.field(k) for k in keys]))
    kept = listing.join(done, keys=keys, join_type="left anti", use_threads=False)
    return kept.sort_by(_ORDER)


@dataclass(frozen=True)
class StagedListing:
    """The run's inputs, written as Parquet files under its staging directory for Ray Data to read
    back (``listing_uri``), and what was left out of them. The driver holds only this."""

    listing_uri: str
    files: int
    listed: int
    skipped_already_scored: int
    resumed_from_staging: int
    to_score: int
    mean_source_bytes: float


def listing_rows_per_file(count: int, decode_batch_size: int) -> int:
    """Rows per listing file. A file is read by one task that decodes it ``decode_batch_size``
    rows at a time: up to 64 files (tasks) while they hold under 4,096 rows, then files of 4,096
    rows (245 for a million images: the driver plans one read task per file)."""
    return int(np.clip(-(-count // 64), decode_batch_size, 4096))


def stage_listing(
    config: ScoreConfig,
    staging: str,
    models: dict[str, str],
    decode_batch_size: int,
    use_gpu: bool,
) -> StagedListing:
    """List the inputs; with ``incremental``, drop those already scored with the same models from
    input decoded as this run's model actors (on GPUs or not) would (``reusable_decoders``); drop
    those a dead driver of this run id already staged (``skinray.score.commit.staged_uris``);
    write the rest to ``<staging>/listing/``. Run on a worker (``ray.remote``) so that no
    per-image state lives on the driver, however large the archive."""
    from skinray.score.commit import staged_uris

    listing = list_inputs(config.input)
    listed = listing.num_rows
    if not listed:  # a typo'd prefix lists empty: its commit would empty the date's partitions
        raise ScoreConfigError(f"{config.input}: no files to score")
    listing = listing.append_column(_ORDER, pa.array(np.arange(listed)))
    if config.incremental:
        earlier = _earlier_results(config, models, reusable_decoders(config, use_gpu))
        listing = _without(listing, earlier, ["source_uri", "source_etag"])
    skipped = listed - listing.num_rows
    staged = pa.table({"source_uri": staged_uris(staging)})
    remaining = _without(listing, staged, ["source_uri"]).drop_columns([_ORDER])

    folder = io.join(staging, "listing")
    fs, path = io.resolve(folder)
    fs.delete_dir_contents(path, missing_dir_ok=True)  # an earlier attempt's listing
    fs.create_dir(path, recursive=True)
    rows = listing_rows_per_file(remaining.num_rows, decode_batch_size)
    files = 0
    for files, start in enumerate(range(0, remaining.num_rows, rows), start=1):
        target = io.resolve(listing_file(folder, files - 1))[1]
        pq.write_table(remaining.slice(start, rows), target, filesystem=fs)
    sizes = pc.mean(remaining["source_size_bytes"]).as_py() if remaining.num_rows else None
    return StagedListing(
        listing_uri=folder,
        files=files,
        listed=listed,
        skipped_already_scored=skipped,
        resumed_from_staging=listing.num_rows - remaining.num_rows,
        to_score=remaining.num_rows,
        mean_source_bytes=float(sizes or 0.0),
    )
