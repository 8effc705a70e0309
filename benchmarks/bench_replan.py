"""What does cutting chunks at step boundaries cost? A window split across chunks is planned
once per piece (``pipeline._materialise``: ``ray.get`` of the window's groups, then
``sampler.plan_window`` of the whole window; no text is read or tokenised for steps outside
the piece). This times those two parts for one window of ``--window-groups`` synthetic groups
(the default window, 100k groups: 3,125 steps of 32), pure Python, no Ray: the groups are
unpickled as ``ray.get`` would, and planned with the default sampler (alpha 0.5, uniform).

Groups look like MLQA-R's: 2-7 of its 7 languages each, one row per language.

Run (from the repository root)::

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_replan.py
"""
from __future__ import annotations

import argparse
import pickle
import statistics
import time

import numpy as np

LANGS = ("ar", "de", "en", "es", "hi", "vi", "zh")


def groups(n: int, seed: int = 0):
    from hybridray.data.sampler import Group

    rng = np.random.default_rng(seed)
    out = []
    for g in range(n):
        langs = tuple(sorted(rng.choice(LANGS, size=int(rng.integers(2, 8)), replace=False)))
        out.append(Group(f"g{g}", langs, tuple((0, 7 * g + i) for i in range(len(langs)))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--window-groups", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--chunk-steps", type=int, default=2000, help="data.stream_chunk_steps")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from hybridray.config import SamplerConfig
    from hybridray.data.sampler import Segment, plan_window

    cfg = SamplerConfig(batch_size=args.batch_size, window_groups=args.window_groups)
    window = groups(args.window_groups)
    blob = pickle.dumps(window, protocol=5)
    steps = args.window_groups // args.batch_size
    seg = Segment(epoch=0, window=0, ordinal=0, first_step=0, n_steps=steps)
    fetch, plan = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        got = pickle.loads(blob)
        t1 = time.perf_counter()
        plans = plan_window(got, cfg, seed=0, segment=seg)
        t2 = time.perf_counter()
        fetch.append(t1 - t0)
        plan.append(t2 - t1)
        assert len(plans) == steps
    once = statistics.median(fetch) + statistics.median(plan)
    # pieces per window when windows follow each other and chunks are cut every chunk_steps steps
    pieces = 1 + (steps - 1) / args.chunk_steps if args.chunk_steps else 1
    print(f"window: {args.window_groups:,} groups, {steps:,} steps of {args.batch_size}; "
          f"{len(blob) / 1e6:.1f} MB pickled")
    print(f"unpickle the groups: {statistics.median(fetch):.2f} s (median of {args.repeats}: "
          + ", ".join(f"{x:.2f}" for x in fetch) + ")")
    print(f"plan_window:         {statistics.median(plan):.2f} s (median of {args.repeats}: "
          + ", ".join(f"{x:.2f}" for x in plan) + ")")
    print(f"per piece: {once:.2f} s; chunks of {args.chunk_steps} steps give on average {pieces:.2f} pieces "
          f"per window, i.e. {(pieces - 1) * once:.2f} s of extra planning per {steps:,} steps "
          f"({(pieces - 1) * once / steps * 1000:.2f} ms per step), in Ray Data tasks")


if __name__ == "__main__":
    main()
