"""Peak memory and step time of one training step with and without gradient caching
(``loss.cache_chunk_size``), on the multilingual-e5-small shape (random weights: memory and
time do not depend on them), one CPU process, plain torch (forward, backward, no optimizer).

Each setting runs in a fresh subprocess; its peak resident memory (``ru_maxrss``) after the
step minus its resident memory just before it is the step's own peak (activations, gradients,
temporaries); the step must raise the process's high-water mark for that to hold, which the
script checks. Usage::

    flock /tmp/hybridray-heavy.lock .venv/bin/python benchmarks/bench_grad_cache.py --out /tmp/gc.md
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

#: (pairs per worker, cache_chunk_size); 0 = no caching.
SETTINGS = [(32, 0), (32, 8), (128, 0), (128, 8), (512, 8)]
QUERY_TOKENS, PASSAGE_TOKENS = 48, 96


def one(pairs: int, chunk: int) -> dict:
    import torch
    from transformers import BertConfig, BertModel

    from hybridray.engine import TrainingModel
    from hybridray.loss import InfoNCELoss
    from hybridray.models.encoder import DualEncoder

    torch.manual_seed(0)
    torch.set_num_threads(2)
    bert = BertModel(BertConfig(vocab_size=250037, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=1536, max_position_embeddings=514), add_pooling_layer=False)
    model = TrainingModel(DualEncoder(bert, freeze_embeddings=True), InfoNCELoss(0.05), cache_chunk_size=chunk)
    model.train()
    gen = torch.Generator().manual_seed(1)
    batch = dict(
        query_input_ids=torch.randint(5, 250000, (pairs, QUERY_TOKENS), generator=gen),
        query_attention_mask=torch.ones(pairs, QUERY_TOKENS, dtype=torch.long),
        passage_input_ids=torch.randint(5, 250000, (pairs, PASSAGE_TOKENS), generator=gen),
        passage_attention_mask=torch.ones(pairs, PASSAGE_TOKENS, dtype=torch.long),
        group_ids=torch.arange(pairs),
    )
    high_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with open("/proc/self/statm") as f:
        resident = int(f.read().split()[1]) * resource.getpagesize() / 1024
    start = time.perf_counter()
    loss = model(**batch)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if peak <= high_before:
        raise RuntimeError("the step did not raise the high-water mark: its peak is not measurable this way")
    return {"pairs": pairs, "chunk": chunk, "step_peak_mib": (peak - resident) / 1024, "seconds": seconds,
            "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the Markdown table here too")
    parser.add_argument("--one", nargs=2, type=int, metavar=("PAIRS", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    rows = []
    for pairs, chunk in SETTINGS:
        out = subprocess.run([sys.executable, __file__, "--one", str(pairs), str(chunk)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr, flush=True)
    lines = ["| pairs per worker | cache_chunk_size | step peak memory (MiB) | step time (s) | loss |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['pairs']} | {r['chunk'] or 'off'} | {r['step_peak_mib']:.0f} | {r['seconds']:.1f} | {r['loss']:.4f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
