"""``hybridray data prepare`` on the real MLQA-R: counts, article-disjoint split, rejects."""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import pyarrow.parquet as pq
import pytest

from hybridray.data.prepare import prepare_lareqa
from hybridray.data.shards import read_manifest
from hybridray.errors import UserError

from conftest import MLQA_R

LANGS = ["ar", "de", "en", "es", "hi", "vi", "zh"]


def source_questions(path):
    """(article title, question id) of every question of a SQuAD file, read independently."""
    data = json.loads(path.read_text())
    return [(a["title"], qa["id"]) for a in data["data"] for p in a["paragraphs"] for qa in p["qas"]]


def shard_rows(shard_dir):
    manifest = read_manifest(shard_dir)
    return [r for f in manifest["files"] for r in pq.read_table(shard_dir / f["path"]).to_pylist()]


def test_row_counts_equal_source_question_counts(mlqa_prepared):
    train, heldout = shard_rows(mlqa_prepared / "train"), shard_rows(mlqa_prepared / "heldout")
    counts = Counter(r["lang"] for r in train + heldout)
    expected = {lang: len(source_questions(MLQA_R / f"{lang}.json")) for lang in LANGS}
    assert dict(counts) == expected
    assert expected["en"] == 1148 and expected["ar"] == 517
    for split, rows in (("train", train), ("heldout", heldout)):
        manifest = read_manifest(mlqa_prepared / split)
        assert manifest["schema_version"] == 1
        assert manifest["languages"] == LANGS
        assert manifest["rows_per_language"] == dict(sorted(Counter(r["lang"] for r in rows).items()))
    assert (mlqa_prepared / "rejects.jsonl").read_text() == ""


def test_split_is_disjoint_by_article_in_every_language(mlqa_prepared):
    heldout_ids = {r["group_id"] for r in shard_rows(mlqa_prepared / "heldout")}
    train_ids = {r["group_id"] for r in shard_rows(mlqa_prepared / "train")}
    assert heldout_ids and train_ids and not heldout_ids & train_ids
    for lang in LANGS:
        sides = defaultdict(set)
        for title, qid in source_questions(MLQA_R / f"{lang}.json"):
            sides[title].add(qid in heldout_ids)
        assert all(len(s) == 1 for s in sides.values()), f"{lang}: an article is on both sides"
    assert 0.25 < len(heldout_ids) / (len(heldout_ids) + len(train_ids)) < 0.35


def test_rows_carry_the_gold_sentence_and_keep_groups_adjacent(mlqa_prepared):
    rows = shard_rows(mlqa_prepared / "train")
    for row in rows[:200]:
        assert row["passage"] in row["context"]
        assert row["source"] == "mlqa-r"
    order = [r["group_id"] for r in rows]
    assert order == sorted(order)


def test_heldout_lareqa_dir_holds_exactly_the_heldout_questions(mlqa_prepared):
    heldout = Counter(r["lang"] for r in shard_rows(mlqa_prepared / "heldout"))
    for lang in LANGS:
        assert len(source_questions(mlqa_prepared / "heldout-lareqa" / f"{lang}.json")) == heldout[lang]


def test_split_is_deterministic(tmp_path):
    def heldout_ids(name, seed):
        prepare_lareqa(MLQA_R, tmp_path / name, seed=seed, langs=["en", "de"])
        return [r["group_id"] for r in shard_rows(tmp_path / name / "heldout")]

    first = heldout_ids("a", 0)
    assert heldout_ids("b", 0) == first
    assert heldout_ids("c", 1) != first


def write_squad(path, article):
    path.write_text(json.dumps({"version": "1.1", "data": [article]}))


def test_malformed_questions_are_reported_with_file_and_reason(tmp_path):
    article = json.loads((MLQA_R / "de.json").read_text())["data"][0]
    paragraph = article["paragraphs"][0]
    good = paragraph["qas"][0]
    paragraph["qas"] = [
        good,
        {**good, "id": "no-answers", "answers": []},
        {**good, "id": "outside", "answers": [{"text": "x", "answer_start": 10**6}]},
        {**good, "id": "empty-q", "question": "  "},
        dict(good),  # duplicate id
    ]
    src = tmp_path / "src"
    src.mkdir()
    write_squad(src / "de.json", article)
    summary = prepare_lareqa(src, tmp_path / "out", heldout_fraction=0.0)
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    reasons = " | ".join(r["reason"] for r in rejects)
    assert len(rejects) == 4 and summary["rejected"] == {"de": 4}
    for expected in ("no answers", "in no sentence break", "empty question", "duplicate question id"):
        assert expected in reasons
    assert all(r["file"].endswith("de.json") and r["row"] >= 2 for r in rejects)
    total = sum(summary["rows"]["train"].values()) + sum(summary["rows"]["heldout"].values())
    assert total == sum(len(p["qas"]) for p in article["paragraphs"]) - 4


def test_failure_leaves_existing_output_untouched(tmp_path):
    out = tmp_path / "out"
    prepare_lareqa(MLQA_R, out, langs=["es"])
    before = (out / "train" / "manifest.json").read_text()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "es.json").write_text("{not json")
    with pytest.raises(UserError, match="es.json"):
        prepare_lareqa(bad, out, overwrite=True)
    assert (out / "train" / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
