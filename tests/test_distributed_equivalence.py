"""The key test: 2 processes (gloo, CPU) compute the same loss and gradients as one process on
the same global batch -- including the gradients DeepSpeed actually applies, after clipping.

This proves the reduction documented in ``hybridray.loss.InfoNCELoss``: each rank returns its
local mean loss, the all-gather's backward returns cross-rank gradients to their owners, and
the all-reduce *average* that DDP/DeepSpeed apply yields the single-process gradient.

Both sides run the same worker function, which builds the same seeded model and batch: once
with 1 process on the whole batch, once with 2 processes on half each. Rank 0 writes the
results to a file the test compares.

Through the DeepSpeed engine (ZeRO-0 and ZeRO-2; with gradient caching ZeRO-0 to 3) the optimizer is plain SGD with a large
learning rate and no momentum or decay, so ``(before - after) / lr`` is exactly the gradient
the engine applied: after the all-reduce *and* after clipping, with a threshold the gradient
norm exceeds. Comparing parameters after an AdamW step instead (the first version of this
test) is blind to the gradient's scale: Adam's first step moves every weight by about ``lr``
whatever the gradient's size. A world-size factor in the loss fails this test.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from hybridray.distributed import all_gather_no_grad, all_reduce_mean, init_process_group

from conftest import spawn_one_and_two

PAIRS, NEGATIVES_PER_QUERY = 8, 2
# Translations across ranks (pairs 1 and 5) and within a rank (0 and 3); hard negatives that
# share their own query's group or another pair's group.
GROUPS = [1, 2, 3, 1, 4, 2, 5, 6]
# Query-major, 2 per query: own-group negatives (spared for their owner, masked for its
# translations), negatives answering another pair's group, and NO_GROUP (0) ones.
NEG_GROUPS = [1, 10, 2, 0, 12, 13, 1, 3, 14, 15, 2, 16, 0, 17, 18, 6]

GRAD_CASES = {
    "plain": dict(loss=dict(mask_same_group=False), hard=False),
    "hard_negatives_masked": dict(loss=dict(mask_same_group=True), hard=True),
    "symmetric_masked": dict(loss=dict(mask_same_group=True, symmetric=True), hard=False),
    "everything_learned_temperature": dict(
        loss=dict(mask_same_group=True, symmetric=True, learn_temperature=True), hard=True
    ),
    # against a teacher that differs from the student (another seed), so the term is not 0
    "distill_everything": dict(
        loss=dict(mask_same_group=True, symmetric=True, learn_temperature=True, distill_weight=0.7), hard=True
    ),
}
ENGINE_STAGES = (0, 2)
ENGINE_LOSS = dict(temperature=0.05, mask_same_group=True, symmetric=True, hard_negatives=2)
#: Global gradient-norm clip for the engine runs: below the gradient's norm, so it acts.
ENGINE_CLIP = 0.05
#: Learning rate of the SGD optimizer given to the engines (the schedule is constant, so this
#: is the step size): large, so that ``before - after`` keeps its digits.
SGD_LR = 1000.0
#: Gradient caching: texts per encoder pass (3 does not divide the local batch: a short last chunk).
CACHE_CHUNK = 3
#: ZeRO stages of the cached runs (ZeRO-1: the shipped small configs' stage; ZeRO-3 with every
#: parameter really partitioned, see ``partition_everything``).
CACHE_STAGES = (0, 1, 2, 3)
DROPOUT = 0.1


def tiny_bert(dropout=0.0, seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(
        vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    ))


def token_batch(gen, rows, length):
    """Random ids with right padding of random length (pooling must respect the mask)."""
    ids = torch.randint(5, 1000, (rows, length), generator=gen)
    lengths = torch.randint(3, length + 1, (rows,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def global_batch():
    gen = torch.Generator().manual_seed(1)
    q_ids, q_mask = token_batch(gen, PAIRS, 7)
    p_ids, p_mask = token_batch(gen, PAIRS, 11)
    n_ids, n_mask = token_batch(gen, PAIRS * NEGATIVES_PER_QUERY, 11)
    return dict(
        query_input_ids=q_ids, query_attention_mask=q_mask,
        passage_input_ids=p_ids, passage_attention_mask=p_mask,
        negative_input_ids=n_ids, negative_attention_mask=n_mask,
        group_ids=torch.tensor(GROUPS), negative_group_ids=torch.tensor(NEG_GROUPS),
    )


def local_slice(batch, rank, world, hard=True):
    """Rank ``rank``'s share: contiguous pairs, and their hard negatives (query-major)."""
    out = {}
    for key, value in batch.items():
        per_rank = len(value) // world
        if key.startswith("negative") and not hard:
            continue
        out[key] = value[rank * per_rank:(rank + 1) * per_rank]
    return out


