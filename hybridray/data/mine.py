"""``hybridray data mine``: hard negatives mined with a retriever, written into a copy of a
shard dataset.

For each row, the query is searched against every passage *in the row's language* (the
passage's: a cross-lingual step takes its negatives from the passage row, so both step kinds
get passage-language negatives), and ``hard_negatives`` gets the best-scoring passages that are
neither the positive nor a translation of it, with the group each one answers in
``hard_negative_group_ids`` (so the loss masks it for that group's in-batch queries).

Stages
======

==========  ================================  ===============================================
stage       where                             what
==========  ================================  ===============================================
index       Ray Data tasks (``reader``)       validate every row (strict: the first bad row
                                              is one UserError naming file:row)
encode      Ray Data ``map_batches`` with an  queries and passages -> unit vectors; one actor
            actor pool (``Encoder``)          per GPU, or per CPU slot; cached per input file
                                              under ``OUT/_mine/`` (a resume re-encodes none)
search      driver, faiss (exact inner        per language, the passages deduplicated by text,
            product, ``evaluate.search``)     on disk and searched in chunks; one input file
                                              at a time
select      driver (``select_negatives``)     exclusions and the margin rule, top ``top_k``
write       driver                            one output shard per input file, atomically
==========  ================================  ===============================================

The selection follows sentence-transformers' ``mine_hard_negatives``: of the ``range_max``
nearest passages, drop the row's own group (its positive and any translation or duplicate of
it), the positives of the other rows with the same query text in the language (a query with two
answers is two groups; as there, the margin is then taken below the lowest positive score), a
passage with the positive's text, and a passage that is the positive of two groups (a negative
names one group; the other's queries would be penalised for their own answer); then
the **margin rule against false negatives** drops a candidate scoring too close to the
positive: above ``s_pos - absolute_margin``, or above ``s_pos - relative_margin * |s_pos|``
(sentence-transformers' ``s_pos * (1 - relative_margin)`` for the positive scores of a trained
retriever; the absolute value keeps it a margin below the positive when ``s_pos`` < 0). The
default, ``relative_margin=0.05``, is NV-Retriever's TopK-PercPos (arXiv 2407.15831). The best
``top_k`` that remain are kept, best first. A row left short of ``top_k`` is searched again,
deeper (``range_max`` x4 a step, up to ``range_max_cap``), before it is given fewer (with e5 on
MLQA-R, 50 nearest leave 19% of rows without a negative, 1000 leave 0.1%). The rows still short
or empty are counted in the summary.

Resumable and streaming
=======================

``OUT`` holds ``part-NNNNN.parquet`` (input file ``NNNNN`` of the sorted listing, its rows in
the same order), ``manifest.json`` written before any shard (so a reader pointed at an
unfinished ``OUT`` refuses it, naming the missing shard), and ``_mine.json``: the parameters and
every finished shard. Each shard is written to a hidden temporary file and renamed. A rerun
with the same parameters skips the finished shards whose file is intact and redoes the rest; a
rerun with other parameters -- the input files' size and modification time among them, so an
input rewritten in place is never resumed over -- is refused unless ``overwrite``; the cached
vectors carry the same fingerprint of their input file and are re-encoded when it differs.
``overwrite`` replaces only a data mine output, and only once the options, the model and every
input row are checked: the old output is moved aside, deleted when the new one is complete, and
put back if the run fails (a SIGKILL leaves it as the hidden ``.OUT.replaced-PID`` beside OUT).

The driver's memory does not grow with the passages' texts or vectors: it holds one input
file's rows and vectors, and one chunk of a language's passage vectors (``POOL_CHUNK_ROWS``)
at a time. The pool's distinct passages are written to ``OUT/_mine/pool-PID/`` (their texts and
vectors, memory-mapped; deleted at the end of the run, failed or not, or by the next run after
a SIGKILL; a second copy of the passages' vectors on disk meanwhile) and searched chunk by chunk, with the
same hits as one search of the whole (``RunningTopK``); what stays in memory per distinct
passage is its groups and an offset, plus a 16-byte digest while the pool is built (~500
bytes a passage measured, against ~5.7 KB when the pool was held in memory; BENCHMARKS.md
"Mining memory"). ``IN`` is never written to. ``OUT/_mine/`` (the
cached vectors, 4 bytes x dim x 2 per row) may be deleted once the output is complete.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pyarrow as pa

from hybridray import storage
from hybridray.data import reader
from hybridray.data.schema import MANIFEST_NAME, SCHEMA_VERSION
from hybridray.data.shards import write_shard_file
from hybridray.errors import UserError

STATE_NAME = "_mine.json"
WORK_DIR = "_mine"
#: Rows per encoding work item (one actor call); a jsonl file is one item (it has no row index).
CHUNK_ROWS = 2048


@dataclass(frozen=True)
class MineOptions:
    """What decides the mined negatives (all in ``_mine.json``'s identity) ..."""

    model: str
    top_k: int = 8  # negatives kept per row, best first
    range_max: int = 50  # nearest passages searched per query
    range_max_cap: int = 1000  # a row left short of top_k is searched again, range_max x4 per step, up to this
    absolute_margin: Optional[float] = None  # drop a candidate above s_pos - absolute_margin
    relative_margin: Optional[float] = 0.05  # drop a candidate above s_pos - relative_margin * |s_pos|
    keep_existing: bool = False  # keep the input's hard negatives first, then the mined ones
    query_prefix: Optional[str] = None  # default: the model's (e.g. "query: " for E5)
    passage_prefix: Optional[str] = None
    pooling: Optional[str] = None  # default: the model's
    max_length: int = 256  # tokens per text when encoding
    max_text_chars: int = 4000  # the reader's limit, as data.max_text_chars
    # ... and what only decides how fast (not in the identity)
    batch_size: int = 64  # texts per forward pass
    workers: Optional[int] = None  # encoder actors; default one per GPU, else one per CPU

    def check(self) -> None:
        """UserError naming the flag of the first bad value."""
        if self.top_k < 1:
            raise UserError(f"--top-k: {self.top_k} must be at least 1")
        if self.range_max < self.top_k:
            raise UserError(f"--range-max: {self.range_max} must be at least --top-k ({self.top_k})")
        if self.range_max_cap < self.range_max:
            raise UserError(f"--range-max-cap: {self.range_max_cap} must be at least --range-max ({self.range_max})")
        if self.absolute_margin is not None and not 0 <= self.absolute_margin <= 2:
            raise UserError(f"--absolute-margin: {self.absolute_margin} is not in [0, 2] (cosine scores)")
        if self.relative_margin is not None and not 0 <= self.relative_margin < 1:
            raise UserError(f"--relative-margin: {self.relative_margin} is not in [0, 1)")
        from hybridray.models import POOLING_MODES

        if self.pooling is not None and self.pooling not in POOLING_MODES:
            raise UserError(f"--pooling {self.pooling!r}: expected one of {', '.join(POOLING_MODES)}")
        for flag, value in (("--batch-size", self.batch_size), ("--max-length", self.max_length),
                            ("--max-text-chars", self.max_text_chars), ("--workers", self.workers or 1)):
            if value < 1:
                raise UserError(f"{flag}: {value} must be at least 1")


# ----------------------------------------------------------------------------- selection
@dataclass
class SelectionCounts:
    """Why candidates were dropped, over a shard or a run (the summary's numbers)."""

    same_group: int = 0
    same_query: int = 0  # a positive of another row with the same query text (and language)
    positive_text: int = 0
    ambiguous: int = 0
    margin: int = 0
    rows: int = 0
    searched_deeper: int = 0  # rows searched beyond range_max (short of top_k at range_max)
    mined_none: int = 0  # rows for which no candidate passed (before --keep-existing's merge)
    short_rows: int = 0  # rows left with fewer than top_k negatives (after the merge)
    empty_rows: int = 0  # rows left with none (after the merge): rejects of a run with loss.hard_negatives > 0
    negatives: int = 0  # mined negatives written

    def add(self, other: "SelectionCounts") -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)


