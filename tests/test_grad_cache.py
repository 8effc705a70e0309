"""Gradient caching in one process (no DeepSpeed): the cached loss's gradient equals the
uncached loss's, dropout included, and only because each chunk's RNG state is replayed. The
distributed, through-the-engine proof is in ``test_distributed_equivalence.py``."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from hybridray.engine import TrainingModel
from hybridray.grad_cache import RandContext, cached_embeddings, encode_in_chunks
from hybridray.loss import InfoNCELoss
from hybridray.models.encoder import DualEncoder

from test_distributed_equivalence import global_batch, tiny_bert

CHUNK = 3
KINDS = ("query", "passage", "negative")


def inputs_of(batch):
    return [(batch[f"{kind}_input_ids"], batch[f"{kind}_attention_mask"]) for kind in KINDS]


def gradients(batch, cached: bool, dropout=0.1):
    """(loss, parameter gradients) of one step from the same weights and RNG state: the cached
    model, or the uncached loss with its encoder called on the same chunks (same masks)."""
    model = TrainingModel(DualEncoder(tiny_bert(dropout)), InfoNCELoss(0.05, learn_temperature=True, symmetric=True),
                          cache_chunk_size=CHUNK if cached else 0).double()
    model.train()
    torch.manual_seed(7)
    if cached:
        loss = model(**batch)
    else:
        embeddings = encode_in_chunks(model.encoder.encode, inputs_of(batch), CHUNK)
        loss = model.loss(*embeddings, batch["group_ids"], batch["negative_group_ids"])
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_error(got, want):
    assert got.keys() == want.keys()
    return max(((got[n] - want[n]).norm() / want[n].norm().clamp_min(1e-30)).item() for n in want)


@pytest.fixture(scope="module")
def uncached():
    return gradients(global_batch(), cached=False)


def test_cached_gradient_equals_the_uncached_one_with_dropout(uncached):
    loss, want = uncached
    cached_loss, got = gradients(global_batch(), cached=True)
    assert cached_loss == pytest.approx(loss, rel=1e-12)
    assert len(want) > 30 and "loss.log_temperature" in want  # every encoder matrix, and tau
    assert relative_error(got, want) < 1e-9


def test_without_replaying_the_rng_the_gradient_is_wrong(uncached, monkeypatch):
    """The test above has teeth: re-encoding with fresh dropout masks gives another gradient."""
    _, want = uncached
    monkeypatch.setattr(RandContext, "replay", lambda self: contextlib.nullcontext())
    _, got = gradients(global_batch(), cached=True)
    assert relative_error(got, want) > 1e-3


def test_zero_reduces_each_parameter_once_after_the_last_chunk():
    """Every chunk but the last marks the encoder's parameters not ready for ZeRO's reduction;
    afterwards all are ready again."""
    batch = global_batch()
    model = TrainingModel(DualEncoder(tiny_bert()), InfoNCELoss(0.05), cache_chunk_size=CHUNK)
    param = model.encoder.model.encoder.layer[0].attention.self.query.weight
    seen = []
    model.encoder.model.register_forward_hook(lambda *_: seen.append(getattr(param, "ds_grad_is_ready", None)))
    loss = model(**batch)
    chunks = sum(-(-len(ids) // CHUNK) for ids, _ in inputs_of(batch))
    assert len(seen) == chunks  # the pass without graph
    loss.backward()
    assert seen[chunks:] == [False] * (chunks - 1) + [True]  # the re-encoding, chunk by chunk
    assert all(getattr(p, "ds_grad_is_ready", True) for p in model.parameters())


def test_without_grad_mode_it_is_plain_chunked_encoding():
    batch = global_batch()
    encoder = DualEncoder(tiny_bert()).double().eval()
    with torch.no_grad():
        got = cached_embeddings(encoder.encode, inputs_of(batch), CHUNK, list(encoder.parameters()))
        want = [encoder.encode(ids, mask) for ids, mask in inputs_of(batch)]
    assert not any(t.requires_grad for t in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="chunk_size"):
        cached_embeddings(encoder.encode, inputs_of(batch), 0, [])


def test_teacher_stays_frozen_and_in_eval_mode():
    """The distillation teacher: no trainable parameter, eval mode whatever the student's mode,
    and the student's own mode untouched."""
    bert = tiny_bert(0.1)
    model = TrainingModel(DualEncoder(bert), InfoNCELoss(0.05, distill_weight=1.0),
                          teacher=DualEncoder(copy.deepcopy(bert)))
    model.train()
    assert model.encoder.training and not any(m.training for m in model.teacher.modules())
    assert not any(p.requires_grad for p in model.teacher.parameters())
    model.eval()
    assert not model.encoder.training
    model.train()
    loss = model(**global_batch())
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
