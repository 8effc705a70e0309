"""``hybridray data mine``: the selection rule (exclusions, margin), and the command end to end
on ``builtin:tiny`` -- mined, resumed after a lost shard, refused with other parameters, read
by a ``loss.hard_negatives=2`` pipeline."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hybridray import cli
from hybridray.data import reader
from hybridray.data.mine import MineOptions, SelectionCounts, build_pools, mine_file, select_negatives
from hybridray.data.sampler import NO_GROUP, stable_hash64
from hybridray.data.shards import read_manifest, write_shards

ROWS_PER_FILE, FILES = 40, 3


def rows_of(shard_dir):
    return [r for f in read_manifest(shard_dir)["files"] for r in pq.read_table(shard_dir / f["path"]).to_pylist()]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def source(mlqa_prepared, tmp_path_factory):
    """120 MLQA-R training rows (whole groups, 7 languages) in 3 parquet files, their in-context
    negatives dropped."""
    rows = rows_of(mlqa_prepared / "train")[: ROWS_PER_FILE * FILES]
    rows = [{**r, "hard_negatives": None, "hard_negative_group_ids": None} for r in rows]
    out = tmp_path_factory.mktemp("mine") / "in"
    write_shards(rows, out, rows_per_file=ROWS_PER_FILE, source="mlqa-r")
    return out


# ----------------------------------------------------------------------------- the rule
POOL_TEXTS = ["positive", "too close", "shared", "kept 1", "kept 2", "positive", "kept 3", "translation"]
POOL_GROUPS = [("g1",), ("g2",), ("g3", "g4"), ("g5",), ("g6",), ("g7",), ("g8",), ("g1",)]


def choose(scores, positive_score, **options):
    counts = SelectionCounts()
    chosen = select_negatives(scores, list(range(len(scores))), positive_score, group="g1", positive="positive",
                              texts=POOL_TEXTS, groups=POOL_GROUPS,
                              options=MineOptions(model="m", **options), counts=counts)
    return [POOL_TEXTS[c] for c in chosen], counts


def test_selection_drops_the_positive_its_translations_shared_texts_and_near_scores():
    scores = [0.9, 0.85, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45]
    # relative margin 0.05 of s_pos 0.86: ceiling 0.817 -- "too close" (0.85) is a likely false negative
    got, counts = choose(scores, 0.86, top_k=2, relative_margin=0.05)
    assert got == ["kept 1", "kept 2"]
    assert (counts.same_group, counts.ambiguous, counts.margin) == (1, 1, 1)
    # without a margin it is the hardest negative
    assert choose(scores, 0.86, top_k=2, relative_margin=None)[0] == ["too close", "kept 1"]
    # an absolute margin of 0.2: ceiling 0.66, so "kept 1" (0.7) goes too; the positive's text under
    # another group (0.55) and the translation (same group) never come back
    got, counts = choose(scores, 0.86, top_k=8, relative_margin=None, absolute_margin=0.2)
    assert got == ["kept 2", "kept 3"]
    assert (counts.positive_text, counts.same_group, counts.margin) == (1, 2, 2)
    # a negative positive score (-0.2): the ceiling is still below it (-0.21)
    got, counts = choose([-0.1, -0.15, -0.3, -0.4], -0.2, top_k=2, relative_margin=0.05)
    assert got == ["kept 1"] and counts.margin == 1


def test_margin_rule_on_real_vectors(source, tmp_path):
    """With the tiny model's vectors, the margined negatives are exactly the unmargined ranking
    with every candidate above s_pos - 0.05 |s_pos| taken out, cut at top_k."""
    from hybridray.evaluate.encode import encode_texts
    from hybridray.models import load_encoder, resolve_model_path

    model, tokenizer = load_encoder(resolve_model_path("builtin:tiny"))
    files = reader.list_shard_files(str(source))
    records = {i: [r for _, r in reader.iter_file_rows(f)] for i, f in enumerate(files)}
    vectors = {i: tuple(encode_texts(model, tokenizer, [r[side] for r in rs], max_length=64, progress=False)
                        for side in ("query", "passage")) for i, rs in records.items()}
    pools = build_pools(files, lambda i: vectors[i][1], tmp_path / "pool")
    text_vector = {t: v for pool in pools.values() for t, v in zip(pool.texts, pool.vectors)}
    strict, loose = SelectionCounts(), SelectionCounts()
    mined = mine_file(records[0], *vectors[0], pools, MineOptions(model="m", top_k=3, relative_margin=0.05), strict)
    ranked = mine_file(records[0], *vectors[0], pools, MineOptions(model="m", top_k=50, relative_margin=None), loose)
    assert strict.margin > 0 and 0 < strict.negatives < loose.negatives
    for row, q, p, full in zip(mined, *vectors[0], ranked):
        ceiling = float(q @ p) - 0.05 * abs(float(q @ p))
        assert row["hard_negatives"] == [t for t in full["hard_negatives"]
                                         if float(q @ text_vector[t]) <= ceiling][:3]


def test_keep_existing_puts_the_input_negatives_first():
    from hybridray.data.mine import Pool

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(6, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries, passages = vectors[:3], vectors[3:]
    records = [{"group_id": g, "lang": "en", "query": f"q{g}", "passage": f"p{g}", "hard_negatives": None,
                "hard_negative_group_ids": None} for g in "abc"]
    records[0].update(hard_negatives=["x", "pb"], hard_negative_group_ids=[None, "b"])
    records[2].update(hard_negatives=["y"])  # no group ids: each answers none
    pools = {"en": Pool(["pa", "pb", "pc"], [("a",), ("b",), ("c",)], passages)}

    def mined(keep: bool):
        options = MineOptions(model="m", top_k=2, relative_margin=None, keep_existing=keep)
        return mine_file(records, queries, passages, pools, options, SelectionCounts())

    counts = SelectionCounts()
    options = MineOptions(model="m", top_k=2, relative_margin=None, keep_existing=True)
    mine_file(records, queries, passages, {"en": Pool(["pa"], [("a",)], passages[:1])}, options, counts)
    # row a mined nothing (its own positive is the only candidate) but keeps its 2: it is not counted
    # as a row without a negative (nor short); row b mined pa alone: short of 2
    assert (counts.mined_none, counts.empty_rows, counts.short_rows) == (1, 0, 1)
    kept = mined(True)
    assert list(zip(kept[0]["hard_negatives"], kept[0]["hard_negative_group_ids"])) == [
        ("x", None), ("pb", "b"), ("pc", "c")]  # pb once, where the input had it
    assert sorted(kept[1]["hard_negatives"]) == ["pa", "pc"]
    assert kept[2]["hard_negatives"][0] == "y" and kept[2]["hard_negative_group_ids"][0] is None
    assert sorted(mined(False)[0]["hard_negatives"]) == ["pb", "pc"]
    assert records[0]["hard_negatives"] == ["x", "pb"]  # the input rows are not changed


def test_vector_cache_is_keyed_by_the_input_file(tmp_path):
    """Vectors cached for one version of an input file are not used for another."""
    from hybridray.data.mine import _load_vectors, _save_vectors

    path = tmp_path / "vectors-00000.npz"
    q, p = np.ones((2, 3), np.float32), np.zeros((2, 3), np.float32)
    _save_vectors(path, q, p, {"bytes": 10, "mtime_ns": 1})
    assert (_load_vectors(path, "queries", 2, {"bytes": 10, "mtime_ns": 1}) == q).all()
    assert _load_vectors(path, "queries", 2, {"bytes": 10, "mtime_ns": 2}) is None
    assert _load_vectors(path, "passages", 2, {"bytes": 11, "mtime_ns": 1}) is None
    assert _load_vectors(path, "passages", 3, {"bytes": 10, "mtime_ns": 1}) is None


def test_a_query_with_two_answers_never_gets_the_other_as_a_negative(tmp_path):
    """Rows a and b ask the same query with two answers (two groups): neither answer is the
    other's negative, and the margin is taken below the lower of the two positive scores."""
    rows = [{"group_id": g, "lang": "en", "query": q, "passage": p, "source": "t"}
            for g, q, p in (("a", "who wrote it?", "pa"), ("b", "who wrote it?", "pb"), ("c", "other", "pc"),
                            ("d", "other 2", "pd"))]
    write_shards(rows, tmp_path / "in", rows_per_file=4, source="t")
    files = reader.list_shard_files(str(tmp_path / "in"))
    query = np.array([1.0, 0.0], np.float32)
    # pa 0.95 and pb 0.6 answer it; pc (0.58) is within 5% of pb's score, pd (0.4) is not
    passages = np.array([[0.95, 0.312], [0.6, 0.8], [0.58, 0.815], [0.4, 0.917]], np.float32)
    queries = np.stack([query, query, [0, 1], [0, 1]]).astype(np.float32)
    pools = build_pools(files, lambda i: passages, tmp_path / "pool")
    assert pools["en"].groups_asking("who wrote it?") == ("a", "b") and pools["en"].groups_asking("other") == ()
    assert len(pools["en"].query_groups) == 1
    records = [r for _, r in reader.iter_file_rows(files[0])]

    def negatives(**options):
        counts = SelectionCounts()
        mined = mine_file(records, queries, passages, pools, MineOptions(model="m", top_k=3, **options), counts)
        return [r["hard_negatives"] for r in mined[:2]], counts

    got, counts = negatives(relative_margin=None)
    assert got == [["pc", "pd"], ["pc", "pd"]] and counts.same_query == 2
    got, counts = negatives(relative_margin=0.05)  # ceiling 0.6 - 0.03 = 0.57 for both rows
    assert got == [["pd"], ["pd"]]  # row a alone (s_pos 0.95) would have kept pc


