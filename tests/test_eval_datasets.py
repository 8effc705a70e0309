"""Loaders on the real data, encoding, and ``run_eval`` end to end with the tiny random
encoder (``builtin:tiny``) on small subsets written to tmp_path."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from conftest import MLQA_R, TATOEBA
from hybridray.errors import UserError
from hybridray.evaluate.lareqa import load_lareqa
from hybridray.evaluate.run import add_eval_arguments, run_eval
from hybridray.evaluate.tatoeba import HIGH_RESOURCE, load_tatoeba

MLQA_SIZES = {"ar": (517, 2545), "de": (512, 2362), "en": (1148, 6264), "es": (500, 1787),
              "hi": (507, 2426), "vi": (511, 2828), "zh": (504, 2322)}


@pytest.fixture(scope="module")
def mlqa():
    return load_lareqa(MLQA_R)


def test_mlqa_r_counts(mlqa):
    assert mlqa.langs == sorted(MLQA_SIZES)
    assert {lang: (len(mlqa.questions[lang]), len(mlqa.sentences[lang])) for lang in mlqa.langs} == MLQA_SIZES
    assert mlqa.pools[-1][1] == 20_534
    assert mlqa.n_rejected == 0


def test_mlqa_r_relevant_sets(mlqa):
    answers = {}
    for lang in mlqa.langs:
        raw = json.loads((MLQA_R / f"{lang}.json").read_text(encoding="utf-8"))
        answers[lang] = {qa["id"]: qa["answers"][0]["text"] for a in raw["data"] for p in a["paragraphs"] for qa in p["qas"]}
    inside = total = 0
    for x, lang in enumerate(mlqa.langs):
        relevant = mlqa.relevant(lang)
        start = mlqa.pools[x][0]
        assert (relevant[:, x] == start + mlqa.gold[lang]).all()  # its own gold, in its own pool
        assert ((relevant >= 0).sum(1) >= 2).all()  # MLQA: every question has 2-4 versions
        for qid, gold in zip(mlqa.question_ids[lang], mlqa.gold[lang]):
            total += 1
            inside += answers[lang][qid] in mlqa.sentences[lang][gold]
    assert inside / total > 0.99  # the rest are answers spanning a sentence break


def test_duplicate_sentences_stay_separate_candidates(mlqa):
    assert len(mlqa.sentences["en"]) == 6264
    assert mlqa.sentences["en"].count("Panic!") == 2


def test_load_lareqa_errors(tmp_path):
    with pytest.raises(UserError, match="not a directory"):
        load_lareqa(tmp_path / "missing")
    (tmp_path / "en.json").write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": "A b.", "sentences": ["A b."], "sentence_breaks": [[0, 4]], "qas": []}]}]}))
    with pytest.raises(UserError, match="no valid question"):
        load_lareqa(tmp_path)


def test_tatoeba_loader_on_real_files():
    pairs = load_tatoeba(TATOEBA, ["afr", "amh"])
    foreign, english = pairs["afr"]
    assert len(foreign) == len(english) == 1000
    assert foreign[0] == "Haar Engels is uitstekend." and english[0] == "Her English is excellent."
    assert len(pairs["amh"][0]) == len(pairs["amh"][1]) == 168
    every = load_tatoeba(TATOEBA)
    assert len(every) == 112 and HIGH_RESOURCE <= set(every)


# ----------------------------------------------------------------------------- encoding
@pytest.fixture(scope="module")
def tiny():
    from hybridray.models import load_encoder

    return load_encoder("builtin:tiny")


def test_encode_texts_order_norm_and_mode(tiny):
    from hybridray.evaluate.encode import encode_texts

    model, tokenizer = tiny
    model.train()
    texts = ["a", "a much longer sentence with many more words in it", "kurz", "这是一个测试"]
    batched = encode_texts(model, tokenizer, texts, batch_size=3, progress=False)
    one_by_one = np.concatenate([encode_texts(model, tokenizer, [t], progress=False) for t in texts])
    assert batched.dtype == np.float32 and batched.shape == (4, 64)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)  # input order kept, padding harmless
    assert model.training  # restored
    prefixed = encode_texts(model, tokenizer, texts[:1], prefix="query: ", progress=False)
    assert not np.allclose(prefixed, batched[:1])


# ----------------------------------------------------------------------------- run_eval
def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hybridray eval")
    add_eval_arguments(parser)
    return parser.parse_args(list(argv))


def test_data_argument_errors_name_the_option(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        parse("--model", "m", "--data", "squad:/x", "--out", "o")
    assert exc.value.code == 2 and "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--model", "m", "--data", "/no/kind", "--out", "o")
    with pytest.raises(UserError, match="not a directory"):
        run_eval(parse("--model", "builtin:tiny", "--data", f"lareqa:{tmp_path / 'nope'}", "--out", str(tmp_path)))


def small_lareqa(directory, n_articles=2):
    """The first English articles of MLQA-R and every article holding their translations."""
    directory.mkdir()
    english = json.loads((MLQA_R / "en.json").read_text(encoding="utf-8"))
    english["data"] = english["data"][:n_articles]
    qids = {qa["id"] for a in english["data"] for p in a["paragraphs"] for qa in p["qas"]}
    for path in sorted(MLQA_R.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8")) if path.stem != "en" else english
        data["data"] = [a for a in data["data"]
                        if any(qa["id"] in qids for p in a["paragraphs"] for qa in p["qas"])]
        if data["data"]:
            (directory / path.name).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return directory


def test_run_eval_lareqa_end_to_end(tmp_path, capsys):
    data = small_lareqa(tmp_path / "mlqa-small")
    out = tmp_path / "report"
    args = parse("--model", "builtin:tiny", "--data", f"lareqa:{data}", "--out", str(out),
                 "--max-length", "64", "--no-progress", "--with-context")
    assert run_eval(args) == 0
    report = json.loads((out / "report.json").read_text())
    langs = sorted(p.stem for p in data.glob("*.json"))
    assert report["model"] == "builtin:tiny" and report["data"]["langs"] == langs and len(langs) >= 3
    summary = report["summary"]
    for setting in ("mono", "cross", "multi"):
        assert 0.0 <= summary["map"][setting] <= 1.0 and 0.0 <= summary["recall"][setting] <= 1.0
    assert summary["rank_distance"] >= 0 and summary["n_candidates"] > summary["n_queries"] > 0
    assert set(report["pairs"]) == set(langs) and set(report["per_language"]) == set(langs)
    assert report["settings"]["with_context"] and report["timing"]["total_seconds"] > 0
    markdown = (out / "report.md").read_text()
    assert "Mul. mAP" in markdown and "rank dist." in markdown and markdown in capsys.readouterr().out
    for plot in ("pairs_map.png", "rank_distance.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tatoeba_and_beir_reports(tmp_path, tiny):
    from hybridray.evaluate.beir import evaluate_beir
    from hybridray.evaluate.report import write_report
    from hybridray.evaluate.tatoeba import evaluate_tatoeba

    model, tokenizer = tiny
    settings = dict(query_prefix="", pooling="mean", max_length=64, batch_size=16)
    tatoeba = tmp_path / "tatoeba"
    tatoeba.mkdir()
    for lang in ("deu", "amh"):  # one high-, one low-resource language, 30 pairs each
        for side in (lang, "eng"):
            lines = (TATOEBA / f"tatoeba.{lang}-eng.{side}").read_text(encoding="utf-8").split("\n")[:30]
            (tatoeba / f"tatoeba.{lang}-eng.{side}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = evaluate_tatoeba(model, tokenizer, tatoeba, **settings)
    assert report["per_language"]["deu"]["group"] == "high" and report["per_language"]["amh"]["group"] == "low"
    assert report["per_language"]["deu"]["n"] == 30 and report["summary"]["accuracy"]["all"]["n_languages"] == 2
    assert "xxx→eng" in write_report(report, tmp_path / "t")

    beir = tmp_path / "beir" / "toy"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
        for i, t in enumerate(["cats purr", "dogs bark", "fish swim", "birds sing"])))
    (beir / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(["cat", "dog"])))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\nq1\td1\t1\n")
    report = evaluate_beir(model, tokenizer, beir.parent, passage_prefix="", **settings)
    assert report["per_dataset"]["toy"]["recall@100"] == 1.0  # 4 documents: all retrieved
    assert set(report["summary"]) == {"ndcg@10", "recall@100", "mrr@10"}
    assert "ndcg@10" in write_report(report, tmp_path / "b")
