"""Does a worker's memory stay flat over a long run, whatever the planning windows? RSS of a
worker-like process that reads the training stream with the model step replaced by a no-op,
and how many steps its reader thread holds ahead of it, in three variants run one after the
other in one command:

* one stream (``data.stream_chunk_steps=0``): one Ray Data dataset for the whole run, drained
  into the worker -- what every worker did before issue 13 (7b01dd7);
* chunks (``--chunk-steps``, default 2000) on MLQA-R, whose whole train set is one window of
  25 steps: windows much smaller than a chunk;
* chunks (``--big-chunk-steps``, default 200) on MLQA-R copied ``--copies`` times (default 25)
  with new group ids: 20,125 groups, one window of 628 steps at the default
  ``sampler.window_groups`` (100k), so each window spans several chunks -- the case where
  chunks of whole windows held two windows, not two chunks.

The consumer is a Ray actor like a Ray Train worker (0.5 CPU, rank 0 of 2, the demo's
e5-small tokenizer and lengths, batch 32). It reads ``iter_worker_batches`` and does nothing
with each batch except wait ``--step-ms`` (a sleep, no CPU): training is 45-900x slower than
the pipeline, so in a real run the reader thread is always ahead of the consumer, and how far
ahead it may get is what this measures. RSS and peak RSS (VmRSS / VmHWM of
``/proc/self/status``) at the start and after 1k, 10k and 20k steps; "steps queued" counts the
steps the reader thread has taken out of Ray Data and the consumer has not read yet (the
actor wraps each chunk's iterator to count them).

Run (from the repository root, under the shared lock, after
``hybridray data prepare --source ../shared/data/mlqa-r --out data/mlqa-r``)::

    flock /tmp/hybridray-heavy.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_stream_memory.py

The defaults are the recorded run (``--out FILE`` also writes the Markdown section).
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

import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def memory_mb() -> tuple[float, float]:
    """(RSS, peak RSS) of this process in MB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class Counted:
    """A chunk's dataset whose iterator counts the steps it hands to the reader thread."""

    def __init__(self, dataset, pulled: list):
        self.dataset, self.pulled = dataset, pulled

    def iter_batches(self, **kwargs):
        batches = self.dataset.iter_batches(**kwargs)
        try:
            for batch in batches:
                self.pulled[0] += 1
                yield batch
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()


class Reader:
    """A worker-like process: reads its slice of every step, the model step a no-op."""

    def read(self, stream, stop_step: int, step_s: float, marks: list[int]) -> dict:
        from hybridray.console import quiet_process
        from hybridray.data import pipeline

        quiet_process(False)  # as train_func does: no Ray Data progress bars in the worker
        pulled = [0]
        drained = pipeline.drained
        pipeline.drained = lambda makers: drained([lambda make=make: Counted(make(), pulled) for make in makers])
        out = {"start": memory_mb(), "marks": {}}
        t0 = time.perf_counter()
        n = queued_max = 0
        for batch in pipeline.iter_worker_batches(stream, rank=0, world_size=2, stop_step=stop_step):
            n += 1
            assert batch["step"] == n - 1
            queued_max = max(queued_max, pulled[0] - n)
            if step_s:
                time.sleep(step_s)  # the model step, a no-op that takes as long as asked
            if n in marks:
                out["marks"][n] = (*memory_mb(), pulled[0] - n)
        out["steps"], out["seconds"], out["queued_max"] = n, time.perf_counter() - t0, queued_max
        return out


