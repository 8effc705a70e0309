"""Gradient caching: the contrastive loss of a large batch with the encoder activation memory of
a small one (GradCache, Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup"; sentence-transformers' ``CachedMultipleNegativesRankingLoss``).

The loss depends on the encoder only through the embeddings, so its parameter gradient is
``sum_chunks (dL/dE_chunk) . (dE_chunk/dtheta)``. ``cached_embeddings``:

1. encodes every input chunk by chunk **without graph**, remembering the RNG state before each
   chunk (``RandContext``), and returns the embeddings as one leaf tensor: the loss (gathered
   across workers as usual) is then built on it, with its own small graph;
2. when the backward pass reaches that leaf, its hook has ``dL/dE`` for the whole local batch;
   it re-encodes each chunk **with graph**, replaying that chunk's RNG state so that dropout
   draws the very masks of step 1, and pushes the chunk's slice of ``dL/dE`` through it
   (``torch.autograd.backward(E_chunk, grad)``), freeing the chunk's graph before the next.

All of it happens inside the one ``engine.backward(loss)`` of a step, so DeepSpeed reduces,
clips and steps once per global batch as without caching. A parameter's gradient now builds
up over several nested backward passes; ZeRO-2 and ZeRO-3 reduce in gradient hooks and would
reduce it at the first, so every chunk but the last marks the encoder's parameters
``ds_grad_is_ready = False`` (DeepSpeed's switch for tiled computations, as its ``TiledMLP``
does) and the last marks them ready again (ZeRO-1 without ``overlap_comm`` reduces only after
the backward). This relies on a DeepSpeed 0.19.8 internal: ``engine.backward`` queues ZeRO's
post-backward callback once, on the outer graph task, so the nested chunk backwards do not
run the epilogue early; a DeepSpeed upgrade must rerun the test below.

``tests/test_distributed_equivalence.py`` proves the applied gradient equal to that of the
uncached loss under the same dropout masks, on 1 and 2 workers, under ZeRO-0/1/2/3 (ZeRO-3
with every parameter partitioned), unclipped (the scale) and clipped.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence

import torch
from torch.utils.checkpoint import get_device_states, set_device_states


class RandContext:
    """The RNG state (CPU, and every CUDA device the ``tensors`` live on) at creation;
    ``replay()`` runs a block from that state and leaves the RNG as it found it."""

    def __init__(self, *tensors: torch.Tensor):
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)

    @contextlib.contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=self.devices, enabled=True):
            torch.set_rng_state(self.cpu_state)
            set_device_states(self.devices, self.device_states)
            yield


def _mark_ready(params: Iterable[torch.nn.Parameter], ready: bool) -> None:
    for param in params:
        param.ds_grad_is_ready = ready


def encode_in_chunks(
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    chunk_size: int,
) -> list[torch.Tensor]:
    """``[encode(ids, mask) for ids, mask in inputs]``, ``chunk_size`` rows per call (0 = all
    rows at once); graph or not as the caller's grad mode says."""
    out = []
    for ids, mask in inputs:
        step = chunk_size or len(ids)
        out.append(torch.cat([encode(ids[s:s + step], mask[s:s + step]) for s in range(0, len(ids), step)]))
    return out


def cached_embeddings(
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    chunk_size: int,
    params: Sequence[torch.nn.Parameter],
) -> list[torch.Tensor]:
    """``[encode(ids, mask) for ids, mask in inputs]`` computed ``chunk_size`` rows at a time
    without graph; the backward pass re-encodes each chunk with graph (see the module).

    ``params`` are the trainable parameters ``encode`` uses (marked not-ready for ZeRO until
    the last chunk). Outside grad mode this is plain chunked encoding."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunks = []  # (input index, start, end, RNG state before the chunk)
    pieces = []
    with torch.no_grad():
        for index, (ids, mask) in enumerate(inputs):
            for start in range(0, len(ids), chunk_size):
                end = min(start + chunk_size, len(ids))
                chunks.append((index, start, end, RandContext(ids)))
                pieces.append(encode(ids[start:end], mask[start:end]))
    sizes = [len(ids) for ids, _ in inputs]
    if not torch.is_grad_enabled():
        return list(torch.cat(pieces).split(sizes))
    cache = torch.cat(pieces).requires_grad_()

    def backpropagate(grad: torch.Tensor) -> None:
        offset = 0
        try:
            with torch.enable_grad():
                for n, (index, start, end, rng) in enumerate(chunks):
                    _mark_ready(params, n == len(chunks) - 1)
                    ids, mask = inputs[index]
                    with rng.replay():
                        embeddings = encode(ids[start:end], mask[start:end])
                    torch.autograd.backward(embeddings, grad[offset:offset + end - start])
                    offset += end - start
        finally:
            _mark_ready(params, True)

    cache.register_hook(backpropagate)
    return list(cache.split(sizes))
