"""The key test: 2 processes (gloo, CPU) compute the same loss, gradients and optimizer step as
one process on the same global batch.

This proves the reduction documented in ``hybridray.loss.InfoNCELoss``: each rank returns its
local mean loss, the all-gather's backward returns cross-rank gradients to their owners, and
the all-reduce *average* that DDP/DeepSpeed apply yields the single-process gradient.

Both sides run the same worker function, which builds the same seeded model and batch: once
with 1 process on the whole batch, once with 2 processes on half each. Rank 0 writes the
results to a file the test compares.
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
GROUPS = [0, 1, 2, 0, 3, 1, 4, 5]
NEG_GROUPS = [0, 10, 1, 11, 12, 13, 0, 2, 14, 15, 1, 16, 6, 17, 18, 5]

GRAD_CASES = {
    "plain": dict(loss=dict(mask_same_group=False), hard=False),
    "hard_negatives_masked": dict(loss=dict(mask_same_group=True), hard=True),
    "symmetric_masked": dict(loss=dict(mask_same_group=True, symmetric=True), hard=False),
    "everything_learned_temperature": dict(
        loss=dict(mask_same_group=True, symmetric=True, learn_temperature=True), hard=True
    ),
}
ENGINE_STAGES = (0, 2)
ENGINE_LOSS = dict(temperature=0.05, mask_same_group=True, symmetric=True, hard_negatives=2)


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(
        vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
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


def engine_config(stage, world):
    from hybridray.config import build_config

    return build_config({
        "sampler": {"batch_size": PAIRS},
        "scaling": {"num_workers": world},
        "deepspeed": {"zero_stage": stage},
        "loss": ENGINE_LOSS,
        "model": {"freeze_embeddings": False},
        # Clipping on (and equal on both sides), so DeepSpeed's global grad norm is tested too.
        "optim": {"lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.01, "grad_clip": 0.5},
    })


def _worker(index, ports, outputs):
    """Processes 0 and 1 form the 2-process run; process 2 is the 1-process reference, in the
    same spawn so that the (slow) imports of both runs overlap.

    Per run: gradients (all-reduce averaged) per case, then one DeepSpeed step per stage.
    """
    from deepspeed.utils import safe_get_full_grad

    from hybridray.engine import TrainingModel, build_engine
    from hybridray.loss import InfoNCELoss
    from hybridray.models.encoder import DualEncoder

    torch.set_num_threads(1)
    world, rank = (2, index) if index < 2 else (1, 0)
    init_process_group(rank, world, ports[world], "gloo")
    bert, batch = tiny_bert(), global_batch()
    # variable-size int gather: rank r contributes r + 2 values 10r, 10r+1, ...
    results = {"gather": all_gather_no_grad(torch.arange(rank + 2) + 10 * rank)}
    for name, case in GRAD_CASES.items():
        # float64: the equivalence is then checked far below float32 noise
        encoder = DualEncoder(copy.deepcopy(bert))
        model = TrainingModel(encoder, InfoNCELoss(0.05, **case["loss"])).double()
        loss = model(**local_slice(batch, rank, world, case["hard"]))
        loss.backward()
        grads = {}
        for pname, param in model.named_parameters():
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            dist.all_reduce(grad)  # what DDP/DeepSpeed do: the average over ranks
            grads[pname] = grad / world
        results[name] = {"loss": all_reduce_mean(loss), "grads": grads}

    for stage in ENGINE_STAGES:
        config = engine_config(stage, world)
        engine = build_engine(TrainingModel.from_config(config, copy.deepcopy(bert)), config, world)
        loss = engine(**local_slice(batch, rank, world))
        engine.backward(loss)
        grads = {}
        for pname, param in engine.module.named_parameters():
            grad = safe_get_full_grad(param)
            grads[pname] = (grad if grad is not None else torch.zeros_like(param)).detach().clone()
        engine.step()
        params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        results[f"engine{stage}"] = dict(loss=all_reduce_mean(loss), grads=grads, params=params)
    if rank == 0:
        torch.save(results, outputs[world])
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process results, two-process results) on the same model and global batch."""
    return spawn_one_and_two(_worker, tmp_path_factory.mktemp("equivalence"), ("single.pt", "double.pt"))


def assert_same_tensors(got: dict, want: dict, rel: float) -> None:
    """Every entry within ``rel`` x the largest reference entry over all tensors (an absolute
    tolerance relative to the gradient's scale: some entries, e.g. attention key biases, are
    zero in exact arithmetic and pure rounding noise in practice)."""
    assert got.keys() == want.keys()
    scale = max(t.abs().max() for t in want.values())
    errors = {name: (got[name] - want[name]).abs().max().item() for name in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rel * scale, f"{worst}: error {errors[worst]:.3g}, scale {scale:.3g}"


@pytest.mark.parametrize("case", [*GRAD_CASES, *(f"engine{s}" for s in ENGINE_STAGES)])
def test_two_processes_match_one(runs, case):
    single, double = runs[0][case], runs[1][case]
    float64 = single["loss"].dtype == torch.float64
    rel = 1e-12 if float64 else 1e-5  # float32: sums of a few hundred terms, reordered
    assert double["loss"].item() == pytest.approx(single["loss"].item(), rel=rel)
    # The test has teeth: every encoder matrix actually receives gradient (pooler unused).
    nonzero = {n for n, g in single["grads"].items() if g.abs().max() > 0}
    assert {n for n in single["grads"] if "pooler" not in n} <= nonzero
    assert_same_tensors(double["grads"], single["grads"], rel)
    if "params" in single:
        assert_same_tensors(double["params"], single["params"], rel)
    if "learned_temperature" in case:
        assert single["grads"]["loss.log_temperature"].abs().item() > 0


def test_variable_size_gather_without_grad(runs):
    assert runs[0]["gather"].tolist() == [0, 1]
    assert runs[1]["gather"].tolist() == [0, 1, 10, 11, 12]
