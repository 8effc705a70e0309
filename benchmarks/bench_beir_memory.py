"""Memory of ``hybridray eval --data beir:DIR`` against corpus size: the streaming path
(issue 13, item 2) must not hold the corpus's texts or embeddings in one process.

For each ``--sizes`` N, a synthetic BEIR-layout dataset is written to a temp directory
(``corpus.jsonl`` of N distinct passages of 20-40 generated words, some with a title;
``queries.jsonl`` and ``qrels/test.tsv`` with ``--queries`` queries, 1-3 relevant passages
each), then ``hybridray eval --model builtin:tiny --data beir:DIR --no-progress`` runs on it in
a child process, as a user runs it (one worker, no Ray). The child's RSS (with any descendants)
is sampled every 0.2 s with psutil; its high-water mark is also read from the kernel
(``wait4``'s ``ru_maxrss``), which no sampling interval can miss. The baseline is a child that
imports the same modules and loads ``builtin:tiny``, then reports its RSS: what the command
holds before it reads any data.

Then ``scan_beir`` alone (what the driver keeps per passage: ids, byte offsets, a digest) runs
on the largest dataset in a child under tracemalloc, which reports the Python heap it holds
after the scan and its peak during the scan, and the size of each field.

``builtin:tiny`` is randomly initialised: the metrics it scores are meaningless. This measures
memory and time only. Run it under the shared lock::

    flock /tmp/hybridray-heavy.lock env PYTHONPATH=$PWD .venv/bin/python \\
        benchmarks/bench_beir_memory.py --sizes 1000,100000,400000 --threads 1 --out /tmp/bench_beir_memory.md
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
import threading
import time
from pathlib import Path

import numpy as np
import psutil

MODEL = "builtin:tiny"
SAMPLE_S = 0.2
MB = 2 ** 20

#: A child that loads what ``hybridray eval`` loads before the data, then prints its RSS.
BASELINE = """
import json, psutil
from hybridray.evaluate import beir, encode, search  # faiss, torch, transformers
from hybridray.evaluate.pool import encoder_for
from hybridray.models import load_encoder
model, tokenizer = load_encoder({model!r})
print(json.dumps({{"rss": psutil.Process().memory_info().rss}}))
"""

#: A child that scans one dataset under tracemalloc and sizes what the scan keeps.
SCAN = """
import json, sys, tracemalloc
from hybridray.evaluate.beir import scan_beir
tracemalloc.start()
scan = scan_beir({path!r})
held, peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
ids = sys.getsizeof(scan.corpus_ids) + sum(sys.getsizeof(i) for i in scan.corpus_ids)
offsets = sys.getsizeof(scan.offsets) + sum(sys.getsizeof(o) for o in scan.offsets)
duplicates = sys.getsizeof(scan.duplicate_of)
print(json.dumps({{"held": held, "peak": peak, "ids": ids, "offsets": offsets, "duplicates": duplicates,
                  "n_duplicates": len(scan.duplicate_of), "n_queries": len(scan.query_ids)}}))
"""


#: A child that reads one corpus chunk and tokenises it as ``encode_texts`` does (all at once).
CHUNK = """
import json, psutil
from hybridray.evaluate.beir import CORPUS_CHUNK, read_corpus_chunk, scan_beir
from hybridray.models import load_encoder
model, tokenizer = load_encoder({model!r})
source = scan_beir({path!r}).chunks(CORPUS_CHUNK)[0][1]
rss = psutil.Process().memory_info
before = rss().rss
texts = read_corpus_chunk(source)
read = rss().rss
features = tokenizer(texts, truncation=True, max_length=min(256, tokenizer.model_max_length))
print(json.dumps({{"n": len(texts), "texts": read - before, "tokenised": rss().rss - read,
                  "tokens": sum(map(len, features["input_ids"])) / len(texts)}}))
