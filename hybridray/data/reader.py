"""Streaming read and validation of shard datasets (parquet or jsonl; local, glob or ``s3://``).

Reading happens in two passes, both Ray Data tasks over *files*, so every row keeps its file
and its row number there (a rejects report that says ``part-00003.parquet:812`` is useful;
"row 51,812 of the dataset" is not):

1. **index** (``index_shards``): each file is read and every row validated with
   ``schema.row_problem``; only a compact index (file, row, group_id, lang, number of hard
   negatives) reaches the driver, never the texts. The driver checks what needs the whole
   dataset -- duplicate ``(group_id, lang)`` -- and gathers a group's rows wherever they are
   (``hybridray data prepare`` keeps them adjacent, but a group split across two files, or
   scattered, still becomes one group).
2. **fetch** (``read_rows``): the batch pipeline reads the texts of one window's rows.

Row numbers: 0-based row index for parquet (as ``pyarrow.Table.slice`` counts), 1-based line
number for jsonl (as editors and ``sed -n`` count).

Local paths and ``s3://`` go through ``hybridray.storage`` (endpoint, credentials, timeouts).
"""
from __future__ import annotations

import fnmatch
import io
import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from hybridray.data.sampler import Group
from hybridray.data.schema import MANIFEST_NAME, SCHEMA_VERSION, RowError, row_problem
from hybridray.errors import UserError
from hybridray import storage
from hybridray.storage import filesystem_for, uri_of

SHARD_SUFFIXES = (".parquet", ".jsonl")
#: The reject reason of a row without hard negatives in a run that draws them.
NO_NEGATIVES = ("no hard_negatives, and loss.hard_negatives > 0 draws from them (hybridray data mine fills more "
                "rows with --keep-existing, a lower --relative-margin or a higher --range-max-cap)")
_GLOB = re.compile(r"[*?\[]")

#: ``(file, row) -> (name, row)`` as a rejects report should show them (an ``hf:`` source's
#: cache files report their dataset's own rows; see ``hf_source``). Default: unchanged.
Locate = Callable[[str, int], tuple[str, int]]

#: The columns of the per-file index (pass 1).
INDEX_SCHEMA = pa.schema(
    [
        ("file_index", pa.int32()),
        ("row", pa.int64()),
        ("group_id", pa.string()),
        ("lang", pa.string()),
        ("n_negatives", pa.int32()),
        ("filtered", pa.bool_()),
        ("reason", pa.string()),
    ]
)


