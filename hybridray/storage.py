"""Local paths and ``s3://`` URIs behind one small set of file operations (pyarrow.fs).

Every place that reads or writes run data (shards, run directories, models, held-out sets)
goes through here, so S3 settings live in one place: the endpoint comes from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (MinIO, moto, ...; ``run.s3_endpoint`` sets
the first for a run), the region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, credentials
from the usual AWS variables or the instance's role -- never from a config file, so they never
reach a saved config, a report or a checkpoint.

Throttling (``SlowDown``), 5xx answers, dropped connections and an endpoint that is down are
retried around each whole operation here (``retried``: jittered exponential backoff for up to
``retry_budget_s()`` seconds, ``run.storage_retry_s`` in a run's config); the SDK
itself makes one attempt per call, because Arrow's client does not recover from every
throttled answer by itself (a throttled GetObject retried inside the SDK ends in "Failed to
flush response stream"). A missing bucket, a denied request or an endpoint still dead after
the last attempt ends in one ``UserError`` line naming the URI.
"""
from __future__ import annotations

import functools
import os
import posixpath
import random
import sys
import time
from typing import Callable, Optional, Sequence, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from hybridray.errors import UserError

T = TypeVar("T")


def is_remote(uri: str) -> bool:
    return "://" in uri


#: Seconds a failing S3 operation is retried by default (``run.storage_retry_s`` sets
#: ``RETRY_ENV`` for a run, its Ray workers included).
DEFAULT_RETRY_S = 30.0
RETRY_ENV = "HYBRIDRAY_STORAGE_RETRY_S"
#: Read size when copying a file between filesystems.
_CHUNK_BYTES = 8 << 20
#: Words of transient S3 errors (AWS SDK error names and HTTP statuses): worth retrying.
_TRANSIENT = ("SLOW_DOWN", "SLOWDOWN", "THROTTL", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "NETWORK_CONNECTION",
              "REQUEST_TIMEOUT", "HTTP RESPONSE CODE: 5", " 500", " 502", " 503", " 504")


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str, region: str) -> pafs.S3FileSystem:
    # One retry layer, ours (``retried``): the SDK makes a single attempt per call.
    kwargs = dict(connect_timeout=5, request_timeout=30,
                  retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    if region:  # else the SDK finds it (config profile, instance metadata)
        kwargs["region"] = region
    if endpoint:
        url = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=url.netloc, scheme=url.scheme)
    return pafs.S3FileSystem(**kwargs)


def _error(uri: str, what: str, exc: Exception) -> UserError:
    return UserError(f"{uri}: {what}: {' '.join(str(exc).split())}")


def retried(uri: str, what: str, operation: Callable[[], T], budget_s: Optional[float] = None) -> T:
    """``operation()``, retried with jittered exponential backoff for ``budget_s`` seconds
    (default ``retry_budget_s()``) while it fails with a transient S3 error -- saying so on
    stderr once, so that a wait on storage does not look like a hang; a lasting or
    non-transient failure is one ``UserError`` naming ``uri``. A missing file
    (``FileNotFoundError``) is the caller's business and passes through."""
    budget = retry_budget_s() if budget_s is None else budget_s
    deadline = time.monotonic() + budget
    attempt = 0
    while True:
        try:
            return operation()
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowException) as exc:
            transient = is_remote(uri) and any(word in str(exc).upper() for word in _TRANSIENT)
            pause = min(4.0, 0.25 * 2 ** attempt) * random.uniform(0.5, 1.0)
            if not transient or time.monotonic() + pause > deadline:
                retrying = f" (retried for {budget:g} s, run.storage_retry_s)" if attempt else ""
                raise _error(uri, what + retrying, exc) from None
            if attempt == 0:
                print(f"hybridray: storage: {uri}: {what}: {' '.join(str(exc).split())[:160]}; "
                      f"retrying for up to {budget:g} s (run.storage_retry_s)", file=sys.stderr, flush=True)
            time.sleep(pause)
            attempt += 1