def test_rows_short_at_range_max_are_searched_deeper():
    """Ten passages; the query's 4 nearest are within the margin. At range_max 2 the row gets
    nothing; with the cap above range_max it is searched again (x4) and gets its 2."""
    from hybridray.data.mine import Pool

    angles = np.array([0.0, 0.01, 0.02, 0.03, 0.04, 0.5, 0.6, 0.7, 0.8, 0.9])
    passages = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    pools = {"en": Pool([f"p{i}" for i in range(10)], [(f"g{i}",) for i in range(10)], passages)}
    record = {"group_id": "g0", "lang": "en", "query": "q", "passage": "p0"}

    def run(cap):
        counts = SelectionCounts()
        options = MineOptions(model="m", top_k=2, range_max=2, range_max_cap=cap, relative_margin=0.05)
        row = mine_file([record], passages[:1], passages[:1], pools, options, counts)[0]
        return row["hard_negatives"], counts

    assert run(2) == ([], SelectionCounts(same_group=1, margin=2, rows=1, mined_none=1, short_rows=1, empty_rows=1))
    got, counts = run(1000)
    assert got == ["p5", "p6"] and counts.searched_deeper == 1 and counts.empty_rows == 0
    assert counts.margin == 4 and counts.same_group == 1  # the counts of its last (deepest) search


