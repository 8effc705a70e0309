"""What fraction of the machine's matmul rate does a training step use, and what does padding
cost? Model FLOPs per step / step time against a measured GEMM peak, with and without
``model.length_buckets``, one run.

* Model FLOPs: ``bench_common.step_flops`` -- forward + backward (3 x forward) matmul FLOPs of
  the encoder from its config, per step, counting the real (non-pad) tokens and, separately,
  the padded tensors the model actually encodes.
* Step time: the bare PyTorch loop of ``bench_common.bare_loop`` (the trainer's computation
  without Ray or DeepSpeed; ``bench_overhead.py`` puts the trainer next to it) on the
  pipeline's own batches of ``configs/local.yaml``; once with one forward per side
  (``length_buckets=1``) and once in ``--buckets`` chunks of similar length, alternated
  A B A B so that drift of the shared machine weighs on both alike.
* Peak: ``torch.mm`` of two 2048 x 2048 fp32 matrices on the same threads, before, between
  and after the loops (the best is used: the MFU is then conservative).

Run (from the repository root; about 4 minutes on 2 cores)::

    flock /tmp/hybridray-heavy.lock .venv/bin/python benchmarks/bench_flops.py --out benchmarks/RESULTS-flops.md
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    MLQA_R,
    bare_loop,
    clock_mhz,
    collect_batches,
    demo_config,
    describe,
    encoder_shape,
    gemm_peak,
    machine,
    mean_step_flops,
    prepare,
    summary,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=MLQA_R, help="LAReQA-layout MLQA-R directory")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed loop")
    ap.add_argument("--warmup", type=int, default=2, help="first steps of a loop left out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--buckets", type=int, default=4, help="model.length_buckets of the bucketed loop")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown section here")
    args = ap.parse_args()

    import ray

    from hybridray.train import init_ray

    work = Path(tempfile.mkdtemp(prefix="bench-flops-"))
    try:
        train_dir = prepare(args.source, work)
        init_ray(num_cpus=args.threads)
        try:
            configs = {k: demo_config(train_dir, work / "runs", [
                f"train.max_steps={args.steps}", "scaling.num_workers=1", f"model.length_buckets={k}"])
                for k in (1, args.buckets)}
            batches = collect_batches(configs[1])
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    shape = encoder_shape(configs[1].model.name_or_path)
    mhz = clock_mhz()
    before = machine()
    peaks = [gemm_peak(args.threads)]
    times = {1: [], args.buckets: []}
    for i, k in enumerate((1, args.buckets, 1, args.buckets)):
        times[k].extend(bare_loop(configs[k], batches, args.threads)[args.warmup:])
        if i == 1:
            peaks.append(gemm_peak(args.threads))
    peaks.append(gemm_peak(args.threads))
    after = machine()
    peak = max(p["best"] for p in peaks)

    flops = {k: mean_step_flops(shape, batches, length_buckets=k) for k in times}
    rows = []
    for k, t in times.items():
        s, f = summary(t), flops[k]
        rows.append(
            f"| {'one forward per side' if k == 1 else f'{k} length buckets'} | {s['mean']:.2f} (median {s['median']:.2f}) "
            f"| {configs[k].sampler.batch_size / s['mean']:.2f} | {f['real_tokens'] / f['padded_tokens']:.1%} | {f['real'] / 1e9:.1f} / {f['padded'] / 1e9:.1f} "
            f"| {f['real'] / s['mean'] / 1e9:.1f} / {f['padded'] / s['mean'] / 1e9:.1f} "
            f"| **{f['real'] / s['mean'] / peak:.1%}** / {f['padded'] / s['mean'] / peak:.1%} |"
        )
    per_cycle = f"{peak / (args.threads * mhz * 1e6):.1f}" if mhz else "(clock unknown)"
    speedup = summary(times[1])["mean"] / summary(times[args.buckets])["mean"]
    table = []
    for world in (1, 2):
        cells = []
        for k in (1, 2, 4, 8):
            f = mean_step_flops(shape, batches, world_size=world, length_buckets=k)
            cells.append(f"{f['real_tokens'] / f['padded_tokens']:.1%} ({f['padded'] / 1e9:.1f})")
        table.append(f"| {world} | " + " | ".join(cells) + " |")
    lq = sum(b["query_input_ids"].shape[1] for b in batches) / len(batches)
    lp = sum(b["passage_input_ids"].shape[1] for b in batches) / len(batches)
    command = (f"flock /tmp/hybridray-heavy.lock .venv/bin/python benchmarks/bench_flops.py --steps {args.steps} "
               f"--warmup {args.warmup} --threads {args.threads} --buckets {args.buckets} --out benchmarks/RESULTS-flops.md")
    text = f"""## Compute efficiency: model FLOPs per step against the GEMM peak, and length buckets

