"""Where does a trainer step's time go? Timing spans of one step, in one process, no Ray Train:

* **bare** -- ``bench_common.bare_loop``'s computation, spans: forward, backward,
  clip + AdamW + schedule;
* **engine** -- the DeepSpeed engine ``train_func`` builds (``engine.build_engine``, a
  process group of one) on the same batches: ZeRO-0 as hybridray builds it now
  (``engine.skip_needless_work``), ZeRO-0 with DeepSpeed's own path put back (backward
  all-reduce over a group of one, DeepSpeed's ``clip_grad_norm_``), and ZeRO-1. Spans:
  forward, ``engine.backward`` (and inside it ``allreduce_gradients``), ``engine.step`` (and
  inside it the clip, ``optimizer.step``, ``zero_grad``, the LR step), and ``train_func``'s
  per-step extras (``clamp_temperature``, the loss and token all-reduces, ``groups_digest``).

Every span records wall time and the main thread's CPU time (``time.thread_time``); a span
whose wall time is far above its thread time was waiting (preempted, or for other threads),
not computing. Medians and maxima over the steady steps are printed, not only means. Then
three pieces alone on e5-small's trainable gradients, 20 repetitions each (median): torch's
vs DeepSpeed's gradient clipping, DeepSpeed's backward all-reduce on one rank, and AdamW's
step with ``foreach`` off (torch's CPU default) and on. And the torch thread count before and
after ``build_engine``.

Run (from the repository root; about 5 minutes on 2 cores)::

    flock /tmp/hybridray-heavy.lock .venv/bin/python benchmarks/profile_step.py
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import MLQA_R, collect_batches, demo_config, machine, prepare  # noqa: E402


class Spans:
    """Wall and main-thread CPU seconds of named spans, one entry per step."""

    def __init__(self):
        self.wall, self.cpu = defaultdict(list), defaultdict(list)
        self._step = defaultdict(lambda: [0.0, 0.0])

    @contextmanager
    def __call__(self, name: str):
        w, c = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            acc = self._step[name]
            acc[0] += time.perf_counter() - w
            acc[1] += time.thread_time() - c

    def wrap(self, obj, attr: str, name: str) -> None:
        """Time every call of ``obj.attr`` as span ``name``."""
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            with self(name):
                return inner(*args, **kwargs)

        setattr(obj, attr, timed)

    def end_step(self) -> None:
        for name, (w, c) in self._step.items():
            self.wall[name].append(w)
            self.cpu[name].append(c)
        self._step.clear()

    def table(self, title: str, warmup: int) -> list[str]:
        lines = [f"{title}:"]
        for name in self.wall:
            w, c = self.wall[name][warmup:], self.cpu[name][warmup:]
            lines.append(f"    {name:<28} wall median {statistics.median(w):7.3f} max {max(w):7.3f} | "
                         f"thread CPU median {statistics.median(c):7.3f} max {max(c):7.3f}  (s, {len(w)} steps)")
        return lines


def model_inputs(batch):
    from hybridray.train import MODEL_INPUTS

    return {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}


def spans_bare(config, batches, threads: int) -> Spans:
    import torch

    from hybridray.engine import TrainingModel, build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    model = TrainingModel.from_config(config)
    model.train()
    optimizer, scheduler = build_optimizer(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    spans = Spans()
    for batch in batches:
        with spans("total"):
            with spans("forward"):
                loss = model(**model_inputs(batch))
            with spans("backward"):
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            with spans("step"):
                with spans("  clip (torch)"):
                    torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
                with spans("  optimizer.step"):
                    optimizer.step()
                scheduler.step()
                float(loss.detach())
        spans.end_step()
    return spans


def spans_engine(config, batches, threads: int, deepspeed_path: bool = False) -> tuple[Spans, tuple[int, int]]:
    """Spans of the engine; ``deepspeed_path`` undoes ``skip_needless_work`` (ZeRO-0)."""
    import torch

    from hybridray.distributed import all_reduce_mean, groups_digest
    from hybridray.engine import TrainingModel, build_engine, clamp_temperature

    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    before = torch.get_num_threads()
    engine = build_engine(TrainingModel.from_config(config), config, 1)
    threads_after = torch.get_num_threads()
    if deepspeed_path:
        engine.enable_backward_allreduce = True
        vars(engine).pop("clip_fp32_gradients", None)  # DeepSpeed's own method again
    spans = Spans()
    spans.wrap(engine, "allreduce_gradients", "  allreduce_gradients")
    spans.wrap(engine, "clip_fp32_gradients", "  clip")
    spans.wrap(engine.optimizer, "step", "  optimizer.step")
    spans.wrap(engine, "zero_grad", "  zero_grad")
    spans.wrap(engine.lr_scheduler, "step", "  lr_scheduler.step")
    for batch in batches:
        with spans("total"):
            with spans("forward"):
                loss = engine(**model_inputs(batch))
            with spans("engine.backward"):
                engine.backward(loss)
            with spans("engine.step"):
                engine.step()
            with spans("extras"):
                clamp_temperature(engine)
                float(all_reduce_mean(loss))
                groups_digest(batch["group_ids"], batch["query_langs"], batch["passage_langs"],
                              batch.get("negative_group_ids"))
                int(all_reduce_mean((batch["query_attention_mask"].sum() + batch["passage_attention_mask"].sum()).float()))
        spans.end_step()
    engine.destroy()
    return spans, (before, threads_after)


def pieces(config, threads: int, reps: int = 20) -> list[str]:
    """The step's pieces alone on e5-small's trainable parameters with random gradients."""
    import torch
    from deepspeed.runtime.utils import clip_grad_norm_ as ds_clip

    from hybridray.engine import TrainingModel, build_engine, build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    engine = build_engine(TrainingModel.from_config(config), config, 1)
    params = [p for p in engine.module.parameters() if p.requires_grad]

    def fill():
        for p in params:
            p.grad = torch.randn_like(p) * 1e-2

    def timed(fn, prepare=fill) -> tuple[float, float]:
        wall, cpu = [], []
        for _ in range(reps):
            prepare()
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
        return statistics.median(wall), statistics.median(cpu)

    rows = {
        "clip: torch clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, 1.0),
        "clip: DeepSpeed clip_grad_norm_": lambda: ds_clip(params, 1.0),
    }
    engine.enable_backward_allreduce = True
    rows["DeepSpeed allreduce_gradients (1 rank)"] = engine.allreduce_gradients
    keep = []  # LambdaLR's step wrapper holds its optimizer by weak reference only
    for foreach in (False, True):
        optimizer, scheduler = build_optimizer(engine.module, config)
        for group in optimizer.param_groups:
            group["foreach"] = foreach
        keep.append((optimizer, scheduler))
        rows[f"AdamW.step foreach={foreach}"] = optimizer.step
    lines = [f"pieces alone ({sum(p.numel() for p in params) / 1e6:.1f}M trainable values in {len(params)} "
             f"tensors, {threads} threads, median of {reps}; wall / process CPU):"]
    for name, fn in rows.items():
        w, c = timed(fn)
        lines.append(f"    {name:<40} {w * 1e3:7.1f} ms / {c * 1e3:7.1f} ms")
    engine.destroy()
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import ray

    from hybridray.device import tell_deepspeed
    from hybridray.train import init_ray

    tell_deepspeed()
    work = Path(tempfile.mkdtemp(prefix="profile-step-"))
    lines = [f"machine: {machine()}",
             f"command: flock /tmp/hybridray-heavy.lock .venv/bin/python benchmarks/profile_step.py "
             f"--steps {args.steps} --warmup {args.warmup} --threads {args.threads}"]
    try:
        train_dir = prepare(MLQA_R, work)
        one = [f"train.max_steps={args.steps}", "scaling.num_workers=1", f"scaling.cpus_per_worker={args.threads}"]
        configs = {k: demo_config(train_dir, work / "runs", [*one, f"deepspeed.zero_stage={k}", f"name=profile-z{k}"])
                   for k in (0, 1)}
        init_ray(num_cpus=args.threads + 1)
        try:
            batches = collect_batches(configs[0])
        finally:
            ray.shutdown()  # the loops below run without Ray
        lines += pieces(configs[0], args.threads)
        lines += spans_bare(configs[0], batches, args.threads).table("bare", args.warmup)
        for title, k, ds_path in (("engine ZeRO-0, DeepSpeed's own path", 0, True),
                                  ("engine ZeRO-0, as hybridray builds it", 0, False),
                                  ("engine ZeRO-1", 1, False)):
            spans, threads = spans_engine(configs[k], batches, args.threads, ds_path)
            lines += spans.table(f"{title} (torch threads {threads[0]} before build_engine, {threads[1]} after)",
                                 args.warmup)
        lines += spans_bare(configs[0], batches, args.threads).table("bare (again)", args.warmup)
        lines.append(f"machine: {machine()}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
