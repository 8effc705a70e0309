"""Evaluation data from a local directory or an ``s3://`` prefix, read as a local directory.

Evaluation sets are small (megabytes) and their readers want random access to a directory
layout (``dev/sw.json``, ``qrels/test.tsv``), so an ``s3://`` prefix is copied once into a
temporary directory for the duration of the evaluation. The S3 endpoint and keys come from
the same variables as the shard reader's (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
``AWS_*``; see :mod:`hybridray.data.reader`).
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator

from hybridray.errors import UserError


@contextlib.contextmanager
def local_dir(path: str) -> Iterator[Path]:
    """Yield ``path`` as a local directory: itself if local, a temporary copy of every file
    under an ``s3://`` prefix otherwise (removed on exit). UserError naming ``path`` when it
    is missing, empty or unreachable."""
    if "://" not in path:
        local = Path(path).expanduser()
        if not local.is_dir():
            raise UserError(f"{path}: not a directory")
        yield local
        return
    import pyarrow as pa
    import pyarrow.fs as pafs

    from hybridray.data.reader import filesystem_for

    fs, base = filesystem_for(path)
    try:
        infos = [i for i in fs.get_file_info(pafs.FileSelector(base, recursive=True))
                 if i.type == pafs.FileType.File]
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None
    if not infos:
        raise UserError(f"{path}: no files under this prefix")
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
            raise UserError(f"{path}: cannot read: {exc}") from None
        yield root
