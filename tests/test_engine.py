"""DeepSpeed engine construction: config dict, schedule, weight-decay groups, ZeRO-1/2/3
training with 2 processes on CPU, clipping against a plain-torch reference, and the encoder's
sentence-transformers export."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hybridray.config import build_config
from hybridray.distributed import init_process_group
from hybridray.engine import (
    TrainingModel,
    build_optimizer,
    deepspeed_config,
    lr_factor,
    micro_batch_size,
    param_groups,
)
from hybridray.errors import UserError
from hybridray.loss import InfoNCELoss
from hybridray.models.encoder import DualEncoder

from conftest import spawn_one_and_two

PAIRS = 8
STEPS = 5
#: ZeRO stage -> LR schedule tried with it (each schedule goes through a real engine once).
STAGE_SCHEDULES = {1: "linear", 2: "cosine", 3: "constant"}
CLIP_STAGES, CLIPS = (0, 2), (0.0, 0.05)
ALL_STAGES = (0, 1, 2, 3)
TAU0, TAU_MIN = 0.011, 0.01  # a learned temperature starting just above its lower bound


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(
        vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))


def batch(seed, rows=PAIRS):
    gen = torch.Generator().manual_seed(seed)
    def tokens(length):
        ids = torch.randint(5, 1000, (rows, length), generator=gen)
        return ids, torch.ones_like(ids)

    (q_ids, q_mask), (p_ids, p_mask) = tokens(6), tokens(10)
    return dict(query_input_ids=q_ids, query_attention_mask=q_mask, passage_input_ids=p_ids,
                passage_attention_mask=p_mask, group_ids=torch.arange(rows))


def config(**sections):
    tree = {"sampler": {"batch_size": PAIRS}, "scaling": {"num_workers": 1},
            "train": {"max_steps": STEPS}}
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return build_config(tree)


# ----------------------------------------------------------------------------- pure pieces
def test_deepspeed_config_is_explicit():
    cfg = config(sampler={"batch_size": 32}, scaling={"num_workers": 2},
                 optim={"grad_clip": 0.0}, deepspeed={"zero_stage": 3})
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 1
    assert ds["gradient_clipping"] == 0.0  # present and off, not DeepSpeed's silent 1.0
    assert ds["zero_optimization"] == {"stage": 3}
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False}  # CPU: fp32
    assert ds["zero_force_ds_cpu_optimizer"] is False
    assert ds["zero_allow_untested_optimizer"] is True
    assert deepspeed_config(config(optim={"grad_clip": 2.5}), 1)["gradient_clipping"] == 2.5
    with pytest.raises(UserError, match="multiple of the workers"):
        micro_batch_size(config(sampler={"batch_size": 12}), 8)


def test_gradient_accumulation_is_refused_with_the_reason():
    """Accumulation used to mix a mono and a cross global batch into one update, end the LR
    schedule at half its length and checkpoint mid-accumulation."""
    with pytest.raises(UserError, match=r"optim.grad_accum: values above 1 are not supported"):
        config(optim={"grad_accum": 2})


def test_lr_factor_schedules():
    def f(step, schedule):
        return lr_factor(step, warmup_steps=4, total_steps=14, schedule=schedule)

    assert [f(s, "linear") for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # step 0 already moves
    assert f(4, "linear") == 1.0 and f(9, "linear") == pytest.approx(0.5) and f(14, "linear") == 0.0
    assert f(9, "cosine") == pytest.approx(0.5) and f(14, "cosine") == pytest.approx(0.0)
    assert f(6, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert f(13, "constant") == 1.0 and f(1, "constant") == 0.5
    assert lr_factor(0, 0, 10, "linear") == 1.0  # no warm-up
    assert all(f(s, "linear") > 0 for s in range(14))  # every step of a run updates


def test_param_groups_skip_frozen_and_decay_only_matrices():
    model = TrainingModel(DualEncoder(tiny_bert(), freeze_embeddings=True),
                          InfoNCELoss(0.05, learn_temperature=True))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert "encoder.model.embeddings.word_embeddings.weight" not in decayed | spared  # frozen
    assert "encoder.model.embeddings.position_embeddings.weight" in decayed  # still trains
    assert "encoder.model.encoder.layer.0.attention.self.query.weight" in decayed
    assert "encoder.model.encoder.layer.0.attention.self.query.bias" in spared
    assert "encoder.model.embeddings.LayerNorm.weight" in spared
    assert "loss.log_temperature" in spared
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | spared == trainable


def tiny_decoder():
    from transformers import MistralConfig, MistralModel

    torch.manual_seed(0)
    model = MistralModel(MistralConfig(
        vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.0,
    ))
    model.config.use_cache = False
    return model


def ragged_batch(seed, padding_side="right", negatives=0):
    """``batch(seed)`` with texts of random lengths (the longest using the full width), padded
    on ``padding_side``, plus ``negatives`` hard negatives per query (query-major)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = batch(seed, rows=PAIRS)
    if negatives:
        inputs["negative_input_ids"] = torch.randint(5, 1000, (PAIRS * negatives, 10), generator=gen)
        inputs["negative_attention_mask"] = torch.ones_like(inputs["negative_input_ids"])
        inputs["negative_group_ids"] = torch.randint(0, PAIRS + 1, (PAIRS * negatives,), generator=gen)
    for side in ("query", "passage", "negative")[: 3 if negatives else 2]:
        ids = inputs[f"{side}_input_ids"]
        rows, width = ids.shape
        lengths = torch.randint(2, width + 1, (rows,), generator=gen)
        lengths[0] = width
        cols = torch.arange(width)
        mask = cols[None] < lengths[:, None] if padding_side == "right" else cols[None] >= width - lengths[:, None]
        inputs[f"{side}_attention_mask"] = mask.long()
        inputs[f"{side}_input_ids"] = ids.masked_fill(~mask, 0)
    return inputs


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_length_buckets_keep_the_loss_and_gradients(padding_side):
    """Chunks of similar length (``model.length_buckets``) give every text the embedding the
    whole batch gives it: the same loss and gradients, with fewer padded tokens encoded.
    Left padding is the decoder recipe's (positions counted from each row's first token)."""
    from hybridray.engine import length_chunks

    inputs = ragged_batch(3, padding_side, negatives=2)
    assert inputs["negative_attention_mask"].sum(1).unique().numel() > 2  # negatives vary in length too

    mask = inputs["passage_attention_mask"]
    order, chunks = length_chunks(mask, 3)
    assert sorted(torch.cat([rows for rows, _ in chunks]).tolist()) == list(range(PAIRS))
    assert len(chunks) == 3 and (mask.sum(1)[order].diff() >= 0).all()
    for rows, cols in chunks:  # each chunk exactly as wide as its longest row, no real token cut
        assert cols.stop - cols.start == int(mask[rows].sum(1).max())
        assert mask[rows][:, cols].sum() == mask[rows].sum()
    assert sum(len(rows) * (cols.stop - cols.start) for rows, cols in chunks) < mask.numel()
    assert len(length_chunks(mask, 64)[1]) == PAIRS  # never more chunks than rows

    results = []
    for buckets in (1, 3):
        encoder = DualEncoder(tiny_bert()) if padding_side == "right" else DualEncoder(tiny_decoder(), "last")
        model = TrainingModel(encoder, InfoNCELoss(0.05), length_buckets=buckets)
        loss = model(**inputs)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss1, grads1), (loss3, grads3) = results
    torch.testing.assert_close(loss3, loss1, rtol=1e-5, atol=1e-6)
    assert grads1.keys() == grads3.keys() and grads1
    for name in grads1:
        torch.testing.assert_close(grads3[name], grads1[name], rtol=1e-4, atol=1e-6, msg=name)
    assert config(model={"length_buckets": 4}).model.length_buckets == 4
    with pytest.raises(UserError, match="model.length_buckets"):
        config(model={"length_buckets": 0})
    assert TrainingModel.from_config(config(model={"length_buckets": 4}), tiny_bert()).length_buckets == 4