def retry_budget_s() -> float:
    """How long ``retried`` keeps trying: ``$HYBRIDRAY_STORAGE_RETRY_S``, else 30 s."""
    try:
        return max(0.0, float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_S)))
    except ValueError:
        raise UserError(f"{RETRY_ENV}={os.environ[RETRY_ENV]!r} is not a number of seconds") from None


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of ``uri`` and the path inside it."""
    if uri.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or ""
        return _s3(endpoint, region), uri[len("s3://"):].rstrip("/")
    if is_remote(uri):
        raise UserError(f"{uri}: only local paths and s3:// are supported")
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def uri_of(like: str, fs_path: str) -> str:
    """The URI of ``fs_path`` on the filesystem of ``like`` (inverse of ``filesystem_for``);
    a path that is a URI already is returned as it is."""
    return f"s3://{fs_path}" if like.startswith("s3://") and not is_remote(fs_path) else fs_path


def join(uri: str, *parts: str) -> str:
    return posixpath.join(uri, *parts) if is_remote(uri) else os.path.join(uri, *parts)


def _info(uri: str) -> pafs.FileInfo:
    fs, path = filesystem_for(uri)
    return retried(uri, "cannot read", lambda: fs.get_file_info(path))


def exists(uri: str) -> bool:
    return _info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return _info(uri).type == pafs.FileType.Directory


def child_dirs(uri: str) -> list[str]:
    """The names of the directories directly under ``uri`` (none if it does not exist)."""
    fs, path = filesystem_for(uri)
    infos = retried(uri, "cannot read", lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos if i.type == pafs.FileType.Directory)


def read_text(uri: str) -> Optional[str]:
    """The file's text, or None if there is no such file."""
    fs, path = filesystem_for(uri)

    def read() -> Optional[str]:
        try:
            with fs.open_input_stream(path) as f:
                return f.read().decode("utf-8")
        except FileNotFoundError:
            return None

    if is_remote(uri) and _info(uri).type == pafs.FileType.NotFound:
        return None
    return retried(uri, "cannot read", read)


def write_text(uri: str, text: str) -> None:
    """Write a whole file: locally through a temporary file and a rename (never half a file);
    on S3 an object is replaced whole anyway."""
    fs, path = filesystem_for(uri)
    if is_remote(uri):
        def put() -> None:
            with fs.open_output_stream(path) as f:
                f.write(text.encode("utf-8"))

        retried(uri, "cannot write", put)
        return
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise _error(uri, "cannot write", exc) from None


def delete_tree(uri: str) -> None:
    """Remove a directory (or prefix) and everything under it; nothing if it is absent."""
    fs, path = filesystem_for(uri)
    if _info(uri).type == pafs.FileType.NotFound:
        return
    retried(uri, "cannot delete", lambda: fs.delete_dir(path))


def file_size(uri: str) -> Optional[tuple[int, None]]:
    """``(size, None)`` -- the shape of ``file_sha256`` without reading the file -- or None if
    there is no such file."""
    info = _info(uri)
    return None if info.type != pafs.FileType.File else (info.size, None)


def file_sizes(uris: list[str]) -> list[int]:
    """Sizes in bytes, one listing call per file."""
    return [_info(uri).size for uri in uris]


def check_writable(uri: str) -> None:
    """Write and delete a small object under ``uri``: a missing bucket, denied access or a dead
    endpoint is one clear error before a run starts, not a failure at its first checkpoint."""
    probe = join(uri, ".hybridray-write-check")
    write_text(probe, "ok")
    fs, path = filesystem_for(probe)
    retried(uri, "cannot delete", lambda: fs.delete_file(path))


def file_sha256(uri: str) -> Optional[tuple[int, str]]:
    """``(size, SHA-256 hex)`` of a file, read in chunks (retried as a whole), or None if absent."""
    import hashlib

    fs, path = filesystem_for(uri)

    def digest() -> Optional[tuple[int, str]]:
        h, size = hashlib.sha256(), 0
        try:
            with fs.open_input_stream(path) as f:
                while chunk := f.read(_CHUNK_BYTES):
                    h.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            return None
        return size, h.hexdigest()

    if _info(uri).type != pafs.FileType.File:
        return None
    return retried(uri, "cannot read", digest)