# ----------------------------------------------------------------------------- files
def _is_shard(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.endswith(SHARD_SUFFIXES) and not base.startswith((".", "_"))


def list_shard_files(path: str) -> list[str]:
    """Every ``*.parquet`` / ``*.jsonl`` file of a directory, glob or ``s3://`` prefix, sorted.

    Raises UserError naming ``path`` when the storage is unreachable or holds no shard file.
    """
    return [uri for uri, _ in list_shard_sizes(path)]


def list_shard_sizes(path: str) -> list[tuple[str, int]]:
    """``list_shard_files`` with each file's size in bytes (from the same listing)."""
    fs, fs_path = filesystem_for(path)
    match = _GLOB.search(fs_path)
    base = fs_path[: match.start()].rsplit("/", 1)[0] if match else fs_path
    try:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            candidates = [info]
        elif info.type == pafs.FileType.Directory:
            candidates = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        else:
            raise UserError(f"{path}: no such file or directory")
    except UserError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{path}: cannot read: {' '.join(str(exc).split())}") from None
    files = sorted(
        (i.path, i.size) for i in candidates
        if i.type == pafs.FileType.File and _is_shard(i.path)
        and (not match or fnmatch.fnmatchcase(i.path, fs_path))
    )
    if not files:
        raise UserError(f"{path}: no shard files (*.parquet, *.jsonl)")
    return [(uri_of(path, f), size) for f, size in files]


# ----------------------------------------------------------------------------- rows
def iter_file_rows(path: str, columns: Optional[Sequence[str]] = None) -> Iterator[tuple[int, object]]:
    """``(row number, row)`` of one shard file, streaming; a jsonl line that is not a JSON
    object yields its problem as a string instead of a dict."""
    fs, fs_path = filesystem_for(path)
    if path.endswith(".parquet"):
        with fs.open_input_file(fs_path) as f:
            parquet = pq.ParquetFile(f)
            names = [c for c in (columns or parquet.schema_arrow.names) if c in parquet.schema_arrow.names]
            row = 0
            for batch in parquet.iter_batches(batch_size=4096, columns=names):
                for record in batch.to_pylist():
                    yield row, record
                    row += 1
        return
    with fs.open_input_stream(fs_path) as f:
        # Lines are decoded one by one: a line of invalid UTF-8 is that line's problem, not
        # the whole file's.
        for line_no, data in enumerate(io.BufferedReader(f), start=1):
            try:
                raw = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield line_no, f"invalid UTF-8 at byte {exc.start} of the line"
                continue
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError as exc:
                yield line_no, f"invalid JSON: {exc.msg}"
                continue
            except RecursionError:
                yield line_no, "invalid JSON: nested too deeply"
                continue
            if not isinstance(record, dict):
                yield line_no, f"not a JSON object but {type(record).__name__}"
                continue
            yield line_no, ({k: record.get(k) for k in columns} if columns else record)


def index_file(
    path: str, file_index: int, *, max_text_chars: int, languages: Optional[Sequence[str]] = None
) -> pa.Table:
    """Pass 1 for one file: one index row per shard row, with its problem (or null).

    Rows in a language outside ``languages`` are marked ``filtered`` (a selection, not an
    error: they are neither trained on nor reported as rejects).
    """
    wanted = set(languages) if languages else None

    def build() -> dict[str, list]:
        out: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}

        def add(row, group_id=None, lang=None, n_neg=0, filtered=False, reason=None):
            for name, value in zip(INDEX_SCHEMA.names, (file_index, row, group_id, lang, n_neg, filtered, reason)):
                out[name].append(value)

        for row, record in iter_file_rows(path):
            if isinstance(record, str):
                add(row, reason=record)
                continue
            reason = row_problem(record, max_text_chars=max_text_chars)
            if reason:  # its language still counts for the manifest check
                lang = record.get("lang")
                add(row, lang=lang if isinstance(lang, str) else None, reason=reason)
                continue
            negatives = record.get("hard_negatives") or ()
            add(row, record["group_id"], record["lang"], len(negatives),
                filtered=wanted is not None and record["lang"] not in wanted)
        return out

    try:
        out = storage.retried(path, "cannot read file", build)  # a throttled read: the file again
    except (UserError, OSError, pa.ArrowException, UnicodeDecodeError) as exc:
        message = str(exc).removeprefix(f"{path}: ")
        out = {name: [value] for name, value in zip(INDEX_SCHEMA.names, (file_index, -1, None, None, 0, False,
                                                                          message if isinstance(exc, UserError)
                                                                          else f"cannot read file: {exc}"))}
    return pa.Table.from_pydict(out, schema=INDEX_SCHEMA)


def read_rows(path: str, rows: Iterable[int], columns: Sequence[str]) -> dict[int, dict]:
    """The given rows of one file (``columns`` only, None for a column the file does not
    have); parquet reads only the row groups needed."""
    wanted = sorted(set(rows))
    if not wanted:
        return {}
    return storage.retried(path, "cannot read", lambda: _read_rows(path, wanted, columns))


def _read_rows(path: str, wanted: list[int], columns: Sequence[str]) -> dict[int, dict]:
    if not path.endswith(".parquet"):
        targets = set(wanted)
        return {r: rec for r, rec in iter_file_rows(path, columns) if r in targets}
    fs, fs_path = filesystem_for(path)
    out: dict[int, dict] = {}
    with fs.open_input_file(fs_path) as f:
        parquet = pq.ParquetFile(f)
        starts, start = [], 0
        for i in range(parquet.num_row_groups):
            starts.append(start)
            start += parquet.metadata.row_group(i).num_rows
        by_group: dict[int, list[int]] = {}
        for r in wanted:
            g = max(i for i, s in enumerate(starts) if s <= r)
            by_group.setdefault(g, []).append(r)
        present = [c for c in columns if c in parquet.schema_arrow.names]
        for g, rs in by_group.items():
            table = parquet.read_row_group(g, columns=present)
            records = table.take([r - starts[g] for r in rs]).to_pylist()
            out.update((r, {c: rec.get(c) for c in columns}) for r, rec in zip(rs, records))
    return out


# ----------------------------------------------------------------------------- the index
@dataclass
class ShardIndex:
    """What the driver knows about a shard dataset: groups (data order), counts, rejects."""

    path: str
    files: list[str]
    groups: list[Group] = field(default_factory=list)
    rows_per_language: dict[str, int] = field(default_factory=dict)
    rejects: list[RowError] = field(default_factory=list)
    filtered_rows: int = 0
    scattered_groups: int = 0  # groups whose rows are not adjacent in data order
    min_negatives: int = 0  # fewest hard negatives of any accepted row
    rows_without_negatives: int = 0  # valid, non-duplicate rows with no hard negative (rejects, if need_negatives)
    first_without_negatives: Optional[str] = None  # "file:row" of the first of them, in data order
    #: Every row read, per file (accepted, rejected or filtered) and per language (rows whose
    #: language could be read): what the dataset's manifest must agree with.
    rows_per_file: list[int] = field(default_factory=list)
    rows_read_per_language: dict[str, int] = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return sum(self.rows_per_language.values())

    def reject_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(reason_kind(r.reason) for r in self.rejects).items()))


