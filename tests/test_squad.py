"""``hybridray data from-squad``: TyDi QA GoldP train files -> one shard dataset that the shard
reader accepts as it is (for ``data.extra_mono``); the documented config; unused extra
languages are reported, not silently ignored."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from conftest import REPO, SHARED_DATA
from hybridray.cli import main
from hybridray.config import ExtraMonoConfig, load_config
from hybridray.data import reader
from hybridray.data.pipeline import check_lengths, unused_extra_languages
from hybridray.data.squad import squad_to_shards
from hybridray.errors import UserError

TYDI_TRAIN = SHARED_DATA / "tydiqa-goldp" / "train"
TYDI_DEV = SHARED_DATA / "tydiqa-goldp" / "dev"


def expected_rows() -> dict[str, int]:
    """By the rule, from the source files: per language, the first answerable question of each
    passage of at most 4,000 characters that is not also a dev passage."""
    out = {}
    for lang in ("en", "ko", "sw"):
        dev = {p["context"].strip() for a in json.loads((TYDI_DEV / f"{lang}.json").read_text())["data"]
               for p in a["paragraphs"]}
        kept = set()
        for article in json.loads((TYDI_TRAIN / f"{lang}.json").read_text())["data"]:
            for paragraph in article["paragraphs"]:
                context = paragraph["context"].strip()
                if any(q["answers"] for q in paragraph["qas"]) and len(context) <= 4000 and context not in dev:
                    kept.add(context)
        out[lang] = len(kept)
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("tydi") / "tydi-train"
    assert main(["data", "from-squad", "--source", str(TYDI_TRAIN), "--out", str(out),
                 "--exclude-passages-of", str(TYDI_DEV)]) == 0
    return out


def test_tydi_train_converts_one_question_per_passage_and_no_dev_passage(converted):
    rows = expected_rows()
    summary = json.loads((converted / "_convert.json").read_text())
    assert summary["source_questions"] == {"en": 3696, "ko": 1625, "sw": 2755}  # ../shared/data/README.md
    assert summary["rows"] == rows
    rejects = [json.loads(x) for x in (converted / "_rejects.jsonl").read_text().splitlines()]
    reasons = {kind: sum(kind in r["reason"] for r in rejects)
               for kind in ("characters (max 4000)", "passage already used by", "an evaluation split")}
    assert len(rejects) == 3696 + 1625 + 2755 - sum(rows.values()) == sum(reasons.values())
    assert reasons["passage already used by"] > 1000 and reasons["an evaluation split"] > 50  # sw: 63 dev passages
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["rows_per_language"] == rows and manifest["source"] == "tydiqa-goldp/train"
    shard_rows = [r for _, r in reader.iter_file_rows(reader.list_shard_files(str(converted))[0])]
    for lang in rows:
        passages = [r["passage"] for r in shard_rows if r["lang"] == lang]
        assert len(passages) == len(set(passages))  # no passage twice: no unmasked false negative


def test_the_shard_reader_accepts_the_conversion(converted):
    files = reader.list_shard_files(str(converted))
    assert [f.rsplit("/", 1)[-1] for f in files] == ["part-00000.parquet"]  # _rejects.jsonl is not a shard
    index = reader.merge_index(str(converted), files, [reader.index_file(files[0], 0, max_text_chars=4000)],
                               strict=True)
    rows = expected_rows()
    assert index.rows_per_language == rows and not index.rejects
    assert len(index.groups) == sum(rows.values()) and all(len(g.langs) == 1 for g in index.groups)
    source = json.loads((TYDI_TRAIN / "sw.json").read_text(encoding="utf-8"))
    qa = source["data"][0]["paragraphs"][0]
    rows = {r["group_id"]: r for _, r in reader.iter_file_rows(files[0])}
    row = rows[qa["qas"][0]["id"]]
    assert (row["lang"], row["query"], row["passage"]) == ("sw", qa["qas"][0]["question"].strip(), qa["context"].strip())


def test_squad_rejects_and_errors(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    paragraph = {"context": "Nairobi ni mji mkuu.", "qas": [
        {"id": "a", "question": "Mji mkuu?", "answers": [{"text": "Nairobi", "answer_start": 0}]},
        {"id": "a", "question": "Tena?", "answers": [{"text": "Nairobi", "answer_start": 0}]},
        {"id": "b", "question": "Hakuna?", "answers": [], "is_impossible": True}]}
    (source / "sw.json").write_text(json.dumps({"data": [{"title": "t", "paragraphs": [paragraph]}]}))
    summary = squad_to_shards(source, tmp_path / "out")
    assert summary["rows"] == {"sw": 1} and summary["rejected"] == {"sw": 2}
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "out" / "_rejects.jsonl").read_text().splitlines()]
    assert reasons == ["data[0].paragraphs[0].qas[1]: duplicate question id", "data[0].paragraphs[0].qas[2]: no answer"]
    with pytest.raises(UserError, match="already exists"):
        squad_to_shards(source, tmp_path / "out")
    (source / "sw.json").write_text(json.dumps({"data": [{"paragraphs": [{"qas": []}]}]}))
    with pytest.raises(UserError, match=r"sw.json: data\[0\].paragraphs\[0\]: missing or empty 'context'"):
        squad_to_shards(source, tmp_path / "out2")


def test_documented_config_and_unused_extra_languages():
    config = load_config(REPO / "configs" / "tydi-extra-mono.yaml")
    (extra,) = config.data.extra_mono
    assert extra.path == "data/tydi-train" and extra.new_languages and config.train.final_eval_suite
    main_rows = {lang: 500 for lang in ("ar", "de", "en", "es", "hi", "vi", "zh")}  # MLQA-R
    tydi = SimpleNamespace(rows_per_language=expected_rows())
    assert unused_extra_languages([extra], [tydi], main_rows, 32) == []
    old_way = ExtraMonoConfig(path="data/tydi-train", weight=0.5)
    (note,) = unused_extra_languages([old_way], [tydi], main_rows, 32)
    assert note.startswith("data.extra_mono[0] (data/tydi-train): ko, sw never used") and "new_languages" in note
    with pytest.raises(UserError, match=r"model.max_passage_length \(192\) is more than builtin:tiny takes \(128 tokens\)"):
        check_lengths(config.model.model_copy(update={"name_or_path": "builtin:tiny"}))
    korean_only = SimpleNamespace(rows_per_language={"ko": 1621})
    with pytest.raises(UserError, match=r"data.extra_mono\[0\].*no language a mono step can use"):
        unused_extra_languages([old_way], [korean_only], main_rows, 32)