def test_text_store_reads_back_what_was_appended(tmp_path):
    from hybridray.data.mine import TextStore

    texts = ["", "plain", "ünïcödé — 中文 עברית", "", "x" * 10_000, "line\nbreak"]
    store = TextStore(tmp_path / "t.bin")
    for t in texts:
        store.append(t)
    store.close()
    assert len(store) == len(texts) and list(store) == texts and store[2] == texts[2]
    empty = TextStore(tmp_path / "e.bin").close()
    assert len(empty) == 0 and list(empty) == []


def test_pool_on_disk_searched_in_chunks_equals_the_whole(tmp_path, monkeypatch):
    """build_pools keeps the first occurrence of each passage text per language, with every group
    it answers, and its vector, on disk; the pool searched in chunks (of 7, and of 1) returns the
    same scores and passages, in the same order, as one search of the whole pool -- equal
    vectors included (duplicated vectors under different texts tie, and keep their order)."""
    import hybridray.data.mine as mine
    from hybridray.evaluate.search import search

    rng = np.random.default_rng(0)
    rows, vectors = [], []
    for i in range(60):
        text = f"p{i % 45}"  # 15 texts repeated: deduplicated to their first row
        rows.append({"group_id": f"g{i}", "lang": "en" if i % 3 else "de", "query": f"q{i % 50}", "passage": text,
                     "source": "t"})
        vectors.append(rng.normal(size=8))
    vectors = np.array(vectors, np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[10] = vectors[11]  # an exact tie between two different passages
    write_shards(rows, tmp_path / "in", rows_per_file=20, source="t")
    files = reader.list_shard_files(str(tmp_path / "in"))
    pools = build_pools(files, lambda i: vectors[20 * i:20 * i + 20], tmp_path / "pool")
    for lang in ("en", "de"):
        first = {}
        for i, r in enumerate(rows):
            if r["lang"] == lang:
                first.setdefault(r["passage"], []).append(i)
        pool = pools[lang]
        assert list(pool.texts) == list(first)
        assert np.array_equal(np.asarray(pool.vectors), vectors[[v[0] for v in first.values()]])
        assert pool.groups == [tuple(sorted(rows[i]["group_id"] for i in v)) for v in first.values()]
        assert isinstance(pool.vectors, np.memmap) and len(pool.texts) < 40
        queries = vectors[:12]
        whole = search(queries, np.asarray(pool.vectors), 9)
        for chunk in (7, 1):
            monkeypatch.setattr(mine, "POOL_CHUNK_ROWS", chunk)
            got = pool.search(queries, 9)
            assert np.array_equal(got[0], whole[0]) and np.array_equal(got[1], whole[1])
    assert sorted(p.name for p in (tmp_path / "pool").iterdir()) == [
        "texts-0.bin", "texts-1.bin", "vectors-0.f32", "vectors-1.f32"]


# ----------------------------------------------------------------------------- the command
def check_never_positive_nor_translation(rows):
    """On every row: no negative is a passage of the row's own group (any language), each is a
    passage of its own language, and its group id names the group whose passage it is."""
    passages_of_group: dict[str, set[str]] = {}
    group_of = {}
    for r in rows:
        passages_of_group.setdefault(r["group_id"], set()).add(r["passage"])
        group_of.setdefault((r["lang"], r["passage"]), set()).add(r["group_id"])
    for r in rows:
        assert r["hard_negatives"], r["group_id"]
        assert len(r["hard_negative_group_ids"]) == len(r["hard_negatives"])
        for text, group in zip(r["hard_negatives"], r["hard_negative_group_ids"]):
            assert text not in passages_of_group[r["group_id"]]
            assert group != r["group_id"]
            assert group_of[(r["lang"], text)] == {group}


def test_mine_end_to_end_then_resume_then_train(ray_session, source, tmp_path, capsys, monkeypatch):
    """As a user runs it. The tiny model is random (every cosine is about 0.93), so any margin
    drops nearly all candidates: this run switches it off; the rule is tested above."""
    import hybridray.data.mine as mine

    # the first run searches each language's pool (~17 passages) in chunks of 5; the resume
    # below searches it whole and must write the same bytes
    monkeypatch.setattr(mine, "POOL_CHUNK_ROWS", 5)
    out = tmp_path / "mined"
    argv = ["data", "mine", "--model", "builtin:tiny", "--shards", str(source), "--out", str(out),
            "--top-k", "3", "--relative-margin", "off", "--max-length", "64"]
    assert cli.main(argv) == 0
    assert "3 shard(s) mined, 0 already done" in capsys.readouterr().out
    rows = rows_of(out)
    assert [r["group_id"] for r in rows] == [r["group_id"] for r in rows_of(source)]
    assert all(len(r["hard_negatives"]) == 3 for r in rows)
    check_never_positive_nor_translation(rows)
    assert sorted(p.name for p in source.iterdir()) == ["manifest.json", *(f"part-0000{i}.parquet" for i in range(3))]

    assert not list((out / "_mine").glob("pool*"))  # the on-disk pool is the run's, not kept

    # a lost shard is mined again (from the cached vectors), the others are left as they are
    monkeypatch.setattr(mine, "POOL_CHUNK_ROWS", 65536)
    before = {p.name: (sha(p), p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}
    (out / "part-00001.parquet").unlink()
    assert cli.main(argv) == 0
    assert "1 shard(s) mined, 2 already done" in capsys.readouterr().out
    after = {p.name: (sha(p), p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}
    assert after["part-00000.parquet"] == before["part-00000.parquet"]
    assert after["part-00002.parquet"] == before["part-00002.parquet"]
    assert after["part-00001.parquet"][0] == before["part-00001.parquet"][0]  # the same negatives, unchunked
    assert json.loads((out / "_mine.json").read_text())["last_run"]["files_encoded"] == 0

    # other parameters into the same --out: one line, nothing touched
    assert cli.main([("2" if a == "3" else a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mined with other parameters (top_k: 3 -> 2)" in err
    assert {p.name: sha(p) for p in out.glob("part-*.parquet")} == {k: v[0] for k, v in after.items()}

    # an input file rewritten in place (same name, same rows, one passage changed): refused, naming the
    # input files; restored byte for byte and mtime, the run is "already done" again
    changed = source / "part-00001.parquet"
    original, stat = changed.read_bytes(), changed.stat()
    table = pq.read_table(changed).to_pylist()
    table[0]["passage"] = table[0]["passage"] + " (edited)"
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(changed)), changed)
    try:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "the input files (changed" in err, err
    finally:
        changed.write_bytes(original)
        os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    stale = out / "_mine" / "pool-999999999"  # the pool of a run killed before its cleanup
    stale.mkdir()
    (stale / "vectors-0.f32").write_bytes(b"\0" * 64)
    assert cli.main(argv) == 0
    assert "0 shard(s) mined, 3 already done" in capsys.readouterr().out
    assert not stale.exists()

    # a run that fails (here: interrupted while writing a shard) deletes its pool too
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    (out / "part-00002.parquet").unlink()
    with monkeypatch.context() as patch:
        patch.setattr(mine, "write_shard_file", interrupted)
        assert cli.main(argv) == 130
    capsys.readouterr()
    assert not list((out / "_mine").glob("pool*"))
    assert cli.main(argv) == 0 and "1 shard(s) mined, 2 already done" in capsys.readouterr().out

    # a training pipeline reads them with loss.hard_negatives=2
    from hybridray.config import build_config
    from hybridray.data.pipeline import build_train_dataset, iter_worker_batches

    cfg = build_config({"seed": 0, "model": {"name_or_path": "builtin:tiny", "max_query_length": 16,
                                             "max_passage_length": 24},
                        "data": {"train": str(out)}, "sampler": {"alpha": 0.5, "batch_size": 4},
                        "train": {"max_steps": 4}, "scaling": {"num_workers": 1},
                        "loss": {"hard_negatives": 2}}, [])
    ds, _ = build_train_dataset(cfg, rejects_path=None)
    steps = list(iter_worker_batches(ds, rank=0, world_size=1))
    assert len(steps) == 4
    for s in steps:
        assert s["negative_input_ids"].shape[0] == 2 * len(s["group_ids"])
        negatives = s["negative_group_ids"].reshape(-1, 2)
        assert (negatives != NO_GROUP).all()
        assert (negatives != s["group_ids"][:, None]).all()
    assert stable_hash64(rows[0]["group_id"]) != NO_GROUP
    # the input has no negatives at all: every row is a reject, and the refusal says why
    from hybridray.errors import UserError

    with pytest.raises(UserError, match=r"no valid rows \(120 rejected; 120 of them have no hard_negatives "
                                        r"\(first: .*part-00000.parquet:0\) and loss.hard_negatives=2"):
        build_train_dataset(build_config({**cfg.model_dump(mode="json"), "data": {"train": str(source)}}, []), rejects_path=None)

    # --overwrite with other parameters, interrupted while writing: the old output is back, intact
    other = [("2" if a == "3" else a) for a in argv] + ["--overwrite"]
    monkeypatch.setattr(mine, "write_shard_file", interrupted)
    assert cli.main(other) == 130
    capsys.readouterr()
    assert {p.name: sha(p) for p in out.glob("part-*.parquet")} == {k: v[0] for k, v in after.items()}
    assert json.loads((out / "_mine.json").read_text())["identity"]["top_k"] == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    monkeypatch.undo()
    assert cli.main(other) == 0  # and not interrupted: replaced
    assert "3 shard(s) mined, 0 already done" in capsys.readouterr().out
    assert all(len(r["hard_negatives"]) == 2 for r in rows_of(out))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_input_is_one_line(ray_session, source, tmp_path, capsys):
    def run(*extra, model="builtin:tiny", shards=str(source), out=str(tmp_path / "o")):
        code = cli.main(["data", "mine", "--model", model, "--shards", shards, "--out", out, *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        return err

    assert "no such file or directory" in run(shards=str(tmp_path / "missing"))
    broken = tmp_path / "not-a-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "--model" in run(model=str(broken))
    assert "mining never writes into its input" in run(out=str(source / "mined"))
    assert "would match --shards" in run(shards=str(source / "*.parquet"), out=str(source / "sub"))
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert "is a file" in run(out=str(a_file))
    not_mined = tmp_path / "not-mined"
    not_mined.mkdir()
    (not_mined / "keep.txt").write_text("mine")
    assert "is not a data mine output" in run("--overwrite", out=str(not_mined))
    assert (not_mined / "keep.txt").read_text() == "mine"
    assert "--range-max" in run("--top-k", "9", "--range-max", "5")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "part-00000.jsonl").write_text(json.dumps({"group_id": "g", "lang": "en", "query": "q",
                                                       "passage": "", "source": "s"}) + "\n")
    assert "part-00000.jsonl:1: empty field 'passage'" in run(shards=str(bad))
    assert not (tmp_path / "o").exists()


def test_rows_without_negatives_are_rejects_when_a_run_draws_them(tmp_path):
    """loss.hard_negatives > 0 on a dataset where some rows have none: each such row is a reject
    naming file:row and pointing at data mine's flags (the rest train); data.strict refuses
    the dataset at the first; at k = 0 every row is read."""
    from hybridray.errors import UserError

    rows = [{"group_id": f"g{i}", "lang": "en", "query": f"q{i}", "passage": f"p{i}", "source": "t",
             "hard_negatives": ["n"] if i % 2 == 0 else None} for i in range(5)]
    path = tmp_path / "part-00000.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = reader.index_file(str(path), 0, max_text_chars=4000)

    def merged(**kwargs):
        return reader.merge_index(str(tmp_path), [str(path)], [table], **kwargs)

    every = merged(strict=True)
    assert [g.group_id for g in every.groups] == [f"g{i}" for i in range(5)] and every.rows_without_negatives == 2
    some = merged(strict=False, need_negatives=True)
    assert [g.group_id for g in some.groups] == ["g0", "g2", "g4"] and some.min_negatives == 1
    assert [(r.file, r.row) for r in some.rejects] == [(str(path), 2), (str(path), 4)]  # jsonl: line numbers
    assert some.reject_counts() == {"no_hard_negatives": 2} and "--range-max-cap" in some.rejects[0].reason
    with pytest.raises(UserError) as refused:
        merged(strict=True, need_negatives=True)
    message = str(refused.value)
    assert message.startswith(f"{path}:2: no hard_negatives") and len(message.splitlines()) == 1