def select_negatives(
    scores: Sequence[float], candidates: Sequence[int], positive_score: float, *, group: str,
    positive: str, texts: Sequence[str], groups: Sequence[tuple[str, ...]], options: MineOptions,
    counts: SelectionCounts, same_query: frozenset = frozenset(),
) -> list[int]:
    """Pool indices of one row's negatives, best first (see the module docstring).

    ``scores`` / ``candidates``: the search hits, best first; ``texts`` / ``groups``: the pool's
    passage texts and, per passage, the groups whose positive it is; ``same_query``: the groups
    of the other rows asking the same query in the same language (their positives answer it too).
    """
    ceiling = np.inf
    if options.absolute_margin is not None:
        ceiling = min(ceiling, positive_score - options.absolute_margin)
    if options.relative_margin is not None:
        ceiling = min(ceiling, positive_score - options.relative_margin * abs(positive_score))
    chosen: list[int] = []
    for score, c in zip(scores, candidates):
        if group in groups[c]:
            counts.same_group += 1
        elif same_query.intersection(groups[c]):
            counts.same_query += 1
        elif texts[c] == positive:
            counts.positive_text += 1
        elif len(groups[c]) > 1:
            counts.ambiguous += 1
        elif score > ceiling:
            counts.margin += 1
        else:
            chosen.append(int(c))
            if len(chosen) == options.top_k:
                break
    return chosen


