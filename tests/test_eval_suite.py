"""``hybridray eval --suite`` end to end with the tiny random encoder on small subsets of the
real data (written to tmp_path), single TyDi / AfriQA tasks, suite config errors, S3 (moto),
and the end-of-training hook ``train.final_eval_suite`` (without a Ray fit)."""
from __future__ import annotations

import json
import shutil

import pytest
import yaml

from conftest import REPO, SHARED_DATA
from hybridray.cli import main
from hybridray.config import build_config, load_suite
from hybridray.errors import UserError
from test_eval_datasets import small_lareqa

PNG = b"\x89PNG\r\n\x1a\n"


def head_lines(source, target, n):
    target.write_text("\n".join(source.read_text(encoding="utf-8").split("\n")[:n]) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Small copies: TyDi (sw, te, en; sw with 20 train distractors), AfriQA (hau, yor, fon),
    Tatoeba (swh, deu), SciFact (15 judgments), MLQA-R (2 English articles)."""
    root = tmp_path_factory.mktemp("suite-data")
    for split, langs, n in (("dev", ("sw", "te", "en"), 12), ("train", ("sw",), 20)):
        (root / "tydi" / split).mkdir(parents=True, exist_ok=True)
        for lang in langs:
            data = json.loads((SHARED_DATA / "tydiqa-goldp" / split / f"{lang}.json").read_text(encoding="utf-8"))
            data["data"] = data["data"][:n]
            (root / "tydi" / split / f"{lang}.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (root / "afriqa").mkdir()
    for name in ("hau.en.test.jsonl", "yor.en.test.jsonl", "fon.fr.test.jsonl"):
        head_lines(SHARED_DATA / "afriqa" / name, root / "afriqa" / name, 12)
    (root / "tatoeba").mkdir()
    for lang in ("swh", "deu"):
        for side in (lang, "eng"):
            name = f"tatoeba.{lang}-eng.{side}"
            head_lines(SHARED_DATA / "tatoeba" / name, root / "tatoeba" / name, 20)
    scifact = root / "scifact"
    (scifact / "qrels").mkdir(parents=True)
    qrels = (SHARED_DATA / "scifact-beir" / "qrels" / "test.tsv").read_text().split("\n")
    judged = [line.split("\t") for line in qrels[1:16]]
    docs = {d for _, d, _ in judged}
    corpus = [json.loads(x) for x in (SHARED_DATA / "scifact-beir" / "corpus.jsonl").read_text().split("\n") if x]
    keep = [d for d in corpus if d["_id"] in docs] + [d for d in corpus[:25] if d["_id"] not in docs]
    (scifact / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in keep))
    queries = [x for x in (SHARED_DATA / "scifact-beir" / "queries.jsonl").read_text().split("\n")
               if x and json.loads(x)["_id"] in {q for q, _, _ in judged}]
    (scifact / "queries.jsonl").write_text("\n".join(queries) + "\n")
    (scifact / "qrels" / "test.tsv").write_text("\n".join(qrels[:16]) + "\n")
    small_lareqa(root / "mlqa")
    return root


def write_suite(path, small, **tydi):
    suite = {
        "batch_size": 16, "max_length": 48,
        "tasks": [
            {"name": "heldout", "kind": "lareqa", "path": str(small / "mlqa")},
            {"name": "tatoeba", "kind": "tatoeba", "path": str(small / "tatoeba")},
            {"name": "tydi", "kind": "tydi", "path": str(small / "tydi"), **tydi},
            {"name": "afriqa", "kind": "afriqa", "path": str(small / "afriqa")},
            {"name": "scifact", "kind": "beir", "path": str(small / "scifact"), "lang": "en"},
        ],
    }
    path.write_text(yaml.safe_dump(suite))
    return path


def test_suite_end_to_end_with_the_tiny_model(tmp_path, small, capsys):
    suite = write_suite(tmp_path / "suite.yaml", small)
    out = tmp_path / "report"
    assert main(["eval", "--suite", str(suite), "--model", "builtin:tiny", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["tasks"]) == ["heldout", "tatoeba", "tydi", "afriqa", "scifact"]
    rows = {(r["task"], r["setting"]): r for r in report["summary"]}
    assert set(rows) == {("heldout", "multi"), ("tatoeba", "both directions"), ("tydi", "mono"),
                         ("afriqa", "cross"), ("afriqa", "translated"), ("scifact", "")}
    # groups by Joshi et al.: TyDi sw, te low and en high; AfriQA all low; SciFact (en) high
    assert (rows[("tydi", "mono")]["n_low"], rows[("tydi", "mono")]["n_high"]) == (2, 1)
    assert rows[("afriqa", "cross")]["n_low"] == 3 and rows[("scifact", "")]["n_high"] == 1
    assert rows[("tatoeba", "both directions")]["n_low"] == 1  # swh (XTREME calls it high; Joshi class 2)
    for r in report["summary"]:
        assert 0.0 <= r["all"] <= 1.0 and r["seconds"] > 0
    tydi = report["tasks"]["tydi"]
    assert tydi["per_language"]["sw"]["n_corpus"] == tydi["data"]["n_corpus"]["sw"] > tydi["per_language"]["sw"]["n_queries"]
    for lang, entry in tydi["per_language"].items():
        for name in ("ndcg@10", "recall@100", "mrr@10", "answer@1", "answer@5", "answer@20", "answer_in_gold"):
            assert 0.0 <= entry["mono"][name] <= 1.0, (lang, name)
        assert entry["mono"]["answer@1"] <= entry["mono"]["answer@5"] <= entry["mono"]["answer@20"]
        assert entry["mono"]["answer_in_gold"] == 1.0  # TyDi answers are spans of their passage
    afriqa = report["tasks"]["afriqa"]
    assert afriqa["summary"]["cross"]["low"]["n_languages"] == 3 and afriqa["per_language"]["fon"]["corpus"] == "fr"
    assert set(report["low_resource"]) == {"tatoeba", "tydi", "afriqa"}
    assert set(report["low_resource"]["afriqa"]) == {"cross", "translated"}
    assert (out / "low_resource.png").read_bytes()[:8] == PNG
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# Evaluation suite: `builtin:tiny`") and "| task | metric | all | low | mid | high |" in markdown
    for title in ("LAReQA retrieval", "Tatoeba bitext", "TyDi QA gold-passage retrieval", "AfriQA cross-lingual",
                  "BEIR-layout retrieval", "low_resource.png"):
        assert title in markdown, title
    assert markdown.strip() in capsys.readouterr().out

    # The user changes one thing -- TyDi without distractors, Swahili only -- and only that changes.
    suite = write_suite(tmp_path / "suite2.yaml", small, langs=["sw"], distractors=False)
    assert main(["eval", "--suite", str(suite), "--model", "builtin:tiny", "--out", str(tmp_path / "r2"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "r2" / "report.json").read_text())
    sw = again["tasks"]["tydi"]["per_language"]["sw"]
    assert list(again["tasks"]["tydi"]["per_language"]) == ["sw"] and again["tasks"]["tydi"]["data"]["n_distractors"] == {"sw": 0}
    assert sw["n_corpus"] == 12 < tydi["per_language"]["sw"]["n_corpus"]
    assert again["tasks"]["afriqa"]["per_language"] == afriqa["per_language"]  # the rest is unchanged


def test_single_tydi_and_afriqa_tasks(tmp_path, small, capsys):
    out = tmp_path / "afriqa"
    assert main(["eval", "--model", "builtin:tiny", "--data", f"afriqa:{small / 'afriqa'}", "--langs", "hau",
                 "--afriqa-corpus", "file", "--out", str(out), "--max-length", "32", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["task"] == "afriqa" and list(report["per_language"]) == ["hau"]
    assert report["per_language"]["hau"]["corpus"] == "hau.en" and report["settings"]["max_length"] == 32
    assert "### cross:" in (out / "report.md").read_text()
    assert main(["eval", "--model", "builtin:tiny", "--data", f"tydi:{small / 'tydi'}", "--langs", "te",
                 "--no-distractors", "--out", str(tmp_path / "tydi"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "tydi" / "report.json").read_text())
    assert report["data"]["distractors"] is False and report["per_language"]["te"]["group"] == "low"
    capsys.readouterr()


def test_suite_and_option_errors_name_the_key(tmp_path, small, capsys):
    bad = {"tasks": [{"name": "t", "kind": "tydi", "path": str(small / "tydi"), "distractor": True}]}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match=r"a.yaml: tasks.0.distractor: unknown key"):
        load_suite(tmp_path / "a.yaml")
    bad["tasks"][0] = {"name": "t", "kind": "beir", "path": "x", "corpus": "file"}
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match=r"b.yaml: tasks.0: corpus applies to kind afriqa, not beir"):
        load_suite(tmp_path / "b.yaml")
    bad["tasks"] = [{"name": "t", "kind": "tatoeba", "path": "x"}] * 2
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match=r"duplicate task name\(s\) \['t'\]"):
        load_suite(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text(yaml.safe_dump({"tasks": [{"name": "t", "kind": "tydi", "path": str(tmp_path / "no")}]}))
    assert main(["eval", "--suite", str(tmp_path / "d.yaml"), "--model", "builtin:tiny", "--out", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["eval", "--suite", str(tmp_path / "d.yaml"), "--langs", "sw", "--model", "m", "--out", "o"]) == 2
    assert "--langs: set per task in the suite file" in capsys.readouterr().err
    assert main(["eval", "--data", f"lareqa:{small / 'mlqa'}", "--no-distractors", "--model", "m", "--out", "o"]) == 2
    assert "--no-distractors: does not apply to lareqa data" in capsys.readouterr().err
    suite = load_suite(REPO / "configs" / "eval" / "suite.yaml")  # the shipped suite is valid
    assert [t.kind for t in suite.tasks] == ["lareqa", "tatoeba", "tydi", "afriqa", "beir"]


# ----------------------------------------------------------------------------- S3
@pytest.fixture
def s3_bucket(s3_server, small):
    """The small TyDi copy under s3://eval-data/sets/tydi on the session's moto server."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="eval-data")
    for path in (small / "tydi").rglob("*.json"):
        client.upload_file(str(path), "eval-data", f"sets/tydi/{path.relative_to(small / 'tydi')}")
    yield "s3://eval-data/sets"
    bucket = boto3.resource("s3", endpoint_url=s3_server).Bucket("eval-data")
    bucket.objects.all().delete()
    bucket.delete()


def test_suite_reads_s3(tmp_path, s3_bucket, small, monkeypatch):
    from hybridray.evaluate.suite import run_suite

    monkeypatch.setenv("HYBRIDRAY_CACHE", str(tmp_path / "cache"))  # s3 data is cached there

    suite = build_suite([{"name": "tydi", "kind": "tydi", "path": f"{s3_bucket}/tydi"},
                         {"name": "local", "kind": "tydi", "path": str(small / "tydi")}])
    report = run_suite(suite, "builtin:tiny", tmp_path / "out")
    remote, local = report["tasks"]["tydi"], report["tasks"]["local"]
    assert remote["data"]["path"] == f"{s3_bucket}/tydi"
    assert remote["per_language"] == local["per_language"]  # the same files, the same numbers
    assert list((tmp_path / "cache" / "remote").iterdir())  # read through the cache
    with pytest.raises(UserError, match="s3://eval-data/missing: no such directory"):
        run_suite(build_suite([{"name": "x", "kind": "tydi", "path": "s3://eval-data/missing"}]), "builtin:tiny", tmp_path / "o")


def build_suite(tasks):
    from hybridray.config import EvalSuiteConfig

    return EvalSuiteConfig.model_validate({"batch_size": 16, "max_length": 32, "tasks": tasks})


# ----------------------------------------------------------------------------- training hook
def test_final_eval_suite_runs_on_the_exported_model(tmp_path, small):
    from hybridray.models import resolve_model_path
    from hybridray.train import resolve_paths, run_final_suite

    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"max_length": 32, "tasks": [
        {"name": "tydi", "kind": "tydi", "path": str(small / "tydi"), "langs": ["sw"]}]}))
    tree = {"name": "hook", "data": {"heldout": ""}, "run": {"storage_path": str(tmp_path / "runs")},
            "model": {"name_or_path": "builtin:tiny"}, "train": {"final_eval_suite": str(suite), "max_steps": 3}}
    checkpoint_dir = tmp_path / "checkpoint"  # stands for <run>/model after _collect_outputs
    shutil.copytree(resolve_model_path("builtin:tiny"), checkpoint_dir / "model")
    out = run_final_suite(build_config(tree), str(checkpoint_dir / "model"))
    report = json.loads((tmp_path / "runs" / "hook" / "eval" / "suite" / "report.json").read_text())
    assert out.endswith("runs/hook/eval/suite") and report["label"] == "Run `hook` after 3 steps"
    assert report["model"] == str(checkpoint_dir / "model")
    assert list(report["tasks"]["tydi"]["per_language"]) == ["sw"]
    # a bad suite fails before training starts, naming the file and the key
    suite.write_text(yaml.safe_dump({"tasks": [{"name": "t", "kind": "tydy", "path": "x"}]}))
    with pytest.raises(UserError, match=r"suite.yaml: tasks.0.kind"):
        resolve_paths(build_config(tree))
