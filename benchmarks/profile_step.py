"""Where does a trainer step's time go? Timing spans of one step, three ways, one process:

* **bare** -- ``bench_common.bare_loop``'s computation, spans: forward, backward,
  clip + AdamW + schedule;
* **engine ZeRO-0 / ZeRO-1** -- the DeepSpeed engine ``train_func`` builds
  (``engine.build_engine``, a process group of one), fed the same batches, spans: forward
  (``engine(...)``), ``engine.backward``, ``engine.step``, and the per-step extras of
  ``train_func`` (``clamp_temperature``, the loss and token all-reduces, ``groups_digest``);
* **trainer** (``--trainer``) -- ``run_training`` on one worker, with the CPU seconds every
  process on the machine used during its steady steps (psutil, sampled every 0.5 s): what the
  train worker itself used, and what everything else (the driver, Ray's daemons, other
  users) took from the same cores.

Run (from the repository root; about 6 minutes on 2 cores)::

    flock /tmp/hybridray-heavy.lock .venv/bin/python benchmarks/profile_step.py --trainer
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import MLQA_R, collect_batches, demo_config, machine, prepare  # noqa: E402


def spans_bare(config, batches, threads: int) -> dict[str, list[float]]:
    import torch

    from hybridray.engine import TrainingModel, build_optimizer
    from hybridray.train import MODEL_INPUTS

    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    model = TrainingModel.from_config(config)
    model.train()
    optimizer, scheduler = build_optimizer(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    spans = defaultdict(list)
    for batch in batches:
        t0 = time.perf_counter()
        loss = model(**{k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None})
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        float(loss.detach())
        t3 = time.perf_counter()
        for name, a, b in (("forward", t0, t1), ("backward", t1, t2), ("step", t2, t3), ("total", t0, t3)):
            spans[name].append(b - a)
    return spans


def spans_engine(config, batches, threads: int) -> dict[str, list[float]]:
    import torch

    from hybridray.distributed import all_reduce_mean, groups_digest
    from hybridray.engine import TrainingModel, build_engine, clamp_temperature
    from hybridray.train import MODEL_INPUTS

    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    engine = build_engine(TrainingModel.from_config(config), config, 1)
    spans = defaultdict(list)
    for batch in batches:
        t0 = time.perf_counter()
        loss = engine(**{k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None})
        t1 = time.perf_counter()
        engine.backward(loss)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        clamp_temperature(engine)
        float(all_reduce_mean(loss))
        groups_digest(batch["group_ids"], batch["query_langs"], batch["passage_langs"], batch.get("negative_group_ids"))
        int(all_reduce_mean((batch["query_attention_mask"].sum() + batch["passage_attention_mask"].sum()).float()))
        t4 = time.perf_counter()
        for name, a, b in (("forward", t0, t1), ("backward", t1, t2), ("step", t2, t3), ("extras", t3, t4), ("total", t0, t4)):
            spans[name].append(b - a)
    engine.destroy()
    return spans


class CpuSampler:
    """CPU seconds of every process on the machine, sampled every ``every`` seconds."""

    def __init__(self, every: float = 0.5):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            snap = {}
            for p in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
                try:
                    t = p.info["cpu_times"]
                    label = " ".join(p.info["cmdline"] or [p.info["name"] or "?"])[:70]
                    snap[p.info["pid"]] = (label, t.user + t.system)
                except Exception:
                    continue
            self.samples.append((time.time(), snap))
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def between(self, a: float, b: float) -> dict[str, float]:
        """CPU seconds per process label between the samples nearest to times ``a`` and ``b``."""
        first = min(self.samples, key=lambda s: abs(s[0] - a))
        last = min(self.samples, key=lambda s: abs(s[0] - b))
        used = defaultdict(float)
        for pid, (label, cpu) in last[1].items():
            used[label] += cpu - (first[1][pid][1] if pid in first[1] else 0.0)  # new ones: all of it
        return dict(used), last[0] - first[0]


def trainer_cpu(config, warmup: int) -> dict:
    from hybridray.train import run_training

    with CpuSampler() as sampler:
        run_training(config, overwrite=True)
    path = Path(config.run.storage_path) / config.name / "metrics.jsonl"
    ends = [json.loads(line)["time"] for line in path.read_text().splitlines() if line.strip()]
    used, window = sampler.between(ends[warmup - 1], ends[-1])
    steps = len(ends) - warmup
    return {"used": used, "window": window, "s_per_step": (ends[-1] - ends[warmup - 1]) / steps}


def show(name: str, spans: dict[str, list[float]], warmup: int) -> str:
    cells = [f"{k} {statistics.fmean(v[warmup:]):.3f}" for k, v in spans.items()]
    return f"{name:>12}: " + ", ".join(cells) + " (s, mean over steady steps)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trainer", action="store_true", help="also run_training with a CPU sampler")
    args = ap.parse_args()

    import ray

    from hybridray.device import tell_deepspeed
    from hybridray.train import init_ray

    tell_deepspeed()
    work = Path(tempfile.mkdtemp(prefix="profile-step-"))
    lines = [f"machine: {machine()}"]
    try:
        train_dir = prepare(MLQA_R, work)
        init_ray(num_cpus=args.threads + 1)
        one = [f"train.max_steps={args.steps}", "scaling.num_workers=1", f"scaling.cpus_per_worker={args.threads}"]
        configs = {k: demo_config(train_dir, work / "runs", [*one, f"deepspeed.zero_stage={k}", f"name=profile-z{k}"])
                   for k in (0, 1)}
        batches = collect_batches(configs[0])
        lines.append(show("bare", spans_bare(configs[0], batches, args.threads), args.warmup))
        for k in (0, 1):
            lines.append(show(f"engine z{k}", spans_engine(configs[k], batches, args.threads), args.warmup))
        lines.append(show("bare", spans_bare(configs[0], batches, args.threads), args.warmup))
        if args.trainer:
            result = trainer_cpu(configs[0], args.warmup)
            top = sorted(result["used"].items(), key=lambda kv: -kv[1])[:12]
            lines.append(f"trainer z0: {result['s_per_step']:.3f} s/step steady; CPU seconds over "
                         f"{result['window']:.1f} s of steady steps (2 cores = {2 * result['window']:.1f} CPU-s):")
            lines.extend(f"    {cpu:7.2f}  {label}" for label, cpu in top)
            lines.append(f"    total {sum(result['used'].values()):.2f}")
        lines.append(f"machine: {machine()}")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
