"""``hybridray eval``'s encoding path against sentence-transformers' own ``encode``.

Same model directory (``builtin:multilingual-e5-small``'s cache, which is also a
sentence-transformers directory: Transformer -> mean Pooling -> Normalize), same texts
(a deterministic subset of MLQA-R's questions and candidate sentences, with E5's ``query: ``
/ ``passage: `` prefixes), same batch size, maximum length and torch threads, in one process.

* **hybridray** -- ``hybridray.evaluate.encode.encode_texts`` on the model ``load_encoder``
  returns, as ``hybridray eval`` calls it (batch 64, 256 tokens: ``evaluate.run.DEFAULTS``);
* **sentence-transformers** -- ``SentenceTransformer(directory).encode(texts, prompt_name=...,
  batch_size=64, normalize_embeddings=True)`` with ``max_seq_length`` 256.

The texts are cut in two halves, encoded in the order hybridray, ST (first half), ST,
hybridray (second half), so a drift of the shared machine weighs on both alike. Each side's
time is its two halves' sum; tokenisation is included on both sides (each tokenises
in its own way). The embeddings are compared row by row (cosine).

Run (from the repository root; about 4 minutes on 2 cores)::

    flock /tmp/hybridray-heavy.lock .venv/bin/python benchmarks/bench_encode.py --out benchmarks/RESULTS-encode.md
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import MLQA_R, machine  # noqa: E402


def texts_of(source: Path, questions: int, candidates: int) -> tuple[list[str], list[str]]:
    """Every k-th question and candidate sentence of MLQA-R (all languages), in file order."""
    from hybridray.evaluate.lareqa import load_lareqa

    data = load_lareqa(str(source))
    qs = [q for lang in data.langs for q in data.questions[lang]]
    cs = [c for lang in data.langs for c in data.candidate_texts(lang, False)]
    pick = lambda items, n: items[:: max(1, len(items) // n)][:n]  # noqa: E731
    return pick(qs, questions), pick(cs, candidates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=MLQA_R, help="LAReQA-layout MLQA-R directory")
    ap.add_argument("--questions", type=int, default=1000)
    ap.add_argument("--candidates", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown section here")
    args = ap.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from hybridray.evaluate.encode import encode_texts
    from hybridray.models import BUILTIN_E5, load_encoder, resolve_model_path
    from hybridray.models.offline_e5 import E5_PROMPTS

    torch.set_num_threads(args.threads)
    directory = resolve_model_path(BUILTIN_E5)
    questions, candidates = texts_of(args.source, args.questions, args.candidates)
    before = machine()
    model, tokenizer = load_encoder(directory)
    st = SentenceTransformer(directory, device="cpu")
    st.max_seq_length = args.max_length

    def ours(texts, side):
        return encode_texts(model, tokenizer, texts, prefix=E5_PROMPTS[side], max_length=args.max_length,
                            batch_size=args.batch_size, pooling="mean", progress=False)

    def theirs(texts, side):
        return st.encode(texts, prompt_name=side, batch_size=args.batch_size, normalize_embeddings=True,
                         convert_to_numpy=True, show_progress_bar=False)

    halves = [(questions[: len(questions) // 2], candidates[: len(candidates) // 2]),
              (questions[len(questions) // 2:], candidates[len(candidates) // 2:])]
    seconds = {"hybridray": 0.0, "sentence-transformers": 0.0}
    vectors = {"hybridray": [], "sentence-transformers": []}
    order = [("hybridray", ours), ("sentence-transformers", theirs)]
    for h, (qs, cs) in enumerate(halves):
        for name, encode in (order if h == 0 else order[::-1]):
            start = time.perf_counter()
            out = np.concatenate([encode(qs, "query"), encode(cs, "passage")])
            seconds[name] += time.perf_counter() - start
            vectors[name].append(out)
    after = machine()
    a, b = (np.concatenate(vectors[k]) for k in ("hybridray", "sentence-transformers"))
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    n = len(questions) + len(candidates)
    rate = {k: n / s for k, s in seconds.items()}
    tokens = [len(ids) for ids in tokenizer([E5_PROMPTS["query"] + t for t in questions] +
                                            [E5_PROMPTS["passage"] + t for t in candidates],
                                            truncation=True, max_length=args.max_length)["input_ids"]]
    import sentence_transformers

    command = (f"flock /tmp/hybridray-heavy.lock .venv/bin/python benchmarks/bench_encode.py --questions {args.questions} "
               f"--candidates {args.candidates} --threads {args.threads} --batch-size {args.batch_size} "
               f"--max-length {args.max_length} --out benchmarks/RESULTS-encode.md")
    text = f"""## Encoding speed: `hybridray eval` vs sentence-transformers `encode`

Command (from the repository root; about 4 minutes here):

    {command}

Machine: {before['cores']} cores (shared), Python {before['python']}, torch {torch.__version__},
sentence-transformers {sentence_transformers.__version__}, {before['date']}; load average
{before['load']} before and {after['load']} after (1 / 5 / 15 min). Model:
`builtin:multilingual-e5-small` (its cache directory, loaded by both). Texts: {len(questions)}
MLQA-R questions (`query: `) and {len(candidates)} candidate sentences (`passage: `), every
k-th of all 7 languages; {np.mean(tokens):.1f} tokens on average (max {max(tokens)}) with the
prefix. Batch {args.batch_size}, max length {args.max_length}, {args.threads} torch threads, fp32, both
sorting texts by length before batching (hybridray by tokens, sentence-transformers by characters).

| encoder | texts | seconds | texts/s | vs sentence-transformers |
|---|---|---|---|---|
| `hybridray.evaluate.encode.encode_texts` (`hybridray eval`) | {n} | {seconds['hybridray']:.1f} | {rate['hybridray']:.1f} | **{rate['hybridray'] / rate['sentence-transformers']:.3f}** |
| `SentenceTransformer.encode` | {n} | {seconds['sentence-transformers']:.1f} | {rate['sentence-transformers']:.1f} | 1 |

Embeddings agree: cosine between the two encoders' vectors of the same text is
min {cosine.min():.6f}, mean {cosine.mean():.7f} over the {n} texts.
"""
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
