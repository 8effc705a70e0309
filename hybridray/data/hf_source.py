"""Hugging Face ``datasets`` as a training source: ``data.train: hf:NAME_OR_PATH``.

``NAME_OR_PATH`` is what ``datasets`` itself takes: a hub id (``org/name``, with
``data.hf.name`` / ``revision`` for a configuration or a pinned commit), a directory written
by ``save_to_disk`` (one split, or a ``DatasetDict`` from which ``data.hf.split`` is taken), or
anything ``load_dataset`` reads, such as a local directory of json / parquet files. The same
goes for ``data.extra_mono[].path`` with ``data.extra_mono[].hf``.

Why the split is materialised once into shard files
====================================================

The reader works on *files* in Ray Data tasks on any node: pass 1 validates and indexes each
file, pass 2 fetches the rows of one window (``reader.py``). A Hugging Face dataset is neither
in the shard schema (its columns need mapping) nor visible to other nodes: a hub download or a
``load_dataset`` conversion lives in the driver's local HF cache. So the driver loads the split
with ``datasets`` (memory-mapped arrow, no copy), hands contiguous row ranges to Ray Data
(``from_arrow``), and Ray Data tasks map the columns onto the shard schema and write one
parquet file per range into ``<run.storage_path>/hf-cache/<key>/`` -- the run's storage, which
every node of a multi-node run reads already (Ray Train requires shared storage there). From
then on the normal two-pass reader runs unchanged, with its validation and rejects report.

Reading the arrow files of the HF cache directly would skip one copy, but only where the cache
is on every node and its columns already are the shard's; the copy costs one sequential pass.

Rows keep their identity: each file is named by the dataset row it starts at, so a rejected
row is reported as ``hf:NAME[split]:ROW`` with the dataset's own 0-based row index
(``dataset[ROW]``), not as a position in a cache file. ``<key>`` hashes the source, its
options, the dataset's fingerprint and the mapping: a resumed or repeated run reuses the files,
a changed dataset or mapping gets new ones. A run that dies while writing leaves an orphan
attempt directory, never a half-read cache: the ``hf-source.json`` that names the files is
written last.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hybridray import storage
from hybridray.config import HFSourceConfig
from hybridray.data import reader
from hybridray.data.schema import ARROW_SCHEMA, OPTIONAL_COLUMNS, SCHEMA_VERSION
from hybridray.errors import UserError

PREFIX = "hf:"
MARKER = "hf-source.json"
#: Dataset rows per cache file (one Ray Data task each, in both materialising and indexing).
ROWS_PER_FILE = 50_000
_ROW = "__hybridray_row__"
#: Shard columns that may hold an integer dataset column (cast to its decimal string).
_ID_COLUMNS = ("group_id", "article_id")
#: Shard columns that hold a list of strings.
_LIST_COLUMNS = ("hard_negatives", "hard_negative_group_ids")


def is_hf(path: str) -> bool:
    return path.startswith(PREFIX)


def absolute(path: str) -> str:
    """``hf:`` + an absolute path when the spec names a local file or directory (Ray jobs may
    run the driver elsewhere); hub ids are returned unchanged."""
    spec = path[len(PREFIX):]
    local = Path(spec).expanduser()
    return PREFIX + str(local.resolve()) if spec and local.exists() else path


# ----------------------------------------------------------------------------- loading
def load_split(spec: str, options: HFSourceConfig, key: str):
    """``(datasets.Dataset, split or None)`` of one source; UserError naming ``key`` otherwise."""
    import datasets

    local = Path(spec).expanduser()
    if local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file()):
        if options.name or options.revision:
            raise UserError(f"{key}: name / revision select a load_dataset configuration; "
                            f"{PREFIX}{spec} was written by save_to_disk and has neither")
        try:
            loaded = datasets.load_from_disk(str(local))
        except Exception as exc:  # noqa: BLE001 -- a damaged directory fails in many ways
            raise UserError(f"{PREFIX}{spec}: cannot load the save_to_disk directory: {_one_line(exc)}") from None
        if isinstance(loaded, datasets.DatasetDict):
            if options.split not in loaded:
                raise UserError(f"{key}.split: {PREFIX}{spec} has no split {options.split!r} "
                                f"(it has {', '.join(map(repr, loaded))})")
            return loaded[options.split], options.split
        if loaded.split is not None and str(loaded.split) != options.split:
            raise UserError(f"{key}.split: {PREFIX}{spec} holds the split {str(loaded.split)!r}, "
                            f"not {options.split!r}")
        return loaded, (str(loaded.split) if loaded.split is not None else None)
    try:
        loaded = datasets.load_dataset(spec, options.name, split=options.split, revision=options.revision)
    except Exception as exc:  # noqa: BLE001 -- every failure here is the source's (missing, hub, split)
        raise UserError(f"{PREFIX}{spec}: datasets.load_dataset failed: {_one_line(exc)}") from None
    return loaded, options.split


def _one_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


# ----------------------------------------------------------------------------- column plan
def column_plan(dataset, options: HFSourceConfig, *, key: str, label: str, default_source: str) -> list[tuple]:
    """For every shard column, where its values come from: ``("column", name)``,
    ``("labels", name, class names)``, ``("constant", value)`` or ``("null",)``.

    Checked here, on the driver, before any work: a mapped column that does not exist or
    cannot hold the shard column's type is a config error naming ``key``.
    """
    import datasets

    schema = dataset.data.schema
    plan = []
    for field in ARROW_SCHEMA:
        target = field.name
        if target in options.constants:
            plan.append((target, "constant", options.constants[target]))
            continue
        column = options.columns.get(target, target if target in schema.names else None)
        if column is None:
            if target == "source":
                plan.append((target, "constant", default_source))
            elif target in OPTIONAL_COLUMNS:
                plan.append((target, "null", None))
            else:
                raise UserError(
                    f"{key}.columns: {label} has no column for {target!r} (its columns: "
                    f"{', '.join(schema.names)}); map one with {key}.columns.{target}=COLUMN"
                    + ("" if target in ("group_id", "query", "passage") else f" or set {key}.constants.{target}")
                )
            continue
        if column not in schema.names:
            raise UserError(f"{key}.columns.{target}: {label} has no column {column!r} "
                            f"(its columns: {', '.join(schema.names)})")
        feature = dataset.features.get(column)
        if isinstance(feature, datasets.ClassLabel) and target not in _LIST_COLUMNS:
            plan.append((target, "labels", column, tuple(feature.names)))
            continue
        kind = schema.field(column).type
        ok = (
            (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and _is_text(kind.value_type)
            if target in _LIST_COLUMNS
            else _is_text(kind) or (target in _ID_COLUMNS and pa.types.is_integer(kind))
        )
        if not ok:
            wanted = "a list of strings" if target in _LIST_COLUMNS else "strings"
            raise UserError(f"{key}.columns.{target}: column {column!r} of {label} is "
                            f"{kind}, the shard column {target!r} needs {wanted}")
        plan.append((target, "column", column))
    return plan


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def shard_table(batch: pa.Table, plan: Sequence[tuple]) -> pa.Table:
    """Dataset rows -> shard rows (``schema.ARROW_SCHEMA``), as ``plan`` says."""
    n = batch.num_rows
    arrays = []
    for target, kind, *args in plan:
        type_ = ARROW_SCHEMA.field(target).type
        if kind == "column":
            arrays.append(batch.column(args[0]).combine_chunks().cast(type_))
        elif kind == "labels":  # ClassLabel ids -> names; -1 (no label) -> null
            ids = batch.column(args[0]).combine_chunks().to_numpy(zero_copy_only=False)
            ids = np.where(np.isnan(ids), -1, ids).astype(np.int64) if ids.dtype.kind == "f" else ids
            names = np.asarray(args[1], dtype=object)
            arrays.append(pa.array([names[i] if 0 <= i < len(names) else None for i in ids], type_))
        elif kind == "constant":
            arrays.append(pa.array([args[0]] * n, type_))
        else:
            arrays.append(pa.nulls(n, type_))
    return pa.Table.from_arrays(arrays, schema=ARROW_SCHEMA)


# ----------------------------------------------------------------------------- materialise
def file_name(first_row: int) -> str:
    return f"rows-{first_row:012d}.parquet"


def _write_ranges(batch: pa.Table, *, plan: Sequence[tuple], directory: str) -> pa.Table:
    """Ray Data task: one parquet file per contiguous run of dataset rows in ``batch``."""
    fs, base = storage.filesystem_for(directory)
    rows = batch.column(_ROW).to_numpy()
    out = {"file": [], "first_row": [], "rows": []}
    for part in np.split(np.arange(len(rows)), np.flatnonzero(np.diff(rows) != 1) + 1):
        if not len(part):
            continue
        first = int(rows[part[0]])
        table = shard_table(batch.slice(int(part[0]), len(part)), plan)
        with fs.open_output_stream(f"{base}/{file_name(first)}") as f:
            pq.write_table(table, f)
        out["file"].append(file_name(first))
        out["first_row"].append(first)
        out["rows"].append(len(part))
    return pa.table(out, schema=pa.schema([("file", pa.string()), ("first_row", pa.int64()), ("rows", pa.int64())]))


def materialise(dataset, plan: Sequence[tuple], directory: str, *, rows_per_file: int, task_cpus: float) -> list[dict]:
    """Write the split as shard parquet files (Ray Data tasks); ``[{file, first_row, rows}]``."""
    import ray.data

    needed = sorted({args[0] for _, kind, *args in plan if kind in ("column", "labels")})
    table = dataset.with_format("arrow")[:].select(needed)  # applies an indices mapping, if any
    n = table.num_rows
    blocks = [
        table.slice(a, min(rows_per_file, n - a)).append_column(
            _ROW, pa.array(np.arange(a, min(a + rows_per_file, n)), pa.int64())
        )
        for a in range(0, n, rows_per_file)
    ]
    written = ray.data.from_arrow(blocks).map_batches(
        _write_ranges, batch_size=None, batch_format="pyarrow", num_cpus=task_cpus,
        fn_kwargs={"plan": list(plan), "directory": directory},
    ).take_all()
    files = sorted(({k: r[k] for k in ("file", "first_row", "rows")} for r in written), key=lambda r: r["first_row"])
    expected = 0
    for r in files:  # every dataset row exactly once, in order
        if r["first_row"] != expected:
            raise RuntimeError(f"{directory}: materialised rows are not contiguous at row {expected}")
        expected += r["rows"]
    if expected != n:
        raise RuntimeError(f"{directory}: wrote {expected} of {n} rows")
    return files


# ----------------------------------------------------------------------------- the source
@dataclass(frozen=True)
class HFSource:
    """A materialised ``hf:`` source: its name in reports and its shard files."""

    label: str  # e.g. hf:/data/mlqa-hf[train] -- what rejects and errors name
    directory: str  # the shard files (parquet, schema v1)
    first_rows: dict  # file name -> dataset row of its first row
    rows: int
    reused: bool

    def locate(self, file: str, row: int) -> tuple[str, int]:
        """Cache file + row -> this source + the dataset's own row (``reader.Locate``)."""
        return self.label, self.first_rows[posixpath.basename(file)] + row


