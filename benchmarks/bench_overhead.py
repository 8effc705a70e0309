"""What does the machinery cost? ``hybridray train`` against a bare PyTorch loop, in rounds.

On one Ray cluster and the same batches (the pipeline's own, tokenised and trimmed as one
worker of one receives them):

* **bare** -- ``bench_common.bare_loop``: the same ``TrainingModel`` (e5-small + InfoNCE),
  AdamW, LR schedule and clipping in a plain loop, no Ray Train, no DeepSpeed;
* **trainer, 1 worker, ZeRO-0 / ZeRO-1** -- ``hybridray.train.run_training`` (what
  ``hybridray train`` calls) with ``configs/local.yaml`` on one worker with the same threads.

These three run in ``--rounds`` rounds in rotating order (bare, z0, z1 / z0, z1, bare / z1,
bare, z0 / ...), so no run always sits at the same point of the shared machine's drift; the
trainer/bare ratio is taken within each round and the median over rounds is reported with
its range. After the rounds: **2 workers x 1 thread, ZeRO-1** (the demo's layout), and with
``--length-buckets K`` (K > 1) the same with ``model.length_buckets=K``, in the order
1, K, K, 1.

Besides wall time, a separate sampler process (``bench_common.MachineSampler``) records the
CPU seconds of every process on the machine every 0.5 s: the train worker's own CPU per
steady step is compared with the bare loop's (``time.process_time``): preemption by other
jobs inflates wall time, not a process's own CPU time. The CPU Ray's daemons, the driver and
other users take during each run's steady steps is reported for both sides alike.

The trainer's step times are its own: the ``time`` of each step in the run's
``metrics.jsonl`` (rank 0's wall clock when the step's update is done; everything in the loop
counts: fetching the batch, forward, backward, DeepSpeed's step, the logging collectives,
``ray.train.report`` every ``train.log_every`` steps). Steady state drops the first
``--warmup`` steps. Launch-to-first-step (Ray Train workers, model load, DeepSpeed, the data
stream's start, step 1) is reported apart, and so is ``ray.init``.

Run (from the repository root; about 20 minutes on 2 cores with the defaults)::

    flock /tmp/hybridray-heavy.lock .venv/bin/python benchmarks/bench_overhead.py --length-buckets 4 --out benchmarks/RESULTS-overhead.md
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    MLQA_R,
    MachineSampler,
    bare_loop,
    collect_batches,
    demo_config,
    describe,
    encoder_shape,
    gemm_peak,
    machine,
    mean_step_flops,
    prepare,
)


def trainer_run(config, warmup: int, sampler: MachineSampler) -> dict:
    """``run_training(config)``: its steady steps' times from its own ``metrics.jsonl`` and
    the machine's CPU seconds over them."""
    from hybridray.train import run_training

    launched, started = time.time(), time.perf_counter()
    run_training(config, overwrite=True)
    wall = time.perf_counter() - started
    path = Path(config.run.storage_path) / config.name / "metrics.jsonl"
    records = sorted((json.loads(line) for line in path.read_text().splitlines() if line.strip()),
                     key=lambda r: r["step"])
    if [r["step"] for r in records] != list(range(1, config.train.max_steps + 1)):
        raise RuntimeError(f"{path}: expected one record per step")
    ends = [r["time"] for r in records]
    steady = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])]  # steps warmup+1 .. N
    cpu = sampler.between(ends[warmup - 1], ends[-1])
    return {"steady": steady, "cpu": {k: v / len(steady) for k, v in cpu.items()},
            "own_cpu": cpu["worker"] / len(steady), "to_first_step": ends[0] - launched, "wall": wall,
            "digests": [r["groups"] for r in records]}


def bare_run(config, batches, threads: int, warmup: int, sampler: MachineSampler) -> dict:
    clock: dict = {}
    times = bare_loop(config, batches, threads, clock)
    steady = times[warmup:]
    cpu = sampler.between(clock["ends"][warmup - 1], clock["ends"][-1])
    own = sum(clock["cpu"][warmup:]) / len(steady)
    per = {k: v / len(steady) for k, v in cpu.items()}
    per["driver"] = max(0.0, per["driver"] - own)  # the driver's CPU besides the loop itself
    return {"steady": steady, "cpu": per, "own_cpu": own, "first": times[0]}