def engine_config(stage, world, clip=ENGINE_CLIP, cache=0, distill=0.0, buckets=1):
    from hybridray.config import build_config

    return build_config({
        "sampler": {"batch_size": PAIRS},
        "scaling": {"num_workers": world},
        "deepspeed": {"zero_stage": stage},
        "loss": {**ENGINE_LOSS, "cache_chunk_size": cache, "distill_weight": distill},
        "model": {"freeze_embeddings": False, "length_buckets": buckets},
        # Clipping on, with a threshold the gradient norm exceeds: DeepSpeed's global norm over
        # the partitioned gradients is part of what is compared.
        "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0,
                  "grad_clip": clip},
    })


def partition_everything():
    """DeepSpeed keeps parameters under ``stage3_param_persistence_threshold`` (1e5 elements)
    whole on every rank, and no tensor of ``tiny_bert`` reaches it: with the threshold at 0,
    ZeRO-3 partitions every parameter, student and teacher, as it does a large model's, so the
    cached re-encode inside backward runs on gathered-and-released weights."""
    import hybridray.engine

    plain = hybridray.engine.zero_optimization

    def zero_optimization(ds):
        section = plain(ds)
        if section["stage"] == 3:
            section["stage3_param_persistence_threshold"] = 0
        return section

    hybridray.engine.zero_optimization = zero_optimization


