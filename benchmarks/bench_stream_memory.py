"""Does a worker's memory stay flat over a long run? RSS of a worker-like process that reads
the training stream, with the model step replaced by a no-op, one unchunked stream (the old
behaviour: the whole run drained into the worker) against chunks, side by side in one run.

The consumer is a Ray actor like a Ray Train worker (0.5 CPU, rank 0 of 2, the demo's
e5-small tokenizer and lengths, batch 32, MLQA-R shards written by ``prepare_lareqa``). It
reads ``iter_worker_batches`` and does nothing with each batch except wait ``--step-ms``
(a sleep, no CPU): training is 45-900x slower than the pipeline, so in a real run the reader
thread is always ahead of the consumer, and how far ahead it may get is what this measures.
RSS (VmRSS) and peak RSS (VmHWM) are read from ``/proc/self/status`` at the marked steps.

Run (from the repository root, under the shared lock)::

    flock /tmp/hybridray-heavy.lock env PYTHONPATH=$PWD .venv/bin/python \\
        benchmarks/bench_stream_memory.py --steps 20000 --out benchmarks/RESULTS-stream-memory.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MLQA_R = REPO.parent / "shared" / "data" / "mlqa-r"


def memory_mb() -> tuple[float, float]:
    """(RSS, peak RSS) of this process in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class Reader:
    """A worker-like process: reads its slice of every step, the model step a no-op."""

    def read(self, stream, stop_step: int, step_s: float, marks: list[int]) -> dict:
        from hybridray.console import quiet_process
        from hybridray.data.pipeline import iter_worker_batches

        quiet_process(False)  # as train_func does: no Ray Data progress bars in the worker
        out = {"start": memory_mb(), "marks": {}}
        t0 = time.perf_counter()
        n = 0
        for batch in iter_worker_batches(stream, rank=0, world_size=2, stop_step=stop_step):
            n += 1
            assert batch["step"] == n - 1
            if step_s:
                time.sleep(step_s)  # the model step, a no-op that takes as long as asked
            if n in marks:
                out["marks"][n] = (*memory_mb(), time.perf_counter() - t0)
        out["steps"], out["seconds"] = n, time.perf_counter() - t0
        return out


def run_variant(train_dir: Path, chunk_steps: int, args) -> dict:
    import ray

    from hybridray.config import build_config
    from hybridray.data.pipeline import build_train_dataset

    cfg = build_config({
        "seed": 0,
        "model": {"name_or_path": "builtin:multilingual-e5-small", "max_query_length": 48, "max_passage_length": 96},
        "data": {"train": str(train_dir), "stream_chunk_steps": chunk_steps},
        "sampler": {"alpha": 0.5, "batch_size": 32},
        "train": {"max_steps": args.steps},
        "scaling": {"num_workers": 2},
    })
    stream, info = build_train_dataset(cfg, rejects_path=None)
    reader = ray.remote(num_cpus=0.5)(Reader).remote()
    try:
        result = ray.get(reader.read.remote(stream, args.steps, args.step_ms / 1000, args.marks))
    finally:
        ray.kill(reader)
    result["chunks"] = len(stream.chunks())
    result["steps_per_epoch"] = info.steps_per_epoch
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=MLQA_R, help="LAReQA-layout MLQA-R directory")
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--chunk-steps", type=int, default=2000, help="data.stream_chunk_steps of the chunked variant")
    ap.add_argument("--step-ms", type=float, default=20.0, help="duration of the no-op model step (a sleep)")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown section here")
    args = ap.parse_args()
    args.marks = sorted({m for m in (1000, 5000, 10_000, 15_000, 20_000, args.steps) if m <= args.steps})

    import ray

    from hybridray.data.prepare import prepare_lareqa
    from hybridray.train import init_ray

    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        prepare_lareqa(args.source, work / "mlqa-r", heldout_fraction=0.3, seed=0)
        init_ray(num_cpus=2)
        try:
            variants = {name: run_variant(work / "mlqa-r" / "train", chunk, args)
                        for name, chunk in (("one stream (before: `stream_chunk_steps=0`)", 0),
                                            (f"chunks (`stream_chunk_steps={args.chunk_steps}`)", args.chunk_steps))}
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    (old_name, old), (new_name, new) = variants.items()
    rows = []
    for m in args.marks:
        (o_rss, o_peak, _), (n_rss, n_peak, _) = old["marks"][m], new["marks"][m]
        rows.append(f"| {m:,} | {o_rss:,.0f} | {o_peak:,.0f} | {n_rss:,.0f} | {n_peak:,.0f} | {n_peak / o_peak:.2f} |")
    load = os.getloadavg()
    text = f"""## Bounded worker memory: the training stream in chunks (issue 13, item 1)

Command (from the repository root; {started:%Y-%m-%d %H:%M} UTC, {(datetime.datetime.now(datetime.timezone.utc) - started).seconds // 60} min):

    flock /tmp/hybridray-heavy.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_stream_memory.py --steps {args.steps} --chunk-steps {args.chunk_steps} --step-ms {args.step_ms:g} --out benchmarks/RESULTS-stream-memory.md

A worker-like Ray actor (0.5 CPU, rank 0 of 2) reads {args.steps:,} global steps of 32 pairs
(MLQA-R train shards from `prepare_lareqa`, seed 0, 30% held out: {old['steps_per_epoch']} steps per
epoch; `builtin:multilingual-e5-small` tokenizer, queries <= 48 / passages <= 96 tokens), the
model step replaced by a {args.step_ms:g} ms sleep (no CPU; a real e5-small step is ~5 s, so the
reader thread is always ahead of training). RSS and peak RSS (`/proc/self/status`
VmRSS / VmHWM) of that process, in MB, after the given number of steps; one fresh actor per
variant, both in this one run. Machine: {os.cpu_count()} cores, Python {platform.python_version()},
load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end (other jobs were running).

| steps read | before: RSS | before: peak | chunks: RSS | chunks: peak | peak, chunks / before |
|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

- Before: one Ray Data dataset for the whole run, drained by the reader thread into an
  unbounded queue: the worker's memory grows with the steps the reader got ahead
  ({old['seconds']:.0f} s, {old['steps'] / old['seconds']:.1f} steps/s read).
- Chunks: {new['chunks']} datasets of whole windows with >= {args.chunk_steps} steps, each drained to its
  end, the reader at most one chunk ahead of the consumer: at most two chunks held
  ({new['seconds']:.0f} s, {new['steps'] / new['seconds']:.1f} steps/s read).
"""
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
