"""Time ``hybridray.evaluate.search.search`` (exact top-k) on random unit vectors and count the
queries that take the re-check path (k-th exact score within the float32 error bound of faiss's
deepest candidate). One thread, as on a busy 2-core machine.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_search.py
"""
from __future__ import annotations

import time

import faiss
import numpy as np

from hybridray.evaluate.search import EXTRA_DEPTH, exact_scores, flat_ip_index, float32_error_bound, search


def main(n_queries: int = 1000, n_corpus: int = 20_000, dim: int = 384) -> None:
    faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((n_corpus, dim)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    corpus[10:20] = corpus[0]  # a few duplicated rows
    queries = rng.standard_normal((n_queries, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    bound = float32_error_bound(dim, np.linalg.norm(queries, axis=1), float(np.linalg.norm(corpus, axis=1).max()))
    for k in (10, 101):
        started = time.perf_counter()
        search(queries, corpus, k)
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        found, _ = flat_ip_index(corpus).search(queries, k)
        faiss_seconds = time.perf_counter() - started
        deep, rows = flat_ip_index(corpus).search(queries, k + EXTRA_DEPTH)
        kth = np.sort(exact_scores(queries, corpus, rows), axis=1)[:, -k]
        rechecked = int((kth <= deep[:, -1] + bound).sum())
        print(f"k={k}: search {seconds:.3f} s (faiss alone {faiss_seconds:.3f} s), "
              f"re-checked {rechecked} of {n_queries} queries, bound {bound.max():.2e}")


if __name__ == "__main__":
    main()
