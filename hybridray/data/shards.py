"""Writing shard datasets (parquet files + ``manifest.json``) and reading their manifest.

Writing goes to a temporary sibling directory that is renamed into place at the end, so an
interrupted ``data prepare`` never leaves a half-written dataset behind, and an existing
dataset is only replaced when ``overwrite`` is asked for.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from hybridray.data.schema import ARROW_SCHEMA, MANIFEST_NAME, SCHEMA_VERSION
from hybridray.errors import UserError


def write_shards(
    rows: Iterable[dict],
    out_dir: str | Path,
    *,
    rows_per_file: int = 50_000,
    source: str = "",
    overwrite: bool = False,
) -> dict:
    """Write ``rows`` (dicts of schema columns) as parquet shards plus a manifest.

    Rows are written in the order given: callers keep a group's translations adjacent so
    that a streaming reader sees whole groups. Returns the manifest.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise UserError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        counts: Counter = Counter()
        files = []
        buffer: list[dict] = []

        def flush() -> None:
            name = f"part-{len(files):05d}.parquet"
            write_shard_file(buffer, tmp / name)
            files.append({"path": name, "rows": len(buffer)})
            buffer.clear()

        for row in rows:
            buffer.append(row)
            counts[row["lang"]] += 1
            if len(buffer) >= rows_per_file:
                flush()
        if buffer or not files:
            flush()
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "source": source,
            "languages": sorted(counts),
            "rows_per_language": dict(sorted(counts.items())),
            "rows": sum(counts.values()),
            "files": files,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_shard_file(rows: list[dict], path: str | Path) -> int:
    """One parquet shard file of ``rows`` (schema columns; others ignored, missing ones null),
    written to a hidden temporary sibling and renamed into place, so the name never holds a
    half-written file. Returns the number of rows."""
    path = Path(path)
    table = pa.Table.from_pylist([{name: row.get(name) for name in ARROW_SCHEMA.names} for row in rows],
                                 schema=ARROW_SCHEMA)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return len(rows)


def read_manifest(shard_dir: str | Path) -> dict:
    """The manifest of a local shard dataset; checks the schema version."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{path}: no manifest (is {shard_dir} a shard dataset?)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: invalid JSON: {exc}") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"{path}: schema_version {version!r}, this hybridray reads {SCHEMA_VERSION}")
    return manifest
