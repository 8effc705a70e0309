"""Retrieval on BEIR-layout datasets: nDCG@10, Recall@100, MRR@10 per dataset.

Layout of one dataset directory (BEIR, also used for MIRACL-style per-language sets):
``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``) and
``qrels/{split}.tsv`` (header ``query-id  corpus-id  score``). A directory holding several
such datasets (one per sub-directory) is evaluated dataset by dataset.

As in BEIR: documents are encoded as ``title + " " + text``; only queries with at least one
judged-relevant document (score > 0) are evaluated; a hit whose id equals the query id is
dropped (BEIR's ``ignore_identical_ids``, which matters for ArguAna and Quora).
"""
from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from hybridray.errors import UserError
from hybridray.evaluate.metrics import mrr_at_k, ndcg_at_k, topk_recall
from hybridray.evaluate.search import search

#: The metrics reported per dataset and their cut-offs.
CUTOFFS = {"ndcg": 10, "recall": 100, "mrr": 10}
#: Corpus passages read and encoded at a time (one worker): the texts held at once.
CORPUS_CHUNK = 50_000


@dataclass
class BeirData:
    """One BEIR-layout dataset, restricted to the queries that have relevant documents."""

    name: str
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]


def _lines(path: Path, what: str):
    """``(line number, text)`` of a UTF-8 text file's non-blank lines; a line that is not
    UTF-8 is a UserError naming ``path:line``."""
    for line_no, _, text in _lines_at(path, what):
        yield line_no, text


def _lines_at(path: Path, what: str):
    """``(line number, byte offset, text)`` of a UTF-8 text file's non-blank lines (as
    :func:`_lines`; the offset lets a chunk of the file be read again later)."""
    if not path.is_file():
        raise UserError(f"{path}: missing ({what})")
    offset = 0
    with path.open("rb") as f:
        for line_no, data in enumerate(f, 1):
            start, offset = offset, offset + len(data)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}:{line_no}: not UTF-8 (byte {exc.start})") from None
            if text.strip():
                yield line_no, start, text


