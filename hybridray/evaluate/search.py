"""Exact inner-product top-k search with faiss: on GPU when faiss sees one, else CPU.

Embeddings are L2-normalised, so inner product is cosine similarity. Used where a top-k list
is the output (BEIR layout); full-ranking metrics count ranks instead
(:func:`hybridray.evaluate.metrics.rank_counts`). Equal scores are ordered by the same fixed
tie-break keys as there (:func:`hybridray.evaluate.metrics.tiebreak_keys`), so a top-k list
never favours a document for its position in the corpus.
"""
from __future__ import annotations

import faiss
import numpy as np

from hybridray.evaluate.metrics import tiebreak_keys


def flat_ip_index(corpus: np.ndarray) -> faiss.Index:
    """An exact (flat) inner-product index holding ``corpus``; the one CPU/GPU choice."""
    corpus = np.ascontiguousarray(corpus, dtype=np.float32)
    index = faiss.IndexFlatIP(corpus.shape[1])
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(corpus)
    return index


def search(queries: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` corpus rows per query, best first: ``(scores [n, k], indices [n, k])``.

    ``k`` is capped at the corpus size, so every returned index is a real row. Ties follow
    ``tiebreak_keys``: faiss returns one more hit than asked, the hits are re-ordered by
    (score, key), and a query whose k-th and (k+1)-th scores are equal -- a tie that crosses
    the cut, so faiss's own choice of which tied rows to return would decide -- is ranked
    exactly against the whole corpus instead.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    corpus = np.ascontiguousarray(corpus, dtype=np.float32)
    k = min(k, len(corpus))
    depth = min(k + 1, len(corpus))
    scores, indices = flat_ip_index(corpus).search(queries, depth)
    keys = tiebreak_keys(len(corpus))
    order = np.lexsort((-keys[indices], -scores), axis=1)  # by score, then key, both descending
    scores, indices = np.take_along_axis(scores, order, 1), np.take_along_axis(indices, order, 1)
    if depth > k:
        for i in np.flatnonzero(scores[:, k - 1] == scores[:, k]):
            row = corpus @ queries[i]  # this query's scores against every row, one consistent set
            best = np.lexsort((-keys, -row))[:k]
            scores[i, :k], indices[i, :k] = row[best], best
    return scores[:, :k], indices[:, :k]