# ----------------------------------------------------------------------------- engines
def _train(stage, engine, local):
    """``STEPS`` steps on one fixed batch: losses, LRs used, and the word-embedding table and
    a trained matrix before and after (full tensors, also under ZeRO-3)."""
    import deepspeed

    emb = engine.module.encoder.model.get_input_embeddings().weight
    dense = engine.module.encoder.model.encoder.layer[0].attention.self.query.weight

    def snapshot():
        with deepspeed.zero.GatheredParameters([emb, dense], enabled=stage == 3):
            return emb.detach().clone(), dense.detach().clone()

    before = snapshot()
    losses, lrs = [], []
    for _ in range(STEPS):
        lrs.append(engine.get_lr()[0])
        loss = engine(**local)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return {"losses": losses, "lrs": lrs, "before": before, "after": snapshot()}


def _reference_run(bert, cfg, batches):
    """Plain torch: same optimizer and schedule, clipping by ``clip_grad_norm_`` exactly as the
    config says. Returns final parameters and the pre-clip gradient norms."""
    model = TrainingModel.from_config(cfg, copy.deepcopy(bert))
    optimizer, scheduler = build_optimizer(model, cfg)
    norms, losses = [], []
    for b in batches:
        loss = model(**b)
        loss.backward()
        losses.append(loss.item())
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).item())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms, losses


