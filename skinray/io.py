"""One resolver for every URI skinray reads or writes: local paths and ``s3://bucket/key``.

Everything goes through :mod:`pyarrow.fs`, so Ray Data, Parquet and the model files share one idea of
what a URI is. S3 settings come from the standard AWS environment (credentials, region) and, for
S3-compatible stores, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``
(``http://127.0.0.1:9000`` style; the scheme picks http or https).
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

__all__ = [
    "exists",
    "join",
    "read_bytes",
    "resolve",
    "s3_filesystem",
    "write_bytes",
]


def s3_filesystem(endpoint_url: str | None = None, region: str | None = None) -> pafs.S3FileSystem:
    """An S3 filesystem configured from the environment, or from ``endpoint_url`` when given."""
    endpoint_url = (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    kwargs: dict = {}
    if endpoint_url:
        parsed = urlparse(endpoint_url if "://" in endpoint_url else f"https://{endpoint_url}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | os.PathLike, filesystem: pafs.FileSystem | None = None):
    """``(filesystem, path)`` for a local path or an ``s3://`` URI.

    A given ``filesystem`` is used as is (tests pass one pointed at a local S3 server).
    """
    text = os.fspath(uri)
    if text.startswith("s3://"):
        fs = filesystem or s3_filesystem()
        return fs, text.removeprefix("s3://").rstrip("/")
    if "://" in text and not text.startswith("file://"):
        raise ValueError(f"unsupported URI scheme in {text!r}: use a local path or s3://bucket/key")
    path = Path(text.removeprefix("file://")).expanduser().resolve()
    return filesystem or pafs.LocalFileSystem(), str(path)


def absolute(uri: str | os.PathLike) -> str:
    """An ``s3://`` URI as is; a local path made absolute against this process's working directory
    (Ray workers run elsewhere)."""
    text = os.fspath(uri)
    if "://" in text and not text.startswith("file://"):
        return text
    return str(Path(text.removeprefix("file://")).expanduser().resolve())


def in_manifest(manifest_uri: str, entry: str) -> str:
    """A manifest's entry as a URI: one with a scheme (``s3://``, ``file://``) or an absolute path
    as it is, a relative path under the manifest's folder (the working directory for a manifest
    named without one)."""
    entry = entry.strip()
    if "://" in entry or entry.startswith("/"):
        return entry
    base = manifest_uri.rsplit("/", 1)[0] if "/" in manifest_uri else "."
    scheme, _, folder = base.rpartition("://")
    # S3 keys are literal: a/../b is not a/b there, so the path is normalised before joining.
    joined = posixpath.normpath(posixpath.join(folder, entry))
    return f"{scheme}://{joined}" if scheme else joined


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Append path parts to a local path or s3:// URI."""
    text = os.fspath(uri).rstrip("/")
    return "/".join([text, *(p.strip("/") for p in parts)])


class UnreadableURI(OSError):
    """A URI no file system here can read: another scheme, a NUL byte, a symlink loop."""


def file_info(uri: str | os.PathLike, filesystem: pafs.FileSystem | None = None):
    """``(filesystem, path, FileInfo)`` of ``uri``; ``UnreadableURI`` where it cannot be addressed."""
    try:
        fs, path = resolve(uri, filesystem)
        return fs, path, fs.get_file_info(path)
    except (ValueError, RuntimeError) as error:
        text = os.fspath(uri)
        raise UnreadableURI(str(error) if text in str(error) else f"{text!r}: {error}") from None


def read_bytes(uri: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> bytes:
    """The whole object at ``uri``; a missing object raises ``FileNotFoundError`` naming it, and one
    that cannot be addressed ``UnreadableURI``: read errors are ``OSError`` alike."""
    fs, path, info = file_info(uri, filesystem)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no such file: {os.fspath(uri)}")
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(
    uri: str | os.PathLike, data: bytes, filesystem: pafs.FileSystem | None = None
) -> None:
    """Write ``data`` to ``uri``, creating parent directories where the filesystem has them."""
    fs, path = resolve(uri, filesystem)
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def exists(uri: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> bool:
    fs, path = resolve(uri, filesystem)
    return fs.get_file_info(path).type != pafs.FileType.NotFound
