"""The scoring job's inputs: what to score, listed once, before Ray is involved.

An input is an ``s3://`` prefix, a local folder, or a manifest file (``.csv``, ``.txt``,
``.parquet``) of URIs. Each image is one row of :data:`LISTING_SCHEMA` with its size and ETag (a
modification-time/size tag where storage has no ETag). With ``incremental``, images an earlier run
scored with the same models (same URI and ETag) are dropped from the listing.
"""

from __future__ import annotations

import io as stdio
import os
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

__all__ = ["LISTING_SCHEMA", "MANIFEST_SUFFIXES", "drop_already_scored", "list_inputs"]

LISTING_SCHEMA = pa.schema(
    [
        pa.field("source_uri", pa.string()),
        pa.field("source_size_bytes", pa.int64()),
        pa.field("source_etag", pa.string()),
    ]
)
MANIFEST_SUFFIXES = (".csv", ".txt", ".parquet")


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


def _already_scored(config: ScoreConfig, models: dict[str, str]) -> set[tuple[str, str]]:
    """(source_uri, etag) pairs some earlier run scored with the same models: the same config
    hashes (weights, temperature, test-time flips and every other setting). Rows written before
    the config hashes were recorded never match, so their images are scored again."""
    fs, path = io.resolve(io.join(config.output, "results"))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return set()
    dataset = pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive")
    keys = ["segmenter_config_sha256", "classifier_config_sha256"]
    if not set(keys) <= set(dataset.schema.names):
        return set()
    table = dataset.to_table(columns=["source_uri", "source_etag", *keys])
    same_models = pc.and_(
        pc.equal(table[keys[0]], models[keys[0]]),
        pc.equal(pc.fill_null(table[keys[1]], ""), models[keys[1]] or ""),
    )
    table = table.filter(same_models)
    return set(zip(table["source_uri"].to_pylist(), table["source_etag"].to_pylist(), strict=True))


def drop_already_scored(
    listing: pa.Table, config: ScoreConfig, models: dict[str, str]
) -> tuple[pa.Table, int]:
    """The listing without the images some earlier run under ``config.output`` scored with the same
    ``models`` (their names and weight hashes, as the rows record them), and how many were dropped."""
    done = _already_scored(config, models)
    keep = [
        (uri, etag) not in done
        for uri, etag in zip(
            listing["source_uri"].to_pylist(), listing["source_etag"].to_pylist(), strict=True
        )
    ]
    return listing.filter(pa.array(keep, pa.bool_())), len(keep) - sum(keep)
