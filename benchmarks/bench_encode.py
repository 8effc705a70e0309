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
in its own way). The real and padded tokens of the exact batches each side encodes are
counted (forward pre-hooks, ``TokenCounter``) and printed. Once on all 7
languages, once on one language (``--one-language``), so the gap is not read as a
mixed-script artefact only. The embeddings are compared row by row (cosine).

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

from bench_common import MLQA_R, describe, machine  # noqa: E402


def texts_of(source: Path, questions: int, candidates: int, langs=None) -> tuple[list[str], list[str]]:
    """Every k-th question and candidate sentence of MLQA-R (all languages, or ``langs``), in
    file order."""
    from hybridray.evaluate.lareqa import load_lareqa

    data = load_lareqa(str(source), langs)
    qs = [q for lang in data.langs for q in data.questions[lang]]
    cs = [c for lang in data.langs for c in data.candidate_texts(lang, False)]
    pick = lambda items, n: items[:: max(1, len(items) // n)][:n]  # noqa: E731
    return pick(qs, questions), pick(cs, candidates)


class TokenCounter:
    """Real and padded tokens of every batch a module encodes (a forward pre-hook on it):
    hybridray's ``BertModel`` (called with ``attention_mask=``) and sentence-transformers'
    ``Transformer`` module (called with a features dict; it calls ``BertModel.forward``
    directly, which bypasses hooks on the ``BertModel``)."""

    def __init__(self, model):
        self.real = self.padded = self.batches = 0
        self.active = False
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if self.active:
            mask = kwargs["attention_mask"] if "attention_mask" in kwargs else args[0]["attention_mask"]
            self.real += int(mask.sum())
            self.padded += mask.numel()
            self.batches += 1


def compare(questions, candidates, ours, theirs, counters) -> dict:
    """Both encoders on the same texts, cut in two halves encoded in the order hybridray,
    ST (first half), ST, hybridray (second half); seconds, tokens and vectors per encoder."""
    halves = [(questions[: len(questions) // 2], candidates[: len(candidates) // 2]),
              (questions[len(questions) // 2:], candidates[len(candidates) // 2:])]
    names = ("hybridray", "sentence-transformers")
    seconds = dict.fromkeys(names, 0.0)
    vectors = {k: [] for k in names}
    tokens = {k: [0, 0] for k in names}
    order = list(zip(names, (ours, theirs)))
    for h, (qs, cs) in enumerate(halves):
        for name, encode in (order if h == 0 else order[::-1]):
            counter = counters[name]
            counter.real = counter.padded = 0
            counter.active = True
            start = time.perf_counter()
            out = np.concatenate([encode(qs, "query"), encode(cs, "passage")])
            seconds[name] += time.perf_counter() - start
            counter.active = False
            tokens[name][0] += counter.real
            tokens[name][1] += counter.padded
            vectors[name].append(out)
    a, b = (np.concatenate(vectors[k]) for k in names)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"seconds": seconds, "tokens": tokens, "cosine": cosine, "n": len(questions) + len(candidates)}


def rows_of(title: str, r: dict) -> list[str]:
    ours, st = r["seconds"]["hybridray"], r["seconds"]["sentence-transformers"]
    (ro, po), (rs, ps) = r["tokens"]["hybridray"], r["tokens"]["sentence-transformers"]
    return [
        f"| {title} | hybridray `encode_texts` | {r['n']} | {ours:.1f} | {r['n'] / ours:.1f} | **{st / ours:.2f}×** "
        f"| {ro:,} / {po:,} ({ro / po:.1%}) | {ps / po:.2f}× |",
        f"| {title} | `SentenceTransformer.encode` | {r['n']} | {st:.1f} | {r['n'] / st:.1f} | 1 "
        f"| {rs:,} / {ps:,} ({rs / ps:.1%}) | 1 |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", type=Path, default=MLQA_R, help="LAReQA-layout MLQA-R directory")
    ap.add_argument("--questions", type=int, default=1000)
    ap.add_argument("--candidates", type=int, default=2000)
    ap.add_argument("--one-language", default="en", help="the one-language comparison's language ('' = none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None, help="write the Markdown section here")
    args = ap.parse_args()

    import sentence_transformers
    import torch
    from sentence_transformers import SentenceTransformer

    from hybridray.evaluate.encode import encode_texts
    from hybridray.models import BUILTIN_E5, load_encoder, resolve_model_path
    from hybridray.models.offline_e5 import E5_PROMPTS

    torch.set_num_threads(args.threads)
    directory = resolve_model_path(BUILTIN_E5)
    sets = {"all 7 languages": texts_of(args.source, args.questions, args.candidates)}
    if args.one_language:
        sets[f"{args.one_language} only"] = texts_of(args.source, args.questions // 2, args.candidates // 2,
                                                    [args.one_language])
    before = machine()
    model, tokenizer = load_encoder(directory)
    st = SentenceTransformer(directory, device="cpu")
    st.max_seq_length = args.max_length
    counters = {"hybridray": TokenCounter(model), "sentence-transformers": TokenCounter(st[0])}

    def ours(texts, side):
        return encode_texts(model, tokenizer, texts, prefix=E5_PROMPTS[side], max_length=args.max_length,
                            batch_size=args.batch_size, pooling="mean", progress=False)

    def theirs(texts, side):
        return st.encode(texts, prompt_name=side, batch_size=args.batch_size, normalize_embeddings=True,
                         convert_to_numpy=True, show_progress_bar=False)

    results = {title: compare(qs, cs, ours, theirs, counters) for title, (qs, cs) in sets.items()}
    after = machine()
    rows = [row for title, r in results.items() for row in rows_of(title, r)]
    cosines = np.concatenate([r["cosine"] for r in results.values()])
    counts = "; ".join(f"{title}: {len(qs)} questions and {len(cs)} candidate sentences"
                       for title, (qs, cs) in sets.items())
    one = args.one_language or "''"
    command = (f"flock /tmp/hybridray-heavy.lock .venv/bin/python benchmarks/bench_encode.py --questions {args.questions} "
               f"--candidates {args.candidates} --one-language {one} --threads {args.threads} "
               f"--batch-size {args.batch_size} --max-length {args.max_length} --out benchmarks/RESULTS-encode.md")
    text = f"""## Encoding speed: `hybridray eval` vs sentence-transformers `encode`

Command (from the repository root; about 5 minutes here):

    {command}

Machine: {describe(before)}, sentence-transformers {sentence_transformers.__version__};
{before['date']}, shared, run under the lock with nothing else of mine running; load average
{before['load']} before and {after['load']} after (1 / 5 / 15 min). Model:
`builtin:multilingual-e5-small` (its cache directory, loaded by both). Texts: every k-th of
MLQA-R's questions (`query: `) and candidate sentences (`passage: `) ({counts}). Batch
{args.batch_size}, max length {args.max_length}, {args.threads} torch threads, fp32, one process;
both sort texts by length before batching (hybridray by token count, sentence-transformers 6
by characters). Each side's time includes its own tokenisation; the halves run in the order
hybridray, ST, ST, hybridray. Tokens: counted by forward pre-hooks on the modules that
receive each batch (hybridray's `BertModel`, sentence-transformers' `Transformer`), i.e. of
the exact batches each side encoded (real = attention-mask ones, padded = the
batch tensors' size).

| texts | encoder | texts | seconds | texts/s | speed vs sentence-transformers | real / padded tokens encoded (padding efficiency) | padded tokens vs sentence-transformers |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Embeddings agree: cosine between the two encoders' vectors of the same text is min
{cosines.min():.6f}, mean {cosines.mean():.7f} over all {len(cosines)} texts.
"""
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
