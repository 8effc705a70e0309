"""What does the machinery cost? ``hybridray train`` against a bare PyTorch loop, one run.

Side by side, on one Ray cluster and the same batches (the pipeline's own, tokenised and
trimmed as one worker of one receives them):

* **bare** -- ``bench_common.bare_loop``: the same ``TrainingModel`` (e5-small + InfoNCE),
  AdamW, LR schedule and clipping in a plain loop, no Ray Train, no DeepSpeed; run before and
  after the two single-worker trainer runs, so drift of the shared machine shows;
* **trainer, 1 worker, ZeRO-0 / ZeRO-1** -- ``hybridray.train.run_training`` (what
  ``hybridray train`` calls) with ``configs/local.yaml`` on one worker with the same threads;
* **trainer, 2 workers x 1 thread, ZeRO-1** against the 1 worker x 2 threads run.

The trainer's step times are its own: the ``time`` of each step in the run's
``metrics.jsonl`` (rank 0's wall clock when the step's update is done; everything in the loop
counts: fetching the batch, forward, backward, DeepSpeed's step, the logging collectives,
``ray.train.report`` every ``train.log_every`` steps). Steady state drops the first
``--warmup`` steps. Launch-to-first-step (Ray Train workers, model load, DeepSpeed, the data
stream's start, step 1) is reported apart, and so is ``ray.init``.

Run (from the repository root; it takes about 10 minutes on 2 cores)::

    flock /tmp/hybridray-heavy.lock .venv/bin/python benchmarks/bench_overhead.py --out benchmarks/RESULTS-overhead.md
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    MLQA_R,
    bare_loop,
    collect_batches,
    demo_config,
    encoder_shape,
    gemm_peak,
    machine,
    mean_step_flops,
    prepare,
    summary,
)


def trainer_run(config, warmup: int) -> dict:
    """``run_training(config)`` and its per-step times from its own ``metrics.jsonl``."""
    from hybridray.train import run_training

    launched, started = time.time(), time.perf_counter()
    result = run_training(config, overwrite=True)
    wall = time.perf_counter() - started
    path = Path(config.run.storage_path) / config.name / "metrics.jsonl"
    records = sorted((json.loads(line) for line in path.read_text().splitlines() if line.strip()),
                     key=lambda r: r["step"])
    if [r["step"] for r in records] != list(range(1, config.train.max_steps + 1)):
        raise RuntimeError(f"{path}: expected one record per step")
    ends = [r["time"] for r in records]
    durations = [b - a for a, b in zip(ends, ends[1:])]  # steps 2..N
    return {
        "steady": summary(durations[warmup - 1:]),  # steps warmup+1 .. N
        "to_first_step": ends[0] - launched,
        "warm": durations[: warmup - 1],
        "wall": wall,
        "digests": [r["groups"] for r in records],
        "display_samples_per_s": result.get("samples_per_s"),
    }


def digests(batches) -> list[str]:
    """What a one-worker run's metrics say it trained at each step (``groups_digest``)."""
    from hybridray.distributed import groups_digest

    return [groups_digest(b["group_ids"], b["query_langs"], b["passage_langs"], b.get("negative_group_ids"))
            for b in batches]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=MLQA_R, help="LAReQA-layout MLQA-R directory")
    ap.add_argument("--steps", type=int, default=14, help="steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the steady state")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the single-worker runs")
    ap.add_argument("--length-buckets", type=int, default=1, help="model.length_buckets of every run")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown section here")
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < args.warmup + 3:
        ap.error("need --warmup >= 1 and --steps >= warmup + 3")

    import ray

    from hybridray.train import init_ray

    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    T, W = args.threads, 2
    common = [f"train.max_steps={args.steps}", f"model.length_buckets={args.length_buckets}"]
    one = [*common, "scaling.num_workers=1", f"scaling.cpus_per_worker={T}"]
    try:
        train_dir = prepare(args.source, work)
        start = time.perf_counter()
        # T CPUs for a single worker plus one for the Ray Data tasks: on a 2-core machine a
        # worker holding both CPUs would leave the pipeline none (it would wait forever).
        init_ray(num_cpus=T + 1)
        ray_init_s = time.perf_counter() - start
        before = machine()
        base = demo_config(train_dir, work / "runs", [*one, "name=bench-bare"])
        batches = collect_batches(base)
        shape = encoder_shape(base.model.name_or_path)
        peak = gemm_peak(T)
        peak_1 = gemm_peak(1)

        runs = {}
        runs["bare (before)"] = bare_loop(base, batches, T)
        runs["trainer 1w ZeRO-0"] = trainer_run(demo_config(train_dir, work / "runs", [*one, "deepspeed.zero_stage=0", "name=bench-z0"]), args.warmup)
        runs["trainer 1w ZeRO-1"] = trainer_run(demo_config(train_dir, work / "runs", [*one, "deepspeed.zero_stage=1", "name=bench-z1"]), args.warmup)
        runs["bare (after)"] = bare_loop(base, batches, T)
        runs["trainer 2w ZeRO-1"] = trainer_run(demo_config(train_dir, work / "runs", [
            *common, f"scaling.num_workers={W}", f"scaling.cpus_per_worker={T // W}",
            "deepspeed.zero_stage=1", "name=bench-2w"]), args.warmup)
        after = machine()
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    expected = digests(batches)
    for name, run in runs.items():
        if isinstance(run, dict) and "1w" in name and run["digests"] != expected:
            raise RuntimeError(f"{name} trained other batches than the bare loop")
    for name in [n for n in runs if n.startswith("bare")]:
        times = runs[name]
        runs[name] = {"steady": summary(times[args.warmup:]), "first": times[0], "warm": times[1:args.warmup]}

    B = base.sampler.batch_size
    bare_s = (runs["bare (before)"]["steady"]["mean"] + runs["bare (after)"]["steady"]["mean"]) / 2
    flops_1 = mean_step_flops(shape, batches, world_size=1, length_buckets=args.length_buckets)
    flops_2 = mean_step_flops(shape, batches, world_size=W, length_buckets=args.length_buckets)

    rows = []
    for name, run in runs.items():
        s = run["steady"]["mean"]
        f = flops_2 if "2w" in name else flops_1
        startup = (f"{run['first']:.1f} s (first step)" if name.startswith("bare")
                   else f"{run['to_first_step']:.1f} s (launch to step 1 done)")
        rows.append(
            f"| {name} | {B / s:.2f} | {s:.2f} (median {run['steady']['median']:.2f}, "
            f"{run['steady']['min']:.2f}–{run['steady']['max']:.2f}) | **{bare_s / s:.3f}** | "
            f"{f['real'] / s / peak['best']:.1%} / {f['padded'] / s / peak['best']:.1%} | {startup} |"
        )
    z0, z1 = (runs[f"trainer 1w ZeRO-{k}"]["steady"]["mean"] for k in (0, 1))
    w2 = runs["trainer 2w ZeRO-1"]["steady"]["mean"]
    drift = runs["bare (after)"]["steady"]["mean"] / runs["bare (before)"]["steady"]["mean"]
    command = (f"flock /tmp/hybridray-heavy.lock .venv/bin/python benchmarks/bench_overhead.py "
               f"--steps {args.steps} --warmup {args.warmup} --threads {T} "
               f"--length-buckets {args.length_buckets} --out benchmarks/RESULTS-overhead.md")
    walls = ", ".join(f"{n.split('trainer ')[1]} {r['wall']:.0f} s" for n, r in runs.items() if n.startswith("trainer"))
    text = f"""## Trainer overhead: `hybridray train` vs a bare PyTorch loop

Command (from the repository root; about 10 minutes here):

    {command}

Machine: {before['cores']} cores (shared), Python {before['python']}, {before['date']}; load
average {before['load']} before and {after['load']} after (`os.getloadavg`, 1 / 5 / 15 min).
Model and data: `configs/local.yaml` (`builtin:multilingual-e5-small`, word embeddings frozen,
queries <= 48 / passages <= 96 tokens, global batch {B}, α = 0.5, AdamW lr 5e-5 with 10 warm-up
steps, clipping 1.0), MLQA-R train split of `hybridray data prepare` (seed 0), no held-out
evaluation, `model.length_buckets={args.length_buckets}`; {args.steps} steps per run, the first
{args.warmup} left out of the steady state. Every run trains the same {args.steps} global
batches (checked: each single-worker run's per-step digests in `metrics.jsonl` equal the bare
loop's). The trainer's step times are from its own `metrics.jsonl` (rank 0's clock at the end
of each step); the bare loop is timed around each step. The single-worker runs use {T} torch
threads like the bare loop; the Ray cluster is started once with {T + 1} logical CPUs
(`ray.init` took {ray_init_s:.1f} s), so that a worker holding {T} CPUs leaves one for the
Ray Data tasks. GEMM peak ({peak['n']}×{peak['n']} fp32 `torch.mm`, best of 10, same run):
{peak['best'] / 1e9:.1f} GFLOP/s on {T} threads (median {peak['median'] / 1e9:.1f}),
{peak_1['best'] / 1e9:.1f} GFLOP/s on 1.

| run | samples/s | s/step, steady (mean; median, range) | vs bare | model FLOPs / GEMM peak (real / padded tokens) | start-up |
|---|---|---|---|---|---|
{chr(10).join(rows)}

- **Trainer vs bare loop, 1 worker, {T} threads: ZeRO-0 {bare_s / z0:.3f}, ZeRO-1 {bare_s / z1:.3f}**
  (bare = the mean of its two runs; the bare loop's after/before ratio is {drift:.3f}, i.e.
  the machine drifted by {abs(drift - 1):.1%} over the single-worker runs). Target >= 0.95.
- **2 workers × 1 thread vs 1 worker × {T} threads (ZeRO-1): {z1 / w2:.3f}** in samples/s
  (same {T} cores; > 1 means two workers are faster).
- Model FLOPs per step (forward + backward = 3 × forward matmul FLOPs, from the encoder's
  config): {flops_1['real'] / 1e9:.1f} GFLOP on real tokens, {flops_1['padded'] / 1e9:.1f}
  GFLOP on what one worker encodes (padding efficiency {flops_1['real_tokens'] / flops_1['padded_tokens']:.1%});
  with 2 workers each slice is trimmed to its own longest text: {flops_2['padded'] / 1e9:.1f}
  GFLOP ({flops_2['real_tokens'] / flops_2['padded_tokens']:.1%}). The FLOP columns divide by
  the {T}-thread GEMM peak for every run.
- Wall time of each trainer run (launch to return: workers, DeepSpeed, {args.steps} steps,
  final checkpoint and export): {walls}.
"""
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
