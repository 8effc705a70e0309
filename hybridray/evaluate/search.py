"""Exact inner-product top-k search with faiss: on GPU when faiss sees one, else CPU.

Embeddings are L2-normalised, so inner product is cosine similarity. Used where a top-k list
is the output (BEIR layout, Tatoeba); LAReQA's full-ranking mAP counts ranks instead
(:func:`hybridray.evaluate.metrics.rank_counts`).
"""
from __future__ import annotations

import faiss
import numpy as np


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

    ``k`` is capped at the corpus size, so every returned index is a real row.
    """
    k = min(k, len(corpus))
    scores, indices = flat_ip_index(corpus).search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, indices
