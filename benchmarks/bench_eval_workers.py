"""Encoding time of evaluation with 1 and 2 workers, the same total cores.

The real encoder (``builtin:multilingual-e5-small``) encodes the first ``--texts`` candidate
sentences of MLQA-R (every language in turn, ``passage: `` prefix, max 128 tokens, batch
64) in four ways, one after another in this process:

- **1 process x N threads**: ``encode_texts`` in this process (``hybridray eval``'s default);
- **2 actors x N/2 threads**: ``hybridray eval --workers 2``: a pool of Ray actors
  (:class:`hybridray.evaluate.pool.EncoderPool`) on a local Ray with N CPUs; the time is the
  first call on started actors (encoding, gathering); ``ray.init``, the pool's start (weights
  to the actors) and a second call on the same warm actors are reported apart;
- **2 ranks x N/2 threads**: the held-out evaluation inside training
  (:func:`hybridray.evaluate.sharding.encode_sharded`): 2 gloo processes, each encoding its
  half, the halves gathered; the time is rank 0's, from the first forward to the gathered
  array (the model loaded before);
- **1 process x N/2 threads**: the single-worker baseline of the split paths, for the
  per-core picture.

Every way's embeddings are compared with the first one's (max absolute difference). N =
``--threads`` (default: all cores). Run it under the shared lock::

    flock /tmp/hybridray-heavy.lock .venv/bin/python benchmarks/bench_eval_workers.py \\
        --data ../shared/data/mlqa-r --texts 3000 --out /tmp/bench_eval_workers.md
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import numpy as np

MODEL = "builtin:multilingual-e5-small"
SETTINGS = {"prefix": "passage: ", "max_length": 128, "batch_size": 64, "pooling": "mean", "progress": False}


def texts_of(data_dir: str, n: int) -> list[str]:
    from hybridray.evaluate.lareqa import load_lareqa

    data = load_lareqa(data_dir)
    texts = [t for lang in data.langs for t in data.sentences[lang]]
    if n > len(texts):
        raise SystemExit(f"--texts {n}: {data_dir} has {len(texts)} candidate sentences")
    step = len(texts) // n  # every language, not only the first
    return texts[::step][:n]


def one_process(texts: list[str], threads: int) -> tuple[float, np.ndarray]:
    import torch

    from hybridray.evaluate.encode import encode_texts
    from hybridray.models import load_encoder

    torch.set_num_threads(threads)
    model, tokenizer = load_encoder(MODEL)
    started = time.perf_counter()
    vectors = encode_texts(model, tokenizer, texts, **SETTINGS)
    return time.perf_counter() - started, vectors


def actor_pool(texts: list[str], workers: int, cpus: int) -> tuple[str, float, np.ndarray]:
    import ray

    from hybridray.evaluate.pool import EncoderPool
    from hybridray.models import load_encoder
    from hybridray.train import init_ray

    started = time.perf_counter()
    init_ray(num_cpus=cpus)
    ray_start = time.perf_counter() - started
    model, tokenizer = load_encoder(MODEL)
    started = time.perf_counter()
    pool = EncoderPool(model, tokenizer, workers)
    pool_start = time.perf_counter() - started
    started = time.perf_counter()
    vectors = pool.encode_texts(texts, **SETTINGS)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    pool.encode_texts(texts, **SETTINGS)
    again = time.perf_counter() - started
    pool.close()
    ray.shutdown()
    return (f"ray.init {ray_start:.1f} s, pool start {pool_start:.1f} s, not counted; "
            f"second call {again:.1f} s"), seconds, vectors


def _rank(rank: int, port: int, texts: list[str], threads: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from hybridray.distributed import init_process_group
    from hybridray.evaluate.sharding import encode_sharded
    from hybridray.models import load_encoder

    torch.set_num_threads(threads)
    init_process_group(rank, 2, port, "gloo", timeout_s=1800)
    model, tokenizer = load_encoder(MODEL)
    settings = dict(SETTINGS)
    prefix = settings.pop("prefix")
    dist.barrier()
    started = time.perf_counter()
    vectors = encode_sharded(model, tokenizer, texts, prefix=prefix, lockstep=False, **settings)
    seconds = time.perf_counter() - started
    if rank == 0:
        np.save(out, vectors)
        Path(out + ".seconds").write_text(str(seconds))
    dist.barrier()
    dist.destroy_process_group()


def process_group(texts: list[str], threads: int, scratch: str) -> tuple[float, np.ndarray]:
    import torch.multiprocessing as mp

    from hybridray.distributed import free_port

    out = os.path.join(scratch, "ranks.npy")
    mp.spawn(_rank, args=(free_port(), texts, threads, out), nprocs=2, join=True)
    return float(Path(out + ".seconds").read_text()), np.load(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/mlqa-r", help="a LAReQA directory (MLQA-R)")
    parser.add_argument("--texts", type=int, default=3000, help="candidate sentences to encode")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="total cores (even)")
    parser.add_argument("--out", help="write the markdown section here too")
    args = parser.parse_args()
    import tempfile

    from hybridray.console import quiet_process
    from hybridray.models import resolve_model_path

    quiet_process()
    resolve_model_path(MODEL)  # built once, before anything is timed
    half = max(1, args.threads // 2)
    texts = texts_of(args.data, args.texts)
    tokens = sum(min(128, len(t.split())) for t in texts)
    rows, reference = [], None

    def row(name, workers, threads, seconds, vectors, note=""):
        nonlocal reference
        if reference is None:
            reference = vectors
        diff = float(np.abs(vectors - reference).max())
        rows.append((name, workers, threads, seconds, len(texts) / seconds, diff, note))
        print(f"{name}: {seconds:.1f} s ({len(texts) / seconds:.1f} texts/s), max |diff| {diff:.1e} {note}", flush=True)

    seconds, vectors = one_process(texts, args.threads)
    row("1 process", 1, args.threads, seconds, vectors)
    note, seconds, vectors = actor_pool(texts, 2, args.threads)
    row("`hybridray eval --workers 2` (Ray actor pool)", 2, half, seconds, vectors, note)
    with tempfile.TemporaryDirectory() as scratch:
        seconds, vectors = process_group(texts, half, scratch)
    row("`encode_sharded`, 2 gloo processes (the code held-out evaluation runs on every rank)", 2, half, seconds, vectors,
        "no Ray Train, no DeepSpeed: ZeRO-3's filler passes not measured")
    seconds, vectors = one_process(texts, half)
    row("1 process", 1, half, seconds, vectors)

    base = rows[0][3]
    lines = [
        "## Evaluation encoding on 1 and 2 workers (issue 13, item 2)",
        "",
        f"{len(texts):,} MLQA-R candidate sentences (an even sample of all languages' pools, "
        f"~{tokens // len(texts)} words each), `{MODEL}`, `passage: ` prefix, max 128 tokens, batch 64; "
        f"{args.threads} cores in total. Machine: {platform.machine()}, {os.cpu_count()} cores "
        f"({platform.processor() or platform.platform()}), torch CPU; shared with other engineers' work "
        f"but run under the heavy lock. Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        "| way | workers | threads each | seconds | texts/s | vs 1 process × all threads | max abs diff vs row 1 | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, workers, threads, seconds, rate, diff, note in rows:
        lines.append(f"| {name} | {workers} | {threads} | {seconds:.1f} | {rate:.1f} | {base / seconds:.2f}× | "
                     f"{diff:.1e} | {note} |")
    lines += [
        "",
        "Command (under the shared lock):",
        "",
        "```bash",
        f"flock /tmp/hybridray-heavy.lock .venv/bin/python benchmarks/bench_eval_workers.py --data {args.data} "
        f"--texts {args.texts} --threads {args.threads} --out <file>",
        "```",
        "",
    ]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
