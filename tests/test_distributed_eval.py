"""Evaluation spread over workers scores exactly what one process scores.

- Held-out evaluation inside training (``train.heldout_evaluation``): 2 gloo ranks under
  DeepSpeed ZeRO-1 and ZeRO-3, each encoding its shard, against ``evaluate_lareqa`` in this
  process on the same weights. The shards have different numbers of batches (and under
  ZeRO-3 the rank with fewer runs filler passes), so a lockstep bug hangs or fails here.
  The same through Ray Train is ``test_train.py::test_run_evaluates_before_and_after_and_exports``.
- ``hybridray eval`` with a pool of 2 Ray actors (started once for the suite) against the
  single-process path.
- The streaming BEIR path (corpus read and encoded in chunks, running top-k) against the
  in-memory one.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import MLQA_R, run_spawned
from hybridray.config import build_config

#: Small encoding batches: the shards of the held-out set need different numbers of batches.
EVAL = {"batch_size": 5, "max_length": 32}


def small_lareqa(directory: Path, articles: int = 2) -> Path:
    """The first ``articles`` articles of three MLQA-R languages."""
    directory.mkdir(parents=True, exist_ok=True)
    for lang in ("de", "en", "es"):
        data = json.loads((MLQA_R / f"{lang}.json").read_text(encoding="utf-8"))
        data["data"] = data["data"][:articles]
        (directory / f"{lang}.json").write_text(json.dumps(data), encoding="utf-8")
    return directory


def train_config(stage: int):
    return build_config({"model": {"name_or_path": "builtin:tiny"}, "sampler": {"batch_size": 8},
                         "scaling": {"num_workers": 2}, "deepspeed": {"zero_stage": stage}, "eval": EVAL})


def _ranks(rank, port, heldout_dir, out):
    from hybridray.distributed import init_process_group
    from hybridray.engine import TrainingModel, build_engine
    from hybridray.evaluate.lareqa import load_lareqa
    from hybridray.train import heldout_evaluation

    torch.set_num_threads(1)
    init_process_group(rank, 2, port, "gloo", timeout_s=120)
    heldout = load_lareqa(heldout_dir)
    results = {}
    for stage in (1, 3):
        cfg = train_config(stage)
        engine = build_engine(TrainingModel.from_config(cfg), cfg, 2)
        results[stage] = heldout_evaluation(engine, engine.module.encoder.tokenizer, heldout, cfg, "check")
        results[f"{stage}-train-mode"] = all(m.training for m in engine.module.modules())
    if rank == 0:
        torch.save(results, out)
    else:
        assert all(results[stage] is None for stage in (1, 3))  # only rank 0 gets the report
    dist.barrier()
    dist.destroy_process_group()


def assert_same_scores(got: dict, want: dict, rel: float = 1e-5) -> None:
    """Every score of a LAReQA or BEIR report equal to float tolerance, the same keys."""
    for part in ("summary", "per_language", "pairs", "per_dataset"):
        if part in want:
            assert set(_flat(got[part])) == set(_flat(want[part])), part
            assert _flat(got[part]) == pytest.approx(_flat(want[part]), rel=rel, abs=1e-7, nan_ok=True), part


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix: float("nan") if tree is None else tree}  # report.json writes NaN as null


def test_heldout_evaluation_on_two_ranks_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    from hybridray.data.tokenize import prefixes
    from hybridray.distributed import free_port
    from hybridray.evaluate.encode import distinct
    from hybridray.evaluate.lareqa import evaluate_lareqa, lareqa_texts, load_lareqa
    from hybridray.evaluate.sharding import shard_bounds
    from hybridray.models import load_encoder

    heldout_dir = small_lareqa(tmp_path / "heldout")
    heldout = load_lareqa(heldout_dir)
    n_questions = sum(len(q) for q in heldout.questions.values())
    questions, candidates = lareqa_texts(heldout)  # the ranks shard the distinct texts
    n_distinct = [len(distinct(texts)[0]) for texts in (questions, candidates)]
    batches = [math.ceil((hi - lo) / EVAL["batch_size"]) for lo, hi in (shard_bounds(n_distinct[1], 2, r) for r in (0, 1))]
    assert n_distinct[0] % 2 and batches[0] > batches[1]  # uneven shards: rank 1 runs a filler pass under ZeRO-3
    out = tmp_path / "ranks.pt"
    mp.spawn(run_spawned, args=(_ranks, free_port(), heldout_dir, out), nprocs=2, join=True)
    results = torch.load(out)

    model, tokenizer = load_encoder("builtin:tiny")
    cfg = train_config(1)
    query_prefix, passage_prefix = prefixes(cfg.model)
    want = evaluate_lareqa(model, tokenizer, heldout, query_prefix=query_prefix, passage_prefix=passage_prefix,
                           pooling=cfg.model.pooling, **EVAL)
    assert want["summary"]["map"]["multi"] < 0.99  # an untrained encoder: the scores are not all equal
    for stage in (1, 3):
        got = results[stage]
        assert got["timing"]["encode_workers"] == 2 and got["model"] == "builtin:tiny (check)"
        assert got["summary"]["n_queries"] == n_questions
        assert_same_scores(got, want)
        assert results[f"{stage}-train-mode"]  # back in train mode after evaluating


# ----------------------------------------------------------------------------- streaming BEIR
SCIFACT = MLQA_R.parent / "scifact-beir"


#: Unjudged copies of judged-relevant documents (new id -> which relevant document, in corpus
#: order), appended at the end: far from their originals, so in other chunks.
COPIES = {"copy-a": 0, "copy-b": 2, "copy-b2": 2, "copy-c": 9}


def small_beir(directory: Path, n_queries: int = 30, n_corpus: int = 150) -> Path:
    """A SciFact sub-set in BEIR layout: the first judged queries, their documents and others,
    plus exact copies of judged-relevant documents under new, unjudged ids (:data:`COPIES`):
    equal scores across chunks, whose order (the seeded key) moves nDCG and MRR."""
    qrels = [line.split("\t") for line in (SCIFACT / "qrels" / "test.tsv").read_text().splitlines()[1:]]
    queries = sorted({q for q, _, _ in qrels}, key=int)[:n_queries]
    judged = [(q, d, s) for q, d, s in qrels if q in queries]
    wanted = {d for _, d, _ in judged}
    corpus = []
    for line in (SCIFACT / "corpus.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["_id"] in wanted or len(corpus) < n_corpus - len(wanted):
            words = record["text"].split()  # 3-32 words: under max_length, so batches pad and neighbours matter
            corpus.append({**record, "text": " ".join(words[: 3 + (len(corpus) * 13) % 30])})
    relevant = [r for r in corpus if r["_id"] in {d for _, d, grade in judged if int(grade) > 0}]
    corpus += [{**relevant[i], "_id": new} for new, i in COPIES.items()]
    (directory / "qrels").mkdir(parents=True)
    (directory / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" * (1 + (i % 7 == 0)) for i, r in enumerate(corpus)),
                                           encoding="utf-8")  # some blank lines too
    texts = {json.loads(line)["_id"]: line for line in (SCIFACT / "queries.jsonl").read_text(encoding="utf-8").splitlines()}
    (directory / "queries.jsonl").write_text("".join(texts[q] + "\n" for q in queries), encoding="utf-8")
    (directory / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in judged))
    return directory


def test_running_top_k_is_search_of_the_whole_corpus():
    """Chunked search merged by (score, key) returns exactly the whole corpus's top k, ties
    included: a collapsed encoder (every score equal), duplicated rows, random vectors."""
    from hybridray.evaluate.search import RunningTopK, search

    rng = np.random.default_rng(0)
    random = rng.standard_normal((500, 8)).astype(np.float32)
    random /= np.linalg.norm(random, axis=1, keepdims=True)
    duplicated = random.copy()
    duplicated[100:300] = duplicated[7]  # 201 equal rows: ties that cross every cut
    queries = np.concatenate([random[:20], duplicated[7:8]])
    for corpus in (random, duplicated, np.ones((500, 8), np.float32) / np.sqrt(8)):
        for k in (1, 10, 101, 600):
            want = search(queries, corpus, k)
            for size in (7, 64, 500):
                top = RunningTopK(queries, k, len(corpus))
                order = np.random.default_rng(size).permutation(range(0, len(corpus), size))  # any chunk order
                for start in order:
                    top.add(np.arange(start, min(start + size, len(corpus))), corpus[start:start + size])
                got = top.result()
                np.testing.assert_array_equal(got[1], want[1])
                np.testing.assert_array_equal(got[0], want[0])


def test_streaming_beir_equals_the_in_memory_evaluation(tmp_path):
    from hybridray.evaluate.beir import evaluate_beir, load_beir, score_beir
    from hybridray.evaluate.encode import encode_texts
    from hybridray.models import load_encoder

    root = small_beir(tmp_path / "beir" / "scifact-small")
    model, tokenizer = load_encoder("builtin:tiny")
    settings = dict(pooling="mean", max_length=48, batch_size=8)
    data = load_beir(root)  # the in-memory reference: every text, one encoding, one search
    want = score_beir(data, encode_texts(model, tokenizer, data.query_texts, prefix="query: ", **settings),
                      encode_texts(model, tokenizer, data.corpus_texts, prefix="passage: ", **settings))
    got = evaluate_beir(model, tokenizer, root, query_prefix="query: ", passage_prefix="passage: ",
                        chunk_size=7, **settings)
    assert want["n_corpus"] == len(data.corpus_ids) > 100 and 0 < want["ndcg@10"] < 1
    assert got["per_dataset"]["scifact-small"] == pytest.approx(want, rel=1e-6)
    whole = evaluate_beir(model, tokenizer, root, query_prefix="query: ", passage_prefix="passage: ", **settings)
    assert whole["per_dataset"]["scifact-small"] == pytest.approx(want, rel=1e-6)


def test_copies_of_relevant_documents_in_other_chunks_are_ordered_by_the_key(tmp_path):
    """A judged-relevant passage and its unjudged copy, in different chunks, get bit-identical
    vectors and rank next to each other in the order of their seeded keys, as in one search of
    the whole corpus."""
    from hybridray.evaluate.beir import read_corpus_chunk, same_text_same_vector, scan_beir
    from hybridray.evaluate.encode import encode_chunks, encode_texts
    from hybridray.evaluate.metrics import tiebreak_keys
    from hybridray.evaluate.search import RunningTopK, search
    from hybridray.models import load_encoder

    root = small_beir(tmp_path / "scifact-small")
    data = scan_beir(root)
    n = len(data.corpus_ids)
    copies = data.duplicate_of
    assert sorted(copies) == list(range(n - len(COPIES), n)) and len(set(copies.values())) == 3
    assert all(data.corpus_ids[copy] in COPIES and copy - original > 3 for copy, original in copies.items())
    relevant = {doc for judged in data.qrels.values() for doc, grade in judged.items() if grade > 0}
    assert all(data.corpus_ids[original] in relevant and data.corpus_ids[copy] not in relevant
               for copy, original in copies.items())
    model, tokenizer = load_encoder("builtin:tiny")
    settings = dict(pooling="mean", max_length=128, batch_size=4, prefix="passage: ")  # chunks of 3: copy and
    # original padded with different neighbours differ by ~2e-8 (builtin:tiny) unless the copy takes the original's vector
    queries = encode_texts(model, tokenizer, data.query_texts, prefix="query: ", pooling="mean", max_length=48)
    top, vectors = RunningTopK(queries, 101, n), np.zeros((n, queries.shape[1]), np.float32)
    for rows, chunk in same_text_same_vector(encode_chunks(model, tokenizer, data.chunks(3), read_corpus_chunk,
                                                           **settings), data.duplicate_of):
        top.add(rows, chunk)
        vectors[rows] = chunk
    for copy, original in copies.items():
        np.testing.assert_array_equal(vectors[copy], vectors[original])
    scores, hits = top.result()
    keys = tiebreak_keys(n)
    groups = [[original] + [c for c, o in copies.items() if o == original] for original in set(copies.values())]
    ranked = 0
    for i in range(len(queries)):
        for group in groups:
            ranks = sorted(rank for rank, row in enumerate(hits[i]) if row in group)
            if len(ranks) == len(group):  # side by side, in descending key order
                assert ranks == list(range(ranks[0], ranks[0] + len(group)))
                assert list(hits[i][ranks]) == sorted(group, key=lambda row: -keys[row])
                ranked += 1
    assert ranked >= len(groups) * 5  # the groups are in many queries' top 101
    np.testing.assert_array_equal(hits, search(queries, vectors, 101)[1])  # one search of the whole


def test_same_text_same_vector_waits_for_an_original_in_a_later_chunk():
    from hybridray.evaluate.beir import same_text_same_vector

    chunks = [(np.array([4, 5]), np.array([[4.0], [5.0]])),  # 5 copies 1, which comes later
              (np.array([0, 1]), np.array([[0.0], [1.0]])),
              (np.array([2, 3]), np.array([[2.0], [3.0]]))]  # 3 copies 0, already there
    got = {int(r): float(v[0]) for rows, vectors in same_text_same_vector(chunks, {5: 1, 3: 0})
           for r, v in zip(rows, vectors)}
    assert got == {0: 0.0, 1: 1.0, 2: 2.0, 3: 0.0, 4: 4.0, 5: 1.0}
    with pytest.raises(RuntimeError, match="never came"):
        list(same_text_same_vector(chunks[:1], {5: 1}))


def test_equal_texts_get_identical_vectors_whatever_the_batch():
    """A text padded beside others and alone differs by float noise; encode_texts encodes each
    distinct text once, so every occurrence of a text gets the same bits."""
    from hybridray.evaluate.encode import encode_texts
    from hybridray.models import load_encoder

    model, tokenizer = load_encoder("builtin:tiny")
    text = "the same passage twice"
    texts = [text, "a much longer passage " * 6, "short", text, "x " * 20, text]
    got = encode_texts(model, tokenizer, texts, batch_size=2, progress=False)
    np.testing.assert_array_equal(got[0], got[3])
    np.testing.assert_array_equal(got[0], got[5])
    alone = encode_texts(model, tokenizer, [text, "a much longer passage " * 6, "short", "x " * 20], batch_size=2,
                         progress=False)
    np.testing.assert_allclose(got[[0, 1, 2, 4]], alone, atol=1e-6)


# ----------------------------------------------------------------------------- hybridray eval, 2 actors
@pytest.mark.ray
def test_eval_on_two_actors_equals_one_process(ray_session, tmp_path):
    """A suite (LAReQA + streaming BEIR) encoded by one pool of 2 Ray actors scores what one
    process scores; the BEIR corpus chunks are read by the actors."""
    from hybridray.config import EvalSuiteConfig
    from hybridray.evaluate.suite import run_suite

    suite = EvalSuiteConfig.model_validate({"batch_size": 8, "max_length": 48, "tasks": [
        {"name": "lareqa", "kind": "lareqa", "path": str(small_lareqa(tmp_path / "lareqa", articles=1))},
        {"name": "scifact", "kind": "beir", "path": str(small_beir(tmp_path / "beir" / "scifact-small"))},
    ]})
    one = run_suite(suite, "builtin:tiny", tmp_path / "one")
    two = run_suite(suite, "builtin:tiny", tmp_path / "two", workers=2)
    assert one["timing"]["encode_workers"] == 1 and two["timing"]["encode_workers"] == 2
    for task in ("lareqa", "scifact"):
        assert_same_scores(two["tasks"][task], one["tasks"][task])
    assert [row["all"] for row in two["summary"]] == pytest.approx([row["all"] for row in one["summary"]], rel=1e-5)


def test_encoding_actors_are_sized_per_node_with_cpu_left_for_the_driver():
    """An actor lives on one node: shares come from each node's resources, never the cluster's
    sum, and half a CPU of the driver's node stays free; what cannot be placed is a UserError."""
    from hybridray.device import encode_actor_resources
    from hybridray.errors import UserError

    def node(name, cpus, gpus=0, alive=True):
        return {"NodeID": name, "Alive": alive, "Resources": {"CPU": cpus, **({"GPU": gpus} if gpus else {})}}

    gpu_cluster = [node("head", 64), node("a", 8, 1), node("b", 8, 1)]
    assert encode_actor_resources(2, gpu_cluster, "head") == {"num_cpus": 8.0, "num_gpus": 1}
    assert encode_actor_resources(2, gpu_cluster + [node("c", 6, 2)], "head") == {"num_cpus": 3.0, "num_gpus": 1}
    with pytest.raises(UserError, match="--workers 3: the cluster has 2 GPU"):
        encode_actor_resources(3, gpu_cluster, "head")
    # 1 + 3 CPUs: the driver keeps half of its node; both actors fit on the 3-CPU node
    assert encode_actor_resources(2, [node("head", 1), node("a", 3)], "head") == {"num_cpus": 1.0, "num_gpus": 0}
    assert encode_actor_resources(2, [node("head", 2)], "head") == {"num_cpus": 0.75, "num_gpus": 0}  # this machine
    assert encode_actor_resources(1, [node("head", 2)], "head") == {"num_cpus": 1.0, "num_gpus": 0}
    assert encode_actor_resources(4, [node("head", 4), node("a", 8)], "head") == {"num_cpus": 2.0, "num_gpus": 0}
    assert encode_actor_resources(2, [node("head", 2), node("gone", 64, alive=False)], "head")["num_cpus"] == 0.75
    with pytest.raises(UserError, match="--workers 2: the cluster has 0 CPU"):
        encode_actor_resources(2, [node("head", 0.5)], "head")
    # more actors than whole CPUs: each would run a thread and hold a model copy on 2 cores
    with pytest.raises(UserError, match="--workers 3: the cluster has 2 CPU.*use at most 2"):
        encode_actor_resources(3, [node("head", 2)], "head")
    with pytest.raises(UserError, match="--workers 150: the cluster has 2 CPU"):
        encode_actor_resources(150, [node("head", 2)], "head")