def reason_kind(reason: str) -> str:
    """A short category of a reject reason, for the run's metrics."""
    for prefix, kind in (
        ("missing field", "missing_field"), ("empty field", "empty_field"),
        ("unknown language", "unknown_language"), ("duplicate", "duplicate"),
        ("field 'hard_negatives'", "bad_hard_negatives"), ("a hard negative", "too_long"),
        ("field 'hard_negative_group_ids'", "bad_hard_negatives"), (NO_NEGATIVES, "no_hard_negatives"),
        ("unknown field", "unknown_field"), ("invalid JSON", "invalid_json"),
        ("not a JSON object", "invalid_json"),
    ):
        if reason.startswith(prefix):
            return kind
    if "characters (max" in reason:
        return "too_long"
    if "must be a string" in reason:
        return "bad_type"
    return "other"


def merge_index(
    path: str, files: list[str], tables: Iterable[pa.Table], *, strict: bool, locate: Optional[Locate] = None,
    need_negatives: bool = False,
) -> ShardIndex:
    """Fold the per-file index tables (in file order) into groups, with global checks.

    ``strict`` raises UserError on the first bad row in data order, naming file:row.
    ``need_negatives`` (a run with ``loss.hard_negatives > 0``) rejects a row without any.
    """
    index = ShardIndex(path, files)
    locate = locate or (lambda file, row: (file, row))
    first_seen: dict[tuple[str, str], tuple[int, int]] = {}
    members: dict[str, list[tuple[str, int, int]]] = {}
    last_group: Optional[str] = None
    closed: set[str] = set()
    counts: Counter = Counter()
    min_neg: Optional[int] = None

    def reject(file_index: int, row: int, reason: str) -> None:
        if row < 0:
            raise UserError(f"{files[file_index]}: {reason}")
        error = RowError(*locate(files[file_index], row), reason)
        if strict:
            raise UserError(str(error))
        index.rejects.append(error)

    index.rows_per_file = [0] * len(files)
    read_per_language: Counter = Counter()
    for table in tables:
        cols = table.to_pydict()
        for fi, row, gid, lang, n_neg, filtered, reason in zip(*(cols[n] for n in INDEX_SCHEMA.names)):
            if row >= 0:
                index.rows_per_file[fi] += 1
                read_per_language[lang] += 1
            if reason is not None:
                reject(fi, row, reason)
                continue
            if filtered:
                index.filtered_rows += 1
                continue
            key = (gid, lang)
            if key in first_seen:
                first = "{}:{}".format(*locate(files[first_seen[key][0]], first_seen[key][1]))
                reject(fi, row, f"duplicate (group_id, lang) ({gid!r}, {lang!r}): first at {first}")
                continue
            first_seen[key] = (fi, row)  # a later copy is a duplicate, whether this row is kept or not
            if n_neg == 0:
                index.rows_without_negatives += 1
                if index.first_without_negatives is None:
                    index.first_without_negatives = "{}:{}".format(*locate(files[fi], row))
                if need_negatives:
                    reject(fi, row, NO_NEGATIVES)
                    continue
            if gid != last_group:
                if last_group is not None:
                    closed.add(last_group)
                if gid in closed:
                    index.scattered_groups += 1
                    closed.discard(gid)  # count each scattered group once per re-appearance
                last_group = gid
            members.setdefault(gid, []).append((lang, fi, row))
            counts[lang] += 1
            min_neg = n_neg if min_neg is None else min(min_neg, n_neg)
    for gid, rows in members.items():  # dicts keep first-occurrence (data) order
        rows.sort()
        index.groups.append(Group(gid, tuple(r[0] for r in rows), tuple((r[1], r[2]) for r in rows)))
    index.rows_per_language = dict(sorted(counts.items()))
    index.rows_read_per_language = {k: v for k, v in read_per_language.items() if k is not None}
    index.min_negatives = min_neg or 0
    return index