def _temperature_run(bert, stage, rank, world):
    """4 AdamW steps at a large LR on a batch whose passages equal its queries (the positive
    is the best match, so the loss pulls the temperature down): the learned log-temperature
    after each step, in the module and in DeepSpeed's fp32 master copy (rank ``rank`` of
    ``world``)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    from hybridray.engine import build_engine, clamp_temperature

    cfg = config(deepspeed={"zero_stage": stage}, model={"freeze_embeddings": True}, scaling={"num_workers": world},
                 loss={"temperature": TAU0, "learn_temperature": True},
                 optim={"lr": 0.5, "warmup_steps": 0, "schedule": "constant", "grad_clip": 0.0})
    engine = build_engine(TrainingModel.from_config(cfg, copy.deepcopy(bert)), cfg, world)
    half = slice(rank * PAIRS // world, (rank + 1) * PAIRS // world)
    b = {k: v[half] for k, v in batch(0).items()}
    b["passage_input_ids"], b["passage_attention_mask"] = b["query_input_ids"], b["query_attention_mask"]
    param = engine.module.loss.log_temperature
    values, masters = [], []
    for _ in range(4):
        engine.backward(engine(**b))
        engine.step()
        clamp_temperature(engine)
        with deepspeed.zero.GatheredParameters([param], enabled=stage == 3):
            values.append(param.item())
        master = safe_get_full_fp32_param(param)
        masters.append(master.flatten()[0].item() if master is not None else None)
    return {"values": values, "masters": masters}


def _modes_after_build(scratch):
    """Which submodules are in train mode in an engine built on a model loaded from disk
    (``from_pretrained`` returns eval mode), and after a held-out evaluation."""
    import json as json_

    from hybridray.engine import build_engine
    from hybridray.train import heldout_evaluation

    cfg = config(model={"name_or_path": "builtin:tiny"})
    engine = build_engine(TrainingModel.from_config(cfg), cfg, 1)
    after_build = [n for n, m in engine.module.named_modules() if not m.training]
    directory = Path(scratch) / "lareqa"
    directory.mkdir()
    para = {"context": "Berlin ist die Hauptstadt. Paris auch.", "sentences": ["Berlin ist die Hauptstadt.", "Paris auch."],
            "sentence_breaks": [[0, 25], [26, 37]],
            "qas": [{"id": "q1", "question": "Was ist Berlin?", "answers": [{"text": "Berlin", "answer_start": 0}]}]}
    for lang in ("de", "en"):
        (directory / f"{lang}.json").write_text(json_.dumps({"data": [{"title": "t", "paragraphs": [para]}]}))
    from hybridray.evaluate.lareqa import load_lareqa

    heldout = load_lareqa(directory)
    reports = [heldout_evaluation(engine, engine.module.encoder.tokenizer, heldout, cfg, "check") for _ in range(2)]
    after_eval = [n for n, m in engine.module.named_modules() if not m.training]
    return {"after_build": after_build, "after_eval": after_eval,
            "deterministic_eval": reports[0]["summary"] == reports[1]["summary"]}


def _worker(index, ports, outputs):
    """Processes 0-1: ZeRO-1/2/3 training with 2 ranks. Process 2 (alone, world 1): clipping
    through the engine against ``_reference_run``."""
    from hybridray.engine import build_engine

    torch.set_num_threads(1)
    world, rank = (2, index) if index < 2 else (1, 0)
    init_process_group(rank, world, ports[world], "gloo")
    bert, results = tiny_bert(), {}
    if world == 2:
        half = slice(rank * PAIRS // 2, (rank + 1) * PAIRS // 2)
        local = {k: v[half] for k, v in batch(0).items()}
        ragged = {k: v[half] for k, v in ragged_batch(5).items()}  # ZeRO-3: texts of varied lengths
        for stage, schedule in STAGE_SCHEDULES.items():
            cfg = config(scaling={"num_workers": 2}, deepspeed={"zero_stage": stage},
                         model={"freeze_embeddings": True},
                         optim={"lr": 2e-3, "warmup_steps": 2, "schedule": schedule})
            engine = build_engine(TrainingModel.from_config(cfg, copy.deepcopy(bert)), cfg, 2)
            results[stage] = _train(stage, engine, ragged if stage == 3 else local)
        # the ZeRO-3 run again with 3 length buckets per side: every chunk's forward and
        # backward gathers the partitions again, in lockstep on both ranks (no deadlock)
        cfg = config(scaling={"num_workers": 2}, deepspeed={"zero_stage": 3},
                     model={"freeze_embeddings": True, "length_buckets": 3},
                     optim={"lr": 2e-3, "warmup_steps": 2, "schedule": STAGE_SCHEDULES[3]})
        engine = build_engine(TrainingModel.from_config(cfg, copy.deepcopy(bert)), cfg, 2)
        calls, encode = [], engine.module.encoder.encode  # count the encoder's forwards: 3 per side
        engine.module.encoder.encode = lambda *args, **kwargs: (calls.append(1), encode(*args, **kwargs))[1]
        results["buckets"] = _train(3, engine, ragged)
        results["buckets"]["forwards_per_step"] = len(calls) / STEPS
        results["buckets"]["sides"] = 2 + ("negative_input_ids" in ragged)
        # clamped on 2 ranks: under ZeRO-1/2/3 the fp32 master copy is partitioned across them
        results["temperature"] = {stage: _temperature_run(bert, stage, rank, 2) for stage in ALL_STAGES}
    else:
        batches = [batch(seed) for seed in range(3)]
        for stage in CLIP_STAGES:
            for clip in CLIPS:
                cfg = config(deepspeed={"zero_stage": stage}, model={"freeze_embeddings": False},
                             optim={"lr": 1e-2, "warmup_steps": 0, "grad_clip": clip,
                                    "weight_decay": 0.01},
                             train={"max_steps": 3})
                engine = build_engine(TrainingModel.from_config(cfg, copy.deepcopy(bert)), cfg, 1)
                assert engine.gradient_clipping() == clip
                losses = []
                for b in batches:
                    loss = engine(**b)
                    engine.backward(loss)
                    engine.step()
                    losses.append(loss.item())
                got = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
                want, norms, want_losses = _reference_run(bert, cfg, batches)
                results[(stage, clip)] = {"got": got, "want": want, "norms": norms, "losses": losses,
                                          "want_losses": want_losses,
                                          "backward_allreduce": engine.enable_backward_allreduce}
        results["modes"] = _modes_after_build(outputs[1].parent)
    if rank == 0:
        torch.save(results, outputs[world])
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(clipping results of the 1-process run, training results of the 2-process run)."""
    return spawn_one_and_two(_worker, tmp_path_factory.mktemp("engine"), ("clip.pt", "zero.pt"))