# ----------------------------------------------------------------------------- encoding
class Encoder:
    """A Ray Data actor: one model, loaded once; a work item (rows ``[start, stop)`` of one
    shard file) in, its query and passage vectors out (float32 bytes, row-major)."""

    def __init__(self, model_path: str, pooling: str, prefixes: tuple[str, str], max_length: int,
                 batch_size: int, threads: int) -> None:
        import torch

        from hybridray.device import default_device
        from hybridray.models import load_encoder

        from hybridray.console import quiet_process

        quiet_process()  # an actor is a fresh process: no weight-loading bars, no library chatter
        if default_device().type == "cpu":
            torch.set_num_threads(threads)
        self.model, self.tokenizer = load_encoder(model_path)
        self.model.to(default_device())
        self.pooling, self.prefixes, self.max_length, self.batch_size = pooling, prefixes, max_length, batch_size

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        from hybridray.evaluate.encode import encode_texts

        out: dict[str, list] = {"file_index": [], "start": [], "rows": [], "dim": [], "queries": [], "passages": []}
        for item in batch.to_pylist():
            if item["path"].endswith(".parquet"):
                records = reader.read_rows(item["path"], range(item["start"], item["stop"]), ["query", "passage"])
                rows = [records[r] for r in range(item["start"], item["stop"])]
            else:  # jsonl: the whole file, in order (its row numbers are line numbers)
                rows = [record for _, record in reader.iter_file_rows(item["path"], ["query", "passage"])]
            vectors = [
                encode_texts(self.model, self.tokenizer, [r[side] for r in rows], prefix=prefix,
                             max_length=self.max_length, batch_size=self.batch_size, pooling=self.pooling,
                             progress=False)
                for side, prefix in zip(("query", "passage"), self.prefixes)
            ]
            out["file_index"].append(item["file_index"])
            out["start"].append(item["start"])
            out["rows"].append(len(rows))
            out["dim"].append(vectors[0].shape[1])
            out["queries"].append(vectors[0].tobytes())
            out["passages"].append(vectors[1].tobytes())
        return {"file_index": np.array(out["file_index"], dtype=np.int64),
                "start": np.array(out["start"], dtype=np.int64), "rows": np.array(out["rows"], dtype=np.int64),
                "dim": np.array(out["dim"], dtype=np.int64),
                "queries": np.array(out["queries"], dtype=object), "passages": np.array(out["passages"], dtype=object)}


def _pool_size(workers: Optional[int]) -> tuple[int, dict]:
    """(actors, resources per actor): one per GPU of the cluster, else one per CPU slot."""
    import ray

    resources = ray.cluster_resources()
    kind = "GPU" if int(resources.get("GPU", 0)) else "CPU"
    slots = max(1, int(resources.get(kind, 1)))
    if workers is not None and workers > slots:  # the pool would wait forever for the rest
        raise UserError(f"--workers {workers}: the Ray cluster has {slots} {kind}(s), one per encoder actor")
    return (workers or slots), ({"num_gpus": 1} if kind == "GPU" else {"num_cpus": 1})


def _vectors_path(out: Path, file_index: int) -> Path:
    return out / WORK_DIR / f"vectors-{file_index:05d}.npz"


