"""Driver memory of ``hybridray data mine``'s search stage against pool size: the streaming
pool (issue 14, item 2) against the in-memory pool it replaced, side by side in one run.

The search stage is what runs on the driver after Ray Data has encoded (and cached) every
file's vectors: ``build_pools`` over every input file, then ``mine_file`` per file. For each
``--sizes`` N, a synthetic one-language shard dataset of N rows (distinct passages of 20-40
generated words, one group each) is written to a temp directory in files of 20,000 rows, and
each file's passage vectors are generated on demand (random unit vectors of e5-small's 384
dims, seeded by the file index: as the cached ``_mine/vectors-*.npz`` would give them, one file
at a time). A child process then builds the pool and mines ``--queries`` rows of the first
file against all N passages (top_k 8, range_max 50, no margin), with

- ``streamed``: this checkout's ``hybridray.data.mine`` (texts and vectors on disk,
  memory-mapped; searched in chunks of ``POOL_CHUNK_ROWS``);
- ``in-memory``: ``hybridray/data/mine.py`` as of ``--baseline`` (default 1d7ba49, the commit
  before streaming), loaded from git: every text in a Python list, every vector in one array.

The child samples its anonymous RSS (``RssAnon`` of ``/proc/self/status``: the heap, not the
memory-mapped pool files, whose pages are the kernel's reclaimable page cache) every 0.05 s,
and also reports the kernel's high-water mark of all RSS (``VmHWM``, file pages included). Both
children check that they mined the same negatives. The baseline is a child that imports the
same modules and reads no data.

    flock /tmp/hybridray-heavy.lock env PYTHONPATH=$PWD .venv/bin/python \\
        benchmarks/bench_mine_memory.py --sizes 100000,400000 --out /tmp/bench_mine_memory.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MB = 2 ** 20
ROWS_PER_FILE = 20_000
DIM = 384

CHILD = r"""
import hashlib, importlib.util, json, sys, threading, time
import numpy as np

def rss_anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

peak = [rss_anon()]
done = threading.Event()
def sample():
    while not done.wait(0.05):
        peak[0] = max(peak[0], rss_anon())
threading.Thread(target=sample, daemon=True).start()

from hybridray.data import reader
args = json.loads(sys.argv[1])
if args["module"]:
    spec = importlib.util.spec_from_file_location("mine_baseline", args["module"])
    mine = importlib.util.module_from_spec(spec)
    sys.modules["mine_baseline"] = mine  # dataclasses look their module up there
    spec.loader.exec_module(mine)
else:
    import hybridray.data.mine as mine
from hybridray.evaluate import search  # faiss
start_anon = rss_anon()
if args["baseline_only"]:
    done.set()
    print(json.dumps({"anon": start_anon}))
    sys.exit(0)

def vectors(i, rows):
    v = np.random.default_rng(i).normal(size=(rows, args["dim"])).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)

files = reader.list_shard_files(args["shards"])
rows = [args["rows_per_file"]] * (len(files) - 1) + [args["n"] - args["rows_per_file"] * (len(files) - 1)]
t0 = time.perf_counter()
if args["module"]:
    pools = mine.build_pools(files, lambda i: vectors(i, rows[i]))
else:
    pools = mine.build_pools(files, lambda i: vectors(i, rows[i]), args["workdir"])
build_s = time.perf_counter() - t0
after_build = rss_anon()
records = [r for _, r in reader.iter_file_rows(files[0])][: args["queries"]]
first = vectors(0, rows[0])[: args["queries"]]
queries = first + 0.3 * vectors(10_000, len(first))  # near its own passage, as a real query
queries /= np.linalg.norm(queries, axis=1, keepdims=True)
t0 = time.perf_counter()
options = mine.MineOptions(model="-", top_k=8, range_max=50, relative_margin=None)
mined = mine.mine_file(records, queries, first, pools, options, mine.SelectionCounts())
mine_s = time.perf_counter() - t0
done.set()
digest = hashlib.sha256(json.dumps([r["hard_negatives"] for r in mined]).encode()).hexdigest()
hwm = int([l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]) * 1024
print(json.dumps({"anon": start_anon, "after_build": after_build, "peak_anon": max(peak[0], rss_anon()),
                  "hwm": hwm, "build_s": build_s, "mine_s": mine_s, "digest": digest,
                  "negatives": sum(len(r["hard_negatives"]) for r in mined)}))
"""


def write_dataset(n: int, out: Path) -> None:
    from hybridray.data.shards import write_shards

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(5000)]

    def rows():
        for i in range(n):
            text = " ".join(rng.choice(words, size=int(rng.integers(20, 41))))
            yield {"group_id": f"g{i}", "lang": "en", "query": f"question {i}", "passage": f"{i} {text}",
                   "source": "synthetic"}

    write_shards(rows(), out, rows_per_file=ROWS_PER_FILE, source="synthetic")


def child(args: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True, env=env,
                         check=False)
    if out.returncode:
        raise SystemExit(f"child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,400000")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--baseline", default="1d7ba49", help="the commit whose in-memory mine.py is compared")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    lines = [f"Machine: {platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} cores; "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; commit {head.strip()} "
             f"against {args.baseline}'s in-memory pool.", ""]
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "mine_baseline.py"
        old.write_text(subprocess.run(["git", "show", f"{args.baseline}:hybridray/data/mine.py"], cwd=REPO,
                                      capture_output=True, text=True, check=True).stdout)
        common = {"dim": DIM, "rows_per_file": ROWS_PER_FILE, "queries": args.queries, "workdir": f"{tmp}/pool"}
        base = child({**common, "module": None, "baseline_only": True, "shards": "", "n": 0})["anon"]
        lines += [f"Baseline (modules imported, no data): {base / MB:.0f} MB anonymous RSS.", "",
                  "| passages | pool | build s | mine s (queries) | anon. RSS after build | peak anon. RSS "
                  "| peak above baseline | bytes a passage | VmHWM (file pages incl.) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        results = {}
        for n in (int(s) for s in args.sizes.split(",")):
            shards = Path(tmp) / f"n{n}"
            write_dataset(n, shards)
            for name, module in (("in-memory", str(old)), ("streamed", None)):
                r = child({**common, "module": module, "baseline_only": False, "shards": str(shards), "n": n})
                results[(n, name)] = r
                lines.append(f"| {n:,} | {name} | {r['build_s']:.1f} | {r['mine_s']:.1f} ({args.queries}) | "
                             f"{r['after_build'] / MB:.0f} MB | {r['peak_anon'] / MB:.0f} MB | "
                             f"{(r['peak_anon'] - base) / MB:.0f} MB | {(r['peak_anon'] - base) / n:,.0f} | "
                             f"{r['hwm'] / MB:.0f} MB |")
                print(lines[-1], flush=True)
            same = results[(n, "in-memory")]["digest"] == results[(n, "streamed")]["digest"]
            if not same:
                raise SystemExit(f"{n} passages: the streamed pool mined other negatives than the in-memory one")
            import shutil

            shutil.rmtree(shards)
        sizes = sorted({n for n, _ in results})
        if len(sizes) > 1:
            a, b = sizes[0], sizes[-1]
            lines.append("")
            for name in ("in-memory", "streamed"):
                grow = results[(b, name)]["peak_anon"] - results[(a, name)]["peak_anon"]
                lines.append(f"- {name}: peak anonymous RSS grows {grow / MB:.0f} MB from {a:,} to {b:,} passages, "
                             f"{grow / (b - a):,.0f} bytes a passage.")
        lines.append("- Both pools mined the same negatives at every size (sha256 of the lists).")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
