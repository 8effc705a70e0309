"""Does streaming in chunks cost the real demo training speed? ``hybridray train
configs/local.yaml`` (2 workers x 0.5 CPU, e5-small, ZeRO-1, batch 32, no held-out
evaluation) cut to ``--steps`` steps, with ``data.stream_chunk_steps=--chunk-steps`` (every
chunk boundary met inside the Ray Train workers: a new Ray Data executor, a drain burst while
training runs) against one chunk (``data.stream_chunk_steps`` larger than the run), the two
alternating, ``--repeats`` runs of each. Reports each run's training samples/s (the run
summary's ``samples_per_s``: steps 2 to the last) and the medians.

With ``--before DIR`` (a checkout of the code before chunking, e.g. ``git worktree add
/tmp/hybridray-before 7b01dd7``) it compares instead this code at its default chunk size
against that code, each run with its own code (``PYTHONPATH``, also the Ray workers'), the
same config and data.

Run (from the repository root, under the shared lock, after
``hybridray data prepare --source ../shared/data/mlqa-r --out data/mlqa-r``)::

    flock /tmp/hybridray-heavy.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_stream_demo.py
    flock /tmp/hybridray-heavy.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_stream_demo.py --before /tmp/hybridray-before
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(storage: Path, name: str, chunk_steps, steps: int, code: Path = REPO) -> dict:
    """One training run; ``chunk_steps`` None leaves the key out (code from before it existed)."""
    cmd = [str(REPO / ".venv" / "bin" / "hybridray"), "train", "configs/local.yaml", f"name={name}",
           f"train.max_steps={steps}", "train.eval_before=false", "data.heldout=''",
           f"data.train={REPO / 'data' / 'mlqa-r' / 'train'}",
           f"train.log_every={steps}", f"run.storage_path={storage}",
           # the plain recipe this benchmark was published with (local.yaml's defaults changed)
           "loss.hard_negatives=0", "loss.distill_weight=0", "model.length_buckets=1"]
    if chunk_steps is not None:
        cmd.append(f"data.stream_chunk_steps={chunk_steps}")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=code, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(code)})
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    summary = json.loads((storage / name / "summary.json").read_text())
    return {"samples_per_s": summary["samples_per_s"], "wall": wall, "loss": summary["metrics"]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--chunk-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--before", type=Path, default=None, help="a checkout of the code before chunking")
    args = ap.parse_args()
    storage = Path(tempfile.mkdtemp(prefix="bench-stream-demo-"))
    if args.before:
        return compare_with_before(args, storage)
    variants = {"chunks": args.chunk_steps, "one chunk": args.steps + 1}
    results: dict[str, list[dict]] = {v: [] for v in variants}
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        for i in range(args.repeats):
            for variant, chunk in variants.items():
                r = run(storage, f"demo-{chunk}-{i}", chunk, args.steps)
                results[variant].append(r)
                print(f"run {i + 1} {variant} (stream_chunk_steps={chunk}): {r['samples_per_s']:.2f} samples/s, "
                      f"wall {r['wall']:.0f} s, final loss {r['loss']:.4f}", flush=True)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    med = {v: statistics.median(r["samples_per_s"] for r in rs) for v, rs in results.items()}
    lo = min(r["samples_per_s"] for r in results["chunks"]) / max(r["samples_per_s"] for r in results["one chunk"])
    hi = max(r["samples_per_s"] for r in results["chunks"]) / min(r["samples_per_s"] for r in results["one chunk"])
    load = os.getloadavg()
    print(f"\n{started:%Y-%m-%d %H:%M} UTC; {args.steps} steps, chunks of {args.chunk_steps} "
          f"({-(-args.steps // args.chunk_steps) - 1} boundaries) vs one chunk, {args.repeats} alternating runs each")
    for v, rs in results.items():
        runs = ", ".join(f"{r['samples_per_s']:.2f}" for r in rs)
        print(f"{v}: median {med[v]:.2f} samples/s (runs: {runs})")
    print(f"ratio of medians chunks / one chunk: {med['chunks'] / med['one chunk']:.3f} "
          f"(range over run pairs {lo:.3f}-{hi:.3f}); load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


def compare_with_before(args, storage: Path) -> None:
    """This code at its default ``data.stream_chunk_steps`` against the code in ``--before``."""
    codes = {"this code (default chunks)": REPO, f"before ({args.before})": args.before.resolve()}
    results: dict[str, list[dict]] = {v: [] for v in codes}
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        for i in range(args.repeats):
            for variant, code in (codes.items() if i % 2 == 0 else reversed(codes.items())):
                r = run(storage, f"demo-{'now' if code == REPO else 'before'}-{i}", None, args.steps, code)
                results[variant].append(r)
                print(f"run {i + 1} {variant}: {r['samples_per_s']:.2f} samples/s, wall {r['wall']:.0f} s, "
                      f"final loss {r['loss']:.4f}", flush=True)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    now, before = (results[v] for v in codes)
    med = [statistics.median(r["samples_per_s"] for r in rs) for rs in (now, before)]
    pairs = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(now, before)]
    load = os.getloadavg()
    print(f"\n{started:%Y-%m-%d %H:%M} UTC; {args.steps} steps, {args.repeats} runs each, order alternating")
    for v, rs in results.items():
        runs = ", ".join(f"{r['samples_per_s']:.2f}" for r in rs)
        print(f"{v}: median {statistics.median(r['samples_per_s'] for r in rs):.2f} samples/s (runs: {runs})")
    print(f"ratio of medians now / before: {med[0] / med[1]:.3f} (per run pair {min(pairs):.3f}-{max(pairs):.3f}); "
          f"final losses now {[round(r['loss'], 4) for r in now]}, before {[round(r['loss'], 4) for r in before]}; "
          f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


if __name__ == "__main__":
    main()