def _id(value) -> Optional[str]:
    """A BEIR ``_id`` as text: a string or an integer, never empty."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
        return None
    return str(value)


def _read_records(path: Path, text_required: bool) -> dict[str, tuple[int, dict]]:
    """``_id -> (line, record)`` of a BEIR jsonl file (corpus or queries), every record checked
    (:func:`_records`)."""
    return {doc_id: (line_no, record) for line_no, _, doc_id, record in _records(path, text_required)}


def _records(path: Path, text_required: bool):
    """``(line, byte offset, _id, record)`` of each record of a BEIR jsonl file, in file order,
    every record checked: a JSON object with a unique ``_id``, ``text`` (and ``title``)
    strings or absent; queries need a non-empty ``text``. Anything else is a UserError naming
    ``path:line``. Holds the ids seen, never the texts."""
    seen: dict[str, int] = {}
    layout = "BEIR layout needs corpus.jsonl, queries.jsonl, qrels/"
    for line_no, offset, text in _lines_at(path, layout):
        where = f"{path}:{line_no}"
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not JSON: {exc}") from None
        except RecursionError:
            raise UserError(f"{where}: not JSON: nested too deeply") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
        doc_id = _id(record.get("_id"))
        if doc_id is None:
            raise UserError(f"{where}: '_id' must be a non-empty string or integer, got {record.get('_id')!r}")
        for key in ("title", "text"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise UserError(f"{where}: '{key}' must be a string, got {type(record[key]).__name__}")
        if text_required and not (record.get("text") or "").strip():
            raise UserError(f"{where}: query {doc_id!r} has no 'text'")
        if doc_id in seen:
            raise UserError(f"{where}: duplicate _id {doc_id!r} (first at line {seen[doc_id]})")
        seen[doc_id] = line_no
        yield line_no, offset, doc_id, record


def document_text(record: dict) -> str:
    """What is encoded of a corpus record: ``title + " " + text`` (BEIR's rule)."""
    return f"{record.get('title') or ''} {record.get('text') or ''}".strip()


def _read_qrels(path: Path, queries, corpus) -> dict[str, dict[str, int]]:
    """The judgments; each names a query of queries.jsonl and a document of corpus.jsonl, once."""
    qrels: dict[str, dict[str, int]] = {}
    lines = _lines(path, "missing qrels file")
    header = next(lines, None)
    if header is None or header[0] != 1 or [h.strip() for h in header[1].rstrip("\r\n").split("\t")[:3]] != [
            "query-id", "corpus-id", "score"]:
        raise UserError(f"{path}: expected the header 'query-id<TAB>corpus-id<TAB>score'")
    for line_no, text in lines:
        row = next(csv.reader([text.rstrip("\r\n")], delimiter="\t"), [])
        try:
            query, doc, score = row[0], row[1], int(row[2])
        except (IndexError, ValueError):
            raise UserError(f"{path}:{line_no}: expected query-id, corpus-id, integer score") from None
        if query not in queries:
            raise UserError(f"{path}:{line_no}: query {query!r} is not in queries.jsonl")
        if doc not in corpus:
            raise UserError(f"{path}:{line_no}: document {doc!r} is not in corpus.jsonl")
        if doc in qrels.get(query, {}):
            raise UserError(f"{path}:{line_no}: ({query!r}, {doc!r}) judged twice")
        qrels.setdefault(query, {})[doc] = score
    return qrels


def load_beir(path: str | Path, split: str = "test") -> BeirData:
    """Read one BEIR-layout dataset directory; every malformed line is a UserError naming
    ``file:line``. Only queries with a judged-relevant document (score > 0) are kept (BEIR's
    rule)."""
    path = Path(path)
    corpus = _read_records(path / "corpus.jsonl", text_required=False)
    queries = _read_records(path / "queries.jsonl", text_required=True)
    qrels = {q: docs for q, docs in _read_qrels(path / "qrels" / f"{split}.tsv", queries, corpus).items()
             if any(score > 0 for score in docs.values())}
    if not qrels:
        raise UserError(f"{path}: no query of queries.jsonl has a relevant document in qrels/{split}.tsv")
    query_ids = sorted(qrels)
    return BeirData(
        name=path.name,
        corpus_ids=list(corpus),
        corpus_texts=[document_text(doc) for _, doc in corpus.values()],
        query_ids=query_ids,
        query_texts=[queries[q][1]["text"] for q in query_ids],
        qrels=qrels,
    )


@dataclass
class BeirScan:
    """One BEIR-layout dataset checked line by line without keeping its corpus texts: the
    corpus is read again chunk by chunk (:meth:`chunks`, :func:`read_corpus_chunk`)."""

    name: str
    corpus_path: str
    corpus_ids: list[str]
    #: byte offset of each corpus record in corpus.jsonl, and the file's size last
    offsets: list[int]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]
    #: row -> the first row with the same text, for every row whose text came earlier
    duplicate_of: dict[int, int] = field(default_factory=dict)

    def chunks(self, size: int) -> list[tuple[int, tuple[str, int, int, int]]]:
        """``(first row, (path, start byte, end byte, file size when scanned))`` of consecutive
        runs of ``size`` records."""
        n = len(self.corpus_ids)
        return [(i, (self.corpus_path, self.offsets[i], self.offsets[min(i + size, n)], self.offsets[-1]))
                for i in range(0, n, size)]


def scan_beir(path: str | Path, split: str = "test") -> BeirScan:
    """:func:`load_beir`'s checks and result, except that the corpus texts are not kept (a
    corpus of millions of passages is read in chunks later); the same errors, naming
    ``file:line``."""
    path = Path(path)
    corpus_ids, offsets, digests = [], [], bytearray()
    for _, offset, doc_id, record in _records(path / "corpus.jsonl", text_required=False):
        corpus_ids.append(doc_id)
        offsets.append(offset)
        digests += hashlib.blake2b(document_text(record).encode("utf-8"), digest_size=16).digest()
    offsets.append((path / "corpus.jsonl").stat().st_size)
    duplicate_of = _duplicates(np.frombuffer(bytes(digests), dtype="V16"))
    queries = _read_records(path / "queries.jsonl", text_required=True)
    qrels = {q: docs for q, docs in _read_qrels(path / "qrels" / f"{split}.tsv", queries, set(corpus_ids)).items()
             if any(score > 0 for score in docs.values())}
    if not qrels:
        raise UserError(f"{path}: no query of queries.jsonl has a relevant document in qrels/{split}.tsv")
    query_ids = sorted(qrels)
    return BeirScan(name=path.name, corpus_path=str(path / "corpus.jsonl"), corpus_ids=corpus_ids, offsets=offsets,
                    query_ids=query_ids, query_texts=[queries[q][1]["text"] for q in query_ids], qrels=qrels,
                    duplicate_of=duplicate_of)


