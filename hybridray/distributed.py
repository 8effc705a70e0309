"""Distributed primitives, each proven once and reused (contriever ``dist_utils`` style).

Everything here is the identity when torch.distributed is not initialised or has one
process, so single-process code (tests, evaluation, notebooks) runs the same functions.
"""
from __future__ import annotations

from typing import Optional

import datetime
import os
import socket

import torch
import torch.distributed as dist

from hybridray.device import default_device, dist_backend


def is_distributed() -> bool:
    """True when a process group is up (Ray Train, DeepSpeed or the helpers below)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_world_size() -> int:
    """Processes of this job on this node (launchers and Ray Train set ``LOCAL_WORLD_SIZE``)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, keeping the autograd graph.

    The backward sums, over all ranks, the gradients that reach each slice and hands the sum
    to the slice's owner, so negatives scored on other ranks still train the encoder that
    produced them (see ``InfoNCELoss`` for why the local loss needs no extra scaling).
    Every rank must pass the same shape.

    torch's functional ``all_gather_single`` (the non-deprecated collective of torch 2.13, with
    autograd; ``torch.distributed.nn.functional.all_gather`` is deprecated), proven against a
    single process over gloo by ``tests/test_distributed_equivalence.py``.
    """
    if world_size() == 1:
        return tensor
    from torch.distributed._functional_collectives import all_gather_single

    return all_gather_single(tensor.contiguous(), 0, dist.group.WORLD)


def all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, without gradients.

    Sizes along dim 0 may differ between ranks (each rank's slice is padded to the largest,
    gathered, then trimmed); any dtype works (group ids, labels, lengths).
    """
    if world_size() == 1:
        return tensor.detach()
    tensor = tensor.detach().contiguous()
    n = world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:s] for g, s in zip(gathered, sizes)], dim=0)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks, without gradients (for logging a global quantity)."""
    tensor = tensor.detach().clone()
    if world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


# ----------------------------------------------------------------------------- set-up
def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_process_group(
    rank: int,
    world_size: int,
    port: int,
    backend: str | None = None,
    timeout_s: float = 300.0,
) -> None:
    """Join a process group on 127.0.0.1 (tests, benchmarks, standalone runs).

    Also sets the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` variables that DeepSpeed
    reads, as a launcher would. The timeout turns a hang (one rank crashed) into an error.
    """
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
    }
    os.environ.update(env)
    dist.init_process_group(
        backend or dist_backend(default_device()),
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def init_standalone() -> None:
    """A process group of one on a free loopback port, unless one is already up.

    DeepSpeed needs a process group even for one process; under Ray Train one exists already
    and is reused.
    """
    if not is_distributed():
        init_process_group(0, 1, free_port())


def groups_digest(group_ids: torch.Tensor, query_langs=(), passage_langs=(),
                  negative_group_ids: Optional[torch.Tensor] = None) -> str:
    """A digest of what every rank trained in one step (collective): the group ids, the query
    and passage language of each pair and the hard negatives' groups. Each rank hashes its rank
    and its slice; the sum over ranks identifies the step's whole global batch. Two runs
    trained the same pairs at a step iff their digests agree (up to 48-bit collisions)."""
    import hashlib

    import numpy as np

    def ids(tensor) -> bytes:
        return np.ascontiguousarray(tensor.cpu().numpy(), dtype="<i8").tobytes()

    langs = "|".join([" ".join(query_langs), " ".join(passage_langs)]).encode()
    negatives = ids(negative_group_ids) if negative_group_ids is not None else b""
    own = hashlib.sha256(rank().to_bytes(4, "little") + ids(group_ids) + b"\0" + langs + b"\0" + negatives).digest()
    total = torch.tensor([int.from_bytes(own[:6], "little")], dtype=torch.int64)
    if is_distributed():
        dist.all_reduce(total)
    return f"{int(total.item()) & ((1 << 48) - 1):012x}"