"""


def words(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct pronounceable words of 2-4 syllables."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    out: dict[str, None] = {}
    while len(out) < n:
        out["".join(rng.choice(syllables, size=int(rng.integers(2, 5))))] = None
    return list(out)


def write_dataset(directory: Path, n: int, n_queries: int, seed: int = 0) -> dict:
    """A BEIR-layout dataset of ``n`` distinct passages and ``n_queries`` judged queries."""
    rng = np.random.default_rng(seed)
    vocab = np.array(words(rng, 5000))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "qrels").mkdir(exist_ok=True)
    seen: set[int] = set()
    lengths = rng.integers(20, 41, size=n)
    picks = rng.integers(0, len(vocab), size=int(lengths.sum()))
    titled = rng.random(n) < 0.3
    relevant = rng.choice(n, size=(n_queries, 3), replace=n < 3 * n_queries)
    wanted = {int(d) for d in relevant.ravel()}
    texts: dict[int, str] = {}
    with (directory / "corpus.jsonl").open("w", encoding="utf-8") as f:
        at = 0
        for i in range(n):
            body = " ".join(vocab[picks[at:at + lengths[i]]])
            at += lengths[i]
            title = " ".join(vocab[picks[at - 2:at]]).title() if titled[i] else ""
            if hash(title + " " + body) in seen:  # astronomically rare: one more word makes it distinct
                body += " " + str(i)
            seen.add(hash(title + " " + body))
            if i in wanted:
                texts[i] = body
            f.write(json.dumps({"_id": f"doc{i}", "title": title, "text": body}) + "\n")
    with (directory / "queries.jsonl").open("w", encoding="utf-8") as q, \
            (directory / "qrels" / "test.tsv").open("w", encoding="utf-8") as r:
        r.write("query-id\tcorpus-id\tscore\n")
        for j in range(n_queries):
            judged = list(dict.fromkeys(int(d) for d in relevant[j, : int(rng.integers(1, 4))]))
            source = texts[judged[0]].split()
            start = int(rng.integers(0, len(source) - 6))
            q.write(json.dumps({"_id": f"q{j}", "text": " ".join(source[start:start + 6]) + "?"}) + "\n")
            for rank, doc in enumerate(judged):
                r.write(f"q{j}\tdoc{doc}\t{2 if rank == 0 else 1}\n")
    return {"corpus_bytes": (directory / "corpus.jsonl").stat().st_size}


def run_sampled(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; its RSS (and its descendants') every :data:`SAMPLE_S`, and the kernel's peak."""
    started = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = psutil.Process(child.pid)
    samples: list[tuple[float, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            except psutil.Error:
                break
            samples.append((time.perf_counter() - started, rss))
            done.wait(SAMPLE_S)

    # read the pipes in threads so a chatty child never blocks on a full pipe
    out: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, s=s: out.__setitem__(k, s.read()))
               for k, s in (("stdout", child.stdout), ("stderr", child.stderr))]
    sampler = threading.Thread(target=sample)
    for t in readers + [sampler]:
        t.start()
    _, status, usage = os.wait4(child.pid, 0)  # ru_maxrss: the kernel's high-water mark, in KiB on Linux
    seconds = time.perf_counter() - started
    done.set()
    for t in readers + [sampler]:
        t.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({child.returncode}):\n{out['stderr'][-3000:]}")
    return {"seconds": seconds, "peak_sampled": max(r for _, r in samples), "peak_kernel": usage.ru_maxrss * 1024,
            "samples": samples, "stdout": out["stdout"], "cpu_seconds": usage.ru_utime + usage.ru_stime}


def timeline(samples: list[tuple[float, int]], points: int = 10) -> list[int]:
    """The sampled RSS at the end of each tenth of the run (the flat part is the chunked encoding)."""
    end = samples[-1][0]
    return [next(r for t, r in reversed(samples) if t <= end * (i + 1) / points) for i in range(points)]


