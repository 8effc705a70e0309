"""In-context hard negatives written by ``hybridray data prepare``: exactly the other sentences
of the answer's paragraph, in the row's language, with the groups they answer; read by the
training pipeline with ``loss.hard_negatives=2``."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from hybridray import cli
from hybridray.data.lareqa import in_context_negatives, read_lareqa
from hybridray.data.prepare import prepare_lareqa
from hybridray.data.sampler import NO_GROUP, stable_hash64
from hybridray.data.shards import read_manifest


def shard_rows(shard_dir):
    return [r for f in read_manifest(shard_dir)["files"] for r in pq.read_table(shard_dir / f["path"]).to_pylist()]


def paragraph(sentences: list[str], answers: dict[str, int], lang: str) -> dict:
    """A LAReQA paragraph: ``answers`` maps a question id to the index of its answer sentence."""
    context, breaks = "", []
    for s in sentences:
        breaks.append([len(context), len(context) + len(s)])
        context += s + " "
    qas = [{"id": qid, "question": f"{lang} question {qid}?",
            "answers": [{"text": sentences[i][:4], "answer_start": breaks[i][0]}]} for qid, i in answers.items()]
    return {"context": context, "sentences": sentences, "sentence_breaks": breaks, "qas": qas}


def write_fixture(root, langs=("en", "de")):
    """Article 0: a 4-sentence paragraph (q1 -> S0, q2 -> S1, nothing -> S2, q5 and q6 -> S3)
    and a 1-sentence paragraph (q3); article 1: one 1-sentence paragraph (q4)."""
    root.mkdir()
    for lang in langs:
        s = [f"{lang} sentence {i}." for i in range(4)]
        data = {"version": "1.1", "data": [
            {"title": f"{lang} A", "paragraphs": [
                paragraph(s, {"q1": 0, "q2": 1, "q5": 3, "q6": 3}, lang),
                paragraph([f"{lang} lonely T0."], {"q3": 0}, lang),
            ]},
            {"title": f"{lang} B", "paragraphs": [paragraph([f"{lang} alone U0."], {"q4": 0}, lang)]},
        ]}
        (root / f"{lang}.json").write_text(json.dumps(data))
    return root


def expected(lang: str) -> dict[str, list[tuple[str, object]]]:
    """(negative, group it answers) per question; S3 answers two questions, so it is never one."""
    s = [f"{lang} sentence {i}." for i in range(4)]
    article0 = [(s[0], "q1"), (s[1], "q2"), (s[2], None)]
    return {
        "q1": [(s[1], "q2"), (s[2], None)],                     # the rest of its paragraph
        "q2": [(s[0], "q1"), (s[2], None)],
        "q5": article0, "q6": article0,
        "q3": article0,                                         # its paragraph has nothing else: the article
        "q4": article0 + [(f"{lang} lonely T0.", "q3")],       # its article has nothing else: the next one
    }


def test_negatives_are_the_other_sentences_of_the_paragraph_in_the_same_language(tmp_path):
    src = write_fixture(tmp_path / "src")
    assert cli.main(["data", "prepare", "--source", str(src), "--out", str(tmp_path / "out"),
                     "--heldout-fraction", "0"]) == 0
    rows = shard_rows(tmp_path / "out" / "train")
    assert len(rows) == 12
    for row in rows:
        want = expected(row["lang"])[row["group_id"]]
        assert list(zip(row["hard_negatives"], row["hard_negative_group_ids"])) == want, row["group_id"]
        assert row["passage"] not in row["hard_negatives"]
        assert all(n.startswith(row["lang"]) for n in row["hard_negatives"])
    summary = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert summary["hard_negatives"]["train"] == {"paragraph": 8, "article": 2, "next_article": 2}

    # a user who does not want them: the columns stay empty, nothing else changes
    assert cli.main(["data", "prepare", "--source", str(src), "--out", str(tmp_path / "plain"),
                     "--heldout-fraction", "0", "--no-hard-negatives"]) == 0
    plain = shard_rows(tmp_path / "plain" / "train")
    assert all(r["hard_negatives"] is None and r["hard_negative_group_ids"] is None for r in plain)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("hard_")} for r in rs]  # noqa: E731
    assert strip(plain) == strip(rows)


def test_a_split_never_borrows_from_the_other(tmp_path):
    """q4's article alone: nothing in its split to take (an empty list, said in the counts)."""
    source = read_lareqa(write_fixture(tmp_path / "src", langs=("en",)))
    alone = [q for q in source.questions if q.qid == "q4"]
    negatives = in_context_negatives(alone, source.raw, answered_by=source.questions)
    assert negatives.texts[("q4", "en")] == [] and negatives.origin == {"none": 1}