def copies(train: Path, out: Path, n: int) -> Path:
    """``train``'s shards written ``n`` times with new group ids (``<id>~<k>``): n times the
    groups, the same texts and lengths. No manifest (not checked then)."""
    out.mkdir(parents=True)
    tables = [pq.read_table(f) for f in sorted(train.glob("*.parquet"))]
    for k in range(n):
        for i, table in enumerate(tables):
            ids = pc.binary_join_element_wise(table["group_id"], f"~{k}", "")
            pq.write_table(table.set_column(table.schema.get_field_index("group_id"), "group_id", ids),
                           out / f"part-{k:03d}-{i:02d}.parquet")
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
    chunks = stream.chunks()
    result["chunks"] = len(chunks)
    result["chunk_max"] = max(sum(p.n_steps for p in c) for c in chunks)
    result["groups"], result["window_steps"] = info.n_groups, max(s.n_steps for s in stream.segments)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=Path, default=REPO / "data" / "mlqa-r" / "train",
                    help="MLQA-R train shards (hybridray data prepare)")
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--chunk-steps", type=int, default=2000, help="data.stream_chunk_steps on MLQA-R")
    ap.add_argument("--copies", type=int, default=25, help="copies of MLQA-R in the large-window variant")
    ap.add_argument("--big-chunk-steps", type=int, default=200,
                    help="data.stream_chunk_steps of the large-window variant")
    ap.add_argument("--step-ms", type=float, default=12.0, help="duration of the no-op model step (a sleep)")
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown section here")
    args = ap.parse_args()
    args.marks = sorted({m for m in (1000, 10_000, 20_000, args.steps) if m <= args.steps})

    import ray

    from hybridray.train import init_ray

    work = Path(tempfile.mkdtemp(prefix="bench-stream-"))
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        big = copies(args.train, work / "copies", args.copies)
        init_ray(num_cpus=2)
        try:
            variants = [
                ("one stream (`stream_chunk_steps=0`, before)", "MLQA-R", run_variant(args.train, 0, args)),
                (f"chunks (`stream_chunk_steps={args.chunk_steps}`)", "MLQA-R",
                 run_variant(args.train, args.chunk_steps, args)),
                (f"chunks (`stream_chunk_steps={args.big_chunk_steps}`)", f"MLQA-R x {args.copies}",
                 run_variant(big, args.big_chunk_steps, args)),
            ]
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for name, data, r in variants:
        start = r["start"][0]
        at = " | ".join(f"{r['marks'][m][0]:,.0f} (+{r['marks'][m][0] - start:,.0f})" for m in args.marks)
        queued = " / ".join(f"{r['marks'][m][2]:,}" for m in args.marks)
        rows.append(f"| {name} | {data}: {r['groups']:,} groups, windows of {r['window_steps']:,} steps | "
                    f"{r['chunks']} x <= {r['chunk_max']:,} | {start:,.0f} | {at} | {r['marks'][args.marks[-1]][1]:,.0f} "
                    f"| {queued} | {r['queued_max']:,} | {r['seconds']:.0f} s, {r['steps'] / r['seconds']:.0f}/s |")
    marks = " | ".join(f"RSS at {m // 1000}k (above start)" for m in args.marks)
    load = os.getloadavg()
    minutes = (datetime.datetime.now(datetime.timezone.utc) - started).seconds // 60
    text = f"""## Bounded worker memory: the training stream in chunks (issue 13, item 1)

Command (from the repository root, after `hybridray data prepare --source ../shared/data/mlqa-r
--out data/mlqa-r`; {started:%Y-%m-%d %H:%M} UTC, {minutes} min):

    flock /tmp/hybridray-heavy.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_stream_memory.py

(defaults: `--steps {args.steps} --chunk-steps {args.chunk_steps} --copies {args.copies} --big-chunk-steps {args.big_chunk_steps} --step-ms {args.step_ms:g}`)

A worker-like Ray actor (0.5 CPU, rank 0 of 2) reads {args.steps:,} global steps of 32 pairs
(`builtin:multilingual-e5-small` tokenizer, queries <= 48 / passages <= 96 tokens, seed 0,
default `sampler.window_groups` 100,000), the model step replaced by a {args.step_ms:g} ms
sleep (no CPU; a real e5-small step is ~5 s, so in training the reader thread is always
ahead). MLQA-R is `data/mlqa-r/train`; "MLQA-R x {args.copies}" is {args.copies} copies of it with new group
ids (the same texts), one window of several chunks. RSS in MB (`/proc/self/status` VmRSS at
the actor's start and after the given steps; peak = VmHWM at the end); steps queued = steps
the reader thread had taken from Ray Data that the consumer had not read yet. One fresh actor
per variant, one after the other in this one run. Machine: {os.cpu_count()} cores, Python
{platform.python_version()}, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end
(other jobs were running).

| variant | data | chunks x steps | RSS at start | {marks} | peak | steps queued at {' / '.join(f'{m // 1000}k' for m in args.marks)} | steps queued, max | read |
|---|---|---:|---:|{'---:|' * len(args.marks)}---:|---:|---:|---|
{chr(10).join(rows)}
"""
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
