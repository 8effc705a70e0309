"""Scoring-step benchmark: all LAReQA metrics from embeddings, vectorised vs naive.

Embeddings in, metrics out (mono, cross, multi mAP and recall, rank distance, per-pair
matrix) at full MLQA-R size: the real question / candidate structure of the data directory
(4,199 queries, 20,534 pooled candidates, 42 cross pairs) with random unit embeddings.

- **vectorised**: :func:`hybridray.evaluate.lareqa.score_lareqa` (one matmul per chunk of
  queries, ranks by counting the candidates that score higher, plus a second pass over the
  rows with equal scores that counts those ahead in the fixed tie-break order, no sort);
- **naive**: one score matrix per query language, then a Python loop over its rows that
  argsorts the scores in full for every pool the query is evaluated against (the multi pool
  and each language pool holding one of its versions) and reads the ranks off the order.

Both run in one process on the same embeddings; the naive one on the first
``--naive-queries`` questions of every language (default: all), its full-size time then
extrapolated linearly in the number of queries, which the output says. The metrics of both
are compared on the queries the naive run covered.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_scoring.py --data ../shared/data/mlqa-r
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import numpy as np

from hybridray.evaluate.lareqa import RECALL_AT, LareqaData, load_lareqa, score_lareqa


def naive_lareqa(data: LareqaData, query_emb: dict, cand_emb: dict) -> dict:
    """The same metrics by full per-query sorts; returns ``summary`` and ``pairs``
    (without ties, which random float embeddings do not produce, ranks are positions)."""
    langs, pools = data.langs, data.pools
    candidates = np.concatenate([cand_emb[lang] for lang in langs])
    pair_ap = {x: {y: [] for y in langs} for x in langs}
    pair_hit = {x: {y: [] for y in langs} for x in langs}
    multi = {x: {"ap": [], "recall": [], "distance": []} for x in langs}
    for x in langs:
        relevant = data.relevant(x)
        all_scores = query_emb[x] @ candidates.T  # one product per language, then a row loop
        for i, scores in enumerate(all_scores):
            position = np.empty(len(scores), dtype=np.int64)
            position[np.argsort(-scores)] = np.arange(1, len(scores) + 1)
            ranks = sorted(position[g] for g in relevant[i] if g >= 0)
            multi[x]["ap"].append(np.mean([(j + 1) / r for j, r in enumerate(ranks)]))
            multi[x]["recall"].append(np.mean([r <= RECALL_AT["multi"] for r in ranks]))
            if len(ranks) >= 2:
                multi[x]["distance"].append(ranks[-1] - ranks[0])
            for y, (lo, hi) in zip(langs, pools):
                if relevant[i, langs.index(y)] < 0:
                    continue
                pool_scores = scores[lo:hi]
                order = np.argsort(-pool_scores)
                rank = 1 + int(np.nonzero(order == relevant[i, langs.index(y)] - lo)[0][0])
                pair_ap[x][y].append(1 / rank)
                pair_hit[x][y].append(rank <= 1)
    cross = [(x, y) for x in langs for y in langs if x != y and pair_ap[x][y]]
    return {
        "summary": {
            "map": {"mono": np.mean([np.mean(pair_ap[x][x]) for x in langs]),
                    "cross": np.mean([np.mean(pair_ap[x][y]) for x, y in cross]),
                    "multi": np.mean([np.mean(multi[x]["ap"]) for x in langs])},
            "recall": {"mono": np.mean([np.mean(pair_hit[x][x]) for x in langs]),
                       "cross": np.mean([np.mean(pair_hit[x][y]) for x, y in cross]),
                       "multi": np.mean([np.mean(multi[x]["recall"]) for x in langs])},
            "rank_distance": np.mean([np.mean(multi[x]["distance"]) for x in langs]),
        },
        "pairs": {x: {y: np.mean(pair_ap[x][y]) if pair_ap[x][y] else np.nan for y in langs} for x in langs},
    }


def first_questions(data: LareqaData, n: int) -> LareqaData:
    """The same pools, only the first ``n`` questions of every language."""
    return dataclasses.replace(
        data,
        question_ids={lang: ids[:n] for lang, ids in data.question_ids.items()},
        questions={lang: qs[:n] for lang, qs in data.questions.items()},
        gold={lang: gold[:n] for lang, gold in data.gold.items()},
    )


def metric_values(result: dict, naive: bool) -> list[float]:
    s = result["summary"]
    values = [s[key][setting] for key in ("map", "recall") for setting in ("mono", "cross", "multi")]
    values.append(s["rank_distance"])
    pairs = result["pairs"]
    values += [pairs[x][y] if naive else pairs[x][y]["map"] for x in pairs for y in pairs[x]]
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/mlqa-r", help="LAReQA directory")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--naive-queries", type=int, default=None,
                        help="naive run on the first N questions of each language (default: all)")
    parser.add_argument("--repeat", type=int, default=3, help="vectorised runs; the best is kept")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    data = load_lareqa(args.data)
    rng = np.random.default_rng(args.seed)

    def unit(n: int) -> np.ndarray:
        x = rng.standard_normal((n, args.dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    query_emb = {lang: unit(len(data.questions[lang])) for lang in data.langs}
    cand_emb = {lang: unit(len(data.sentences[lang])) for lang in data.langs}
    n_queries = sum(len(q) for q in data.questions.values())

    times = []
    for _ in range(args.repeat):
        started = time.perf_counter()
        score_lareqa(data, query_emb, cand_emb)
        times.append(time.perf_counter() - started)
    fast = min(times)

    subset = data if args.naive_queries is None else first_questions(data, args.naive_queries)
    n_subset = sum(len(q) for q in subset.questions.values())
    sub_queries = {lang: query_emb[lang][: len(subset.questions[lang])] for lang in data.langs}
    started = time.perf_counter()
    naive = naive_lareqa(subset, sub_queries, cand_emb)
    naive_measured = time.perf_counter() - started
    naive_full = naive_measured * n_queries / n_subset
    diff = np.nanmax(np.abs(np.subtract(metric_values(score_lareqa(subset, sub_queries, cand_emb), False),
                                        metric_values(naive, True))))

    extrapolated = n_subset < n_queries
    naive_label = f"naive (per-query full argsort, Python loop){' †' if extrapolated else ''}"
    print(f"### LAReQA scoring step, MLQA-R size ({n_queries} queries, {data.pools[-1][1]} pooled "
          f"candidates, {sum(1 for x in data.langs for y in data.langs if x != y)} cross pairs, dim {args.dim})\n")
    print("| implementation | queries timed | time, all queries (s) | ms / query | time vs vectorised |")
    print("|---|---|---|---|---|")
    print(f"| vectorised rank counting (`score_lareqa`, best of {args.repeat}) | {n_queries} | {fast:.2f} | "
          f"{1000 * fast / n_queries:.2f} | 1× |")
    print(f"| {naive_label} | {n_subset} | {naive_full:.2f} | {1000 * naive_full / n_queries:.2f} | "
          f"{naive_full / fast:.1f}× |")
    if extrapolated:
        print(f"\n† naive timed on the first {args.naive_queries} questions of each language ({n_subset} queries, "
              f"{naive_measured:.2f} s) and extrapolated linearly to {n_queries} queries.")
    print(f"\nSame metrics on the {n_subset} queries both scored: max |difference| = {diff:.1e} over "
          f"{len(metric_values(naive, True))} values (summary mAP/recall/rank distance and the per-pair mAP matrix).")
    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, numpy {np.__version__}.")


if __name__ == "__main__":
    main()