Command (from the repository root; about 4 minutes here):

    {command}

Machine: {describe(before)}; {before['date']}, shared, run under the lock with nothing else of
mine running; load average {before['load']} before and {after['load']} after (1 / 5 / 15 min).
Peak: fp32 `torch.mm` 2048×2048 on {args.threads} threads, best of 10:
{' / '.join(f"{p['best'] / 1e9:.1f}" for p in peaks)} GFLOP/s before, between and after the loops (the best one is used). It is this machine's
measured matmul rate, not a datasheet figure: {per_cycle} fp32 FLOP per cycle per core at the
clock the VM reports (one 512-bit FMA per cycle is 32), so the MFU below is against what the
hardware really delivers. Model: `builtin:multilingual-e5-small`
(BERT-style, {shape['layers']} layers, hidden {shape['hidden']}, FFN {shape['intermediate']}); FLOPs per step
= 3 × the forward's matmul FLOPs (per token per layer 8H² + 4HI for the projections and FFN,
per text per layer 4L²H for attention scores and their weighted sum); embedding lookups,
LayerNorm, softmax, pooling and the loss are left out. Data: the first {args.steps} global batches
(32 pairs) of `configs/local.yaml` on the MLQA-R train split; their padded widths average
{lq:.1f} (queries) / {lp:.1f} (passages) tokens. Step time: the bare PyTorch loop (the trainer's
computation; see the trainer-overhead section for the trainer against it), {args.threads} threads,
first {args.warmup} steps of each loop left out, {len(times[1])} steps per setting (two loops each,
alternated).

| forward | s/step (mean) | samples/s | padding efficiency (real / encoded tokens) | GFLOP/step (real / encoded) | GFLOP/s (real / encoded) | of GEMM peak (real / encoded) |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

**Length buckets ({args.buckets}) vs one forward per side: {speedup:.3f}× the samples/s.**

Padding efficiency (and encoded GFLOP per step) by workers and `model.length_buckets`, same
batches (each worker's slice trimmed to its own longest text, each bucket to its own):

| workers | 1 bucket | 2 | 4 | 8 |
|---|---|---|---|---|
{chr(10).join(table)}

What `model.length_buckets` does and does not change: each worker sorts the texts of its
slice by length and encodes each side in that many chunks, each padded only to its own
longest text, then puts the embeddings back in pair order. Queries, passages, group ids and
languages never move, so the batch type and language of the step, the loss (InfoNCE over
the gathered batch) and its gradient are the same function of the same pairs; what differs
is float rounding (other matrix shapes) and which dropout mask each text draws, so with
dropout on (e5's 0.1) a bucketed run follows another trajectory, and the key is part of the
run's identity (a resume with another value is refused). It is off by default
(`model.length_buckets: 1`) because its gain is measured here on CPU only: under ZeRO-3 every
chunk gathers the parameters again (n× the all-gather traffic per side), which on GPUs may
cost more than the padding it saves (not measured). Tests (dropout off): equal loss and
gradients for right-padded encoders and left-padded decoders with hard negatives
(`test_length_buckets_keep_the_loss_and_gradients`), and equal losses and weights on 2
ranks under ZeRO-3 with 3 buckets against 1 (`test_length_buckets_under_zero3_on_two_processes`).
Sorting the pairs of the global batch across workers instead was not done: under lockstep
the worker with the longest texts sets the pace, so it saves nothing per step.
"""
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
