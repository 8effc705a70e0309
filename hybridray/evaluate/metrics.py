"""Exact ranking metrics in numpy, vectorised: no per-query sort, no Python loop over queries.

Ties
====

Every ranking here is a strict total order: candidate ``c`` ranks above candidate ``r`` when
``score(c) > score(r)``, or when the scores are equal and ``key(c) > key(r)``, where ``key``
is a fixed pseudo-random permutation of the candidate indices (``tiebreak_keys``, seed
``TIEBREAK_SEED``). This is trec_eval's convention -- ties are broken by an arbitrary order
of the documents that knows nothing of relevance (trec_eval uses the document ids) -- with a
seeded order instead of the ids, because here the candidate index often correlates with
relevance (Tatoeba's gold line is the query's own line number; LAReQA pools keep paragraph
order). So a collapsed encoder (every embedding equal) produces one fixed random ranking and
scores at chance level, never a perfect 1.0; breaking ties in the relevant item's favour
would call it perfect, and a sweep would pick it. ``hybridray.evaluate.search`` applies the
same rule to top-k lists.

Two families:

**Full-ranking metrics from rank counting** (LAReQA). A relevant candidate's *rank* is

    rank = 1 + #(candidates of the pool ranked above it, by the order above)

so no sort of the score row is needed: one comparison of the relevant score against it (and
a second, on the equal scores only, for the keys). Ranks are carried as an int array
``[n, m]`` (``m`` relevant slots per query), ``0`` marking an empty slot. Two different
candidates never share a rank, so the i-th relevant item in rank order sits at position
``r_(i)`` (ranks sorted ascending, ``i = 1..R``). Then

- ``average_precision``: ``AP = (1/R) * sum_i  i / r_(i)`` -- the textbook AP (mean of the
  precision at each relevant item's position, full ranking, no cut-off);
- ``recall_at_k``: ``#{i : r_(i) <= k} / R``, the fraction of the relevant set in the top k;
- ``rank_distance``: ``max(r) - min(r)``, the spread of one query's relevant items
  (language bias); NaN for queries with fewer than two relevant items.

**Top-k metrics** (BEIR layout) from the relevance grades of the retrieved hits, best first
(``hit_gains [n, k]``, 0 for unjudged or non-relevant hits), as trec_eval defines them:
``ndcg_at_k`` (linear gain = grade, discount ``log2(position + 1)``), ``topk_recall``
(relevant = grade > 0), ``mrr_at_k`` (reciprocal position of the first relevant hit).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

#: Seed of the fixed candidate order that breaks score ties (see the module docstring).
TIEBREAK_SEED = 0


def tiebreak_keys(n_candidates: int) -> np.ndarray:
    """The tie-break key of each candidate index: among equal scores, the higher key ranks
    first. A fixed permutation, the same in every run and process."""
    return np.random.default_rng(TIEBREAK_SEED).permutation(n_candidates)


def rank_counts(
    queries: np.ndarray,
    candidates: np.ndarray,
    relevant: np.ndarray,
    pools: Sequence[tuple[int, int]],
    *,
    chunk_size: int = 256,
    keys: Optional[np.ndarray] = None,
) -> np.ndarray:
    """For every relevant candidate, how many candidates of each pool rank above it.

    Args:
        queries: ``[n, d]`` query embeddings.
        candidates: ``[N, d]`` candidate embeddings, the pools laid out contiguously.
        relevant: ``[n, m]`` indices into ``candidates``, ``-1`` for an empty slot.
        pools: ``(start, end)`` row ranges of ``candidates``, one per pool.
        chunk_size: queries scored at once (memory ~ ``chunk_size * (4 + 2m) * N`` bytes).
        keys: ``[N]`` tie-break keys (default ``tiebreak_keys(N)``).

    Returns:
        ``[n, m, len(pools)]`` int64 counts (0 for empty slots). The rank of a relevant item
        in pool ``p`` is ``1 + counts[..., p]``; in the union of all pools it is
        ``1 + counts.sum(-1)``. Scores come from one matmul per chunk and the relevant score is
        read from the same row, so an item is never above itself.

    numpy on the CPU, also when training on a GPU: its vectorised boolean sums are ~10x
    faster than torch's on CPU, and a 20k-candidate pool scores in about two seconds.
    """
    candidates = np.asarray(candidates, dtype=np.float32)
    relevant = np.asarray(relevant, dtype=np.int64)
    keys = tiebreak_keys(len(candidates)) if keys is None else np.asarray(keys)
    n, m = relevant.shape
    out = np.zeros((n, m, len(pools)), dtype=np.int64)
    for start in range(0, n, chunk_size):
        scores = np.asarray(queries[start:start + chunk_size], dtype=np.float32) @ candidates.T
        rel = relevant[start:start + chunk_size]
        rel_scores = np.take_along_axis(scores, np.maximum(rel, 0), axis=1)
        rel_scores[rel < 0] = np.inf  # an empty slot: nothing is above or equal to it
        rel_keys = keys[np.maximum(rel, 0)]
        for p, (lo, hi) in enumerate(pools):
            block = scores[:, None, lo:hi]
            counts = (block > rel_scores[:, :, None]).sum(-1)
            # Equal scores: the keys decide. The relevant item equals itself in its own pool;
            # only (query, slot) pairs with another equal score need the key comparison.
            equal = block == rel_scores[:, :, None]
            own = (rel >= lo) & (rel < hi)
            tied = np.nonzero(equal.sum(-1) > own)
            if tied[0].size:
                above = equal[tied] & (keys[lo:hi][None, :] > rel_keys[tied][:, None])
                counts[tied] += above.sum(-1)
            out[start:start + len(scores), :, p] = counts
    return out


def _sorted_ranks(ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's relevant ranks ascending (inf for empty slots) and the set sizes."""
    ranks = np.asarray(ranks)
    valid = ranks > 0
    r = np.sort(np.where(valid, ranks, np.inf), axis=1)  # the m relevant ranks, not a score row
    if (r[:, 1:] == r[:, :-1])[np.isfinite(r[:, 1:])].any():
        raise ValueError("two relevant items share a rank: ranks must come from a total order")
    return r, valid.sum(1)


def average_precision(ranks: np.ndarray) -> np.ndarray:
    """AP per query from its relevant ranks ``[n, m]`` (0 = empty slot); NaN if none."""
    r, n_relevant = _sorted_ranks(ranks)
    i = np.arange(1, r.shape[1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (i / r).sum(1) / n_relevant


def recall_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Fraction of each query's relevant set in the top ``k``; NaN if the set is empty."""
    r, n_relevant = _sorted_ranks(ranks)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (r <= k).sum(1) / n_relevant


def rank_distance(ranks: np.ndarray) -> np.ndarray:
    """Largest minus smallest relevant rank per query; NaN with fewer than two relevant items."""
    ranks = np.asarray(ranks)
    valid = ranks > 0
    hi = np.where(valid, ranks, -np.inf).max(1)
    lo = np.where(valid, ranks, np.inf).min(1)
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
