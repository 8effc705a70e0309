"""Local paths and ``s3://`` URIs behind one small set of file operations (pyarrow.fs).

Every place that reads or writes run data (shards, run directories, checkpoints' side files)
goes through here, so S3 settings live in one place: the endpoint comes from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (MinIO, moto, ...), the region from
``AWS_REGION`` / ``AWS_DEFAULT_REGION``, credentials from the usual AWS variables. Timeouts
and retries are short so that an unreachable endpoint is a clear error in seconds, not a hang.
"""
from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from hybridray.errors import UserError


def is_remote(uri: str) -> bool:
    return "://" in uri


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str, region: str) -> pafs.S3FileSystem:
    kwargs = dict(region=region, connect_timeout=5, request_timeout=30,
                  retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2))
    if endpoint:
        url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=url.netloc, scheme=url.scheme)
    return pafs.S3FileSystem(**kwargs)


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``uri`` and the path inside it."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return _s3(endpoint, region), uri[len("s3://"):].rstrip("/")
    if is_remote(uri):
        raise UserError(f"{uri}: only local paths and s3:// are supported")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def uri_of(like: str, fs_path: str) -> str:
    """The URI of ``fs_path`` on the filesystem of ``like`` (inverse of ``filesystem_for``)."""
    return f"s3://{fs_path}" if like.startswith("s3://") else fs_path


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri, *parts) if is_remote(uri) else os.path.join(uri, *parts)


def _info(uri: str) -> pafs.FileInfo:
    fs, path = filesystem_for(uri)
    try:
        return fs.get_file_info(path)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{uri}: cannot read: {exc}") from None


def exists(uri: str) -> bool:
    return _info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return _info(uri).type == pafs.FileType.Directory


def read_text(uri: str) -> Optional[str]:
    """The file's text, or None if there is no such file."""
    fs, path = filesystem_for(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException) as exc:
        if _info(uri).type == pafs.FileType.NotFound:
            return None
        raise UserError(f"{uri}: cannot read: {exc}") from None


def write_text(uri: str, text: str) -> None:
    """Write a whole file: locally through a temporary file and a rename (never half a file);
    on S3 an object is replaced whole anyway."""
    fs, path = filesystem_for(uri)
    try:
        if is_remote(uri):
            with fs.open_output_stream(path) as f:
                f.write(text.encode("utf-8"))
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{uri}: cannot write: {exc}") from None


def delete_tree(uri: str) -> None:
    """Remove a directory (or prefix) and everything under it; nothing if it is absent."""
    fs, path = filesystem_for(uri)
    if _info(uri).type == pafs.FileType.NotFound:
        return
    try:
        fs.delete_dir(path)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{uri}: cannot delete: {exc}") from None


def file_sizes(uris: list[str]) -> list[int]:
    """Sizes in bytes, one listing call per file."""
    return [_info(uri).size for uri in uris]


@contextlib.contextmanager
def local_dir(uri: str) -> Iterator[Path]:
    """``uri`` as a local directory, for readers that want random access to a small layout
    (evaluation sets: ``dev/sw.json``, ``qrels/test.tsv``): itself if local, else a temporary
    copy of every file under the ``s3://`` prefix, removed on exit. UserError naming ``uri``
    when it is missing, empty or unreachable."""
    if not is_remote(uri):
        local = Path(uri).expanduser()
        if not local.is_dir():
            raise UserError(f"{uri}: not a directory")
        yield local
        return
    fs, base = filesystem_for(uri)
    try:
        infos = [i for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
                 if i.type == pafs.FileType.File]
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{uri}: cannot read: {exc}") from None
    if not infos:
        raise UserError(f"{uri}: no files under this prefix")
    with tempfile.TemporaryDirectory(prefix="hybridray-eval-") as tmp:
        root = Path(tmp) / base.rstrip("/").rsplit("/", 1)[-1]
        try:
            for info in infos:
                target = root / info.path[len(base):].lstrip("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                with fs.open_input_stream(info.path) as source, open(target, "wb") as out:
                    while chunk := source.read(1 << 20):
                        out.write(chunk)
        except (OSError, pa.ArrowException) as exc:
            raise UserError(f"{uri}: cannot read: {exc}") from None
        yield root
