"""Exact inner-product top-k search with faiss: on GPU when faiss sees one, else CPU.

Embeddings are L2-normalised, so inner product is cosine similarity. Used where a top-k list
is the output (BEIR layout); full-ranking metrics count ranks instead
(:func:`hybridray.evaluate.metrics.rank_counts`). Equal scores are ordered by the same fixed
tie-break keys as there (:func:`hybridray.evaluate.metrics.tiebreak_keys`), so a top-k list
never favours a document for its position in the corpus.
"""
from __future__ import annotations

from typing import Optional

import faiss
import numpy as np

from hybridray.evaluate.metrics import tiebreak_keys

#: Candidates faiss returns beyond the k asked: a query is re-checked against its whole corpus
#: only when its k-th exact score is within the float32 error bound of the deepest of them,
#: which a deeper list makes rare (about 0.1 % of queries instead of 5 % with k + 1).
EXTRA_DEPTH = 16
#: The unit roundoff of float32.
FLOAT32_EPS = 2.0 ** -24


def float32_error_bound(dim: int, query_norms: np.ndarray, corpus_norm: float) -> np.ndarray:
    """Per query, a bound on |float32 inner product - exact| over every row: the classic
    dot-product bound gamma_d * |q| |c| (any summation order: faiss's and BLAS's kernels), plus
    the float32 rounding of the exact score, doubled for slack. On GPU this assumes faiss's flat
    index in float32 (its default; not float16, not TF32 math)."""
    return 2 * (dim + 2) * FLOAT32_EPS * query_norms * corpus_norm


def flat_ip_index(corpus: np.ndarray) -> faiss.Index:
    """An exact (flat) inner-product index holding ``corpus``; the one CPU/GPU choice."""
    corpus = np.ascontiguousarray(corpus, dtype=np.float32)
    index = faiss.IndexFlatIP(corpus.shape[1])
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(corpus)
    return index


def exact_scores(queries: np.ndarray, corpus: np.ndarray, rows: np.ndarray, block: int = 64) -> np.ndarray:
    """``[n, m]`` inner products of query ``i`` with corpus rows ``rows[i]``, summed in float64
    and rounded to float32. The score a ranking orders by: unlike a float32 BLAS product, its
    value does not depend on how many rows were scored together (faiss's and numpy's kernels
    change with the matrix sizes), so equal vectors always tie and a corpus searched whole or
    in chunks is ordered alike."""
    out = np.empty(rows.shape, dtype=np.float32)
    for lo in range(0, len(rows), block):
        out[lo:lo + block] = np.einsum("nd,nmd->nm", queries[lo:lo + block], corpus[rows[lo:lo + block]],
                                       dtype=np.float64)
    return out


def search(queries: np.ndarray, corpus: np.ndarray, k: int,
           keys: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` corpus rows per query, best first: ``(scores [n, k], indices [n, k])``.

    ``k`` is capped at the corpus size, so every returned index is a real row. faiss finds the
    candidates (:data:`EXTRA_DEPTH` more than asked); they are ordered by their
    :func:`exact_scores`, then by ``tiebreak_keys``. A row faiss left out scores at most its
    deepest candidate plus the float32 error (:func:`float32_error_bound`); a query whose k-th
    exact score does not clear that -- a tie or near-tie across faiss's cut -- is ranked again
    over every row whose float32 score comes within twice the bound of its k-th, scored
    exactly. ``keys``: the tie-break keys of the corpus rows (default
    ``tiebreak_keys(len(corpus))``; a chunk of a larger corpus passes its rows' keys).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    corpus = np.ascontiguousarray(corpus, dtype=np.float32)
    k = min(k, len(corpus))
    depth = min(k + EXTRA_DEPTH, len(corpus))
    found, indices = flat_ip_index(corpus).search(queries, depth)
    keys = tiebreak_keys(len(corpus)) if keys is None else keys
    scores = exact_scores(queries, corpus, indices)
    order = np.lexsort((-keys[indices], -scores), axis=1)  # by score, then key, both descending
    scores, indices = np.take_along_axis(scores, order, 1)[:, :k], np.take_along_axis(indices, order, 1)[:, :k]
    if depth > k:
        bound = float32_error_bound(corpus.shape[1], np.linalg.norm(queries, axis=1),
                                    float(np.linalg.norm(corpus, axis=1).max()))
        for i in np.flatnonzero(scores[:, k - 1] <= found[:, -1] + bound):
            rows = np.flatnonzero(corpus @ queries[i] >= scores[i, k - 1] - 2 * bound[i])
            row = exact_scores(queries[i:i + 1], corpus, rows[None])[0]
            best = np.lexsort((-keys[rows], -row))[:k]
            scores[i], indices[i] = row[best], rows[best]
    return scores, indices


class RunningTopK:
    """The top-``k`` of every query over a corpus that arrives in chunks (a corpus too large
    to encode at once): the same hits, in the same order, as :func:`search` of the whole.

    Each chunk is searched exactly (:func:`search` with the chunk rows' own tie-break keys out
    of ``tiebreak_keys(n_corpus)``), and merged with the hits so far by (score, key), both
    descending. Under that strict total order the top ``k`` of the whole corpus is the top
    ``k`` of the union of every chunk's top ``k``, whatever the chunks and their order.
    Holds ``[n_queries, k]`` scores and rows, never the corpus."""

    def __init__(self, queries: np.ndarray, k: int, n_corpus: int):
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k, self.n_corpus, self.added = min(k, n_corpus), n_corpus, 0
        self.keys = tiebreak_keys(n_corpus)
        self.scores = np.empty((len(queries), 0), dtype=np.float32)
        self.rows = np.empty((len(queries), 0), dtype=np.int64)

    def add(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Merge the chunk of corpus rows ``rows`` (indices into the whole corpus) embedded as ``vectors``."""
        rows = np.asarray(rows, dtype=np.int64)
        scores, local = search(self.queries, vectors, self.k, keys=self.keys[rows])
        scores = np.concatenate([self.scores, scores], axis=1)
        hits = np.concatenate([self.rows, rows[local]], axis=1)
        order = np.lexsort((-self.keys[hits], -scores), axis=1)[:, : self.k]
        self.scores, self.rows = np.take_along_axis(scores, order, 1), np.take_along_axis(hits, order, 1)
        self.added += len(rows)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [n, k], rows [n, k])``, best first, once every corpus row was added."""
        if self.added != self.n_corpus:
            raise RuntimeError(f"RunningTopK: {self.added} of {self.n_corpus} corpus rows added")
        return self.scores, self.rows