def _duplicates(digests: np.ndarray) -> dict[int, int]:
    """``row -> first row`` with the same text digest, for every row that repeats an earlier one
    (16 bytes a passage while scanning, instead of the texts)."""
    if len(digests) == 0:
        return {}
    _, first, inverse = np.unique(digests, return_index=True, return_inverse=True)
    first = first[inverse.reshape(-1)]
    repeats = np.flatnonzero(first != np.arange(len(digests)))
    return dict(zip(repeats.tolist(), first[repeats].tolist()))


def same_text_same_vector(chunks: Iterable[tuple[np.ndarray, np.ndarray]],
                          duplicate_of: dict[int, int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The ``(rows, vectors)`` of ``chunks`` with every repeated text given the vector of its
    first occurrence (which may come in a later chunk: such rows wait for it). A text's vector
    depends a little on the batch it was padded with, so without this a passage and its copy
    in another chunk would be ordered by float noise, not by the seeded tie-break key. Holds
    the vectors of the repeated texts only."""
    originals = set(duplicate_of.values())
    kept: dict[int, np.ndarray] = {}
    waiting: dict[int, list[int]] = {}
    for rows, vectors in chunks:
        rows, vectors = np.asarray(rows), np.array(vectors, dtype=np.float32)
        for i, row in enumerate(rows.tolist()):
            if row in originals:
                kept[row] = vectors[i].copy()
        ready = np.ones(len(rows), dtype=bool)
        for i, row in enumerate(rows.tolist()):
            first = duplicate_of.get(row)
            if first is None:
                continue
            if first in kept:
                vectors[i] = kept[first]
            else:
                waiting.setdefault(first, []).append(row)
                ready[i] = False
        if ready.any():
            yield rows[ready], vectors[ready]
        released = [first for first in waiting if first in kept]
        for first in released:
            late = np.array(waiting.pop(first), dtype=np.int64)
            yield late, np.repeat(kept[first][None], len(late), axis=0)
    if waiting:
        raise RuntimeError(f"same_text_same_vector: {len(waiting)} original row(s) never came")


def read_corpus_chunk(source: tuple[str, int, int, int]) -> list[str]:
    """The texts of the corpus records in bytes ``[start, end)`` of a corpus.jsonl that
    :func:`scan_beir` checked (so nothing here can be malformed). A file missing here (an
    actor on another machine) or of another size than when it was scanned is a UserError."""
    import os
    import socket

    path, start, end, size = source
    try:
        now = os.stat(path).st_size
    except OSError as exc:
        raise UserError(f"{path}: not readable on {socket.gethostname()} ({exc.strerror}): an encoding actor on "
                        f"another machine needs the corpus at the same path (a shared filesystem), "
                        f"or use --workers 1") from None
    if now != size:
        raise UserError(f"{path}: changed while it was evaluated ({size} bytes when checked, {now} now)")
    with open(path, "rb") as f:
        f.seek(start)
        lines = f.read(end - start).split(b"\n")
    texts = (line.decode("utf-8") for line in lines)
    return [document_text(json.loads(text)) for text in texts if text.strip()]


def find_beir_datasets(path: str | Path, langs: Optional[Iterable[str]] = None) -> list[Path]:
    """The dataset directories under ``path``: itself if it holds ``corpus.jsonl``, else its
    sub-directories that do (only those named in ``langs``, if given)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory")
    if (path / "corpus.jsonl").is_file():
        return [path]
    found = {p.name: p for p in sorted(path.iterdir()) if (p / "corpus.jsonl").is_file()}
    if langs is not None:
        missing = sorted(set(langs) - set(found))
        if missing:
            raise UserError(f"{path}: no BEIR dataset directory for {missing}")
        found = {name: found[name] for name in langs}
    if not found:
        raise UserError(f"{path}: no corpus.jsonl here or in any sub-directory")
    return list(found.values())


def score_beir(data: BeirData, query_emb: np.ndarray, corpus_emb: np.ndarray) -> dict:
    """nDCG@10, Recall@100, MRR@10 (means over queries) from embeddings, via faiss top-k."""
    _, hits = search(query_emb, corpus_emb, max(CUTOFFS.values()) + 1)  # +1: room for a dropped identical id
    return score_hits(data, hits)


def score_hits(data: BeirData | BeirScan, hits: np.ndarray) -> dict:
    """nDCG@10, Recall@100, MRR@10 (means over queries) of the top-k corpus rows of each query
    (``hits [n_queries, k]``, best first, k = 101: room for a dropped identical id)."""
    depth = max(CUTOFFS.values())
    hit_gains = np.zeros((len(data.query_ids), depth))
    ideal_gains = np.zeros((len(data.query_ids), depth))
    n_relevant = np.zeros(len(data.query_ids))
    for i, qid in enumerate(data.query_ids):
        judged = data.qrels[qid]
        ranked = [data.corpus_ids[j] for j in hits[i] if data.corpus_ids[j] != qid][:depth]
        hit_gains[i, : len(ranked)] = [judged.get(doc, 0) for doc in ranked]
        grades = sorted((g for g in judged.values() if g > 0), reverse=True)[:depth]
        ideal_gains[i, : len(grades)] = grades
        n_relevant[i] = sum(g > 0 for g in judged.values())
    return {
        f"ndcg@{CUTOFFS['ndcg']}": float(ndcg_at_k(hit_gains, ideal_gains, CUTOFFS["ndcg"]).mean()),
        f"recall@{CUTOFFS['recall']}": float(topk_recall(hit_gains, n_relevant, CUTOFFS["recall"]).mean()),
        f"mrr@{CUTOFFS['mrr']}": float(mrr_at_k(hit_gains, CUTOFFS["mrr"]).mean()),
        "n_queries": len(data.query_ids),
        "n_corpus": len(data.corpus_ids),
    }


def evaluate_beir(
    model,
    tokenizer,
    path: str | Path,
    *,
    split: str = "test",
    langs: Optional[Iterable[str]] = None,
    query_prefix: str,
    passage_prefix: str,
    pooling: str,
    max_length: int,
    batch_size: int,
    progress: bool = False,
    chunk_size: Optional[int] = None,
) -> dict:
    """Evaluate an encoder on one BEIR-layout dataset or a directory of them.

    Inputs: the model and tokenizer (evaluated where the weights are; or an encoding pool,
    :mod:`hybridray.evaluate.pool`), ``path`` (a dataset directory, or a directory of dataset
    sub-directories, filtered by ``langs``), the qrels ``split`` and the encoding settings.
    The corpus streams: it is checked once without keeping its texts (:func:`scan_beir`),
    then read and encoded ``chunk_size`` passages at a time (default :data:`CORPUS_CHUNK`,
    smaller so that every actor of a pool gets work), each chunk searched and merged into a
    running top-k (:class:`hybridray.evaluate.search.RunningTopK`: the same hits, ties
    included, as one search of the whole corpus); a passage whose text repeats an earlier one
    gets that one's vector (:func:`same_text_same_vector`), so copies tie exactly. Only the queries' embeddings and one chunk
    per worker are held. Returns the report dict: ``per_dataset[name]`` with ``ndcg@10``,
    ``recall@100``, ``mrr@10``, ``n_queries``, ``n_corpus``; ``summary`` with the macro
    average over datasets of the three metrics. Example::

        report = evaluate_beir(model, tok, "beir/scifact", query_prefix="query: ",
                               passage_prefix="passage: ", pooling="mean",
                               max_length=256, batch_size=64)
        report["summary"]["ndcg@10"]
    """
    from hybridray.evaluate.encode import encode_chunks, encode_texts  # torch + transformers: only when encoding
    from hybridray.evaluate.pool import chunk_length
    from hybridray.evaluate.search import RunningTopK

    encode = dict(pooling=pooling, max_length=max_length, batch_size=batch_size, progress=progress)
    per_dataset, started = {}, time.perf_counter()
    for directory in find_beir_datasets(path, langs):
        data = scan_beir(directory, split)
        query_emb = encode_texts(model, tokenizer, data.query_texts, prefix=query_prefix, **encode)
        size = chunk_size or chunk_length(len(data.corpus_ids), getattr(model, "workers", 1), CORPUS_CHUNK)
        top = RunningTopK(query_emb, max(CUTOFFS.values()) + 1, len(data.corpus_ids))  # +1: a dropped identical id
        chunks = encode_chunks(model, tokenizer, data.chunks(size), read_corpus_chunk, prefix=passage_prefix, **encode)
        for rows, vectors in same_text_same_vector(chunks, data.duplicate_of):
            top.add(rows, vectors)
        per_dataset[data.name] = score_hits(data, top.result()[1])
    names = [f"{m}@{k}" for m, k in CUTOFFS.items()]
    return {
        "task": "beir",
        "data": {"path": str(path), "split": split, "datasets": list(per_dataset)},
        "settings": {"query_prefix": query_prefix, "passage_prefix": passage_prefix, "pooling": pooling,
                     "max_length": max_length, "batch_size": batch_size},
        "summary": {name: float(np.mean([d[name] for d in per_dataset.values()])) for name in names},
        "per_dataset": per_dataset,
        "timing": {"seconds": time.perf_counter() - started},
    }