def _read_marker(fs, path: str) -> Optional[dict]:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, OSError, ValueError, pa.ArrowException):
        return None


def _load(path: str, options: Optional[HFSourceConfig], key: str, rows_per_file: int):
    """``(dataset, label, column plan, identity, digest)`` of a source: what names its cache."""
    spec = path[len(PREFIX):]
    options = options or HFSourceConfig()
    dataset, split = load_split(spec, options, key)
    tag = "/".join(x for x in (options.name, split) if x)
    label = f"{PREFIX}{spec}" + (f"[{tag}]" if tag else "")
    if dataset.num_rows == 0:
        raise UserError(f"{label}: the split has no rows")
    default_source = Path(spec).name if Path(spec).expanduser().exists() else spec
    plan = column_plan(dataset, options, key=key, label=label, default_source=default_source)
    identity = {
        "schema_version": SCHEMA_VERSION, "source": label, "revision": options.revision,
        "fingerprint": dataset._fingerprint, "num_rows": dataset.num_rows, "plan": plan,
        "rows_per_file": rows_per_file,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=list).encode()).hexdigest()[:16]
    return dataset, label, plan, identity, digest


def fingerprint(path: str, options: Optional[HFSourceConfig], *, key: str) -> str:
    """The content fingerprint of an ``hf:`` source (the name of its cache), without
    materialising it: the dataset's own fingerprint, its size and the column mapping."""
    return _load(path, options, key, ROWS_PER_FILE)[4]