def copy_tree(source: str, destination: str, last: Sequence[str] = ()) -> None:
    """Copy a directory tree between any two locations (local or ``s3://``), file by file, each
    file retried on its own (a throttled file is sent again, not the whole tree). Files named
    in ``last`` (relative paths) are copied after all the others.

    Not ``pyarrow.fs.copy_files``: seen here, it drops an upload that fails while closing the
    S3 stream ("Error ignored when destroying file ... SLOW_DOWN during UploadPart") and
    returns as if it had copied the file. Closing the stream ourselves raises the error."""
    src_fs, src = filesystem_for(source)
    dst_fs, dst = filesystem_for(destination)
    infos = retried(source, "cannot read", lambda: src_fs.get_file_info(pafs.FileSelector(src, recursive=True)))

    def copy(source_path: str, target: str) -> None:
        with src_fs.open_input_stream(source_path) as reader, dst_fs.open_output_stream(target) as writer:
            while chunk := reader.read(_CHUNK_BYTES):
                writer.write(chunk)

    files = [i for i in infos if i.type == pafs.FileType.File]
    files.sort(key=lambda i: i.path[len(src):].lstrip("/") in last)
    for info in files:
        relative = info.path[len(src):].lstrip("/")
        target = posixpath.join(dst, relative)
        if not is_remote(destination):
            os.makedirs(os.path.dirname(target), exist_ok=True)
        retried(destination if is_remote(destination) else source, f"cannot copy {source}/{relative} to {destination}",
                lambda p=info.path, t=target: copy(p, t))