@pytest.mark.ray
def test_one_actor_pool_serves_every_call_and_keeps_input_order(ray_session, monkeypatch, tmp_path):
    """The pool's actors start once and serve every call (texts, then a streamed corpus), rows
    come back in input order equal to one process's, repeated texts bit-identical; the actors
    are gone after the ``with`` block. A chunk an actor cannot read, and actors no node can
    host, are a UserError (one line), not a Ray traceback or a hang."""
    import ray

    import hybridray.evaluate.pool as pool_module
    from hybridray.errors import UserError
    from hybridray.evaluate.beir import read_corpus_chunk
    from hybridray.evaluate.encode import encode_chunks, encode_texts
    from hybridray.models import load_encoder

    model, tokenizer = load_encoder("builtin:tiny")
    texts = [f"sentence {i} " + "word " * (i % 17) for i in range(200)] + ["sentence 3 word word word "] * 3
    settings = dict(pooling="mean", max_length=32, batch_size=8)
    want = encode_texts(model, tokenizer, texts, prefix="query: ", progress=False, **settings)
    with pool_module.encoder_for(model, tokenizer, 2) as pool:
        actors = list(pool.actors)
        got = encode_texts(pool, tokenizer, texts, prefix="query: ", **settings)
        np.testing.assert_allclose(got, want, atol=1e-6)
        np.testing.assert_array_equal(got[200], got[201])
        chunks = [(first, texts[first:first + 30]) for first in range(0, len(texts), 30)]
        rows = {}
        for part, vectors in encode_chunks(pool, tokenizer, chunks, list, prefix="query: ", **settings):
            rows.update(zip(part.tolist(), vectors))
        np.testing.assert_allclose(np.stack([rows[i] for i in range(len(texts))]), want, atol=1e-6)
        assert pool.actors == actors and len(actors) == 2  # the same actors served both calls
        gone = [(0, (str(tmp_path / "gone" / "corpus.jsonl"), 0, 10, 10))]
        with pytest.raises(UserError, match=r"gone/corpus.jsonl: not readable on .*--workers 1$"):
            list(encode_chunks(pool, tokenizer, gone, read_corpus_chunk, prefix="passage: ", **settings))
    for actor in actors:  # ray.kill is asynchronous: a call right after it may still be served
        deadline = time.monotonic() + 30
        while True:
            try:
                ray.get(actor.ready.remote(), timeout=30)
            except ray.exceptions.RayActorError:
                break
            assert time.monotonic() < deadline, "an encoding actor is alive 30 s after its pool closed"
            time.sleep(0.2)

    monkeypatch.setattr(pool_module, "START_TIMEOUT_S", 3)
    monkeypatch.setattr("hybridray.device.encode_actor_resources", lambda *args: {"num_cpus": 64.0, "num_gpus": 0})
    with pytest.raises(UserError, match="--workers 2: 2 of 2 encoding actors could not be started within 3 s"):
        pool_module.EncoderPool(model, tokenizer, 2)