def prepare(
    path: str, options: Optional[HFSourceConfig], *, key: str, cache_root: str,
    rows_per_file: int = ROWS_PER_FILE, task_cpus: float = 0.25,
) -> HFSource:
    """Load ``path`` (``hf:...``) and materialise it under ``cache_root`` once."""
    dataset, label, plan, identity, digest = _load(path, options, key, rows_per_file)
    root = f"{cache_root.rstrip('/')}/{digest}"
    fs, fs_root = storage.filesystem_for(root)
    marker = _read_marker(fs, f"{fs_root}/{MARKER}")
    if marker and marker.get("identity") == json.loads(json.dumps(identity, default=list)):
        directory = f"{root}/{marker['attempt']}"
        files, reused = marker["files"], True
    else:
        attempt = uuid.uuid4().hex[:8]
        directory = f"{root}/{attempt}"
        fs.create_dir(f"{fs_root}/{attempt}", recursive=True)
        started = time.perf_counter()
        files = materialise(dataset, plan, directory, rows_per_file=rows_per_file, task_cpus=task_cpus)
        with fs.open_output_stream(f"{fs_root}/{MARKER}") as f:
            f.write(json.dumps({"identity": identity, "attempt": attempt, "files": files},
                               indent=1, default=list).encode("utf-8"))
        reused = False
        print(f"[hybridray] {label}: {dataset.num_rows} rows -> {len(files)} shard file(s) in {directory} "
              f"({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
    return HFSource(label, directory, {r["file"]: r["first_row"] for r in files}, dataset.num_rows, reused)


def index_hf(
    path: str, options: Optional[HFSourceConfig], *, key: str, cache_root: str, max_text_chars: int,
    languages: Optional[Sequence[str]] = None, strict: bool = False, task_cpus: float = 0.25,
    rows_per_file: int = ROWS_PER_FILE, need_negatives: bool = False,
) -> reader.ShardIndex:
    """``reader.index_shards`` of an ``hf:`` source: rejects name the dataset and its row."""
    source = prepare(path, options, key=key, cache_root=cache_root, rows_per_file=rows_per_file, task_cpus=task_cpus)
    index = reader.index_shards(
        source.directory, max_text_chars=max_text_chars, languages=languages, strict=strict,
        task_cpus=task_cpus, locate=source.locate, need_negatives=need_negatives,
    )
    index.path = source.label
    return index
