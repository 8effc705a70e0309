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


#: CPUs of the driver's node left to the driver (Ray Data reads, the running top-k merges).
DRIVER_CPUS = 0.5


def encode_actor_resources(workers: int, nodes: list[dict], driver_node: str = "") -> dict:
    """Ray resources of one actor of an encoding pool of ``workers`` (``hybridray eval
    --workers``), sized per node (``ray.nodes()``; an actor lives on one node), with
    :data:`DRIVER_CPUS` of the driver's node (``driver_node``, a node id) left free. One GPU
    each when the cluster has a GPU for every actor, with the CPUs every GPU node can give per
    GPU; else the largest equal share of CPUs (whole CPUs when one or more: its thread count,
    :func:`cpu_threads`) such that ``workers`` actors fit on the nodes. More actors than
    GPUs, or than the cluster has whole CPUs (each actor runs a thread and loads the model), or
    than the CPUs can hold, is a UserError naming ``--workers``, never a pool that waits
    forever for an actor no node can host, nor 150 model copies on two cores."""
    from hybridray.errors import UserError

    free, whole = [], 0.0  # (cpus, gpus) of each live node; the live nodes' CPUs before the driver's share
    for node in nodes:
        if not node.get("Alive", True):
            continue
        resources = node.get("Resources", {})
        whole += float(resources.get("CPU", 0))
        cpus = float(resources.get("CPU", 0)) - (DRIVER_CPUS if node.get("NodeID") == driver_node else 0)
        free.append((max(cpus, 0.0), int(resources.get("GPU", 0))))
    gpus = sum(g for _, g in free)
    if 0 < gpus < workers:
        raise UserError(f"--workers {workers}: the cluster has {gpus} GPU(s), one encoding actor per GPU")
    if gpus:
        share = min(c / g for c, g in free if g)
        return {"num_cpus": float(int(share)) if share >= 1 else share, "num_gpus": 1}

    whole = int(whole + 1e-9)
    if workers > whole:  # each actor runs at least one thread and holds its own copy of the model
        raise UserError(f"--workers {workers}: the cluster has {whole} CPU(s) and no GPU; each encoding actor "
                        f"runs at least one thread and loads its own copy of the model: use at most {whole}")

    def fits(share: float) -> bool:
        return sum(int(c / share + 1e-9) for c, _ in free) >= workers

    candidates = [c / m for c, _ in free for m in range(1, workers + 1) if c > 0]
    feasible = [s for s in candidates if fits(s)]
    if not feasible or max(feasible) < 0.01:
        cpus = sum(c for c, _ in free)
        raise UserError(f"--workers {workers}: the cluster has {cpus:g} free CPU(s) for encoding actors "
                        f"(after {DRIVER_CPUS} for the driver); use fewer workers")
    share = max(feasible)
    return {"num_cpus": float(int(share)) if share >= 1 else share, "num_gpus": 0}