def digests(batches, world_size: int) -> list[str]:
    """What a run on ``world_size`` workers should log per step (``groups_digest``: the sum of
    every rank's digest of its contiguous slice, as ``slice_step`` cuts it)."""
    import hybridray.distributed as distributed

    out = []
    real_rank = distributed.rank
    try:
        for b in batches:
            B = len(b["group_ids"])
            b_local = B // world_size
            k = len(b["negative_group_ids"]) // B if b.get("negative_group_ids") is not None else 0
            total = 0
            for r in range(world_size):
                lo, hi = r * b_local, (r + 1) * b_local
                distributed.rank = lambda r=r: r
                neg = b["negative_group_ids"][lo * k:hi * k] if k else None
                total += int(distributed.groups_digest(b["group_ids"][lo:hi], b["query_langs"][lo:hi],
                                                       b["passage_langs"][lo:hi], neg), 16)
            out.append(f"{total & ((1 << 48) - 1):012x}")
    finally:
        distributed.rank = real_rank
    return out


def spread(values) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=MLQA_R, help="LAReQA-layout MLQA-R directory")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of bare, ZeRO-0, ZeRO-1 (rotating order)")
    ap.add_argument("--steps", type=int, default=12, help="steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the steady state")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the single-worker runs")
    ap.add_argument("--length-buckets", type=int, default=1,
                    help="K > 1: also time 2 workers with model.length_buckets=K against 1")
    ap.add_argument("--bucket-runs", type=int, default=4, choices=(2, 4),
                    help="2-worker runs with --length-buckets K > 1: 2 = order 1, K; 4 = 1, K, K, 1")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown section here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run (e.g. model.name_or_path=builtin:tiny for a smoke run)")
    args = ap.parse_args()
    if args.warmup < 1 or args.steps < args.warmup + 3 or args.rounds < 1:
        ap.error("need --warmup >= 1, --steps >= warmup + 3 and --rounds >= 1")

    import ray

    from hybridray.train import init_ray

    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    T, W, K = args.threads, 2, args.length_buckets
    one = [*args.set, f"train.max_steps={args.steps}", "scaling.num_workers=1", f"scaling.cpus_per_worker={T}"]
    two = [*args.set, f"train.max_steps={args.steps}", f"scaling.num_workers={W}", f"scaling.cpus_per_worker={T // W}",
           "deepspeed.zero_stage=1"]
    runs: dict[str, list[dict]] = {}
    rounds: list[list[str]] = []
    started_at = time.perf_counter()
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
        peak, peak_1 = gemm_peak(T), gemm_peak(1)

        def config(name, extra):
            return demo_config(train_dir, work / "runs", [*extra, f"name=bench-{name}-{sum(map(len, runs.values()))}"])

        with MachineSampler(work / "cpu.jsonl") as sampler:
            kinds = ["bare", "1w ZeRO-0", "1w ZeRO-1"]
            for r in range(args.rounds):
                order = kinds[r % 3:] + kinds[:r % 3]
                rounds.append(order)
                for kind in order:
                    if kind == "bare":
                        result = bare_run(base, batches, T, args.warmup, sampler)
                    else:
                        stage = kind[-1]
                        result = trainer_run(config(f"z{stage}", [*one, f"deepspeed.zero_stage={stage}"]),
                                             args.warmup, sampler)
                    runs.setdefault(kind, []).append(result)
            for k in ([1, K, K, 1][:args.bucket_runs] if K > 1 else [1]):
                kind = f"2w ZeRO-1, {k} length bucket{'s' if k > 1 else ''}"
                runs.setdefault(kind, []).append(trainer_run(config("2w", [*two, f"model.length_buckets={k}"]),
                                                             args.warmup, sampler))
        after = machine()
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    total_min = (time.perf_counter() - started_at) / 60

    expected = {1: digests(batches, 1), W: digests(batches, W)}
    for kind, results in runs.items():
        for result in results:
            if "digests" in result and result["digests"] != expected[W if kind.startswith("2w") else 1]:
                raise RuntimeError(f"{kind} trained other batches than the bare loop")

    B = base.sampler.batch_size
    mean = statistics.fmean
    s_per_step = {kind: [mean(r["steady"]) for r in results] for kind, results in runs.items()}
    bare_s = statistics.median(s_per_step["bare"])
    ratio = {k: [b / s for b, s in zip(s_per_step["bare"], s_per_step[k])] for k in ("1w ZeRO-0", "1w ZeRO-1")}
    cpu_ratio = {k: [b["own_cpu"] / t["own_cpu"] for b, t in zip(runs["bare"], runs[k])] for k in ratio}
    flops = {1: mean_step_flops(shape, batches, world_size=1), W: mean_step_flops(shape, batches, world_size=W)}
    if K > 1:
        flops[(W, K)] = mean_step_flops(shape, batches, world_size=W, length_buckets=K)

    def flops_of(kind):
        if kind.startswith("2w"):
            return flops[(W, K)] if f", {K} length buckets" in kind else flops[W]
        return flops[1]

    round_rows = []
    for r, order in enumerate(rounds):
        s = {k: s_per_step[k][r] for k in ("bare", "1w ZeRO-0", "1w ZeRO-1")}
        round_rows.append(f"| {r + 1} | {', '.join(order)} | {s['bare']:.2f} | {s['1w ZeRO-0']:.2f} | {s['1w ZeRO-1']:.2f} "
                          f"| {ratio['1w ZeRO-0'][r]:.2f} | {ratio['1w ZeRO-1'][r]:.2f} "
                          f"| {cpu_ratio['1w ZeRO-0'][r]:.2f} | {cpu_ratio['1w ZeRO-1'][r]:.2f} |")
    rows = []
    for kind, results in runs.items():
        s = statistics.median(s_per_step[kind])
        f = flops_of(kind)
        own = statistics.median(r["own_cpu"] for r in results)
        ray_cpu = statistics.median(r["cpu"]["ours"] + r["cpu"]["driver"] for r in results)
        others = statistics.median(r["cpu"]["others"] for r in results)
        startup = ("–" if kind == "bare" else spread([r["to_first_step"] for r in results]) + " s")
        rows.append(
            f"| {kind} | {len(results)} | {B / s:.2f} | {spread(s_per_step[kind])} | {f['real'] / s / 1e9:.0f} / {f['padded'] / s / 1e9:.0f} "
            f"| {f['real'] / s / peak['best']:.0%} / {f['padded'] / s / peak['best']:.0%} | {bare_s / s:.2f} "
            f"| {own:.2f} | {ray_cpu:.2f} | {others:.2f} | {startup} |")

    z1_s = statistics.median(s_per_step["1w ZeRO-1"])
    w2 = "2w ZeRO-1, 1 length bucket"
    w2_s = statistics.median(s_per_step[w2])
    lines = []
    for k in ("1w ZeRO-0", "1w ZeRO-1"):
        lines.append(f"{k.split()[1]}: {spread(ratio[k])} in samples/s, {spread(cpu_ratio[k])} in CPU-seconds per step")
    gain_work = flops[1]["padded"] / flops[W]["padded"]
    bucket_line = ""
    if K > 1:
        wk = f"2w ZeRO-1, {K} length buckets"
        pairs = [a / b for a, b in zip(s_per_step[w2], s_per_step[wk])]  # adjacent runs: 1st/2nd, 4th/3rd
        bucket_line = (
            f"- **`model.length_buckets: {K}` through the trainer (2 workers × 1 thread, ZeRO-1): "
            f"{spread(pairs)}× the samples/s of one forward per side** (per pair of adjacent runs, order {', '.join(map(str, [1, K, K, 1][:args.bucket_runs]))}); "
            f"encoded GFLOP per step {flops[W]['padded'] / 1e9:.0f} → {flops[(W, K)]['padded'] / 1e9:.0f} "
            f"(padding efficiency {flops[W]['real_tokens'] / flops[W]['padded_tokens']:.1%} → "
            f"{flops[(W, K)]['real_tokens'] / flops[(W, K)]['padded_tokens']:.1%}).\n")
    command = (f"flock /tmp/hybridray-heavy.lock .venv/bin/python benchmarks/bench_overhead.py --rounds {args.rounds} "
               f"--steps {args.steps} --warmup {args.warmup} --threads {T} --length-buckets {K} --bucket-runs {args.bucket_runs} "
               + "".join(f"--set {kv} " for kv in args.set) + "--out benchmarks/RESULTS-overhead.md")
    text = f"""## Trainer overhead: `hybridray train` vs a bare PyTorch loop

Command (from the repository root; {total_min:.0f} minutes here):

    {command}

Machine: {describe(before)}; {before['date']}, shared, run under the lock with nothing else of
mine running; load average {before['load']} before and {after['load']} after (1 / 5 / 15 min).
Model and data: `configs/local.yaml` (`builtin:multilingual-e5-small`, word embeddings frozen,
queries <= 48 / passages <= 96 tokens, global batch {B}, α = 0.5, AdamW lr 5e-5 with 10 warm-up
steps, clipping 1.0), MLQA-R train split of `hybridray data prepare` (seed 0), no held-out
evaluation; {args.steps} steps per run, the first {args.warmup} left out of the steady state.
Every run trains the same {args.steps} global batches (checked: each run's per-step digests in
`metrics.jsonl`, 1 and 2 workers, equal the ones computed from the bare loop's batches).
The single-worker runs use {T} torch threads like the bare loop; the Ray cluster is started
once with {T + 1} logical CPUs so that a worker holding {T} CPUs leaves one for the Ray Data
tasks; `ray.init` took {ray_init_s:.1f} s (not in any figure below). GEMM peak ({peak['n']}² fp32
`torch.mm`, best of 10): {peak['best'] / 1e9:.0f} GFLOP/s on {T} threads, {peak_1['best'] / 1e9:.0f} on 1.

Per round (s/step = mean over the steady steps; ratios = bare s/step ÷ trainer s/step in the
same round, > 1 means the trainer is faster; CPU ratio = the bare loop's process CPU-seconds
per step ÷ the train worker's):

| round | order | bare s/step | ZeRO-0 s/step | ZeRO-1 s/step | ZeRO-0 vs bare | ZeRO-1 vs bare | ZeRO-0 vs bare, CPU | ZeRO-1 vs bare, CPU |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(round_rows)}

Per run kind (medians over its runs; "Ray + driver" is the CPU that this benchmark's Ray
daemons, Ray Data tasks, Train controller and driver (besides the bare loop itself) took per
steady step, "others" everything else on the machine; both sides measured the same way):

| run | runs | samples/s | s/step (range over runs) | GFLOP/s (real / encoded) | of GEMM peak (real / encoded) | vs bare (samples/s) | CPU-s/step of the loop's process | Ray + driver CPU-s/step | others CPU-s/step | launch to step 1 done |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

- **Trainer vs bare loop, 1 worker, {T} threads (median over rounds, range):
  {lines[0]}; {lines[1]}.** Target >= 0.95.
- **2 workers × 1 thread vs 1 worker × {T} threads (ZeRO-1): {z1_s / w2_s:.2f}× the samples/s**; of that,
  {gain_work:.3f}× is less work: each worker's half-batch is trimmed to its own longest text
  ({flops[1]['padded'] / 1e9:.0f} → {flops[W]['padded'] / 1e9:.0f} encoded GFLOP per step), so per encoded
  GFLOP the two workers run at {z1_s / w2_s / gain_work:.2f}× one worker's rate and at
  {bare_s / w2_s / gain_work:.2f}× the bare loop's.
{bucket_line}- Model FLOPs per step (forward + backward = 3 × forward matmul FLOPs, from the encoder's
  config): {flops[1]['real'] / 1e9:.0f} GFLOP on real tokens, {flops[1]['padded'] / 1e9:.0f} GFLOP encoded by one
  worker (padding efficiency {flops[1]['real_tokens'] / flops[1]['padded_tokens']:.1%}); the peak column divides by the
  {T}-thread GEMM peak for every run.
"""
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
