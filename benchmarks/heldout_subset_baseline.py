"""The untrained encoder on the held-out subset a sweep evaluates on (``train.eval_max_queries``),
scored exactly as a trial's evaluation is (same prefixes, pooling, max length): the number a
sweep's trials start from (for the published sweep: BENCHMARKS.md, "The α × τ sweep").

    .venv/bin/python benchmarks/heldout_subset_baseline.py configs/local.yaml train.eval_max_queries=300
"""
from __future__ import annotations

import argparse
import json
import time

from hybridray.config import load_config
from hybridray.data.tokenize import prefixes
from hybridray.device import default_device
from hybridray.evaluate.lareqa import evaluate_lareqa, load_lareqa, subset_lareqa
from hybridray.models import load_encoder, resolve_model_path
from hybridray.train import val_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="dotted KEY=VALUE, as for hybridray train")
    args = parser.parse_args()
    config = load_config(args.config, args.overrides)
    started = time.perf_counter()
    heldout = load_lareqa(config.data.heldout, config.eval.langs)
    if config.train.eval_max_queries:
        heldout = subset_lareqa(heldout, config.train.eval_max_queries)
    model, tokenizer = load_encoder(resolve_model_path(config.model.name_or_path))
    model.to(default_device())
    query_prefix, passage_prefix = prefixes(config.model)
    report = evaluate_lareqa(model, tokenizer, heldout, query_prefix=query_prefix, passage_prefix=passage_prefix,
                             pooling=config.model.pooling, max_length=config.eval.max_length,
                             batch_size=config.eval.batch_size, with_context=config.eval.with_context)
    n_queries = sum(len(heldout.question_ids[lang]) for lang in heldout.langs)
    n_sentences = sum(len(heldout.sentences[lang]) for lang in heldout.langs)
    print(json.dumps({"model": config.model.name_or_path, "queries": n_queries, "sentences": n_sentences,
                      "seconds": round(time.perf_counter() - started, 1), **val_metrics(report)}, indent=2))


if __name__ == "__main__":
    main()
