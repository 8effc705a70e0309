"""Where tensors run and in which precision: the one place that makes this choice.

Training and evaluation both ask here, so a run never encodes on one device and trains on
another by accident.
"""
from __future__ import annotations

import os

import torch


def default_device() -> torch.device:
    """The first CUDA device if there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def use_bf16(device: torch.device | str) -> bool:
    """bf16 autocast on GPUs that support it; never on CPU (slow there, and no memory gain
    worth the precision loss for evaluation)."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def tell_deepspeed() -> None:
    """Name this device to DeepSpeed (``DS_ACCELERATOR``) before it is imported, instead of
    letting it probe and warn "Setting accelerator to CPU" in every worker of a CPU run."""
    os.environ.setdefault("DS_ACCELERATOR", default_device().type)


def dist_backend(device: torch.device | str) -> str:
    """The torch.distributed backend for ``device``: NCCL between GPUs, gloo on CPU (no oneCCL
    here; DeepSpeed and the gathered-negatives all-gather both work over gloo)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def cpu_threads(cpus_per_worker: float) -> int:
    """Intra-op threads for a worker that owns ``cpus_per_worker`` CPUs (at least one).

    Ray does not set OMP_NUM_THREADS for fractional CPUs, so torch would start one thread
    per core in every worker: two workers on two cores then fight over four threads, and a
    step runs about 3x slower than it should.
    """
    return max(1, int(cpus_per_worker))


def encode_actor_resources(workers: int, cluster: dict) -> dict:
    """Ray resources of one actor of an encoding pool of ``workers`` (``hybridray eval
    --workers``) on a cluster with ``cluster`` resources (``ray.cluster_resources()``): one GPU
    each when the cluster has a GPU for every actor, else CPU encoding; and an equal share of
    the CPUs (a whole number of them when there is one or more per actor: its thread count,
    :func:`cpu_threads`). More actors than GPUs on a GPU cluster is refused, not silently
    run on CPUs."""
    from hybridray.errors import UserError

    gpus, cpus = int(cluster.get("GPU", 0)), float(cluster.get("CPU", 1))
    if 0 < gpus < workers:
        raise UserError(f"--workers {workers}: the cluster has {gpus} GPU(s), one encoding actor per GPU")
    share = cpus / workers
    return {"num_cpus": float(int(share)) if share >= 1 else share, "num_gpus": 1 if gpus else 0}
