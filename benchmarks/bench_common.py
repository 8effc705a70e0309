"""Pieces shared by the trainer benchmarks (``bench_overhead.py``, ``bench_flops.py``): the
demo's config on a fresh MLQA-R split, the pipeline's own batches, a bare PyTorch loop over the
same model, matmul FLOPs of a BERT-style encoder, and the machine's measured GEMM peak.

Not a test helper: every figure these functions produce is printed with its command in
BENCHMARKS.md.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MLQA_R = REPO.parent / "shared" / "data" / "mlqa-r"
LOCAL_YAML = REPO / "configs" / "local.yaml"


# ----------------------------------------------------------------------------- set-up
def prepare(source: Path, work: Path) -> Path:
    """``hybridray data prepare`` of MLQA-R (seed 0, 30% held out) into ``work``; the train split."""
    from hybridray.data.prepare import prepare_lareqa

    out = work / "mlqa-r"
    prepare_lareqa(source, out, heldout_fraction=0.3, seed=0)
    return out / "train"


def demo_config(train_dir: Path, storage: Path, overrides: Sequence[str] = ()):
    """``configs/local.yaml`` (the README demo: e5-small, batch 32, 48/96 tokens, ZeRO-1) on
    ``train_dir``, without held-out evaluation and with a checkpoint only at the end, plus
    ``overrides`` (``KEY=VALUE``)."""
    from hybridray.config import load_config

    return load_config(LOCAL_YAML, [
        f"data.train={train_dir}", "data.heldout=", "train.eval_before=false",
        "train.checkpoint_every=0", f"run.storage_path={storage}", *overrides,
    ])


def collect_batches(config) -> list[dict]:
    """Every step of ``config``'s run as one worker of one gets it (``iter_worker_batches`` with
    ``world_size=1``: the global batch, trimmed to its longest text). Needs Ray up."""
    from hybridray.data.pipeline import build_train_dataset, iter_worker_batches

    dataset, _ = build_train_dataset(config, rejects_path=None)
    return list(iter_worker_batches(dataset, rank=0, world_size=1, stop_step=config.train.max_steps))


def machine() -> dict:
    load = os.getloadavg()
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load": f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def summary(times: Sequence[float]) -> dict:
    """Mean / median / min / max of per-step seconds (mean is the throughput figure)."""
    return {"mean": statistics.fmean(times), "median": statistics.median(times),
            "min": min(times), "max": max(times), "n": len(times)}


# ----------------------------------------------------------------------------- bare loop
def bare_loop(config, batches: Sequence[dict], threads: int) -> list[float]:
    """Seconds per step of a plain PyTorch loop (no Ray, no DeepSpeed) doing what the trainer
    computes: the same ``TrainingModel`` (encoder + InfoNCE with group masking, dropout on),
    AdamW over the same parameter groups, the same LR schedule and gradient clipping, on the
    same batches. The first entry includes the first step's one-off costs."""
    import torch

    from hybridray.engine import TrainingModel, build_optimizer
    from hybridray.train import MODEL_INPUTS

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(config.seed)
        model = TrainingModel.from_config(config)
        model.train()
        optimizer, scheduler = build_optimizer(model, config)
        params = [p for p in model.parameters() if p.requires_grad]
        times = []
        for batch in batches:
            start = time.perf_counter()
            loss = model(**{k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            float(loss)
            times.append(time.perf_counter() - start)
        return times
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- FLOPs
def encoder_shape(name_or_path: str) -> dict:
    from hybridray.models import model_config

    c = model_config(name_or_path)
    return {"hidden": c.hidden_size, "intermediate": c.intermediate_size, "layers": c.num_hidden_layers}


def forward_flops(shape: dict, lengths: np.ndarray, width: int) -> tuple[float, float]:
    """``(real, padded)`` matmul FLOPs of one encoder forward over texts of ``lengths`` tokens
    padded to ``width``: per token per layer the Q, K, V and output projections (4 x 2H^2) and
    the FFN (2 x 2HI); per text per layer the attention scores and their weighted sum
    (2 x 2 L^2 H, L its length). Embedding lookups, LayerNorm, softmax, pooling and the loss's
    small B x N matmul are left out (well under 1% here)."""
    H, I, n = shape["hidden"], shape["intermediate"], shape["layers"]
    per_token = n * (8 * H * H + 4 * H * I)
    per_square = n * 4 * H
    lengths = np.asarray(lengths, dtype=np.float64)
    real = per_token * lengths.sum() + per_square * (lengths ** 2).sum()
    padded = per_token * width * len(lengths) + per_square * width * width * len(lengths)
    return float(real), float(padded)


def step_flops(shape: dict, batch: dict, world_size: int = 1, length_buckets: int = 1) -> dict:
    """Forward + backward (3 x forward) FLOPs of one global step, and its tokens: ``real``
    counts the non-pad tokens, ``padded`` what the run actually encodes -- each rank's slice
    trimmed to its own longest text (``slice_step``), and with ``length_buckets`` > 1 each
    chunk of similar length trimmed to its own (``engine.length_chunks``)."""
    import torch

    from hybridray.engine import length_chunks

    out = {"real": 0.0, "padded": 0.0, "real_tokens": 0, "padded_tokens": 0}
    for side in ("query", "passage", "negative"):
        mask = batch.get(f"{side}_attention_mask")
        if mask is None:
            continue
        mask = torch.as_tensor(mask)
        for part in torch.tensor_split(mask, world_size):
            for rows, cols in length_chunks(part, length_buckets)[1]:
                chunk = part[rows][:, cols]
                lengths = chunk.sum(1).numpy()
                real, padded = forward_flops(shape, lengths, chunk.shape[1])
                out["real"] += 3 * real
                out["padded"] += 3 * padded
                out["real_tokens"] += int(lengths.sum())
                out["padded_tokens"] += int(chunk.numel())
    return out


def mean_step_flops(shape: dict, batches: Sequence[dict], **kwargs) -> dict:
    per = [step_flops(shape, b, **kwargs) for b in batches]
    return {k: statistics.fmean(p[k] for p in per) for k in per[0]}


def gemm_peak(threads: int, n: int = 2048, reps: int = 10) -> dict:
    """Dense fp32 matmul rate of this machine: ``torch.mm`` of two n x n matrices on
    ``threads`` threads, best and median of ``reps`` (after 2 warm-up products)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        c = torch.empty(n, n)
        for _ in range(2):
            torch.mm(a, b, out=c)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            torch.mm(a, b, out=c)
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    flops = 2.0 * n ** 3
    return {"best": flops / min(times), "median": flops / statistics.median(times), "threads": threads, "n": n}


def gflops(x: Optional[float]) -> str:
    return "–" if x is None else f"{x / 1e9:.1f}"
