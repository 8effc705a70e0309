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
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from hybridray.errors import UserError
from hybridray.evaluate.metrics import mrr_at_k, ndcg_at_k, topk_recall
from hybridray.evaluate.search import search

#: The metrics reported per dataset and their cut-offs.
CUTOFFS = {"ndcg": 10, "recall": 100, "mrr": 10}


@dataclass
class BeirData:
    """One BEIR-layout dataset, restricted to the queries that have relevant documents."""

    name: str
    corpus_ids: list[str]
    corpus_texts: list[str]
    query_ids: list[str]
    query_texts: list[str]
    qrels: dict[str, dict[str, int]]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path}: missing (BEIR layout needs corpus.jsonl, queries.jsonl, qrels/)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{line_no}: not JSON: {exc}") from None
    return rows


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    if not path.is_file():
        raise UserError(f"{path}: missing qrels file")
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["query-id", "corpus-id", "score"]:
            raise UserError(f"{path}: expected the header 'query-id<TAB>corpus-id<TAB>score'")
        for line_no, row in enumerate(reader, 2):
            if not row:
                continue
            try:
                qrels.setdefault(row[0], {})[row[1]] = int(row[2])
            except (IndexError, ValueError):
                raise UserError(f"{path}:{line_no}: expected query-id, corpus-id, integer score") from None
    return qrels


def load_beir(path: str | Path, split: str = "test") -> BeirData:
    """Read one BEIR-layout dataset directory."""
    path = Path(path)
    corpus = _read_jsonl(path / "corpus.jsonl")
    queries = {str(q["_id"]): q["text"] for q in _read_jsonl(path / "queries.jsonl")}
    qrels = {q: docs for q, docs in _read_qrels(path / "qrels" / f"{split}.tsv").items()
             if q in queries and any(score > 0 for score in docs.values())}
    if not qrels:
        raise UserError(f"{path}: no query of queries.jsonl has a relevant document in qrels/{split}.tsv")
    query_ids = sorted(qrels)
    return BeirData(
        name=path.name,
        corpus_ids=[str(doc["_id"]) for doc in corpus],
        corpus_texts=[f"{doc.get('title') or ''} {doc.get('text') or ''}".strip() for doc in corpus],
        query_ids=query_ids,
        query_texts=[queries[q] for q in query_ids],
        qrels=qrels,
    )


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
    depth = max(CUTOFFS.values())
    _, hits = search(query_emb, corpus_emb, depth + 1)  # +1: room for a dropped identical id
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
) -> dict:
    """Evaluate an encoder on one BEIR-layout dataset or a directory of them.

    Inputs: the model and tokenizer (evaluated where the weights are), ``path`` (a dataset
    directory, or a directory of dataset sub-directories, filtered by ``langs``), the qrels
    ``split`` and the encoding settings. Returns the report dict: ``per_dataset[name]`` with
    ``ndcg@10``, ``recall@100``, ``mrr@10``, ``n_queries``, ``n_corpus``; ``summary`` with
    the macro average over datasets of the three metrics. Example::

        report = evaluate_beir(model, tok, "beir/scifact", query_prefix="query: ",
                               passage_prefix="passage: ", pooling="mean",
                               max_length=256, batch_size=64)
        report["summary"]["ndcg@10"]
    """
    from hybridray.evaluate.encode import encode_texts  # torch + transformers: only when encoding

    encode = dict(pooling=pooling, max_length=max_length, batch_size=batch_size, progress=progress)
    per_dataset, started = {}, time.perf_counter()
    for directory in find_beir_datasets(path, langs):
        data = load_beir(directory, split)
        query_emb = encode_texts(model, tokenizer, data.query_texts, prefix=query_prefix, **encode)
        corpus_emb = encode_texts(model, tokenizer, data.corpus_texts, prefix=passage_prefix, **encode)
        per_dataset[data.name] = score_beir(data, query_emb, corpus_emb)
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