@pytest.mark.parametrize("stage", STAGE_SCHEDULES)
def test_zero_stage_trains_on_two_processes(runs, stage):
    result = runs[1][stage]
    losses = result["losses"]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    emb_before, dense_before = result["before"]
    emb_after, dense_after = result["after"]
    assert torch.equal(emb_before, emb_after)  # freeze_embeddings: the table is untouched
    assert not torch.allclose(dense_before, dense_after)  # the rest trains


def test_length_buckets_under_zero3_on_two_processes(runs):
    """ZeRO-3, 2 ranks, gathered negatives, dropout off: 3 length buckets per side train the
    same trajectory as one forward per side (same losses at every step, same final weights)."""
    one, three = runs[1][3], runs[1]["buckets"]
    assert len(three["losses"]) == STEPS
    assert three["forwards_per_step"] == 3 * three["sides"]  # bucketing really ran: 3 chunks per side
    torch.testing.assert_close(torch.tensor(three["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(three["after"][1], one["after"][1], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(one["before"][1], one["after"][1])  # it trained


@pytest.mark.parametrize("stage", STAGE_SCHEDULES)
def test_engine_follows_the_lr_schedule(runs, stage):
    want = [2e-3 * lr_factor(s, 2, STEPS, STAGE_SCHEDULES[stage]) for s in range(STEPS)]
    assert runs[1][stage]["lrs"] == pytest.approx(want, rel=1e-12)
    assert want[0] < want[1]  # warm-up
    if STAGE_SCHEDULES[stage] != "constant":
        assert want[-1] < want[2]  # decay


@pytest.mark.parametrize("stage", ALL_STAGES)
def test_learned_temperature_is_clamped_as_a_parameter(runs, stage):
    """The bound holds for the parameter and DeepSpeed's master copy after every step; clamping
    only the forward value let Adam carry the parameter past the bound, where its gradient
    is zero (it then needs as many steps to come back)."""
    result = runs[1]["temperature"][stage]
    bound = math.log(TAU_MIN)
    assert all(v >= bound - 1e-6 for v in result["values"]), result
    assert result["values"][0] == pytest.approx(bound, abs=1e-6)  # it was pulled down: the clamp acted
    if stage:
        assert all(m >= bound - 1e-6 for m in result["masters"]), result


def test_engine_trains_in_train_mode_and_evaluates_in_eval_mode(runs):
    """Dropout used to be on only after an evaluation had run (it switched the model to train
    mode on its way out); a resumed run then trained without dropout."""
    modes = runs[0]["modes"]
    assert modes["after_build"] == [] and modes["after_eval"] == []
    assert modes["deterministic_eval"]  # no dropout while encoding


@pytest.mark.parametrize("stage", CLIP_STAGES)
def test_clipping_is_what_the_config_says(runs, stage):
    off, on = runs[0][(stage, 0.0)], runs[0][(stage, 0.05)]
    # The gradients are large enough that DeepSpeed's implicit clip at 1.0 would show.
    assert max(off["norms"]) > 1.0 and min(on["norms"]) > 0.05
    for result in (off, on):
        for name, want in result["want"].items():
            if stage == 0:
                # one worker at ZeRO-0 (engine.skip_needless_work): no all-reduce over a group
                # of one and torch's clip, so every step is the plain torch loop's, bit for bit
                assert torch.equal(result["got"][name], want), name
            else:  # DeepSpeed's clip coefficient rounds slightly differently from torch's
                torch.testing.assert_close(result["got"][name], want, rtol=1e-5, atol=1e-5)
        if stage == 0:
            assert result["losses"] == result["want_losses"]
        assert result["backward_allreduce"] is (stage != 0)
    moved = max((off["got"][n] - on["got"][n]).abs().max().item() for n in off["got"])
    assert moved > 1e-3  # clipping changed the trajectory: the comparison has teeth


# ----------------------------------------------------------------------------- export
def test_freeze_embeddings_freezes_only_the_word_table():
    def frozen(encoder):
        return {n for n, p in encoder.named_parameters() if not p.requires_grad}

    unused = {"model.pooler.dense.weight", "model.pooler.dense.bias"}  # always frozen
    assert frozen(DualEncoder(tiny_bert())) == unused
    assert frozen(DualEncoder(tiny_bert(), freeze_embeddings=True)) == unused | {
        "model.embeddings.word_embeddings.weight"
    }


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_export_pooling_config(tmp_path, pooling):
    DualEncoder(tiny_bert(), pooling=pooling).save_pretrained(tmp_path, max_seq_length=64)
    flags = json.loads((tmp_path / "1_Pooling" / "config.json").read_text())
    on = {k for k, v in flags.items() if v is True}
    assert on == {{"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                   "last": "pooling_mode_lasttoken"}[pooling]}
    assert json.loads((tmp_path / "sentence_bert_config.json").read_text())["max_seq_length"] == 64
    assert (tmp_path / "2_Normalize").is_dir() and (tmp_path / "config.json").is_file()


def test_export_loads_in_sentence_transformers_with_the_same_embeddings(tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import BertTokenizerFast

    words = ["hello", "world", "bonjour", "le", "monde", "hallo", "welt"]
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    tokenizer = BertTokenizerFast(vocab=vocab)
    encoder = DualEncoder(tiny_bert(), pooling="cls").eval()
    encoder.save_pretrained(tmp_path, tokenizer, prompts={"query": "query: "}, max_seq_length=32)

    texts = ["hello world", "bonjour le monde", "hallo welt hello"]
    st = SentenceTransformer(str(tmp_path), device="cpu")
    got = torch.as_tensor(st.encode(texts, convert_to_numpy=True))
    tokens = tokenizer(texts, padding=True, return_tensors="pt")
    assert (tokens["input_ids"] != vocab["[UNK]"]).all()
    with torch.no_grad():
        want = encoder.encode(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # back through hybridray.models.load_encoder (which drops the unused pooler)
    reloaded = DualEncoder.from_pretrained(tmp_path, pooling="cls").eval()
    assert reloaded.tokenizer is not None
    with torch.no_grad():
        again = reloaded.encode(tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(again, want)


def test_exported_prompts_become_the_default_prefixes(tmp_path):
    from hybridray.models import default_prefixes

    DualEncoder(tiny_bert()).save_pretrained(tmp_path, prompts={"query": "q: ", "passage": "p: "})
    assert default_prefixes(str(tmp_path)) == ("q: ", "p: ")
    assert default_prefixes("intfloat/multilingual-e5-small") == ("query: ", "passage: ")
    assert default_prefixes("xlm-roberta-base") == ("", "")