def _worker(index, ports, outputs):
    """Processes 0 and 1 form the 2-process run; process 2 is the 1-process reference, in the
    same spawn so that the (slow) imports of both runs overlap.

    Per run: gradients (all-reduce averaged) per case, then one DeepSpeed step per stage.
    """
    from hybridray.engine import TrainingModel, build_engine
    from hybridray.loss import InfoNCELoss
    from hybridray.models.encoder import DualEncoder

    torch.set_num_threads(1)
    partition_everything()
    world, rank = (2, index) if index < 2 else (1, 0)
    init_process_group(rank, world, ports[world], "gloo")
    bert, batch = tiny_bert(), global_batch()
    # variable-size int gather: rank r contributes r + 2 values 10r, 10r+1, ...
    results = {"gather": all_gather_no_grad(torch.arange(rank + 2) + 10 * rank)}
    for name, case in GRAD_CASES.items():
        # float64: the equivalence is then checked far below float32 noise
        encoder = DualEncoder(copy.deepcopy(bert))
        teacher = DualEncoder(tiny_bert(seed=1)) if case["loss"].get("distill_weight") else None
        model = TrainingModel(encoder, InfoNCELoss(0.05, **case["loss"]), teacher).double()
        loss = model(**local_slice(batch, rank, world, case["hard"]))
        loss.backward()
        grads = {}
        for pname, param in model.named_parameters():
            if pname.startswith("teacher."):
                assert param.grad is None  # frozen: the teacher never trains
                continue
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            dist.all_reduce(grad)  # what DDP/DeepSpeed do: the average over ranks
            grads[pname] = grad / world
        results[name] = {"loss": all_reduce_mean(loss), "grads": grads}

    for stage in ENGINE_STAGES:
        for clip in (0.0, ENGINE_CLIP):
            config = engine_config(stage, world, clip)
            model = TrainingModel.from_config(config, copy.deepcopy(bert))
            sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=SGD_LR)
            engine = build_engine(model, config, world, optimizer=sgd)
            before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
            loss = engine(**local_slice(batch, rank, world))
            engine.backward(loss)
            engine.step()
            applied = {n: (before[n] - p.detach()) / SGD_LR for n, p in engine.module.named_parameters()}
            results[(stage, clip)] = dict(loss=all_reduce_mean(loss), grads=applied)
    # Gradient caching through the engine. Without dropout, unclipped: compared below with the
    # uncached single-process reference, scale included (a doubled or halved gradient fails).
    # With dropout, clipped: compared with the uncached loss of this world size (each rank's
    # RNG seeded alike for both) whose encoder is called on the same chunks, in the same order,
    # so that it draws the same dropout masks -- which the cached run's re-encoding reproduces
    # only by replaying each chunk's RNG state; DeepSpeed's pre-clip norm is compared too.
    local = local_slice(batch, rank, world)
    for stage in CACHE_STAGES:
        for dropout in (0.0, DROPOUT):
            # Without dropout, with a distillation teacher too (ZeRO-3 partitions it): the student
            # is the teacher at the first step and neither drops out, so the term is exactly 0.
            # Under ZeRO-2/3 also with 2 length buckets inside each cache chunk: several
            # sub-forwards per chunk, each gathering (ZeRO-3) between the not-ready marks.
            config = engine_config(stage, world, ENGINE_CLIP if dropout else 0.0, cache=CACHE_CHUNK,
                                   distill=0.0 if dropout else 0.5,
                                   buckets=2 if stage >= 2 and not dropout else 1)
            model = TrainingModel.from_config(config, tiny_bert(dropout))
            sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=SGD_LR)
            engine = build_engine(model, config, world, optimizer=sgd)
            params = dict(engine.module.named_parameters())
            # ZeRO-3: outside a gather every parameter, the teacher's too, is released locally
            released = stage == 3 and all(not p.ds_persist and p.numel() == 0 for p in params.values())
            teachers = sum(n.startswith("teacher.") for n in params)
            with full_weights(engine, stage):
                before = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
            torch.manual_seed(100 + rank)
            loss = engine(**local)
            engine.backward(loss)
            engine.step()
            with full_weights(engine, stage):
                applied = {n: (before[n] - p.detach()) / SGD_LR for n, p in engine.module.named_parameters()}
            results[("cached", stage, dropout)] = dict(
                loss=all_reduce_mean(loss), grads=applied, released=released, teachers=teachers,
                buckets=engine.module.length_buckets,
                ds_norm=engine.get_global_grad_norm() if stage else None)
    reference = TrainingModel.from_config(engine_config(0, world), tiny_bert(DROPOUT))
    reference.train()
    torch.manual_seed(100 + rank)
    embeddings = [
        torch.cat([reference.encoder.encode(local[f"{kind}_input_ids"][s:s + CACHE_CHUNK],
                                            local[f"{kind}_attention_mask"][s:s + CACHE_CHUNK])
                   for s in range(0, len(local[f"{kind}_input_ids"]), CACHE_CHUNK)])
        for kind in ("query", "passage", "negative")
    ]
    loss = reference.loss(*embeddings, local["group_ids"], local["negative_group_ids"])
    loss.backward()
    grads = {}
    for pname, param in reference.named_parameters():
        grads[pname] = param.grad if param.grad is not None else torch.zeros_like(param)
        dist.all_reduce(grads[pname])
        grads[pname] /= world
    norm = torch.sqrt(sum(g.norm() ** 2 for g in grads.values()))
    grads = {n: g * min(1.0, ENGINE_CLIP / (norm.item() + 1e-6)) for n, g in grads.items()}  # as DeepSpeed clips
    results[("chunked_reference", DROPOUT)] = dict(loss=all_reduce_mean(loss), grads=grads, norm=norm)

    if world == 1:
        # The plain-torch reference of what the engines must apply: the gradient of the
        # global-batch loss, unclipped and clipped by torch's clip_grad_norm_.
        for clip in (0.0, ENGINE_CLIP):
            model = TrainingModel.from_config(engine_config(0, 1), copy.deepcopy(bert))
            loss = model(**batch)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf"))
            grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone()
                     for n, p in model.named_parameters()}
            results[("reference", clip)] = dict(loss=loss.detach(), grads=grads, norm=norm)
        results["teacher_round_trip"] = teacher_round_trip(outputs[1].parent / "teacher-checkpoint")
    if rank == 0:
        torch.save(results, outputs[world])
    dist.barrier()
    dist.destroy_process_group()


