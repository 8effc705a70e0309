"""Ranking metrics against slow, obviously correct references, and BEIR metrics against
pytrec_eval. Embeddings are small integers so every score is exact and ties are real: every
reference breaks them by the fixed tie-break keys (``tiebreak_keys``), never by relevance."""
from __future__ import annotations

import json

import numpy as np
import pytest
import pytrec_eval

from hybridray.evaluate.beir import load_beir, score_beir
from hybridray.evaluate.lareqa import RECALL_AT, LareqaData, score_lareqa
from hybridray.evaluate.metrics import (
    average_precision,
    mrr_at_k,
    ndcg_at_k,
    rank_counts,
    rank_distance,
    recall_at_k,
    tiebreak_keys,
    topk_recall,
)
from hybridray.evaluate.search import search
from hybridray.evaluate.tatoeba import bitext_accuracy


# ----------------------------------------------------------------------------- references
def ref_ranking(scores: list[float], keys) -> list[int]:
    """The full ranking: by score, equal scores by key, both descending."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], -keys[i]))


def ref_rank(scores: list[float], item: int, keys) -> int:
    """1-based position of ``item`` in ``ref_ranking``."""
    return ref_ranking(scores, keys).index(item) + 1


def ref_ap(scores: list[float], relevant: set[int], keys) -> float:
    """Textbook AP: walk the full ranking, average the precision at each relevant item."""
    hits, total = 0, 0.0
    for position, item in enumerate(ref_ranking(scores, keys), 1):
        if item in relevant:
            hits += 1
            total += hits / position
    return total / len(relevant)


def ref_recall(scores: list[float], relevant: set[int], k: int, keys) -> float:
    return len(set(ref_ranking(scores, keys)[:k]) & relevant) / len(relevant)


def ranks_array(rows: list[list[int]]) -> np.ndarray:
    width = max(len(r) for r in rows)
    return np.array([r + [0] * (width - len(r)) for r in rows])


def scored(values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """A query [1, 0] and candidates [v, 0]: the scores are exactly ``values``."""
    return np.array([[1.0, 0.0]]), np.array([[v, 0.0] for v in values])


# ----------------------------------------------------------------------------- hand-made
SCORES = [9, 5, 5, 1]  # candidates 1 and 2 tie
KEYS_2_FIRST = [0, 1, 2, 3]  # the tie goes to candidate 2 (higher key)
KEYS_1_FIRST = [0, 2, 1, 3]


@pytest.mark.parametrize(
    "relevant, keys, ranks, ap, r1, r2",
    [
        ([2], KEYS_2_FIRST, [2], 1 / 2, 0, 1),  # candidate 2 wins the tie by its key
        ([2], KEYS_1_FIRST, [3], 1 / 3, 0, 0),  # ... and loses it: relevance plays no part
        ([1, 2], KEYS_2_FIRST, [3, 2], (1 / 2 + 2 / 3) / 2, 0, 1 / 2),
        ([0, 2, 3], KEYS_1_FIRST, [1, 3, 4], (1 / 1 + 2 / 3 + 3 / 4) / 3, 1 / 3, 1 / 3),
        ([3], KEYS_2_FIRST, [4], 1 / 4, 0, 0),
    ],
)
def test_hand_made_ranks_and_metrics(relevant, keys, ranks, ap, r1, r2):
    query, candidates = scored(SCORES)
    counts = rank_counts(query, candidates, np.array([relevant]), [(0, 4)], keys=np.array(keys))
    got = 1 + counts[0, :, 0]
    assert got.tolist() == ranks
    assert average_precision(got[None]) == pytest.approx([ap])
    assert average_precision(got[None]) == pytest.approx([ref_ap(SCORES, set(relevant), keys)])
    assert recall_at_k(got[None], 1) == pytest.approx([r1])
    assert recall_at_k(got[None], 2) == pytest.approx([r2])
    assert recall_at_k(got[None], 2) == pytest.approx([ref_recall(SCORES, set(relevant), 2, keys)])


def test_shared_ranks_are_refused():
    """Ranks come from a total order; two relevant items at one rank would let AP exceed 1."""
    with pytest.raises(ValueError, match="share a rank"):
        average_precision(np.array([[1, 1, 3]]))
    assert average_precision(np.array([[1, 2, 0, 0]])) == pytest.approx([1.0])  # empty slots may repeat


def test_rank_distance_and_empty_slots():
    ranks = ranks_array([[1, 2, 4], [7, 3], [5], [3, 0, 9]])
    assert rank_distance(ranks)[:2].tolist() == [3, 4]
    assert np.isnan(rank_distance(ranks)[2])  # one relevant item: no distance
    assert rank_distance(ranks)[3] == 6  # the 0 slot is empty, not rank 0
    assert average_precision(ranks)[3] == pytest.approx((1 / 3 + 2 / 9) / 2)
    assert recall_at_k(ranks, 3)[3] == pytest.approx(1 / 2)


def test_rank_counts_match_brute_force_with_ties_and_pools():
    rng = np.random.default_rng(0)
    queries = rng.integers(-2, 3, (13, 4)).astype(np.float32)
    candidates = rng.integers(-2, 3, (40, 4)).astype(np.float32)
    candidates[7] = candidates[30]  # a duplicated candidate across pools
    pools = [(0, 10), (10, 25), (25, 40)]
    relevant = rng.integers(0, 40, (13, 3))
    relevant[rng.random((13, 3)) < 0.3] = -1
    counts = rank_counts(queries, candidates, relevant, pools, chunk_size=4)
    keys = tiebreak_keys(40)
    scores = (queries @ candidates.T).tolist()
    n_ties = 0
    for i in range(13):
        for slot in range(3):
            for p, (lo, hi) in enumerate(pools):
                r = relevant[i, slot]
                if r < 0:
                    assert counts[i, slot, p] == 0
                    continue
                target = (scores[i][r], keys[r])
                above = [c for c in range(lo, hi) if (scores[i][c], keys[c]) > target]
                n_ties += sum(1 for c in range(lo, hi) if c != r and scores[i][c] == scores[i][r])
                assert counts[i, slot, p] == len(above)
    assert n_ties > 20  # the comparison has teeth: many real ties


def test_average_precision_equals_reference_and_pytrec_eval_without_ties():
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((20, 50))
    keys = tiebreak_keys(50)
    relevant = [sorted(rng.choice(50, size=rng.integers(1, 6), replace=False).tolist()) for _ in range(20)]
    ranks = ranks_array([[ref_rank(scores[i].tolist(), r, keys) for r in rel] for i, rel in enumerate(relevant)])
    ap = average_precision(ranks)
    run = {f"q{i}": {f"d{j}": float(scores[i, j]) for j in range(50)} for i in range(20)}
    qrels = {f"q{i}": {f"d{j}": 1 for j in rel} for i, rel in enumerate(relevant)}
    trec = pytrec_eval.RelevanceEvaluator(qrels, {"map"}).evaluate(run)
    for i, rel in enumerate(relevant):
        assert ap[i] == pytest.approx(ref_ap(scores[i].tolist(), set(rel), keys))
        assert ap[i] == pytest.approx(trec[f"q{i}"]["map"])


def test_search_orders_ties_by_key_also_across_the_cut():
    rng = np.random.default_rng(4)
    corpus = rng.integers(-1, 2, (60, 3)).astype(np.float32)  # few distinct vectors: many ties
    queries = rng.integers(-1, 2, (9, 3)).astype(np.float32)
    keys = tiebreak_keys(60)
    for k in (1, 5, 17, 60):
        scores, hits = search(queries, corpus, k)
        for i in range(len(queries)):
            want = ref_ranking((corpus @ queries[i]).tolist(), keys)[:k]
            assert hits[i].tolist() == want, (k, i)
            np.testing.assert_allclose(scores[i], corpus[want] @ queries[i])


def test_search_is_exact_when_faiss_float32_order_is_wrong(monkeypatch):
    """faiss sees a corpus moved a little (score errors up to 1.6e-5: more than a fixed 1e-5
    margin, within the float32 bound of 4.6e-5 at d = 384), so its candidate lists and order
    are wrong; near-ties 1 ulp apart and exact copies sit across every cut. search and
    RunningTopK must still equal an independent float64 reference ordered by (score rounded
    to float32, key). With no margin at all this fails: the re-check path is exercised."""
    import hybridray.evaluate.search as search_module
    from hybridray.evaluate.search import RunningTopK

    rng = np.random.default_rng(5)
    corpus = rng.standard_normal((2000, 384)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = rng.standard_normal((40, 384)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for j, q in enumerate(queries[:8]):  # 30 rows a few ulps from each of 8 queries: near-ties across the cut
        near = np.repeat(q[None], 30, axis=0)
        dims = rng.integers(0, 384, 30)
        near[np.arange(30), dims] = np.nextafter(near[np.arange(30), dims], np.float32(2))
        corpus[100 + 30 * j:130 + 30 * j] = near
    corpus[500:510] = corpus[100]  # exact copies too
    real_index = search_module.flat_ip_index

    def noisy(rows):
        return rows + 4e-6 * np.random.default_rng(len(rows)).standard_normal(rows.shape).astype(np.float32)

    monkeypatch.setattr(search_module, "flat_ip_index", lambda rows: real_index(noisy(rows)))
    keys = tiebreak_keys(len(corpus))
    exact = (queries.astype(np.float64) @ corpus.astype(np.float64).T).astype(np.float32)
    for k in (1, 10, 45, 101):
        want = np.stack([np.lexsort((-keys, -row))[:k] for row in exact])
        faiss_hits = real_index(noisy(corpus)).search(queries, k)[1]
        assert (faiss_hits != want).any()  # faiss alone is wrong here
        scores, hits = search(queries, corpus, k)
        np.testing.assert_array_equal(hits, want)
        np.testing.assert_array_equal(scores, np.take_along_axis(exact, want, 1))
        top = RunningTopK(queries, k, len(corpus))
        for start in range(0, len(corpus), 300):
            top.add(np.arange(start, min(start + 300, len(corpus))), corpus[start:start + 300])
        np.testing.assert_array_equal(top.result()[1], want)


# ----------------------------------------------------------------------------- LAReQA
def tiny_lareqa() -> LareqaData:
    """3 languages; q3 has no German version, q4 exists in English only; the English pool
    holds a duplicated sentence (two paragraphs quoting the same line)."""
    return LareqaData(
        path="hand-made",
        langs=["en", "de", "fr"],
        question_ids={"en": ["q1", "q2", "q3", "q4"], "de": ["q1", "q2"], "fr": ["q3", "q1", "q2"]},
        questions={"en": ["e1", "e2", "e3", "e4"], "de": ["d1", "d2"], "fr": ["f3", "f1", "f2"]},
        gold={"en": np.array([0, 2, 4, 4]), "de": np.array([1, 0]), "fr": np.array([2, 0, 1])},
        sentences={"en": ["s0", "s1", "s2", "s3", "s4", "s1"], "de": ["t0", "t1", "t2"], "fr": ["u0", "u1", "u2", "u3"]},
        contexts={"en": ["p"] * 6, "de": ["p"] * 3, "fr": ["p"] * 4},
    )


def ref_lareqa(data: LareqaData, query_emb: dict, cand_emb: dict) -> dict:
    """Every setting by its definition: loops, per-query rank scans, textbook macro averages."""
    langs = data.langs
    pool_all = np.concatenate([cand_emb[lang] for lang in langs])
    offset = dict(zip(langs, np.cumsum([0] + [len(cand_emb[lang]) for lang in langs])))
    keys = tiebreak_keys(len(pool_all))  # pooled indices, also inside one language's pool

    def gold_global(lang, qid):
        if qid not in data.question_ids[lang]:
            return None
        return offset[lang] + data.gold[lang][data.question_ids[lang].index(qid)]

    pairs, per_lang = {}, {}
    for x in langs:
        pairs[x] = {}
        for y in langs:
            aps, hits = [], []
            for i, qid in enumerate(data.question_ids[x]):
                g = gold_global(y, qid)
                if g is None:
                    continue
                scores = (cand_emb[y] @ query_emb[x][i]).tolist()
                rank = ref_rank(scores, g - offset[y], keys[offset[y]:])
                aps.append(1 / rank)
                hits.append(rank <= 1)
            pairs[x][y] = (np.mean(aps) if aps else np.nan, np.mean(hits) if hits else np.nan, len(aps))
        aps, recalls, distances = [], [], []
        for i, qid in enumerate(data.question_ids[x]):
            rel = [g for y in langs if (g := gold_global(y, qid)) is not None]
            scores = (pool_all @ query_emb[x][i]).tolist()
            ranks = [ref_rank(scores, g, keys) for g in rel]
            aps.append(ref_ap(scores, set(rel), keys))
            recalls.append(ref_recall(scores, set(rel), 10, keys))
            if len(ranks) >= 2:
                distances.append(max(ranks) - min(ranks))
        per_lang[x] = (np.mean(aps), np.mean(recalls), np.mean(distances) if distances else np.nan)
    cross = [pairs[x][y] for x in langs for y in langs if x != y and pairs[x][y][2]]
    return {
        "map": {"mono": np.mean([pairs[x][x][0] for x in langs]), "cross": np.mean([c[0] for c in cross]),
                "multi": np.mean([per_lang[x][0] for x in langs])},
        "recall": {"mono": np.mean([pairs[x][x][1] for x in langs]), "cross": np.mean([c[1] for c in cross]),
                   "multi": np.mean([per_lang[x][1] for x in langs])},
        "rank_distance": np.nanmean([per_lang[x][2] for x in langs]),
        "pairs": pairs,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_score_lareqa_matches_reference(seed):
    data = tiny_lareqa()
    rng = np.random.default_rng(seed)
    query_emb = {lang: rng.integers(-2, 3, (len(q), 3)).astype(np.float32) for lang, q in data.questions.items()}
    cand_emb = {lang: rng.integers(-2, 3, (len(s), 3)).astype(np.float32) for lang, s in data.sentences.items()}
    cand_emb["en"][5] = cand_emb["en"][1]  # the duplicated sentence encodes identically
    got = score_lareqa(data, query_emb, cand_emb, chunk_size=2)
    want = ref_lareqa(data, query_emb, cand_emb)
    for key in ("map", "recall"):
        for setting in ("mono", "cross", "multi"):
            assert got["summary"][key][setting] == pytest.approx(want[key][setting]), (key, setting)
    assert got["summary"]["rank_distance"] == pytest.approx(want["rank_distance"])
    for x in data.langs:
        for y in data.langs:
            want_map, want_recall, n = want["pairs"][x][y]
            assert got["pairs"][x][y]["n_queries"] == n
            if n:
                assert got["pairs"][x][y]["map"] == pytest.approx(want_map)
                assert got["pairs"][x][y]["recall"] == pytest.approx(want_recall)


def test_lareqa_skips_missing_versions_and_counts():
    data = tiny_lareqa()
    relevant = data.relevant("en")
    assert relevant.tolist() == [[0, 7, 9], [2, 6, 10], [4, -1, 11], [4, -1, -1]]
    query_emb = {lang: np.ones((len(q), 2), np.float32) for lang, q in data.questions.items()}
    cand_emb = {lang: np.ones((len(s), 2), np.float32) for lang, s in data.sentences.items()}
    got = score_lareqa(data, query_emb, cand_emb)
    assert got["pairs"]["en"]["de"]["n_queries"] == 2  # q3 and q4 have no German version
    assert got["pairs"]["de"]["fr"]["n_queries"] == 2
    assert got["summary"]["n_cross_pairs"] == 6
    assert got["summary"]["n_candidates"] == 13 and got["summary"]["n_queries"] == 9
    assert got["summary"]["recall_at"] == RECALL_AT
    # every score ties: the fixed keys decide, exactly as the reference says -- not "perfect"
    want = ref_lareqa(data, query_emb, cand_emb)
    for setting in ("mono", "cross", "multi"):
        assert got["summary"]["map"][setting] == pytest.approx(want["map"][setting])
        assert got["summary"]["map"][setting] < 1.0
    assert got["summary"]["rank_distance"] == pytest.approx(want["rank_distance"]) and want["rank_distance"] > 0


def parallel_lareqa(n_questions=300, per_paragraph=5, langs=("en", "de", "fr")) -> LareqaData:
    """Every question in every language; each pool holds ``per_paragraph`` sentences per
    question (its gold first, in question order)."""
    n = n_questions * per_paragraph
    return LareqaData(
        path="synthetic", langs=list(langs),
        question_ids={lang: [f"q{i}" for i in range(n_questions)] for lang in langs},
        questions={lang: [f"{lang}{i}" for i in range(n_questions)] for lang in langs},
        gold={lang: np.arange(n_questions) * per_paragraph for lang in langs},
        sentences={lang: [f"s{j}" for j in range(n)] for lang in langs},
        contexts={lang: ["p"] * n for lang in langs},
    )


def test_a_collapsed_encoder_scores_at_chance_in_every_metric():
    """All embeddings equal: with ties in the relevant item's favour this scored mAP 1.0 and
    rank distance 0 -- and a sweep would have picked it. Now it scores like random vectors."""
    data = parallel_lareqa()
    n_q, n_c = 300, 1500
    collapsed = score_lareqa(
        data, {lang: np.ones((n_q, 4), np.float32) for lang in data.langs},
        {lang: np.ones((n_c, 4), np.float32) for lang in data.langs},
    )["summary"]
    rng = np.random.default_rng(0)
    random = score_lareqa(
        data, {lang: rng.standard_normal((n_q, 64)).astype(np.float32) for lang in data.langs},
        {lang: rng.standard_normal((n_c, 64)).astype(np.float32) for lang in data.langs},
    )["summary"]
    # Chance: E[1/rank] = H_N / N = 0.0053 for one relevant item among N = 1,500; the expected
    # spread of 3 random ranks among 4,500 is 4,501 * 2/4 = 2,250.
    for summary in (collapsed, random):
        assert all(value < 0.02 for value in summary["map"].values()), summary["map"]
        assert all(value < 0.05 for value in summary["recall"].values()), summary["recall"]
        assert 1_800 < summary["rank_distance"] < 2_700, summary["rank_distance"]
    # the Tatoeba and BEIR paths too (one relevant line / document per query)
    same = np.ones((200, 4), np.float32)
    assert max(bitext_accuracy(same, same)) <= 0.01


# ----------------------------------------------------------------------------- BEIR
def test_topk_metrics_match_pytrec_eval():
    rng = np.random.default_rng(2)
    n_docs, n_queries = 300, 25
    scores = rng.standard_normal((n_queries, n_docs))
    qrels = {
        f"q{i}": {f"d{j}": int(rng.integers(0, 4)) for j in rng.choice(n_docs, size=rng.integers(1, 30), replace=False)}
        for i in range(n_queries)
    }
    qrels = {q: docs for q, docs in qrels.items() if any(g > 0 for g in docs.values())}
    qids = sorted(qrels)
    order = np.argsort(-scores, axis=1)[:, :100]
    hit_gains = np.array([[qrels[q].get(f"d{j}", 0) for j in order[int(q[1:])]] for q in qids], dtype=float)
    ideal = np.zeros((len(qids), 100))
    for i, q in enumerate(qids):
        grades = sorted((g for g in qrels[q].values() if g > 0), reverse=True)
        ideal[i, : len(grades)] = grades
    n_rel = np.array([sum(g > 0 for g in qrels[q].values()) for q in qids])
    run = {q: {f"d{j}": float(scores[int(q[1:]), j]) for j in order[int(q[1:])]} for q in qids}
    top10 = {q: dict(list(docs.items())[:10]) for q, docs in run.items()}
    trec = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    trec_rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    np.testing.assert_allclose(ndcg_at_k(hit_gains, ideal, 10), [trec[q]["ndcg_cut_10"] for q in qids])
    np.testing.assert_allclose(topk_recall(hit_gains, n_rel, 100), [trec[q]["recall_100"] for q in qids])
    np.testing.assert_allclose(mrr_at_k(hit_gains, 10), [trec_rr[q]["recip_rank"] for q in qids])


def write_beir(directory, corpus_ids, query_ids, qrels):
    directory.mkdir(parents=True)
    (directory / "qrels").mkdir()
    (directory / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": d, "title": "t", "text": f"doc {d}"}) + "\n" for d in corpus_ids))
    (directory / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": q, "text": f"query {q}"}) + "\n" for q in query_ids))
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{g}" for q, docs in qrels.items() for d, g in docs.items()]
    (directory / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")


def test_score_beir_matches_pytrec_eval_on_its_own_run(tmp_path):
    rng = np.random.default_rng(3)
    corpus_ids = [f"doc{j}" for j in range(150)]
    qrels = {f"q{i}": {f"doc{j}": int(rng.integers(1, 3)) for j in rng.choice(150, 4, replace=False)} for i in range(12)}
    qrels["q0"]["doc0"] = 0  # judged non-relevant
    write_beir(tmp_path / "set", corpus_ids, [*qrels, "unjudged"], qrels)
    data = load_beir(tmp_path / "set")
    assert data.query_ids == sorted(qrels) and len(data.corpus_ids) == 150
    query_emb = rng.standard_normal((12, 8)).astype(np.float32)
    corpus_emb = rng.standard_normal((150, 8)).astype(np.float32)
    got = score_beir(data, query_emb, corpus_emb)
    scores = query_emb @ corpus_emb.T
    run = {q: {d: float(scores[i, j]) for j, d in enumerate(corpus_ids)} for i, q in enumerate(data.query_ids)}
    trec = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    top10 = {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:10]) for q, docs in run.items()}
    trec_rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    assert got["ndcg@10"] == pytest.approx(np.mean([t["ndcg_cut_10"] for t in trec.values()]), abs=1e-6)
    assert got["recall@100"] == pytest.approx(np.mean([t["recall_100"] for t in trec.values()]), abs=1e-6)
    assert got["mrr@10"] == pytest.approx(np.mean([t["recip_rank"] for t in trec_rr.values()]), abs=1e-6)


def test_score_beir_of_a_collapsed_encoder_is_near_chance(tmp_path):
    """Every document ties: the top 100 are the 100 highest keys, not the first 100 rows
    (corpus order often follows the qrels, e.g. ids assigned in judging order)."""
    corpus_ids = [f"doc{j}" for j in range(1000)]
    qrels = {f"q{i}": {f"doc{i}": 1} for i in range(50)}  # relevant = the first rows
    write_beir(tmp_path / "set", corpus_ids, list(qrels), qrels)
    data = load_beir(tmp_path / "set")
    got = score_beir(data, np.ones((50, 4), np.float32), np.ones((1000, 4), np.float32))
    assert got["recall@100"] < 0.25 and got["ndcg@10"] < 0.05  # chance: 0.1 and ~0.01


# ----------------------------------------------------------------------------- Tatoeba
def test_bitext_accuracy_both_directions():
    foreign = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    # eng line 2 is closer to foreign line 1 than eng line 1 is; eng line 0 is right
    english = np.array([[1, 0, 0], [0, 0.6, 0.8], [0, 0.8, 0.6]], np.float32)
    to_english, to_foreign = bitext_accuracy(foreign, english)
    assert to_english == pytest.approx(1 / 3)  # f0->e0 ok, f1->e2, f2->e1
    assert to_foreign == pytest.approx(1 / 3)  # e0->f0 ok, e1->f2, e2->f1