def check_manifest(index: ShardIndex) -> None:
    """UserError naming the manifest when a dataset directory's ``manifest.json`` disagrees
    with the files read: its schema version, its file list, any file's row count, the total,
    or the rows per language (a truncated, rewritten, added or lost shard). A dataset without
    a manifest, a glob or a single file is not checked."""
    path = index.path
    if _GLOB.search(path) or not storage.is_dir(path):
        return
    uri = storage.join(path, MANIFEST_NAME)
    text = storage.read_text(uri)
    if text is None:
        return
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{uri}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{uri}: not a JSON object")
    version = manifest.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise UserError(f"{uri}: schema_version {version!r}, this hybridray reads {SCHEMA_VERSION}")
    _check_manifest_types(uri, manifest)
    root = filesystem_for(path)[1].rstrip("/")
    found = dict(zip((filesystem_for(f)[1][len(root):].lstrip("/") for f in index.files), index.rows_per_file))
    listed = manifest.get("files")
    if listed is not None:
        if not isinstance(listed, list) or not all(
            isinstance(f, dict) and isinstance(f.get("path"), str) and type(f.get("rows")) is int for f in listed
        ):
            raise UserError(f"{uri}: 'files' must be a list of {{\"path\": ..., \"rows\": ...}}")
        said = {f["path"]: f["rows"] for f in listed}
        for name in sorted(set(said) | set(found)):
            if name not in found:
                raise UserError(f"{uri}: lists {name}, which is not in {path} (a lost shard?)")
            if name not in said:
                raise UserError(f"{uri}: does not list {storage.join(path, name)} (a shard added after the manifest?)")
            if said[name] != found[name]:
                raise UserError(f"{uri}: says {storage.join(path, name)} has {said[name]} rows, it has "
                                f"{found[name]} (truncated or rewritten?)")
    total = sum(index.rows_per_file)
    if "rows" in manifest and manifest["rows"] != total:
        raise UserError(f"{uri}: says the dataset has {manifest['rows']!r} rows, its files have {total}")
    per_language = manifest.get("rows_per_language")
    if per_language is not None and per_language != index.rows_read_per_language:
        differ = sorted(k for k in set(per_language) | set(index.rows_read_per_language)
                        if per_language.get(k) != index.rows_read_per_language.get(k))
        raise UserError(f"{uri}: rows_per_language disagrees with the files for {differ[:5]} "
                        f"(manifest {[per_language.get(k) for k in differ[:5]]}, files "
                        f"{[index.rows_read_per_language.get(k, 0) for k in differ[:5]]})")


def _check_manifest_types(uri: str, manifest: dict) -> None:
    """The shape of the manifest's counts, checked before they are compared: ``true`` is not
    the number 1, and a list where a mapping belongs is a damaged manifest, not a traceback."""
    if "rows" in manifest and type(manifest["rows"]) is not int:
        raise UserError(f"{uri}: 'rows' must be a whole number, not {manifest['rows']!r}")
    per_language = manifest.get("rows_per_language")
    if per_language is not None and not (
        isinstance(per_language, dict) and all(type(n) is int for n in per_language.values())
    ):
        raise UserError(f"{uri}: 'rows_per_language' must map language codes to whole numbers, "
                        f"not {str(per_language)[:80]!r}")


def _index_batch(batch: pa.Table, max_text_chars: int, languages) -> pa.Table:
    tables = [
        index_file(p, int(i), max_text_chars=max_text_chars, languages=languages)
        for p, i in zip(batch["path"].to_pylist(), batch["file_index"].to_pylist())
    ]
    return pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()


def index_shards(
    path: str,
    *,
    max_text_chars: int,
    languages: Optional[Sequence[str]] = None,
    strict: bool = False,
    task_cpus: float = 0.25,
    locate: Optional[Locate] = None,
    need_negatives: bool = False,
) -> ShardIndex:
    """Pass 1 over a shard dataset on Ray Data (one task per file, results in file order);
    ``need_negatives``: see :func:`merge_index`."""
    import ray.data

    files = list_shard_files(path)
    ds = ray.data.from_items(
        [{"file_index": i, "path": f} for i, f in enumerate(files)], override_num_blocks=len(files)
    ).map_batches(
        _index_batch, batch_size=1, batch_format="pyarrow", num_cpus=task_cpus,
        fn_kwargs={"max_text_chars": max_text_chars, "languages": languages},
    )
    ds.context.execution_options.preserve_order = True
    index = merge_index(path, files, ds.iter_batches(batch_size=None, batch_format="pyarrow"), strict=strict,
                        locate=locate, need_negatives=need_negatives)
    check_manifest(index)
    return index


def write_rejects(path: str, rejects: Iterable[RowError]) -> int:
    """The rejects report (local or ``s3://``): one JSON object per line, ``{"file", "row", "reason"}``."""
    from hybridray import storage

    lines = [json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in rejects]
    storage.write_text(path, "".join(lines))
    return len(lines)