def encode_files(files: Sequence[str], rows_per_file: Sequence[int], todo: Sequence[int], out: Path, *,
                 model_path: str, pooling: str, prefixes: tuple[str, str], options: MineOptions,
                 fingerprints: Sequence[dict]) -> float:
    """Encode the queries and passages of the files ``todo`` with an actor pool; each file's
    vectors are saved (atomically, with the input file's ``fingerprints`` entry) as soon as all
    its rows are in. Returns the seconds taken."""
    import ray.data

    if not todo:
        return 0.0
    started = time.perf_counter()
    items = []
    for i in todo:
        step = CHUNK_ROWS if files[i].endswith(".parquet") else max(1, rows_per_file[i])
        items += [{"file_index": i, "path": files[i], "start": a, "stop": min(a + step, rows_per_file[i])}
                  for a in range(0, rows_per_file[i], step)]
    if not items:
        return _save_empty(files, rows_per_file, todo, out, started, fingerprints)
    actors, resources = _pool_size(options.workers)
    actors = min(actors, len(items))
    ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        Encoder, batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"model_path": model_path, "pooling": pooling, "prefixes": prefixes,
                               "max_length": options.max_length, "batch_size": options.batch_size,
                               "threads": resources.get("num_cpus", 1)},
        **resources,
    )
    parts: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    missing = {i: rows_per_file[i] for i in todo}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for fi, start, n, dim, q, p in zip(*(batch[k] for k in ("file_index", "start", "rows", "dim",
                                                                 "queries", "passages"))):
            fi, n, dim = int(fi), int(n), int(dim)
            vectors = (np.frombuffer(q, dtype=np.float32).reshape(n, dim),
                       np.frombuffer(p, dtype=np.float32).reshape(n, dim))
            parts.setdefault(fi, {})[int(start)] = vectors
            missing[fi] -= n
            if missing[fi] == 0:
                done = parts.pop(fi)
                chunks = [done[a] for a in sorted(done)]
                _save_vectors(_vectors_path(out, fi), np.concatenate([c[0] for c in chunks]),
                              np.concatenate([c[1] for c in chunks]), fingerprints[fi])
                _say(f"encoded {files[fi]} ({rows_per_file[fi]} rows)")
    return _save_empty(files, rows_per_file, todo, out, started, fingerprints)


def _save_empty(files, rows_per_file, todo, out: Path, started: float, fingerprints: Sequence[dict]) -> float:
    for i in todo:  # a file without rows: nothing to encode, but it is done
        if rows_per_file[i] == 0:
            _save_vectors(_vectors_path(out, i), np.zeros((0, 1), np.float32), np.zeros((0, 1), np.float32),
                          fingerprints[i])
    return time.perf_counter() - started