#: Text lists for encode_sharded on 2 ranks: one text (rank 1 has none), shards of 2 and 1
#: batches, and copies only (one distinct text: rank 1 has none again).
SHARD_CASES = [["only one"], ["first text", "second, longer text here", "third"], ["same", "same", "same"],
               ["a b", "c", "a b", "d e f", "c", "g"]]


def _sharded_ranks(rank, port, out):
    from hybridray.distributed import init_process_group
    from hybridray.evaluate.sharding import encode_sharded
    from hybridray.models import load_encoder

    torch.set_num_threads(1)
    init_process_group(rank, 2, port, "gloo", timeout_s=60)
    model, tokenizer = load_encoder("builtin:tiny")
    forwards = [0]
    model.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    results = []
    for texts in SHARD_CASES:
        forwards[0] = 0
        vectors = encode_sharded(model, tokenizer, texts, prefix="", lockstep=True, batch_size=1, pooling="mean",
                                 max_length=16, progress=False)
        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(2)]
        dist.all_gather(counts, torch.tensor([forwards[0]]))
        results.append((vectors, [int(c) for c in counts]))
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def test_encode_sharded_with_an_empty_shard_and_copies_keeps_order_and_lockstep(tmp_path):
    """encode_sharded on 2 gloo ranks: rows in input order equal to one process's, copies
    bit-identical, and under lockstep both ranks run the same number of forward passes, also
    when one rank has no text at all (its filler pass)."""
    import torch.multiprocessing as mp

    from hybridray.distributed import free_port
    from hybridray.evaluate.encode import encode_texts
    from hybridray.models import load_encoder

    out = tmp_path / "sharded.pt"
    mp.spawn(run_spawned, args=(_sharded_ranks, free_port(), out), nprocs=2, join=True)
    model, tokenizer = load_encoder("builtin:tiny")
    for texts, (vectors, forwards) in zip(SHARD_CASES, torch.load(out, weights_only=False)):
        want = encode_texts(model, tokenizer, texts, batch_size=1, pooling="mean", max_length=16, progress=False)
        np.testing.assert_allclose(vectors, want, atol=1e-6)
        for i, text in enumerate(texts):
            np.testing.assert_array_equal(vectors[i], vectors[texts.index(text)])
        assert forwards[0] == forwards[1] == max(1, math.ceil(len(set(texts)) / 2)), (texts, forwards)
