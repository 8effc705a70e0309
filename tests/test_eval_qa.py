"""TyDi QA GoldP, AfriQA and SciFact loaders on the real files (counts as in
../shared/data/README.md), answer normalisation and answer recall against a brute-force
reference, resource groups."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHARED_DATA
from hybridray.errors import UserError
from hybridray.evaluate.afriqa import load_afriqa
from hybridray.evaluate.answers import answer_hits, answer_recall, normalize_answer
from hybridray.evaluate.languages import resource_group
from hybridray.evaluate.qa import Corpus, QuerySet, score_query_set
from hybridray.evaluate.tydi import load_tydi

TYDI = SHARED_DATA / "tydiqa-goldp"
AFRIQA = SHARED_DATA / "afriqa"
SCIFACT = SHARED_DATA / "scifact-beir"
#: README: dev questions per language; train: en 3,696, ko 1,625, sw 2,755.
TYDI_DEV = {"ar": 921, "bn": 113, "en": 440, "fi": 782, "id": 565, "ko": 276, "ru": 812, "sw": 499, "te": 669}
TYDI_TRAIN = {"en": 3696, "ko": 1625, "sw": 2755}


def squad_contexts(path) -> list[str]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return [p["context"].strip() for a in data["data"] for p in a["paragraphs"]]


# ----------------------------------------------------------------------------- TyDi
@pytest.fixture(scope="module")
def tydi():
    return load_tydi(TYDI)


def test_tydi_counts_match_the_readme(tydi):
    assert tydi.langs == sorted(TYDI_DEV) and tydi.modes == ["mono"]
    assert tydi.info["n_questions"] == TYDI_DEV
    assert {q.lang: len(q.query_ids) for q in tydi.query_sets} == TYDI_DEV  # every dev question answerable
    assert sum(tydi.info["n_skipped"].values()) == 0
    for lang, n_train in TYDI_TRAIN.items():  # the train files are there, with the README's sizes
        data = json.loads((TYDI / "train" / f"{lang}.json").read_text(encoding="utf-8"))
        assert sum(len(p["qas"]) for a in data["data"] for p in a["paragraphs"]) == n_train


def test_tydi_corpus_is_unique_passages_plus_train_distractors(tydi):
    for lang in TYDI_DEV:
        dev = set(squad_contexts(TYDI / "dev" / f"{lang}.json"))
        train_file = TYDI / "train" / f"{lang}.json"
        train = set(squad_contexts(train_file)) if train_file.exists() else set()
        corpus = tydi.corpora[lang]
        assert set(corpus.texts) == dev | train and len(corpus.texts) == len(dev | train)
        assert tydi.info["n_distractors"][lang] == len(train - dev)
        assert len(set(corpus.ids)) == len(corpus.ids)
    assert tydi.info["n_distractors"]["sw"] == 1624 and len(tydi.corpora["en"].ids) == 3858
    # each question's one relevant passage is its own context
    raw = json.loads((TYDI / "dev" / "sw.json").read_text(encoding="utf-8"))
    context_of = {qa["id"]: p["context"].strip() for a in raw["data"] for p in a["paragraphs"] for qa in p["qas"]}
    sw = next(q for q in tydi.query_sets if q.lang == "sw")
    text_of = dict(zip(tydi.corpora["sw"].ids, tydi.corpora["sw"].texts))
    for qid in sw.query_ids:
        (doc,) = sw.qrels[qid]
        assert text_of[doc] == context_of[qid]


def test_tydi_without_distractors_and_errors(tmp_path):
    task = load_tydi(TYDI, ["sw"], distractors=False)
    assert len(task.corpora["sw"].ids) == len(set(squad_contexts(TYDI / "dev" / "sw.json"))) == 357
    with pytest.raises(UserError, match=r"no file for language\(s\) \['xx'\]"):
        load_tydi(TYDI, ["xx"])
    with pytest.raises(UserError, match="no dev/ directory"):
        load_tydi(tmp_path)
    (tmp_path / "dev").mkdir()
    bad = {"data": [{"title": "t", "paragraphs": [{"context": "Some text.", "qas": [
        {"id": "q1", "question": "Which?", "answers": [{"text": "Some", "answer_start": 0}]},
        {"id": "q2", "question": "  ", "answers": []}]}]}]}
    (tmp_path / "dev" / "sw.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match=r"sw.json: data\[0\].paragraphs\[0\].qas\[1\]: missing or empty 'question'"):
        load_tydi(tmp_path)
    bad["data"][0]["paragraphs"][0]["qas"][1] = {"id": "q1", "question": "Again?", "answers": [{"text": "text"}]}
    (tmp_path / "dev" / "sw.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="duplicate question id 'q1'"):
        load_tydi(tmp_path)
    bad["data"][0]["paragraphs"][0]["qas"][1] = {"id": "q2", "question": "None?", "answers": [], "is_impossible": True}
    (tmp_path / "dev" / "sw.json").write_text(json.dumps(bad))
    task = load_tydi(tmp_path)
    assert task.info["n_skipped"] == {"sw": 1} and len(task.query_sets[0].query_ids) == 1


# ----------------------------------------------------------------------------- AfriQA
AFRIQA_TEST = {"bem": 309, "fon": 386, "hau": 300, "ibo": 409, "kin": 347, "swa": 295, "twi": 486, "yor": 254, "zul": 325}


@pytest.fixture(scope="module")
def afriqa():
    return load_afriqa(AFRIQA)


def test_afriqa_counts_match_the_readme(afriqa):
    for path in AFRIQA.glob("*.jsonl"):  # README: 225-486 questions per file
        assert 225 <= len(path.read_text(encoding="utf-8").strip().split("\n")) <= 486, path.name
    assert afriqa.info["n_rows"] == AFRIQA_TEST
    assert afriqa.info["pivot"] == {lang: "fr" if lang == "fon" else "en" for lang in AFRIQA_TEST}
    assert afriqa.info["n_skipped"] == {"bem": 1, "fon": 0, "hau": 0, "ibo": 0, "kin": 2, "swa": 0, "twi": 0,
                                        "yor": 1, "zul": 0}  # rows without a context
    assert afriqa.modes == ["cross", "translated"]
    sizes = {(q.lang, q.mode): len(q.query_ids) for q in afriqa.query_sets}
    for lang, n in AFRIQA_TEST.items():
        assert sizes[(lang, "cross")] == sizes[(lang, "translated")] == n - afriqa.info["n_skipped"][lang]
    dev = load_afriqa(AFRIQA, split="dev")
    assert "swa" not in dev.langs and "yor" not in dev.langs and len(dev.langs) == 7  # README: no dev for swa, yor
    with pytest.raises(UserError, match=r"no dev file for language\(s\) \['swa'\]"):
        load_afriqa(AFRIQA, ["swa"], split="dev")


def test_afriqa_pivot_corpus_and_relevance(afriqa):
    english = set()
    for path in AFRIQA.glob("*.en.test.jsonl"):
        english |= {(json.loads(x)["context"] or "").strip() for x in path.read_text(encoding="utf-8").split("\n") if x}
    english.discard("")
    assert set(afriqa.corpora) == {"en", "fr"} and set(afriqa.corpora["en"].texts) == english
    assert len(afriqa.corpora["en"].ids) == len(english) == 2557
    rows = [json.loads(x) for x in (AFRIQA / "hau.en.test.jsonl").read_text(encoding="utf-8").split("\n") if x]
    cross, translated = (q for q in afriqa.query_sets if q.lang == "hau")
    assert (cross.mode, translated.mode) == ("cross", "translated") and cross.qrels == translated.qrels
    text_of = dict(zip(afriqa.corpora["en"].ids, afriqa.corpora["en"].texts))
    for i, row in enumerate(r for r in rows if r["context"]):
        assert cross.texts[i] == row["question_lang"].strip()
        assert translated.texts[i] == row["question_translated"].strip()
        (doc,) = cross.qrels[cross.query_ids[i]]
        assert text_of[doc] == row["context"].strip()
    # the pool does not depend on which languages are evaluated; corpus="file" is the file's own
    assert load_afriqa(AFRIQA, ["hau"]).corpora["en"].ids == afriqa.corpora["en"].ids
    own = load_afriqa(AFRIQA, ["hau"], corpus="file")
    assert list(own.corpora) == ["hau.en"] and len(own.corpora["hau.en"].ids) == 296


def test_afriqa_malformed_line_names_file_and_line(tmp_path):
    good = {"question_lang": "Ina?", "question_translated": "Where?", "context": "Here.", "id": "1",
            "answer_pivot": {"text": ["Here"], "answer_start": [0]}}
    (tmp_path / "hau.en.test.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(UserError, match=r"hau.en.test.jsonl:2: not JSON"):
        load_afriqa(tmp_path)
    (tmp_path / "hau.en.test.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "question_lang": ""}) + "\n")
    with pytest.raises(UserError, match=r"hau.en.test.jsonl:2: missing or empty 'question_lang'"):
        load_afriqa(tmp_path)
    (tmp_path / "hau.en.test.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(UserError, match=r"hau.en.test.jsonl:2: duplicate id '1'"):
        load_afriqa(tmp_path)
    with pytest.raises(UserError, match="corpus 'all'"):
        load_afriqa(tmp_path, corpus="all")


# ----------------------------------------------------------------------------- SciFact
def test_scifact_loads_as_beir_with_the_readme_counts():
    from hybridray.evaluate.beir import find_beir_datasets, load_beir

    (directory,) = find_beir_datasets(SCIFACT)
    data = load_beir(directory, "test")
    assert len(data.corpus_ids) == 5183 and len(data.query_ids) == 300
    assert sum(len(docs) for docs in data.qrels.values()) == 339
    assert all(doc in set(data.corpus_ids) for docs in data.qrels.values() for doc in docs)


# ----------------------------------------------------------------------------- answers
@pytest.mark.parametrize("text, expected", [
    ("The U.S.A.!", "usa"),
    ("  an   apple, a pear  ", "apple pear"),
    ("1,000 km", "1000 km"),
    ("«Dar es Salaam»", "dar es salaam"),
    ("مصر، القاهرة", "مصر القاهرة"),                 # Arabic comma is punctuation
    ("ঢাকা।", "ঢাকা"),                               # Bengali danda
    ("서울에서", "서울에서"),
    ("Theater", "theater"),                          # 'the' only as a whole word
])
def test_normalize_answer_hand_cases(text, expected):
    assert normalize_answer(text) == expected


def test_answer_recall_hand_made_case():
    """3 queries, 4 passages, scores chosen by hand (no ties)."""
    corpus = Corpus("c", ["d0", "d1", "d2", "d3"], ["Paris is in France.", "The capital: Nairobi.",
                                                   "Seoul은 서울에서", "1999 was a year"])
    queries = QuerySet("xx", "mono", "c", ["q0", "q1", "q2"], ["a", "b", "c"],
                       {"q0": {"d0": 1}, "q1": {"d1": 1}, "q2": {"d3": 1}},
                       [["paris"], ["The Nairobi"], ["서울"]])
    corpus_emb = np.eye(4, dtype=np.float32)
    query_emb = np.array([[0.9, 0.1, 0.2, 0.3],    # q0: d0 first -> answered at 1
                          [0.1, 0.2, 0.9, 0.5],    # q1: d2, d3, d1 -> 'nairobi' at rank 3
                          [0.1, 0.2, 0.3, 0.9]],   # q2: d3, d2 -> '서울' in d2 at rank 2
                         dtype=np.float32)
    metrics = score_query_set(queries, corpus, query_emb, corpus_emb)
    assert metrics["answer@1"] == pytest.approx(1 / 3)
    assert metrics["answer@5"] == metrics["answer@20"] == 1.0
    assert metrics["mrr@10"] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert metrics["answer_in_gold"] == pytest.approx(2 / 3)  # q2's gold (d3) lacks '서울'


def brute_force_answer_recall(query_emb, corpus_emb, passages, answers, k):
    """Sort every query's full score row and read the passages one by one."""
    answered = 0
    for q, gold in zip(query_emb, answers):
        order = np.argsort(-(corpus_emb @ q), kind="stable")[:k]
        answered += any(normalize_answer(g) and normalize_answer(g) in normalize_answer(passages[j])
                        for j in order for g in gold)
    return answered / len(answers)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_answer_recall_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    words = ["Nairobi", "Mombasa", "Kisumu", "1963", "Uhuru", "the lake", "mto", "Arusha"]
    passages = [" ".join(rng.choice(words, size=4)) + "." for _ in range(40)]
    answers = [[str(rng.choice(words))] + ([str(rng.choice(words))] if rng.random() < 0.3 else []) for _ in range(25)]
    corpus_emb = rng.normal(size=(40, 16)).astype(np.float32)
    query_emb = rng.normal(size=(25, 16)).astype(np.float32)
    corpus = Corpus("c", [f"d{i}" for i in range(40)], passages)
    queries = QuerySet("xx", "mono", "c", [f"q{i}" for i in range(25)], ["?"] * 25,
                       {f"q{i}": {f"d{i}": 1} for i in range(25)}, answers)
    metrics = score_query_set(queries, corpus, query_emb, corpus_emb)
    for k in (1, 5, 20):
        assert metrics[f"answer@{k}"] == pytest.approx(brute_force_answer_recall(query_emb, corpus_emb, passages, answers, k))
    # fewer passages than k: every hit counts, and -1 (no hit) never matches
    hits = np.array([[1, 0, -1]])
    found = answer_hits(hits, ["x", "nairobi"], [["nairobi"]])
    assert found.tolist() == [[True, False, False]] and answer_recall(found, (1, 5))["answer@5"] == 1.0