def local_copy(uri: str) -> str:
    """A local directory holding the tree at ``uri``: ``uri`` itself when it is local, else a
    cached download under ``$HYBRIDRAY_CACHE/remote`` (re-fetched when the remote listing --
    names, sizes, modification times -- has changed, so a model retrained in place is fetched
    again; a file lock makes the workers of one node download once).
    Models, held-out sets and other read-only inputs are read this way."""
    if not is_remote(uri):
        return uri
    import fcntl
    import hashlib
    import json
    import shutil
    import tempfile

    fs, path = filesystem_for(uri)
    try:
        infos = retried(uri, "cannot read", lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True)))
    except FileNotFoundError:
        infos = []
    listing = sorted((i.path[len(path):], i.size, str(i.mtime)) for i in infos if i.type == pafs.FileType.File)
    if not listing:
        raise UserError(f"{uri}: no such directory (or it is empty)")
    root = os.path.join(os.environ.get("HYBRIDRAY_CACHE") or os.path.expanduser("~/.cache/hybridray"), "remote")
    key = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target, stamp_file = os.path.join(root, key), os.path.join(root, key, ".hybridray-listing.json")
    stamp = json.dumps({"uri": uri, "files": listing})
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f".{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if read_text(stamp_file) == stamp:
            return target
        tmp = tempfile.mkdtemp(prefix=f".{key}.partial-", dir=root)
        try:
            copy_tree(uri, tmp)
            with open(os.path.join(tmp, ".hybridray-listing.json"), "w") as f:
                f.write(stamp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


class _RetryingHandler(pafs.FileSystemHandler):
    """An S3 filesystem whose every operation is ``retried`` (for Ray Train, which calls it
    itself: the run snapshot, checkpoint deletions, downloads at a resume). A file being
    written is kept in a local spool file and sent whole, retried, when it is closed -- so a
    write is never half done and a failure is raised at ``close``, never dropped."""

    def __init__(self, s3: pafs.S3FileSystem, budget_s: Optional[float] = None):
        self.s3 = s3
        #: Retry budget carried with the filesystem (``run.storage_retry_s``), so that it holds
        #: in whichever process unpickles it; None = that process's ``retry_budget_s()``.
        self.budget_s = budget_s

    def _do(self, path: str, what: str, operation: Callable[[], T]) -> T:
        return retried(f"s3://{path}", what, operation, self.budget_s)

    def __eq__(self, other) -> bool:
        return isinstance(other, _RetryingHandler) and self.s3.equals(other.s3) and self.budget_s == other.budget_s

    def __hash__(self) -> int:
        return hash((self.get_type_name(), self.budget_s))

    def get_type_name(self) -> str:
        return "hybridray-retrying-s3"

    def normalize_path(self, path):
        return self.s3.normalize_path(path)

    def get_file_info(self, paths):
        return [self._do(p, "cannot read", lambda p=p: self.s3.get_file_info(p)) for p in paths]

    def get_file_info_selector(self, selector):
        return self._do(selector.base_dir, "cannot list", lambda: self.s3.get_file_info(selector))

    def create_dir(self, path, recursive):
        self._do(path, "cannot create", lambda: self.s3.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self._do(path, "cannot delete", lambda: self.s3.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._do(path, "cannot delete", lambda: self.s3.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the contents of every bucket")

    def delete_file(self, path):
        self._do(path, "cannot delete", lambda: self.s3.delete_file(path))

    def move(self, src, dest):
        attempts = []

        def move() -> None:
            try:
                attempts.append(1)
                self.s3.move(src, dest)
            except FileNotFoundError:
                # a retried move whose first try succeeded but whose answer was lost
                if len(attempts) == 1 or self.s3.get_file_info(dest).type == pafs.FileType.NotFound:
                    raise

        self._do(src, "cannot move", move)

    def copy_file(self, src, dest):
        self._do(src, "cannot copy", lambda: self.s3.copy_file(src, dest))

    def open_input_stream(self, path):
        return self.open_input_file(path)

    def open_input_file(self, path):
        # Streamed in ranged reads, each retried: a checkpoint file (often GBs of optimizer
        # state) is never held in memory whole.
        source = self._do(path, "cannot read", lambda: self.s3.open_input_file(path))
        size = self._do(path, "cannot read", source.size)
        return pa.PythonFile(_Download(self, path, source, size), mode="r")

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_Upload(self, path), mode="w")

    def open_append_stream(self, path, metadata):
        raise OSError("append is not supported on S3")


class _Download:
    """A read-only file object for ``_RetryingHandler.open_input_file``: every read is one
    ranged GET at the current offset, retried on its own."""

    def __init__(self, handler: _RetryingHandler, path: str, source, size: int):
        self.handler, self.path, self.source, self.size_bytes = handler, path, source, size
        self.pos, self.closed = 0, False

    def read(self, n: int = -1) -> bytes:
        n = self.size_bytes - self.pos if n is None or n < 0 else min(n, self.size_bytes - self.pos)
        if n <= 0:
            return b""
        data = self.handler._do(self.path, "cannot read", lambda: self.source.read_at(n, self.pos))
        self.pos += len(data)
        return data.to_pybytes() if hasattr(data, "to_pybytes") else bytes(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.size_bytes + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def size(self) -> int:
        return self.size_bytes

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.source.close()


class _Upload:
    """A file object for ``_RetryingHandler.open_output_stream``: spooled, sent at ``close``."""

    def __init__(self, handler: _RetryingHandler, path: str):
        import tempfile

        self.handler, self.path = handler, path
        self.spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)
        self.closed = False

    def write(self, data) -> int:
        return self.spool.write(data)

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return self.spool.tell()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True

        def send() -> None:
            self.spool.seek(0)
            with self.handler.s3.open_output_stream(self.path) as out:
                while chunk := self.spool.read(_CHUNK_BYTES):
                    out.write(chunk)

        try:
            self.handler._do(self.path, "cannot write", send)
        finally:
            self.spool.close()


def train_filesystem(uri: str, budget_s: Optional[float] = None) -> tuple[pafs.FileSystem, str]:
    """``filesystem_for`` for Ray Train's ``RunConfig(storage_filesystem=...)``: on S3 every
    operation Ray Train makes itself is retried like hybridray's own (``_RetryingHandler``),
    for ``budget_s`` seconds (``run.storage_retry_s``) in every process that uses it."""
    fs, path = filesystem_for(uri)
    if isinstance(fs, pafs.S3FileSystem):
        return pafs.PyFileSystem(_RetryingHandler(fs, budget_s)), path
    return fs, path
