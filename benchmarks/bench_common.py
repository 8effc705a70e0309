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
        "train.checkpoint_every=0", f"run.storage_path={storage}",
        # the plain recipe these benchmarks were published with (local.yaml's defaults now add
        # hard negatives, distillation and length buckets: BENCHMARKS.md, the recipe table)
        "loss.hard_negatives=0", "loss.distill_weight=0", "model.length_buckets=1", *overrides,
    ])


def collect_batches(config) -> list[dict]:
    """Every step of ``config``'s run as one worker of one gets it (``iter_worker_batches`` with
    ``world_size=1``: the global batch, trimmed to its longest text). Needs Ray up."""
    from hybridray.data.pipeline import build_train_dataset, iter_worker_batches

    dataset, _ = build_train_dataset(config, rejects_path=None)
    return list(iter_worker_batches(dataset, rank=0, world_size=1, stop_step=config.train.max_steps))


def cpu_model() -> str:
    """The CPU's model name and its SIMD level from /proc/cpuinfo, and whether the logical
    CPUs are SMT siblings of one core."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    name = fields.get("model name\t", "").strip() or platform.machine()
    flags = fields.get("flags\t\t", "").split()
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    siblings, cores = fields.get("siblings\t", "").strip(), fields.get("cpu cores\t", "").strip()
    smt = "SMT siblings" if siblings and cores and int(siblings) > int(cores) else "no SMT siblings"
    mhz = fields.get("cpu MHz\t\t", "").strip()
    mhz = f", {float(mhz):.0f} MHz as the VM reports it" if mhz else ""
    return f"{name}, {simd}, {os.cpu_count()} logical CPUs ({smt}{mhz})"


def clock_mhz() -> float:
    """The CPU clock /proc/cpuinfo reports (MHz), 0 if unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return 0.0


def machine() -> dict:
    import ray
    import torch

    try:
        import deepspeed
        ds = deepspeed.__version__
    except Exception:  # noqa: BLE001 - only a label
        ds = "not importable"
    load = os.getloadavg()
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "versions": f"torch {torch.__version__}, DeepSpeed {ds}, Ray {ray.__version__}",
        "load": f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def describe(m: dict) -> str:
    """One line for a section's 'Machine:' paragraph."""
    return f"{m['cpu']}; Python {m['python']}, {m['versions']}"


# ----------------------------------------------------------------------------- CPU sampler
class MachineSampler:
    """Cumulative CPU seconds of every process on the machine, by category, sampled every
    ``every`` seconds by a separate process (so the sampling costs neither this process nor
    the workers, and its own CPU is left out): ``worker`` (Ray Train workers started by this
    process), ``driver`` (this process), ``ours`` (the rest of this process's tree: Ray's
    daemons, Ray Data tasks, the Train controller), ``others`` (everything else on the
    machine: other users, the VM)."""

    CATEGORIES = ("worker", "driver", "ours", "others")

    def __init__(self, path: Path, every: float = 0.5):
        self.path, self.every, self.process = Path(path), every, None

    def __enter__(self):
        import subprocess
        import sys

        self.process = subprocess.Popen([sys.executable, __file__, "--sample", str(self.path),
                                         str(self.every), str(os.getpid())])
        deadline = time.time() + 30
        while not (self.path.exists() and self.path.read_text().count("\n") >= 1) and time.time() < deadline:
            time.sleep(0.1)
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(10)

    def between(self, a: float, b: float) -> dict[str, float]:
        """CPU seconds per category between wall-clock times ``a`` and ``b`` (linear
        interpolation between the samples around each)."""
        import json

        deadline = time.time() + 10 * self.every + 10
        while True:  # the sampler's last sample may still be older than b
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            if rows[-1][0] >= b or time.time() > deadline:
                break
            time.sleep(self.every)
        times = np.array([r[0] for r in rows])
        if a < times[0] or b > times[-1]:
            raise RuntimeError(f"sampler covers {times[0]:.1f}..{times[-1]:.1f}, asked {a:.1f}..{b:.1f}")
        return {c: float(np.interp(b, times, [r[1 + i] for r in rows]) - np.interp(a, times, [r[1 + i] for r in rows]))
                for i, c in enumerate(self.CATEGORIES)}


def _sample(path: str, every: float, root_pid: int) -> None:
    """The sampler process of ``MachineSampler`` (run as ``bench_common.py --sample``)."""
    import json

    import psutil

    me = os.getpid()
    seen: dict[int, float] = {}
    totals = dict.fromkeys(MachineSampler.CATEGORIES, 0.0)
    first = True
    with open(path, "w") as out:
        while True:
            try:
                tree = {p.pid for p in psutil.Process(root_pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                return
            now = {}
            for p in psutil.process_iter(["pid", "cmdline", "cpu_times"]):
                try:
                    if p.info["pid"] == me or p.info["cpu_times"] is None:
                        continue
                    t = p.info["cpu_times"]
                    pid, cpu = p.info["pid"], t.user + t.system
                    now[pid] = cpu
                    if first:
                        continue
                    if pid == root_pid:
                        kind = "driver"
                    elif pid in tree:
                        kind = "worker" if "RayTrainWorker" in " ".join(p.info["cmdline"] or []) else "ours"
                    else:
                        kind = "others"
                    totals[kind] += cpu - seen.get(pid, 0.0)  # a new process: all of its CPU so far
                except (psutil.Error, TypeError):
                    continue
            seen, first = now, False
            out.write(json.dumps([time.time(), *totals.values()]) + "\n")
            out.flush()
            time.sleep(every)


def summary(times: Sequence[float]) -> dict:
    """Mean / median / min / max of per-step seconds (mean is the throughput figure)."""
    return {"mean": statistics.fmean(times), "median": statistics.median(times),
            "min": min(times), "max": max(times), "n": len(times)}


# ----------------------------------------------------------------------------- bare loop
def bare_loop(config, batches: Sequence[dict], threads: int, clock: Optional[dict] = None) -> list[float]:
    """Seconds per step of a plain PyTorch loop (no Ray, no DeepSpeed) doing what the trainer
    computes: the same ``TrainingModel`` (encoder + InfoNCE with group masking, dropout on),
    AdamW over the same parameter groups, the same LR schedule and gradient clipping, on the
    same batches. The first entry includes the first step's one-off costs. ``clock``, if
    given, receives ``ends`` (wall-clock time at each step's end) and ``cpu`` (this process's
    CPU seconds, ``time.process_time``, of each step)."""
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
        times, ends, cpu = [], [], []
        for batch in batches:
            start, start_cpu = time.perf_counter(), time.process_time()
            loss = model(**{k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
            optimizer.step()
            scheduler.step()
            float(loss)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            ends.append(time.time())
        if clock is not None:
            clock.update(ends=ends, cpu=cpu)
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


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 5 and sys.argv[1] == "--sample":
        _sample(sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
