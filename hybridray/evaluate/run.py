"""``hybridray eval``: arguments and the glue from them to an evaluator (or a suite) and its report.

Imports are light at module level (``hybridray --help`` must not load torch); models and
evaluators load inside :func:`run_eval`. One task (``--data KIND:DIR``) and a suite
(``--suite FILE``) go through the same loaders and evaluators
(:mod:`hybridray.evaluate.suite`).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from hybridray.errors import UserError

DATA_KINDS = ("lareqa", "beir", "tatoeba", "tydi", "afriqa")
#: Encoding defaults of a single ``--data`` task (a suite has its own, in its file).
DEFAULTS = {"batch_size": 64, "max_length": 256}
#: Options that only apply to one --data task, not to a suite.
TASK_ONLY = ("langs", "split", "with_context", "no_distractors", "afriqa_corpus")


def parse_data_spec(value: str) -> tuple[str, str]:
    """``KIND:DIR`` -> ``(kind, dir)`` (``dir`` may be ``s3://...``); argparse reports a bad
    value naming ``--data``."""
    kind, sep, directory = value.partition(":")
    if not sep or kind not in DATA_KINDS or not directory:
        raise argparse.ArgumentTypeError(f"expected KIND:DIR with KIND one of {', '.join(DATA_KINDS)}; got {value!r}")
    return kind, directory


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="builtin:multilingual-e5-small, builtin:tiny, a local or s3:// HF directory "
                             "(e.g. a run's model/), or a hub id")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=parse_data_spec, metavar="KIND:DIR",
                        help="one task: lareqa:DIR ({lang}.json, XQuAD-R/MLQA-R), beir:DIR (corpus.jsonl, "
                             "queries.jsonl, qrels/; or a directory of such datasets), tatoeba:DIR, "
                             "tydi:DIR (TyDi QA GoldP: dev/{lang}.json, train/{lang}.json), "
                             "afriqa:DIR (<lang>.<pivot>.<split>.jsonl); DIR may be s3://bucket/prefix")
    source.add_argument("--suite", metavar="FILE",
                        help="a suite of tasks (e.g. configs/eval/suite.yaml): one report for all")
    parser.add_argument("--langs", default=None, metavar="L1,L2",
                        help="comma-separated languages (lareqa, tydi: ar,sw,...; tatoeba, afriqa: ISO 639-3 "
                             "deu,hau,...; beir: dataset sub-directories); default all")
    parser.add_argument("--query-prefix", default=None, metavar="S",
                        help="text put before every query (default: the model's, e.g. 'query: ' for E5)")
    parser.add_argument("--passage-prefix", default=None, metavar="S",
                        help="text put before every passage (default: the model's, e.g. 'passage: '); "
                             "tatoeba uses the query prefix on both sides")
    parser.add_argument("--with-context", action="store_true",
                        help="lareqa: encode candidates as sentence + paragraph, as LAReQA does")
    parser.add_argument("--split", default=None,
                        help="beir: qrels split (default test); tydi: dev (default); afriqa: test (default)")
    parser.add_argument("--no-distractors", action="store_true",
                        help="tydi: corpus = the split's passages only (default: add train/ passages)")
    parser.add_argument("--afriqa-corpus", choices=("pivot", "file"), default=None,
                        help="afriqa: passages of every file of the pivot language (default) or of the file")
    parser.add_argument("--batch-size", type=int, default=None, help="encoding batch size (default 64)")
    parser.add_argument("--max-length", type=int, default=None, help="max tokens per text (default 256)")
    parser.add_argument("--pooling", default=None,
                        help="mean (E5), cls (LaBSE) or last (decoder LLMs); default: the model's "
                             "(its sentence-transformers pooling, else last for decoders, else mean)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="encode on N Ray actors (one per GPU, else an equal share of the CPUs each; "
                             "joins RAY_ADDRESS's cluster or starts a local one); default 1: this process")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory for report.json, report.md and plots")


def _task_from_args(args: argparse.Namespace):
    """The one task of ``--data KIND:DIR`` and its options, as a suite task."""
    from hybridray.config import KIND_OPTIONS, EvalTaskConfig

    kind, directory = args.data
    options = {"with_context": True if args.with_context else None,
               "distractors": False if args.no_distractors else None,
               "corpus": args.afriqa_corpus, "split": args.split}
    flags = {"with_context": "--with-context", "distractors": "--no-distractors", "corpus": "--afriqa-corpus",
             "split": "--split"}
    wrong = [flags[o] for o, v in options.items() if v is not None and kind not in KIND_OPTIONS[o]]
    if wrong:
        raise UserError(f"{', '.join(wrong)}: does not apply to {kind} data")
    return EvalTaskConfig(name=kind, kind=kind, path=directory,
                          langs=args.langs.split(",") if args.langs else None, **options)


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate ``args.model`` on ``args.data`` or ``args.suite``, write the report to
    ``args.out``, print it."""
    from hybridray.models import POOLING_MODES

    if args.workers < 1:  # before any data is read (encoder_for checks it too, for library callers)
        raise UserError(f"--workers {args.workers}: expected 1 or more")
    if args.pooling is not None and args.pooling not in POOLING_MODES:
        raise UserError(f"--pooling {args.pooling!r}: expected one of {', '.join(POOLING_MODES)}")
    overrides = {"query_prefix": args.query_prefix, "passage_prefix": args.passage_prefix,
                 "pooling": args.pooling, "max_length": args.max_length, "batch_size": args.batch_size}
    if args.suite:
        given = [f"--{o.replace('_', '-')}" for o in TASK_ONLY if getattr(args, o)]
        if given:
            raise UserError(f"{', '.join(given)}: set per task in the suite file, not with --suite")
        from hybridray.config import load_suite
        from hybridray.evaluate.suite import run_suite

        suite = load_suite(args.suite)
        run_suite(suite, args.model, args.out, suite_path=args.suite, overrides=overrides,
                  progress=not args.no_progress, workers=args.workers)
        print((Path(args.out) / "report.md").read_text(encoding="utf-8"))
        return 0
    return _run_one(args, overrides)


def _run_one(args: argparse.Namespace, overrides: dict) -> int:
    from hybridray.config import EvalSuiteConfig
    from hybridray.evaluate.pool import encoder_for
    from hybridray.evaluate.report import write_report
    from hybridray.evaluate.suite import evaluate_task, load_task, local_data, model_location, resolve_settings
    from hybridray.models import load_encoder

    started = time.perf_counter()
    task = _task_from_args(args)
    data = load_task(task, local_data(task.path))  # before the model: data errors fail fast
    model_path = model_location(args.model)
    settings = resolve_settings(EvalSuiteConfig(tasks=[task], **DEFAULTS), model_path, overrides,
                                progress=not args.no_progress)
    model, tokenizer = load_encoder(model_path)
    with encoder_for(model, tokenizer, args.workers) as encoder:
        report = evaluate_task(encoder, tokenizer, task, data, settings)
    report = {"model": args.model, **report, "data": {**report["data"], "path": task.path}}
    report["timing"].update(total_seconds=time.perf_counter() - started, encode_workers=args.workers)
    print(write_report(report, args.out))
    return 0