def _save_vectors(path: Path, queries: np.ndarray, passages: np.ndarray, fingerprint: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        np.savez(f, queries=queries, passages=passages, source=np.array(json.dumps(fingerprint, sort_keys=True)))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _load_vectors(path: Path, side: str, rows: int, fingerprint: dict) -> Optional[np.ndarray]:
    """The cached vectors (``side``: queries or passages) of one file, or None if absent,
    unreadable, not of ``rows`` rows, or encoded from another version of the input file (its
    ``fingerprint``: size and modification time). An npz member is read only when asked for."""
    try:
        with np.load(path) as data:
            if "source" not in data.files or str(data["source"]) != json.dumps(fingerprint, sort_keys=True):
                return None
            vectors = data[side]
    except (OSError, ValueError, KeyError, EOFError):
        return None
    return vectors if len(vectors) == rows else None


def _remove_stale_pools(work: Path) -> None:
    """Delete the on-disk pools of runs into this OUT that are gone (killed before their own
    cleanup); a live one's is left to it."""
    for path in work.glob("pool-*") if work.is_dir() else ():
        try:
            os.kill(int(path.name.removeprefix("pool-")), 0)
        except ValueError:
            continue  # not a pool's name
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _say(message: str) -> None:
    print(f"[hybridray] mine: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the pool
#: Pool passages per exact search (one faiss index): the driver holds one such chunk of a
#: language's passage vectors at a time (98 MB at e5-small's 384 dims), never the whole pool.
POOL_CHUNK_ROWS = 65536


class TextStore:
    """Texts appended to one file and read back by index through a memory map, so that a
    pool's passage texts stay on disk (the driver keeps 8 bytes of offset per text)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "wb")
        self._offsets = [0]
        self._map: Optional[np.ndarray] = None

    def append(self, text: str) -> None:
        data = text.encode("utf-8")
        self._file.write(data)
        self._offsets.append(self._offsets[-1] + len(data))

    def close(self) -> "TextStore":
        """Done appending: the file is read through a memory map from now on."""
        self._file.close()
        self._offsets = np.array(self._offsets, dtype=np.int64)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if self._offsets[-1] else np.zeros(0, np.uint8)
        return self

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return bytes(self._map[self._offsets[i]:self._offsets[i + 1]]).decode("utf-8")

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def text_key(text: str) -> bytes:
    """A 16-byte digest standing for a text in the pool's in-memory indices (the text itself is
    on disk); two different texts share one with probability ~2^-128 per pair."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


@dataclass
class Pool:
    """One language's candidate passages, deduplicated by text. ``texts`` and ``vectors`` may
    be on disk (a :class:`TextStore` and a memory-mapped array, as :func:`build_pools` makes
    them); the search reads ``vectors`` in chunks of :data:`POOL_CHUNK_ROWS`."""

    texts: Sequence[str]
    groups: list[tuple[str, ...]]  # per passage, the groups whose positive it is
    vectors: np.ndarray
    positive_of: dict[str, int] = field(default_factory=dict)  # group -> its positive's passage index
    query_groups: dict[bytes, tuple[str, ...]] = field(default_factory=dict)  # text_key(query) -> groups asking it

    def groups_asking(self, query: str) -> tuple[str, ...]:
        """The groups whose rows ask ``query`` in this language, when it has more than one answer."""
        return self.query_groups.get(text_key(query), ())

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` passages of each query, best first: :func:`~hybridray.evaluate.search.search`
        of the whole pool, run over chunks of it (``RunningTopK``: the same hits in the same order)."""
        from hybridray.evaluate.search import RunningTopK, search

        n = len(self.vectors)
        if n <= POOL_CHUNK_ROWS:
            return search(queries, np.asarray(self.vectors), k)
        top = RunningTopK(queries, k, n)
        for lo in range(0, n, POOL_CHUNK_ROWS):
            hi = min(lo + POOL_CHUNK_ROWS, n)
            top.add(np.arange(lo, hi), np.asarray(self.vectors[lo:hi]))
        return top.result()


def build_pools(files: Sequence[str], passage_vectors: Callable[[int], np.ndarray], workdir: Path) -> dict[str, Pool]:
    """Per language, every distinct passage of the dataset with its groups and its vector (the
    first occurrence's), and the groups of each query text; files are read one at a time.

    The texts and vectors are written under ``workdir`` (emptied first) as they are found and
    memory-mapped: the driver keeps, per distinct passage, its groups and an offset, per group
    its positive's index, and, while building, a 16-byte digest per distinct passage and query
    (a set of groups only for the few texts that answer or ask for more than one)."""
    workdir = Path(workdir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    seen: dict[str, dict[bytes, int]] = {}
    texts: dict[str, TextStore] = {}
    vector_files: dict[str, object] = {}
    groups: dict[str, list] = {}  # per passage: its group (a str), or a set of several
    queries: dict[str, dict[bytes, object]] = {}  # text_key(query) -> its group, or a set of several
    dims: dict[str, int] = {}
    try:
        for fi, path in enumerate(files):
            file_vectors = passage_vectors(fi)
            new_rows: dict[str, list[int]] = {}
            for r, (_, record) in enumerate(reader.iter_file_rows(path, ["group_id", "lang", "query", "passage"])):
                lang, text, group = record["lang"], record["passage"], sys.intern(record["group_id"])
                if lang not in seen:
                    n = len(seen)
                    seen[lang], groups[lang], queries[lang] = {}, [], {}
                    texts[lang] = TextStore(workdir / f"texts-{n}.bin")
                    vector_files[lang] = open(workdir / f"vectors-{n}.f32", "wb")
                    dims[lang] = file_vectors.shape[1]
                key = text_key(text)
                i = seen[lang].get(key)
                if i is None:
                    seen[lang][key] = len(groups[lang])
                    texts[lang].append(text)
                    groups[lang].append(group)
                    new_rows.setdefault(lang, []).append(r)
                else:
                    groups[lang][i] = _with_group(groups[lang][i], group)
                query = text_key(record["query"])
                queries[lang][query] = _with_group(queries[lang].get(query), group)
            for lang, rows in new_rows.items():
                if file_vectors.shape[1] != dims[lang]:
                    raise ValueError(f"{path}: vectors of {file_vectors.shape[1]} dims, earlier files {dims[lang]}")
                vector_files[lang].write(np.ascontiguousarray(file_vectors[rows], dtype=np.float32).tobytes())
        del seen
        pools = {}
        for n, lang in enumerate(groups):
            lang_groups = [(g,) if isinstance(g, str) else tuple(sorted(g)) for g in groups[lang]]
            vector_files[lang].close()
            pools[lang] = Pool(texts[lang].close(), lang_groups,
                               np.memmap(workdir / f"vectors-{n}.f32", dtype=np.float32, mode="r",
                                         shape=(len(lang_groups), dims[lang])),
                               {g: i for i in reversed(range(len(lang_groups))) for g in lang_groups[i]},
                               {q: tuple(sorted(g)) for q, g in queries[lang].items() if not isinstance(g, str)})
            groups[lang] = queries[lang] = None  # freed language by language
    finally:  # after an error too: no file left open
        for f in [*vector_files.values(), *(store._file for store in texts.values())]:
            f.close()
    return pools


def _with_group(have, group: str):
    """``have`` (None, one group, or a set of several) with ``group`` added."""
    if have is None or have == group:
        return group
    if isinstance(have, str):
        return {have, group}
    have.add(group)
    return have


def mine_file(records: list[dict], queries: np.ndarray, passages: np.ndarray, pools: dict[str, Pool],
              options: MineOptions, counts: SelectionCounts) -> list[dict]:
    """One file's rows with their mined negatives (same order)."""
    out = [dict(r) for r in records]
    by_lang: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_lang.setdefault(r["lang"], []).append(i)
    for lang, idx in by_lang.items():
        pool = pools[lang]
        positive_scores = np.einsum("ij,ij->i", queries[idx], passages[idx])
        same_query = [frozenset(pool.groups_asking(out[i]["query"])) - {out[i]["group_id"]} for i in idx]
        # as sentence-transformers: every positive of the query is excluded, and the margin is
        # taken below the lowest of their scores
        s_pos = [min([float(s)] + [float(queries[i] @ pool.vectors[pool.positive_of[g]]) for g in same])
                 for i, s, same in zip(idx, positive_scores, same_query)]
        # rows short of top_k at range_max are searched again, deeper (x4 a step), up to the cap:
        # their counts are those of their last search
        chosen: dict[int, tuple[list[int], SelectionCounts]] = {}
        pending, depth = list(range(len(idx))), options.range_max
        while True:
            scores, hits = pool.search(queries[[idx[j] for j in pending]], depth + 1)
            for j, row_scores, row_hits in zip(pending, scores, hits):
                row, row_counts = out[idx[j]], SelectionCounts()
                chosen[j] = (select_negatives(row_scores, row_hits, s_pos[j], group=row["group_id"],
                                              positive=row["passage"], texts=pool.texts, groups=pool.groups,
                                              options=options, counts=row_counts, same_query=same_query[j]),
                             row_counts)
            pending = [j for j in pending if len(chosen[j][0]) < options.top_k]
            if not pending or depth >= min(options.range_max_cap, len(pool.texts)):
                break
            if depth == options.range_max:
                counts.searched_deeper += len(pending)
            depth = min(depth * 4, options.range_max_cap)
        for j, i in enumerate(idx):
            row, (picked, row_counts) = out[i], chosen[j]
            counts.add(row_counts)
            counts.rows += 1
            counts.negatives += len(picked)
            counts.mined_none += not picked
            mined = [(pool.texts[c], pool.groups[c][0]) for c in picked]
            kept = list(zip(row.get("hard_negatives") or [],
                            row.get("hard_negative_group_ids") or [None] * len(row.get("hard_negatives") or [])))
            if options.keep_existing:
                mined = kept + [m for m in mined if m[0] not in {k[0] for k in kept}]
            row["hard_negatives"] = [t for t, _ in mined]
            row["hard_negative_group_ids"] = [g for _, g in mined]
            counts.short_rows += len(mined) < options.top_k
            counts.empty_rows += not mined
    return out


# ----------------------------------------------------------------------------- the run
def _input_fingerprint(uri: str) -> dict:
    """Size and modification time of one input file: an input rewritten in place (the same
    names and row counts, other texts) is another input, never a silent resume."""
    fs, path = storage.filesystem_for(uri)
    try:
        info = fs.get_file_info(path)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"{uri}: cannot read: {' '.join(str(exc).split())}") from None
    return {"bytes": info.size, "mtime_ns": info.mtime_ns}


def _identity(files: Sequence[str], rows_per_file: Sequence[int], fingerprints: Sequence[dict],
              options: MineOptions, model_path: str, pooling: str, prefixes: tuple[str, str]) -> dict:
    decisive = {k: v for k, v in asdict(options).items() if k not in ("batch_size", "workers")}
    return {
        "schema_version": SCHEMA_VERSION,
        "input_files": [{"path": f, "rows": n, **fp} for f, n, fp in zip(files, rows_per_file, fingerprints)],
        **decisive, "model_path": model_path, "model_files": _model_fingerprint(model_path), "pooling": pooling,
        "query_prefix": prefixes[0], "passage_prefix": prefixes[1],
    }


def _model_fingerprint(model_path: str) -> Optional[list]:
    """Name, size and mtime of a local model directory's files: retrained weights in the same
    directory (a run's ``model/``) are other parameters, never a stale resume. None for a hub id."""
    path = Path(model_path)
    if not path.is_dir():
        return None
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.iterdir()) if f.is_file()]


def _check_paths(shards: str, out: Path) -> None:
    """One UserError, before any work, for an ``--out`` that is not a local directory, or that
    is, holds or lies inside the input (a glob's matches included: a rerun would read them)."""
    if storage.is_remote(str(out)):
        raise UserError(f"--out {out}: mining writes a local directory (copy it to s3:// afterwards)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file; mining writes a directory")
    if storage.is_remote(shards):
        return
    target = out.resolve()
    pattern = os.path.abspath(shards)
    glob = reader._GLOB.search(pattern)
    source = Path(pattern[: glob.start()].rsplit("/", 1)[0] if glob else pattern).resolve()
    if glob:  # the output's own shards must never match the input's glob (the listing is recursive)
        if any(fnmatch.fnmatchcase(str(target / name), pattern) for name in ("part-00000.parquet", "x.parquet",
                                                                                 "x.jsonl")):
            raise UserError(f"--out {out}: its shards would match --shards {shards}; choose an --out outside it")
        if any(target == Path(f).resolve() or target in Path(f).resolve().parents
               for f in reader.list_shard_files(shards)):
            raise UserError(f"--out {out}: holds files of --shards {shards}; choose an --out beside it")
    elif target == source or source in target.parents:
        raise UserError(f"--out {out}: is inside --shards {shards}; mining never writes into its input")
    if not glob and target in source.parents:
        raise UserError(f"--out {out}: holds --shards {shards}; choose an --out beside it")


def _check_model(name: str) -> tuple[str, str, tuple[str, str]]:
    """``(local path, pooling, (query prefix, passage prefix))`` of ``--model``, loaded once
    here so that an unreadable model is one UserError before any work."""
    from hybridray.evaluate.suite import model_location
    from hybridray.models import default_pooling, default_prefixes, load_encoder, resolve_model_path

    try:
        path = resolve_model_path(model_location(name))
        load_encoder(path)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 -- a missing, partial or foreign directory fails in many ways
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"--model {name}: cannot load it as an encoder ({type(exc).__name__}: {first})") from None
    return path, default_pooling(model_location(name)), default_prefixes(model_location(name))


def _read_state(out: Path) -> Optional[dict]:
    try:
        return json.loads((out / STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, value: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(value, indent=1, ensure_ascii=False) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    named = {"input_files": "the input files (changed, added or removed since)", "model_files": "the model's files"}
    shown = [named.get(k) or f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys]
    return "; ".join(shown[:4])


def _shard_name(file_index: int) -> str:
    return f"part-{file_index:05d}.parquet"


def _is_done(out: Path, entry: Optional[dict]) -> bool:
    """A shard recorded as finished whose file is still there with its size (untouched)."""
    path = out / _shard_name(entry["file_index"]) if entry else None
    return bool(entry) and path.is_file() and path.stat().st_size == entry["bytes"]


def mine_hard_negatives(shards: str, out: str | Path, options: MineOptions, *, overwrite: bool = False) -> dict:
    """Mine ``options.top_k`` hard negatives per row of ``shards`` into ``out``; returns the
    summary (also in ``_mine.json``). Resumes an unfinished ``out`` mined with the same options."""
    from hybridray.console import quiet_process
    from hybridray.train import init_ray

    options.check()
    out = Path(out)
    _check_paths(shards, out)
    started = time.perf_counter()
    quiet_process()
    model_path, pooling, prefixes = _check_model(options.model)
    prefixes = (options.query_prefix if options.query_prefix is not None else prefixes[0],
                options.passage_prefix if options.passage_prefix is not None else prefixes[1])
    pooling = options.pooling or pooling
    init_ray()
    index = reader.index_shards(shards, max_text_chars=options.max_text_chars, strict=True)
    files, rows_per_file = index.files, index.rows_per_file
    fingerprints = [_input_fingerprint(f) for f in files]
    identity = _identity(files, rows_per_file, fingerprints, options, model_path, pooling, prefixes)

    state = _read_state(out) if out.exists() else None
    if out.exists() and not any(out.iterdir()):  # an empty directory made for it
        out.rmdir()
    if out.exists() and (state is None or "identity" not in state):
        raise UserError(f"--out {out}: already exists and is not a data mine output (no {STATE_NAME}); "
                        "choose another --out (--overwrite replaces only a data mine output)")
    replaced = None
    if out.exists() and state.get("identity") != identity:
        if not overwrite:
            raise UserError(f"--out {out}: mined with other parameters ({_differences(state['identity'], identity)}); "
                            "pass --overwrite to replace it, or choose another --out")
        # everything is validated and the input is readable: the old output is moved aside, deleted
        # once the new one is complete, and put back if this run fails
        replaced = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        out.rename(replaced)
        state = None
    try:
        summary = _mine_into(out, state, identity, shards, options, index, fingerprints, model_path, pooling,
                             prefixes, started)
    except BaseException:
        if replaced is not None:
            shutil.rmtree(out, ignore_errors=True)
            replaced.rename(out)
        raise
    if replaced is not None:
        shutil.rmtree(replaced)
    return summary


def _mine_into(out: Path, state: Optional[dict], identity: dict, shards: str, options: MineOptions,
               index: reader.ShardIndex, fingerprints: list[dict], model_path: str, pooling: str,
               prefixes: tuple[str, str], started: float) -> dict:
    """The run proper, into ``out`` (new, or an unfinished output of the same ``identity``)."""
    files, rows_per_file = index.files, index.rows_per_file
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = {"identity": identity, "shards": {}}
        _write_json(out / STATE_NAME, state)
    if not (out / MANIFEST_NAME).is_file():
        _write_json(out / MANIFEST_NAME, {
            "schema_version": SCHEMA_VERSION, "source": f"mined from {shards} with {options.model}",
            "languages": sorted(index.rows_read_per_language),
            "rows_per_language": dict(sorted(index.rows_read_per_language.items())),
            "rows": sum(rows_per_file),
            "files": [{"path": _shard_name(i), "rows": n} for i, n in enumerate(rows_per_file)],
        })

    done = {i for i in range(len(files)) if _is_done(out, state["shards"].get(_shard_name(i)))}
    todo = [i for i in range(len(files)) if i not in done]
    vectors_of = lambda i, side: _load_vectors(_vectors_path(out, i), side, rows_per_file[i],  # noqa: E731
                                               fingerprints[i])
    # every file's passages make the pools, so any file without cached vectors is encoded
    uncached = [i for i in range(len(files)) if vectors_of(i, "passages") is None or vectors_of(i, "queries") is None]
    encode_s = encode_files(files, rows_per_file, uncached if todo else [], out, model_path=model_path,
                            pooling=pooling, prefixes=prefixes, options=options, fingerprints=fingerprints)
    search_started = time.perf_counter()
    # the pool is this process's (another run into OUT has its own), rebuilt from the cached
    # vectors by every run and deleted at its end, failed or not (a SIGKILL's by the next run)
    _remove_stale_pools(out / WORK_DIR)
    pool_dir = out / WORK_DIR / f"pool-{os.getpid()}"
    total = SelectionCounts()
    try:
        pools = build_pools(files, lambda i: vectors_of(i, "passages"), pool_dir) if todo else {}
        for i in todo:
            t0 = time.perf_counter()
            records = [rec for _, rec in reader.iter_file_rows(files[i])]
            counts = SelectionCounts()
            rows = mine_file(records, vectors_of(i, "queries"), vectors_of(i, "passages"), pools, options, counts)
            write_shard_file(rows, out / _shard_name(i))
            total.add(counts)
            state["shards"][_shard_name(i)] = {"file_index": i, "input": files[i], "rows": len(rows),
                                              "bytes": (out / _shard_name(i)).stat().st_size,
                                              "counts": asdict(counts)}
            _write_json(out / STATE_NAME, state)
            _say(f"{_shard_name(i)}: {len(rows)} rows, {counts.negatives / max(1, counts.rows):.1f} negatives "
                 f"per row ({time.perf_counter() - t0:.1f} s)")
    finally:
        pools = None
        shutil.rmtree(pool_dir, ignore_errors=True)
    summary = {
        "out": str(out), "shards_mined": len(todo), "shards_skipped": len(done), "rows": sum(rows_per_file),
        "this_run": asdict(total), "encode_seconds": round(encode_s, 2),
        "search_seconds": round(time.perf_counter() - search_started, 2),
        "total_seconds": round(time.perf_counter() - started, 2),
        "files_encoded": len(uncached) if todo else 0,
    }
    state["last_run"] = summary
    _write_json(out / STATE_NAME, state)
    return summary