def teacher_round_trip(directory):
    """Distillation across a checkpoint (ZeRO-2, one process): one step, saved; then a fresh
    model and engine built from the config, as at a resume, and the checkpoint loaded."""
    from hybridray.checkpointing import DEEPSPEED_TAG, load_state, save_state
    from hybridray.engine import TrainingModel, build_engine

    config = engine_config(2, 1, cache=CACHE_CHUNK, distill=0.5)
    engine = build_engine(TrainingModel.from_config(config, tiny_bert()), config, 1)
    loss = engine(**global_batch())
    engine.backward(loss)
    engine.step()
    save_state(engine, directory, step=1, reports={}, run={"fingerprint": "f"})
    trained = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    resumed = build_engine(TrainingModel.from_config(config, tiny_bert()), config, 1)
    load_state(resumed, directory)
    saved = torch.load(directory / DEEPSPEED_TAG / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    return dict(start={n: p.detach() for n, p in tiny_bert().named_parameters()}, trained=trained,
                resumed={n: p.detach().clone() for n, p in resumed.module.named_parameters()},
                saved_keys=sorted(saved))


def full_weights(engine, stage):
    """Every rank holds the whole model inside (ZeRO-3 gathers its partitions)."""
    import contextlib

    import deepspeed

    if stage != 3:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process results, two-process results) on the same model and global batch."""
    return spawn_one_and_two(_worker, tmp_path_factory.mktemp("equivalence"), ("single.pt", "double.pt"))


def assert_same_tensors(got: dict, want: dict, rel: float) -> None:
    """Per tensor: ``||got - want|| <= rel * ||want||``. A tensor whose reference is (near) zero
    in exact arithmetic -- attention key biases get no gradient through the softmax -- is held
    to ``rel`` times a floor of 1e-4 of the largest tensor norm instead, where its rounding
    noise lives."""
    assert got.keys() == want.keys()
    floor = 1e-4 * max(t.norm() for t in want.values())
    for name in want:
        error, scale = (got[name] - want[name]).norm(), max(want[name].norm(), floor)
        assert error <= rel * scale, f"{name}: error {error:.3g} vs norm {want[name].norm():.3g}"


@pytest.mark.parametrize("case", GRAD_CASES)
def test_two_processes_match_one(runs, case):
    single, double = runs[0][case], runs[1][case]
    rel = 1e-12  # float64
    assert double["loss"].item() == pytest.approx(single["loss"].item(), rel=rel)
    # The test has teeth: every encoder matrix actually receives gradient (pooler unused).
    nonzero = {n for n, g in single["grads"].items() if g.abs().max() > 0}
    assert {n for n in single["grads"] if "pooler" not in n} <= nonzero
    assert_same_tensors(double["grads"], single["grads"], rel)
    if "learned_temperature" in case:
        assert single["grads"]["loss.log_temperature"].abs().item() > 0
    if "distill" in case:  # the term is there (the same loss without it is lower)
        without = runs[0]["everything_learned_temperature"]["loss"].item()
        assert single["loss"].item() - without > 1e-3


@pytest.mark.parametrize("clip", [0.0, ENGINE_CLIP])
@pytest.mark.parametrize("stage", ENGINE_STAGES)
@pytest.mark.parametrize("world", [1, 2])
def test_engine_applies_the_single_process_gradient(runs, stage, world, clip):
    reference = runs[0][("reference", clip)]
    got = runs[world - 1][(stage, clip)]
    assert got["loss"].item() == pytest.approx(reference["loss"].item(), rel=1e-5)
    applied = torch.sqrt(sum(g.norm() ** 2 for g in got["grads"].values()))
    if clip:
        assert reference["norm"] > 4 * clip  # clipping really acts, by a wide margin
        assert applied.item() == pytest.approx(clip, rel=1e-4)  # the clipped norm
    else:
        assert applied.item() == pytest.approx(reference["norm"].item(), rel=1e-4)  # no silent clip
    assert_same_tensors(got["grads"], reference["grads"], rel=1e-4)  # float32, reordered sums


def test_variable_size_gather_without_grad(runs):
    assert runs[0]["gather"].tolist() == [0, 1]
    assert runs[1]["gather"].tolist() == [0, 1, 10, 11, 12]


@pytest.mark.parametrize("stage", CACHE_STAGES)
@pytest.mark.parametrize("world", [1, 2])
def test_cached_loss_applies_the_uncached_gradient(runs, stage, world):
    """Gradient caching (``loss.cache_chunk_size``) through the DeepSpeed engine: without
    dropout and unclipped it applies the single-process uncached gradient, scale included (with
    a distillation teacher equal to the student and without dropout: a term of exactly 0);
    with dropout and clipping on, the gradient of the uncached loss under the same dropout
    masks, DeepSpeed's pre-clip norm being the reference's. Under ZeRO-3 every parameter is
    partitioned; under ZeRO-2/3 the exact runs also split each cache chunk into 2 length buckets."""
    exact = runs[0][("reference", 0.0)]
    got = runs[world - 1][("cached", stage, 0.0)]
    assert got["buckets"] == (2 if stage >= 2 else 1)  # length buckets inside the cache chunks
    assert got["teachers"] > 0
    assert got["released"] == (stage == 3)  # ZeRO-3 partitions student and teacher
    assert got["loss"].item() == pytest.approx(exact["loss"].item(), rel=1e-5)
    applied = torch.sqrt(sum(g.norm() ** 2 for n, g in got["grads"].items() if not n.startswith("teacher.")))
    assert applied.item() == pytest.approx(exact["norm"].item(), rel=1e-4)  # the uncached scale
    assert_same_tensors({n: g for n, g in got["grads"].items() if not n.startswith("teacher.")},
                        exact["grads"], rel=1e-4)
    assert all(g.abs().max() == 0 for n, g in got["grads"].items() if n.startswith("teacher."))  # frozen

    reference = runs[world - 1][("chunked_reference", DROPOUT)]
    got = runs[world - 1][("cached", stage, DROPOUT)]
    assert reference["norm"] > 4 * ENGINE_CLIP  # clipping acts, on the whole gradient once
    # dropout is really on: the masks change the loss
    assert abs(reference["loss"].item() - exact["loss"].item()) > 1e-3
    assert got["loss"].item() == pytest.approx(reference["loss"].item(), rel=1e-5)
    if stage:  # ZeRO-0 with a torch optimizer records no norm; its scale is checked above
        assert got["ds_norm"] == pytest.approx(reference["norm"].item(), rel=1e-4)
    assert_same_tensors(got["grads"], reference["grads"], rel=1e-4)


def test_distillation_teacher_is_the_starting_model_rebuilt_not_saved(runs):
    """The teacher never trains, is left out of checkpoints, and a resume rebuilds it from the
    config as the starting model while the student comes back from the checkpoint."""
    trip = runs[0]["teacher_round_trip"]
    start, trained, resumed = trip["start"], trip["trained"], trip["resumed"]
    teacher = {n for n in trained if n.startswith("teacher.")}
    assert teacher and not any(k.startswith("teacher.") for k in trip["saved_keys"])
    assert any(k.startswith("encoder.") for k in trip["saved_keys"])
    for name in teacher:
        torch.testing.assert_close(trained[name], start[name.removeprefix("teacher.model.")], rtol=0, atol=0)
        torch.testing.assert_close(resumed[name], start[name.removeprefix("teacher.model.")], rtol=0, atol=0)
    moved = [n for n in trained if n.startswith("encoder.") and not torch.equal(trained[n], start[n.removeprefix("encoder.model.")])]
    assert len(moved) > 20  # the student trained ...
    for name in trained:
        if name.startswith("encoder."):
            torch.testing.assert_close(resumed[name], trained[name], rtol=0, atol=0)  # ... and came back