def child_json(code: str, env: dict) -> dict:
    run = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"child failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def machine() -> str:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}, " \
           f"torch {torch.__version__}, {psutil.virtual_memory().total / 2 ** 30:.1f} GiB RAM"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,100000,400000",
                        help="corpus sizes, comma-separated, ascending; the growth per passage is taken "
                             "between the last two (both past one chunk)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of the children (default 1: the other core stays free on a shared "
                             "2-core machine; memory does not depend on it)")
    parser.add_argument("--no-eval", action="store_true",
                        help="only the two checks on the largest size (scan_beir's holdings, one chunk tokenised)")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    from hybridray.evaluate.beir import CORPUS_CHUNK
    from hybridray.evaluate.pool import chunk_length

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    hybridray = str(Path(sys.executable).with_name("hybridray"))
    baseline = child_json(BASELINE.format(model=MODEL), env)["rss"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_beir_memory_") as tmp:
        for n in [] if args.no_eval else sizes:
            data = Path(tmp) / f"synthetic-{n}"
            started = time.perf_counter()
            written = write_dataset(data, n, args.queries)
            generate_s = time.perf_counter() - started
            run = run_sampled([hybridray, "eval", "--model", MODEL, "--data", f"beir:{data}", "--no-progress",
                               "--out", str(Path(tmp) / f"eval-{n}")], env)
            report = json.loads((Path(tmp) / f"eval-{n}" / "report.json").read_text())
            metrics = report["per_dataset"][data.name]
            assert metrics["n_corpus"] == n, metrics
            rows.append({"n": n, "chunk": chunk_length(n, 1, CORPUS_CHUNK), "generate_s": generate_s, **written,
                         **{k: v for k, v in run.items() if k not in ("samples", "stdout")},
                         "timeline": timeline(run["samples"]),
                         "ndcg": metrics["ndcg@10"], "n_queries": metrics["n_queries"]})
            print(f"N={n}: peak {run['peak_kernel'] / MB:.0f} MB (sampled {run['peak_sampled'] / MB:.0f}), "
                  f"{run['seconds']:.1f} s", flush=True)
        largest = str(Path(tmp) / f"synthetic-{sizes[-1]}")
        if not rows:  # --no-eval: the dataset for the two checks below
            write_dataset(Path(largest), sizes[-1], args.queries)
        scan = child_json(SCAN.format(path=largest), env)
        chunk = child_json(CHUNK.format(model=MODEL, path=largest), env)
    text = table(rows, baseline, scan, chunk, sizes[-1], args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")


def table(rows: list[dict], baseline: int, scan: dict, chunk: dict, n_scan: int, args) -> str:
    dim = 64  # builtin:tiny's hidden size
    lines = [(f"Machine: {machine()}. Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. "
             f"Children at OMP_NUM_THREADS={args.threads}."),
             f"Baseline (modules imported, `{MODEL}` loaded, no data): {baseline / MB:.0f} MB RSS."]
    if rows:
        lines += ["", ("| passages | corpus.jsonl | chunk | queries | peak RSS (kernel) | peak RSS (sampled 0.2 s) "
             "| peak above baseline | texts + embeddings of the corpus, for scale | wall s | CPU s |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        above = r["peak_kernel"] - baseline
        whole = r["corpus_bytes"] + r["n"] * dim * 4
        lines.append(f"| {r['n']:,} | {r['corpus_bytes'] / MB:.0f} MB | {r['chunk']:,} | {r['n_queries']} "
                     f"| {r['peak_kernel'] / MB:.0f} MB | {r['peak_sampled'] / MB:.0f} MB | {above / MB:.0f} MB "
                     f"| ≥ {whole / MB:.0f} MB | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} |")
    lines += [""] * bool(rows) + [f"RSS at each tenth of the run, {r['n']:,} passages (MB): "
                     + " ".join(f"{x / MB:.0f}" for x in r["timeline"]) for r in rows]
    if len(rows) > 1:
        a, b = rows[-2], rows[-1]  # both past one chunk: the difference is what grows per passage
        growth = (b["peak_kernel"] - a["peak_kernel"]) / (b["n"] - a["n"])
        lines += ["", (f"Peak growth from {a['n']:,} to {b['n']:,} passages: "
                      f"{(b['peak_kernel'] - a['peak_kernel']) / MB:.0f} MB, {growth:.0f} bytes per passage "
                      f"(corpus.jsonl: {b['corpus_bytes'] / b['n']:.0f} bytes per passage; its embeddings at "
                      f"dim {dim}: {dim * 4} bytes, at dim 384 (e5-small): {384 * 4} bytes).")]
    n = n_scan
    lines += ["", (f"`scan_beir` alone on {n:,} passages (tracemalloc, Python heap): held after the scan "
                  f"{scan['held'] / MB:.1f} MB ({scan['held'] / n:.0f} B/passage), peak during it "
                  f"{scan['peak'] / MB:.1f} MB ({scan['peak'] / n:.0f} B/passage); of what it holds: ids "
                  f"{scan['ids'] / n:.0f} B/passage (list + str objects), byte offsets {scan['offsets'] / n:.0f} "
                  f"B/passage (list + int objects), duplicates map {scan['duplicates']} B "
                  f"({scan['n_duplicates']} repeated texts), {scan['n_queries']} queries with their qrels."),
              "", (f"One chunk of {chunk['n']:,} passages read ({chunk['texts'] / MB:.0f} MB of RSS for its texts) and "
                  f"tokenised at once as `encode_texts` does ({chunk['tokens']:.1f} tokens a passage): "
                  f"+{chunk['tokenised'] / MB:.0f} MB RSS ({chunk['tokenised'] / chunk['n'] / 1024:.1f} KiB a passage)."),
              *(["", f"nDCG@10 of the random `{MODEL}` (meaningless, a check that the run scored): "
                  + ", ".join(f"{r['ndcg']:.4f}" for r in rows) + "."] if rows else []),
              "", "```bash",
              f"flock /tmp/hybridray-heavy.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_beir_memory.py "
              f"--sizes {args.sizes} --queries {args.queries} --threads {args.threads}" + (" --no-eval" if args.no_eval else ""),
              "```"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
