"""The Ray Data pipeline: validation and rejects, lockstep slices, resume, S3.

Shards are written here with pyarrow (``schema.ARROW_SCHEMA``) and by hand (jsonl); the
tokenizer is a word-level one built with the ``tokenizers`` library. One local Ray cluster
serves the module; pure reader checks run without it.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hybridray.config import build_config
from hybridray.data import reader
from hybridray.data.pipeline import build_train_dataset, iter_worker_batches, slice_step
from hybridray.data.sampler import NO_GROUP, ExtraSource, make_windows, plan_global_batches, stable_hash64
from hybridray.data.schema import ARROW_SCHEMA
from hybridray.errors import UserError

LANGS = ("de", "en", "es", "fr")
B, W = 8, 2


# ----------------------------------------------------------------------------- data
def row(gid: str, lang: str, i: int, **kw) -> dict:
    """A valid row; texts vary in length so padding is dynamic, and carry their origin."""
    base = {
        "group_id": gid, "lang": lang,
        "query": f"question {gid} {lang} " + "word " * (i % 7),
        "passage": f"answer {gid} {lang} " + "word " * (i % 11),
        "hard_negatives": [f"wrong {gid} {lang} one", f"wrong {gid} {lang} two word"],
        "hard_negative_group_ids": None, "context": None, "article_id": None, "source": "test",
    }
    return {**base, **kw}


def group_rows(i: int, prefix: str = "g") -> list[dict]:
    """Group i; its first hard negative answers group i+1 (a false negative for i+1's
    queries), its second answers nothing."""
    langs = LANGS if i % 3 else LANGS[:2]
    answers = [f"{prefix}{(i + 1) % 48}", None]
    return [row(f"{prefix}{i}", lang, i, hard_negative_group_ids=answers) for lang in langs]


def write_parquet(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=ARROW_SCHEMA), path)


def write_jsonl(path: Path, lines: list) -> None:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))


def make_dataset(root: Path) -> Path:
    """48 groups over two parquet files (g23 split across them) and a jsonl of bad rows."""
    root.mkdir(parents=True)
    rows = [r for i in range(48) for r in group_rows(i)]
    split = next(k for k, r in enumerate(rows) if r["group_id"] == "g23") + 2
    write_parquet(root / "part-00000.parquet", rows[:split] + [row("g99", "xx", 0)])
    write_parquet(root / "part-00001.parquet", rows[split:])
    write_jsonl(root / "part-00002.jsonl", [
        row("b0", "en", 0, query=None),                     # line 1: missing field
        row("b1", "en", 0, passage="   "),                   # line 2: empty field
        row("b2", "english", 0),                             # line 3: unknown language
        row("g5", "en", 5),                                  # line 4: duplicate (g5, en)
        row("b4", "en", 0, passage="x" * 300),               # line 5: over-long text
        row("b5", "en", 0, hard_negatives=["ok", ""]),       # line 6: bad hard_negatives
        "{not json",                                         # line 7: invalid JSON
        "",                                                  # line 8: blank, skipped
        row("g2", "zh", 2, hard_negative_group_ids=["g3", None]),  # line 9: scattered group g2, fine
    ])
    return root


def make_tokenizer(directory: Path, words: set[str]) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    ).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pipeline")
    shards = make_dataset(root / "shards")
    extra = root / "extra"
    extra.mkdir()
    write_parquet(extra / "part-00000.parquet", [row(f"x{i}", "en", i) for i in range(20)])
    words = {"question", "answer", "word", "wrong", "one", "two", "query", "passage", ":", *LANGS}
    words |= {f"{p}{i}" for p in "gx" for i in range(100)}
    tokenizer = make_tokenizer(root / "tokenizer", words)
    return {"root": root, "shards": shards, "extra": extra, "tokenizer": tokenizer}


def config(data, **overrides):
    tree = {
        "seed": 0,
        "model": {"name_or_path": str(data["tokenizer"]), "query_prefix": "query: ",
                  "passage_prefix": "passage: ", "max_query_length": 8, "max_passage_length": 12},
        "data": {"train": str(data["shards"]), "max_text_chars": 200},
        "sampler": {"alpha": 0.5, "batch_size": B, "window_groups": 16},
        "train": {"max_steps": 14},
        "scaling": {"num_workers": W},
    }
    return build_config(tree, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def ray_cluster(ray_session):
    """The session's Ray (its workers see the session's S3 settings)."""


# ----------------------------------------------------------------------------- pure reader
def test_reader_reports_every_bad_row_with_file_and_row(data):
    files = reader.list_shard_files(str(data["shards"]))
    assert [Path(f).name for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.jsonl"]
    tables = [reader.index_file(f, i, max_text_chars=200) for i, f in enumerate(files)]
    index = reader.merge_index(str(data["shards"]), files, tables, strict=False)
    got = {(Path(r.file).name, r.row): r.reason for r in index.rejects}
    n0 = pq.read_metadata(files[0]).num_rows
    expected = {
        ("part-00000.parquet", n0 - 1): "unknown language code 'xx'",
        ("part-00002.jsonl", 1): "missing field 'query'",
        ("part-00002.jsonl", 2): "empty field 'passage'",
        ("part-00002.jsonl", 3): "unknown language code 'english'",
        ("part-00002.jsonl", 4): "duplicate (group_id, lang) ('g5', 'en')",
        ("part-00002.jsonl", 5): "field 'passage' has 300 characters (max 200)",
        ("part-00002.jsonl", 6): "field 'hard_negatives' must be a list of non-empty strings",
        ("part-00002.jsonl", 7): "invalid JSON",
    }
    assert set(got) == set(expected)
    for key, reason in expected.items():
        assert got[key].startswith(reason), (key, got[key])
    assert index.reject_counts() == {
        "bad_hard_negatives": 1, "duplicate": 1, "empty_field": 1, "invalid_json": 1,
        "missing_field": 1, "too_long": 1, "unknown_language": 2,
    }
    groups = {g.group_id: g for g in index.groups}
    assert len(groups) == 48
    assert groups["g23"].langs == LANGS  # split across two files: one group
    assert groups["g2"].langs == (*LANGS, "zh") and index.scattered_groups == 1
    with pytest.raises(UserError, match=r"part-00000.parquet:\d+: unknown language code 'xx'"):
        reader.merge_index(str(data["shards"]), files, tables, strict=True)


def test_missing_storage_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        reader.list_shard_files(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "manifest.json").write_text("{}")
    with pytest.raises(UserError, match="no shard files"):
        reader.list_shard_files(str(tmp_path / "empty"))


def test_glob_selects_files(data):
    files = reader.list_shard_files(str(data["shards"] / "*.parquet"))
    assert [Path(f).name for f in files] == ["part-00000.parquet", "part-00001.parquet"]


# ----------------------------------------------------------------------------- Ray pipeline
def collect(ds, rank, start_step=0):
    return list(iter_worker_batches(ds, rank=rank, world_size=W, start_step=start_step))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.fixture(scope="module")
def full_run(ray_cluster, data):
    cfg = config(data, **{"loss.hard_negatives": 2, "data.extra_mono": [{"path": str(data["extra"]), "weight": 1.0}],
                          "sampler.alpha": 0.7})
    rejects = data["root"] / "run" / "rejects.jsonl"
    ds, info = build_train_dataset(cfg, rejects_path=str(rejects))
    ranks = [collect(ds, r) for r in range(W)]
    return cfg, ds, info, ranks, rejects


def test_rejects_report_and_info(full_run):
    _, _, info, _, rejects = full_run
    lines = [json.loads(x) for x in rejects.read_text().splitlines()]
    assert len(lines) == info.n_rejects == 8
    assert {(Path(x["file"]).name, x["row"]) for x in lines} >= {("part-00002.jsonl", 1), ("part-00002.jsonl", 7)}
    assert all(x["reason"] for x in lines)
    assert info.n_groups == 48 and info.languages == [*LANGS, "zh"]
    assert info.n_windows == 3 and info.steps_per_epoch == 6
    assert info.rejects["unknown_language"] == 2
    # and the console is told: how many, why, where each is named
    said = [n for n in info.notes if "rejected" in n]
    assert len(said) == 1 and said[0].startswith("8 row(s) rejected and left out (") and "2 unknown_language" in said[0]
    assert said[0].endswith(f"; each is named in {rejects}")
    # zh exists for one group only: said once, with the counts, instead of silently no zh steps
    assert [n for n in info.notes if "monolingual" in n] == [
        "no monolingual steps in 'zh' in 1 of 3 window(s): it has 1 group(s) there, fewer than "
        "sampler.batch_size (8)"
    ]


def test_a_source_left_without_rows_is_refused_by_name(ray_cluster, data, tmp_path):
    """An extra_mono set whose rows all lack hard negatives (a plain pair set) at
    loss.hard_negatives=2: every row is a reject, and the run is refused naming the set,
    instead of training on with an extra source that never serves a step."""
    plain = tmp_path / "plain"
    plain.mkdir()
    write_parquet(plain / "part-00000.parquet", [row(f"x{i}", "en", i, hard_negatives=None) for i in range(20)])
    cfg = config(data, **{"loss.hard_negatives": 2, "data.extra_mono": [{"path": str(plain), "weight": 0.5}]})
    with pytest.raises(UserError, match=r"^data\.extra_mono\[0\] \(.*plain\): no valid rows \(20 rejected; 20 of "
                                        r"them have no hard_negatives \(first: .*part-00000.parquet:0\) and "
                                        r"loss.hard_negatives=2 draws from them\)$"):
        build_train_dataset(cfg, rejects_path=None)
    build_train_dataset(config(data, **{"loss.hard_negatives": 0, "data.extra_mono": [{"path": str(plain)}]}),
                        rejects_path=None)  # at k = 0 the same set is read


def test_a_duplicate_is_a_duplicate_whatever_the_negatives(tmp_path):
    """The first (group_id, lang) row has no negatives, its copy has: the copy is reported as a
    duplicate with or without need_negatives (a data error never hides behind a loss option)."""
    path = tmp_path / "part-00000.jsonl"
    path.write_text(json.dumps(row("g1", "en", 0, hard_negatives=None)) + "\n" + json.dumps(row("g1", "en", 1)) + "\n")
    table = reader.index_file(str(path), 0, max_text_chars=200)
    for need in (False, True):
        index = reader.merge_index(str(tmp_path), [str(path)], [table], strict=False, need_negatives=need)
        assert [r.reason.split(" (")[0] for r in index.rejects if r.row == 2] == ["duplicate"], need
        assert len(index.rejects) == (2 if need else 1)


def test_ranks_in_lockstep(full_run):
    cfg, _, _, ranks, _ = full_run
    assert [len(r) for r in ranks] == [cfg.train.max_steps] * W
    for step, slices in enumerate(zip(*ranks)):
        assert {s["step"] for s in slices} == {step}
        assert len({s["batch_type"] for s in slices}) == 1
        assert len({s["lang"] for s in slices}) == 1
        gids = torch.cat([s["group_ids"] for s in slices])
        assert len(set(gids.tolist())) == B  # no group twice in the global batch
        for s in slices:
            assert s["query_input_ids"].shape[0] == B // W
            assert s["negative_input_ids"].shape[0] == 2 * (B // W)
            assert s["query_input_ids"].dtype == torch.int64
            for side in ("query", "passage", "negative"):
                mask = s[f"{side}_attention_mask"]
                assert mask.shape[1] == int(mask.sum(1).max()) <= {"query": 8}.get(side, 12)
            if s["batch_type"] == "mono":
                assert set(s["query_langs"]) == set(s["passage_langs"]) == {s["lang"]}
            else:
                assert all(x != y for x, y in zip(s["query_langs"], s["passage_langs"]))
    types = {s["batch_type"] for s in ranks[0]}
    assert types == {"mono", "cross"}
    # extra_mono weight 1.0: every English mono step comes from the extra set
    en = [s for s in ranks[0] if s["lang"] == "en"]
    assert en and all(s["source"] == "extra:0" for s in en)
    assert all(s["source"] == "train" for s in ranks[0] if s["lang"] != "en")


def test_hard_negatives_carry_the_group_they_answer(full_run):
    """Each pair's two negatives: one answers the next group, one nothing (NO_GROUP); the
    extra set records no answers, so all of its negatives are NO_GROUP."""
    _, _, _, ranks, _ = full_run
    name = {stable_hash64(f"g{i}"): i for i in range(48)}
    for s in (s for slices in ranks for s in slices):
        answers = s["negative_group_ids"].reshape(-1, 2).tolist()
        assert len(answers) == len(s["group_ids"])
        for gid, pair in zip(s["group_ids"].tolist(), answers):
            if s["source"] == "train":
                assert sorted(pair) == sorted([stable_hash64(f"g{(name[gid] + 1) % 48}"), NO_GROUP])
            else:
                assert pair == [NO_GROUP, NO_GROUP]


def test_hard_negative_group_ids_are_validated():
    from hybridray.data.schema import row_problem

    good = row("g1", "en", 1, hard_negative_group_ids=["g2", None])
    assert row_problem(good, max_text_chars=200) is None
    assert "has 1 entries but 'hard_negatives' has 2" in row_problem(
        {**good, "hard_negative_group_ids": ["g2"]}, max_text_chars=200)
    assert "must be a list of strings" in row_problem(
        {**good, "hard_negative_group_ids": [3, None]}, max_text_chars=200)


def test_pipeline_matches_the_pure_plan(full_run, data):
    cfg, _, _, ranks, _ = full_run
    index = reader.index_shards(str(data["shards"]), max_text_chars=200)
    extra = reader.index_shards(str(data["extra"]), max_text_chars=200)
    plans = plan_global_batches(index.groups, cfg.sampler, cfg.seed, cfg.train.max_steps,
                                extra=[ExtraSource(extra.groups, 1.0)])
    windows = make_windows(48, 16, B)
    for plan, slices in zip(plans, zip(*ranks)):
        a, b = windows[plan.window]
        pool = index.groups[a:b] if plan.source < 0 else extra.groups
        expected = [stable_hash64(pool[it.group].group_id) for it in plan.items]
        assert torch.cat([s["group_ids"] for s in slices]).tolist() == expected
        assert [x for s in slices for x in s["query_langs"]] == [it.query_lang for it in plan.items]


def test_resume_reproduces_the_tail(full_run):
    cfg, ds, _, ranks, _ = full_run
    k = 9
    tail = collect(ds, 1, start_step=k)  # worker-side skip on the same dataset
    resumed, _ = build_train_dataset(cfg, rejects_path=None, start_step=k)  # driver-side skip
    again = collect(resumed, 1, start_step=k)
    assert len(tail) == len(again) == cfg.train.max_steps - k
    for a, b, c in zip(ranks[1][k:], tail, again):
        assert_same_tensors(a, b)
        assert_same_tensors(a, c)
    with pytest.raises(RuntimeError, match="expected step 0"):
        collect(resumed, 0)


def test_strict_mode_raises_with_file_and_row(ray_cluster, data):
    with pytest.raises(UserError, match=r"part-00000.parquet:\d+: unknown language code 'xx'"):
        build_train_dataset(config(data, **{"data.strict": True}), rejects_path=None)


def test_xx_mode_and_seed(ray_cluster, data, tmp_path):
    """x-x through the pipeline; other seed, other sequence (fast: 3 steps, no negatives)."""
    cfg = config(data, **{"sampler.mode": "x-x", "train.max_steps": 3, "data.languages": ["de", "en", "es"]})
    ds, info = build_train_dataset(cfg, rejects_path=str(tmp_path / "r.jsonl"))
    steps = collect(ds, 0)
    assert info.filtered_rows > 0 and "fr" not in info.languages
    assert [s["batch_type"] for s in steps] == ["x-x"] * 3
    assert all(s["query_langs"] == s["passage_langs"] for s in steps)
    assert all(set(s["query_langs"]) <= {"de", "en", "es"} for s in steps)
    other = collect(build_train_dataset(config(data, seed=1, **{"sampler.mode": "x-x", "train.max_steps": 3}),
                                        rejects_path=None)[0], 0)
    assert [s["group_ids"].tolist() for s in steps] != [s["group_ids"].tolist() for s in other]


def test_encode_matches_the_hf_tokenizer(data):
    from hybridray.data.tokenize import encode, load_tokenizer, tokenizer_spec

    name = str(data["tokenizer"])
    texts = ["answer g1 de word word word word word", "question g2", "wrong one"]
    ids, mask = encode(tokenizer_spec(name), texts, "passage: ", 6)
    hf = load_tokenizer(name)(["passage: " + t for t in texts], truncation=True, max_length=6,
                              padding="longest", return_tensors="np")
    assert np.array_equal(ids, hf["input_ids"]) and np.array_equal(mask, hf["attention_mask"])
    assert (ids != 1).all()  # no [UNK]: the vocabulary was really loaded


def test_encode_matches_the_real_xlmr_tokenizer():
    """builtin:tiny has multilingual-e5's XLM-R tokenizer: the Rust-backend path agrees."""
    from hybridray.data.tokenize import encode, load_tokenizer, tokenizer_spec

    texts = ["Wo befindet sich der Hauptsitz von OCA?", "Where is it? " * 30, "北京是中国的首都"]
    ids, mask = encode(tokenizer_spec("builtin:tiny"), texts, "query: ", 48)
    hf = load_tokenizer("builtin:tiny")(["query: " + t for t in texts], truncation=True, max_length=48,
                                        padding="longest", return_tensors="np")
    assert ids.shape == (3, 48)
    assert np.array_equal(ids, hf["input_ids"]) and np.array_equal(mask, hf["attention_mask"])