def test_qa_scores_match_pytrec_eval_on_real_tydi_qrels():
    """The BEIR metrics of a TyDi query set (real qrels, duplicate-free corpus, random
    embeddings) equal trec_eval's on the same ranked run."""
    import pytrec_eval

    from hybridray.evaluate.search import search

    task = load_tydi(TYDI, ["sw"])
    queries, corpus = task.query_sets[0], task.corpora["sw"]
    rng = np.random.default_rng(0)
    corpus_emb = rng.normal(size=(len(corpus.ids), 32)).astype(np.float32)
    gold_rows = [corpus.ids.index(next(iter(queries.qrels[q]))) for q in queries.query_ids]
    query_emb = (corpus_emb[gold_rows] + rng.normal(scale=4.0, size=(len(gold_rows), 32))).astype(np.float32)
    corpus_emb /= np.linalg.norm(corpus_emb, axis=1, keepdims=True)
    query_emb /= np.linalg.norm(query_emb, axis=1, keepdims=True)
    metrics = score_query_set(queries, corpus, query_emb, corpus_emb)
    scores, hits = search(query_emb, corpus_emb, 100)
    run = {q: {corpus.ids[j]: float(s) for s, j in zip(scores[i], hits[i])} for i, q in enumerate(queries.query_ids)}
    top10 = {q: dict(sorted(docs.items(), key=lambda kv: -kv[1])[:10]) for q, docs in run.items()}
    trec = pytrec_eval.RelevanceEvaluator(queries.qrels, {"ndcg_cut.10", "recall.100"}).evaluate(run)
    trec_rr = pytrec_eval.RelevanceEvaluator(queries.qrels, {"recip_rank"}).evaluate(top10)
    assert 0.05 < metrics["ndcg@10"] < 0.95  # neither trivial nor hopeless
    assert metrics["ndcg@10"] == pytest.approx(np.mean([v["ndcg_cut_10"] for v in trec.values()]), abs=1e-9)
    assert metrics["recall@100"] == pytest.approx(np.mean([v["recall_100"] for v in trec.values()]), abs=1e-9)
    assert metrics["mrr@10"] == pytest.approx(np.mean([v["recip_rank"] for v in trec_rr.values()]), abs=1e-9)


def test_resource_groups_follow_joshi_classes():
    assert [resource_group(x) for x in ("sw", "te", "bn", "id", "ko", "en", "hau", "fon", "swh", "ara")] == [
        "low", "low", "mid", "mid", "high", "high", "low", "low", "low", "high"]
    assert resource_group("qqq") == "unlisted" and resource_group("qqq", {"qqq": "mid"}) == "mid"
