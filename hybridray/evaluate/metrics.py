"""Exact ranking metrics in numpy, vectorised: no per-query sort, no Python loop over queries.

Two families:

**Full-ranking metrics from rank counting** (LAReQA). A relevant candidate's *rank* is

    rank = 1 + #(candidates of the pool whose score is strictly higher)

so no sort of the score row is needed: one comparison of the relevant score against it.
Ranks are carried as an int array ``[n, m]`` (``m`` relevant slots per query), ``0`` marking
an empty slot. Ties with non-relevant candidates go in the relevant item's favour. Relevant
items tied *with each other* share a rank but not a position: AP and recall place them one
after the other, i.e. they use the *position* of the i-th relevant item (ranks sorted
ascending, ``i = 1..R``)

    p_i = r_(i) + #{j < i : r_(j) = r_(i)}

which is its place in the full ranking with every tie broken in favour of relevant items
(without ties, ``p_i = r_(i)``). Then

- ``average_precision``: ``AP = (1/R) * sum_i  i / p_i`` — the textbook AP (mean of the
  precision at each relevant item's position, full ranking, no cut-off);
- ``recall_at_k``: ``#{i : p_i <= k} / R``, the fraction of the relevant set in the top k;
- ``rank_distance``: ``max(r) - min(r)`` on ranks, the spread of one query's relevant items
  (language bias); NaN for queries with fewer than two relevant items.

**Top-k metrics** (BEIR layout) from the relevance grades of the retrieved hits, best first
(``hit_gains [n, k]``, 0 for unjudged or non-relevant hits), as trec_eval defines them:
``ndcg_at_k`` (linear gain = grade, discount ``log2(position + 1)``), ``topk_recall``
(relevant = grade > 0), ``mrr_at_k`` (reciprocal position of the first relevant hit).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def rank_counts(
    queries: np.ndarray,
    candidates: np.ndarray,
    relevant: np.ndarray,
    pools: Sequence[tuple[int, int]],
    *,
    chunk_size: int = 256,
) -> np.ndarray:
    """For every relevant candidate, how many candidates of each pool score strictly higher.

    Args:
        queries: ``[n, d]`` query embeddings.
        candidates: ``[N, d]`` candidate embeddings, the pools laid out contiguously.
        relevant: ``[n, m]`` indices into ``candidates``, ``-1`` for an empty slot.
        pools: ``(start, end)`` row ranges of ``candidates``, one per pool.
        chunk_size: queries scored at once (memory ~ ``chunk_size * (4 + m) * N`` bytes).

    Returns:
        ``[n, m, len(pools)]`` int64 counts (0 for empty slots). The rank of a relevant item
        in pool ``p`` is ``1 + counts[..., p]``; in the union of all pools it is
        ``1 + counts.sum(-1)``. Scores come from one matmul per chunk and the relevant score is
        read from the same row, so an item is never "higher" than itself.

    numpy on the CPU, also when training on a GPU: its vectorised boolean sums are ~10x
    faster than torch's on CPU, and a 20k-candidate pool scores in about two seconds.
    """
    candidates = np.asarray(candidates, dtype=np.float32)
    relevant = np.asarray(relevant, dtype=np.int64)
    n, m = relevant.shape
    out = np.zeros((n, m, len(pools)), dtype=np.int64)
    for start in range(0, n, chunk_size):
        scores = np.asarray(queries[start:start + chunk_size], dtype=np.float32) @ candidates.T
        rel = relevant[start:start + chunk_size]
        rel_scores = np.take_along_axis(scores, np.maximum(rel, 0), axis=1)
        rel_scores[rel < 0] = np.inf
        for p, (lo, hi) in enumerate(pools):
            out[start:start + len(scores), :, p] = (scores[:, None, lo:hi] > rel_scores[:, :, None]).sum(-1)
    return out


def _masked(ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ranks = np.asarray(ranks)
    valid = ranks > 0
    return valid, np.where(valid, ranks, np.inf)


def _positions(ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted relevant positions ``p_i`` (inf for empty slots) and the relevant-set sizes."""
    valid, r = _masked(ranks)
    r = np.sort(r, axis=1)  # sorts the m relevant ranks of a query, not its score row
    m = r.shape[1]
    earlier = np.tril(np.ones((m, m), dtype=bool), k=-1)  # [i, j]: j < i
    tied_before = ((r[:, :, None] == r[:, None, :]) & earlier).sum(-1)
    return r + tied_before, valid.sum(1)


def average_precision(ranks: np.ndarray) -> np.ndarray:
    """AP per query from its relevant ranks ``[n, m]`` (0 = empty slot); NaN if none."""
    positions, n_relevant = _positions(ranks)
    i = np.arange(1, positions.shape[1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (i / positions).sum(1) / n_relevant


def recall_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Fraction of each query's relevant set in the top ``k``; NaN if the set is empty."""
    positions, n_relevant = _positions(ranks)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (positions <= k).sum(1) / n_relevant


def rank_distance(ranks: np.ndarray) -> np.ndarray:
    """Largest minus smallest relevant rank per query; NaN with fewer than two relevant items."""
    valid, r = _masked(ranks)
    hi = np.where(valid, r, -np.inf).max(1)
    lo = r.min(1)
    return np.where(valid.sum(1) >= 2, hi - lo, np.nan)


def ndcg_at_k(hit_gains: np.ndarray, ideal_gains: np.ndarray, k: int) -> np.ndarray:
    """nDCG@k with linear gains (trec_eval ``ndcg_cut``).

    Args:
        hit_gains: ``[n, >=k]`` grades of the retrieved hits, best first.
        ideal_gains: ``[n, >=k]`` each query's judged grades sorted descending, zero-padded.
    """
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (np.clip(hit_gains[:, :k], 0, None) * discount[: hit_gains[:, :k].shape[1]]).sum(1)
    idcg = (np.clip(ideal_gains[:, :k], 0, None) * discount[: ideal_gains[:, :k].shape[1]]).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(idcg > 0, dcg / idcg, 0.0)


def topk_recall(hit_gains: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Recall@k: relevant hits (grade > 0) in the top k over the number of relevant items."""
    found = (hit_gains[:, :k] > 0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_relevant > 0, found / np.maximum(n_relevant, 1), 0.0)


def mrr_at_k(hit_gains: np.ndarray, k: int) -> np.ndarray:
    """Reciprocal position of the first relevant hit within the top k, else 0."""
    hits = hit_gains[:, :k] > 0
    first = hits.argmax(1)
    return np.where(hits.any(1), 1.0 / (first + 1), 0.0)
