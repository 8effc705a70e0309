"""``hybridray eval``: arguments and the glue from them to an evaluator and its report.

Imports are light at module level (``hybridray --help`` must not load torch); models and
evaluators load inside :func:`run_eval`.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from hybridray.errors import UserError

DATA_KINDS = ("lareqa", "beir", "tatoeba")


def parse_data_spec(value: str) -> tuple[str, str]:
    """``KIND:DIR`` -> ``(kind, dir)`` (a local path or ``s3://`` URI); argparse reports a bad
    value naming ``--data``."""
    kind, sep, directory = value.partition(":")
    if not sep or kind not in DATA_KINDS or not directory:
        raise argparse.ArgumentTypeError(f"expected KIND:DIR with KIND one of {', '.join(DATA_KINDS)}; got {value!r}")
    return kind, directory


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="builtin:multilingual-e5-small, builtin:tiny, a local or s3:// HF directory "
                             "(e.g. a run's model/), or a hub id")
    parser.add_argument("--data", required=True, type=parse_data_spec, metavar="KIND:DIR",
                        help="lareqa:DIR ({lang}.json, XQuAD-R/MLQA-R), beir:DIR (corpus.jsonl, "
                             "queries.jsonl, qrels/; or a directory of such datasets), tatoeba:DIR")
    parser.add_argument("--langs", default=None, metavar="L1,L2",
                        help="comma-separated languages (lareqa: ar,de,...; tatoeba: ISO 639-3 "
                             "deu,swh,...; beir: dataset sub-directories); default all")
    parser.add_argument("--query-prefix", default=None, metavar="S",
                        help="text put before every query (default: the model's, e.g. 'query: ' for E5)")
    parser.add_argument("--passage-prefix", default=None, metavar="S",
                        help="text put before every passage (default: the model's, e.g. 'passage: '); "
                             "tatoeba uses the query prefix on both sides")
    parser.add_argument("--with-context", action="store_true",
                        help="lareqa: encode candidates as sentence + paragraph, as LAReQA does")
    parser.add_argument("--split", default="test", help="beir: qrels split (default test)")
    parser.add_argument("--batch-size", type=int, default=64, help="encoding batch size (default 64)")
    parser.add_argument("--max-length", type=int, default=256, help="max tokens per text (default 256)")
    parser.add_argument("--pooling", default=None,
                        help="mean (E5), cls (LaBSE) or last (decoder LLMs); default: the model's "
                             "(its sentence-transformers pooling, else last for decoders, else mean)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory for report.json, report.md and plots")


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate ``args.model`` on ``args.data``, write the report to ``args.out``, print it."""
    from hybridray import storage

    kind, location = args.data
    directory = Path(storage.local_copy(location))  # s3:// data is fetched once into the cache
    if not directory.is_dir():
        raise UserError(f"--data {kind}:{location}: not a directory")
    from hybridray.device import default_device
    from hybridray.evaluate.report import write_report
    from hybridray.models import POOLING_MODES, default_pooling, default_prefixes, load_encoder, resolve_model_path

    model_path = resolve_model_path(args.model) if storage.is_remote(args.model) else args.model
    if args.pooling is None:
        args.pooling = default_pooling(model_path)
    if args.pooling not in POOLING_MODES:
        raise UserError(f"--pooling {args.pooling!r}: expected one of {', '.join(POOLING_MODES)}")
    if args.with_context and kind != "lareqa":
        raise UserError("--with-context applies to lareqa data only")
    started = time.perf_counter()
    langs = args.langs.split(",") if args.langs else None
    default_query, default_passage = default_prefixes(model_path)
    settings = dict(
        query_prefix=default_query if args.query_prefix is None else args.query_prefix,
        pooling=args.pooling, max_length=args.max_length, batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    passage_prefix = default_passage if args.passage_prefix is None else args.passage_prefix
    if kind == "lareqa":
        from hybridray.evaluate.lareqa import evaluate_lareqa, load_lareqa

        data = load_lareqa(directory, langs)  # before the model: data errors fail fast
    model, tokenizer = load_encoder(model_path)
    model.to(default_device())
    if kind == "lareqa":
        report = evaluate_lareqa(model, tokenizer, data, passage_prefix=passage_prefix,
                                 with_context=args.with_context, **settings)
    elif kind == "beir":
        from hybridray.evaluate.beir import evaluate_beir

        report = evaluate_beir(model, tokenizer, directory, split=args.split, langs=langs,
                               passage_prefix=passage_prefix, **settings)
    else:
        from hybridray.evaluate.tatoeba import evaluate_tatoeba

        report = evaluate_tatoeba(model, tokenizer, directory, langs=langs, **settings)
    report = {"model": args.model, **report}
    report["timing"]["total_seconds"] = time.perf_counter() - started
    print(write_report(report, args.out))
    return 0
