"""Encoding split over the ranks of a process group (held-out evaluation inside training).

Every rank encodes one contiguous shard of the texts, the shards are gathered in rank order,
and every rank ends with all embeddings in input order; the caller scores once (rank 0).
The gather pads each shard to the longest (``hybridray.distributed.all_gather_no_grad``), so
it works over gloo and NCCL alike.

Under ZeRO-3 each layer's forward gathers that layer's partitioned weights collectively, so
every rank must run exactly as many forward passes as every other: a rank whose shard needs
fewer batches (or has no text at all) runs the missing ones on one empty text and throws the
result away (``lockstep``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

#: The text of a filler forward pass (a rank with fewer batches than the others, ZeRO-3).
FILLER = ""


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s contiguous shard of ``n`` items: sizes differ by at
    most one, the first ``n % world`` ranks take one more."""
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def encode_sharded(model, tokenizer, texts: Sequence[str], *, prefix: str, lockstep: bool,
                   batch_size: int, **encode) -> np.ndarray:
    """``encode_texts`` of ``texts`` with the work split over the process group (collective:
    every rank calls it with the same texts). Returns ``[len(texts), dim]`` on every rank,
    rows in input order; each distinct text is encoded by one rank once, so equal texts get
    bit-identical vectors. ``lockstep``: every rank runs the same number of forward passes
    (ZeRO-3). Without a process group (or with one rank) it is ``encode_texts``."""
    import torch

    from hybridray.distributed import all_gather_no_grad, rank, world_size
    from hybridray.evaluate.encode import distinct, encode_texts

    world = world_size()
    if world == 1:
        return encode_texts(model, tokenizer, texts, prefix=prefix, batch_size=batch_size, **encode)
    texts, where = distinct(texts)  # each distinct text on one rank only: equal texts, equal vectors
    lo, hi = shard_bounds(len(texts), world, rank())
    own = list(texts[lo:hi])
    passes = math.ceil(len(own) / batch_size)
    if own:
        local = encode_texts(model, tokenizer, own, prefix=prefix, batch_size=batch_size, **encode)
    else:  # one filler pass tells this rank the embedding width
        local = encode_texts(model, tokenizer, [FILLER], prefix=prefix, batch_size=batch_size, **encode)[:0]
        passes = 1
    if lockstep:  # rank 0 holds the largest shard, so it needs the most passes
        most = max(1, math.ceil(shard_bounds(len(texts), world, 0)[1] / batch_size))
        for _ in range(most - passes):
            encode_texts(model, tokenizer, [FILLER], prefix=prefix, batch_size=batch_size, **encode)
    device = next(model.parameters()).device  # NCCL gathers CUDA tensors, gloo CPU ones
    return all_gather_no_grad(torch.from_numpy(local).to(device)).cpu().numpy()[where]