def step_row(step: int) -> dict:
    return {"step": step, "batch_type": "mono", "lang": "en", "source": "train", "group_ids": np.arange(4),
            "query_langs": "en " * 4, "passage_langs": "en " * 4,
            "query_input_ids": np.ones((4, 3), np.int32), "query_attention_mask": np.ones((4, 3), np.int8),
            "passage_input_ids": np.ones((4, 3), np.int32), "passage_attention_mask": np.ones((4, 3), np.int8)}


def test_a_stream_that_ends_early_fails_loudly():
    """Training used to end quietly at the last step the stream gave: no final checkpoint,
    no export, a "finished" run."""
    batches = iter_worker_batches([step_row(s) for s in range(3)], rank=0, world_size=2, stop_step=5)
    assert [next(batches)["step"] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(RuntimeError, match=r"ended after step 2, before step 4 \(train.max_steps=5\)"):
        next(batches)
    complete = iter_worker_batches([step_row(s) for s in range(3)], rank=0, world_size=2, stop_step=3)
    assert [b["step"] for b in complete] == [0, 1, 2]


def test_slice_step_validates_world_size():
    row = {"step": 0, "batch_type": "mono", "lang": "en", "source": "train", "group_ids": np.arange(6),
           "query_langs": "en " * 6, "passage_langs": "en " * 6,
           "query_input_ids": np.ones((6, 3), np.int32), "query_attention_mask": np.ones((6, 3), np.int8),
           "passage_input_ids": np.ones((6, 3), np.int32), "passage_attention_mask": np.ones((6, 3), np.int8)}
    assert slice_step(row, rank=2, world_size=3)["group_ids"].tolist() == [4, 5]
    with pytest.raises(ValueError):
        slice_step(row, rank=0, world_size=4)


# ----------------------------------------------------------------------------- S3 (moto)
@pytest.fixture(scope="module")
def s3(s3_server, data):
    """The shards under s3://hybridray-test/shards/ on the session's S3-API server."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket="hybridray-test")
    for name in ("part-00000.parquet", "part-00001.parquet"):
        client.upload_file(str(data["shards"] / name), "hybridray-test", f"shards/{name}")
    return s3_server


def test_s3_prefix_read(ray_cluster, data, s3):
    cfg = config(data, **{"data.train": "s3://hybridray-test/shards", "train.max_steps": 2})
    ds, info = build_train_dataset(cfg, rejects_path=None)
    assert info.n_groups == 48 and info.n_rejects == 1
    assert [s["step"] for s in collect(ds, 1)] == [0, 1]


def test_s3_unreachable_is_a_user_error(s3, monkeypatch):
    with pytest.raises(UserError, match="s3://no-such-bucket/shards"):
        reader.list_shard_files("s3://no-such-bucket/shards")
    with socket.socket() as sock:  # a loopback port with nothing listening
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    with pytest.raises(UserError, match="s3://hybridray-test/shards: cannot read"):
        reader.list_shard_files("s3://hybridray-test/shards")