def test_mlqa_negatives_never_hold_the_positive_and_name_the_right_group(mlqa_prepared):
    rows = shard_rows(mlqa_prepared / "train") + shard_rows(mlqa_prepared / "heldout")
    passage_of = {(r["group_id"], r["lang"]): r["passage"] for r in rows}
    in_paragraph = 0
    for row in rows:
        negatives, groups = row["hard_negatives"], row["hard_negative_group_ids"]
        assert negatives and len(groups) == len(negatives) and len(set(negatives)) == len(negatives)
        assert row["passage"] not in negatives
        for text, group in zip(negatives, groups):
            assert group != row["group_id"]
            if group is not None:  # it is that question's answer sentence, in this language
                assert passage_of[(group, row["lang"])] == text
        in_paragraph += all(n in row["context"] for n in negatives)
    assert in_paragraph / len(rows) > 0.9  # the rest come from the article or the next one
    summary = json.loads((mlqa_prepared / "prepare.json").read_text())["hard_negatives"]
    assert summary["train"]["paragraph"] > 0.9 * sum(summary["train"].values())


def test_a_hard_negatives_run_reads_them(ray_session, mlqa_prepared, tmp_path):
    """``loss.hard_negatives=2`` on the prepared MLQA-R shards: every pair's two negatives are
    two of its passage row's (passage language) negatives, with their groups."""
    from hybridray.config import build_config
    from hybridray.data.pipeline import build_train_dataset, iter_worker_batches
    from hybridray.data.tokenize import encode, tokenizer_spec

    tree = {"seed": 0, "model": {"name_or_path": "builtin:tiny", "max_query_length": 16, "max_passage_length": 24},
            "data": {"train": str(mlqa_prepared / "train")},
            "sampler": {"alpha": 0.5, "batch_size": 8}, "train": {"max_steps": 6},
            "scaling": {"num_workers": 2}, "loss": {"hard_negatives": 2}}
    cfg = build_config(tree, [])
    ds, _ = build_train_dataset(cfg, rejects_path=None)
    rows = {(r["group_id"], r["lang"]): r for r in shard_rows(mlqa_prepared / "train")}
    name = {stable_hash64(gid): gid for gid, _ in rows}
    spec = tokenizer_spec("builtin:tiny")
    steps = list(iter_worker_batches(ds, rank=0, world_size=1))
    assert len(steps) == 6 and {s["batch_type"] for s in steps} == {"mono", "cross"}
    for s in steps:
        ids, mask = s["negative_input_ids"].numpy(), s["negative_attention_mask"].numpy()
        for i, (gid, lang) in enumerate(zip(s["group_ids"].tolist(), s["passage_langs"])):
            row = rows[(name[gid], lang)]
            want_ids, want_mask = encode(spec, row["hard_negatives"], "", 24)
            options = {tuple(x[m.astype(bool)]) for x, m in zip(want_ids, want_mask)}
            answers = {tuple(x[m.astype(bool)]): g for x, m, g in
                       zip(want_ids, want_mask, row["hard_negative_group_ids"])}
            for j in (2 * i, 2 * i + 1):
                got = tuple(ids[j][mask[j].astype(bool)])
                assert got in options
                group = answers[got]
                assert int(s["negative_group_ids"][j]) == (stable_hash64(group) if group else NO_GROUP)
    assert np.any([int(g) != NO_GROUP for s in steps for g in s["negative_group_ids"]])
