"""The ``hybridray`` command. Thin: parses arguments and calls the modules that do the work.

User mistakes (bad config, missing files, malformed data) exit with code 2 and one line on
stderr; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from hybridray.errors import UserError


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML run config, e.g. configs/local.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="dotted overrides, e.g. sampler.alpha=0.3 loss.temperature=0.02",
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from hybridray.config import load_config
    from hybridray.train import run_training

    config = load_config(args.config, args.overrides)
    if args.print_config:
        from hybridray.config import dump_config

        print(dump_config(config), end="")
        return 0
    run_training(config, overwrite=args.overwrite)  # prints the closing summary
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from hybridray.config import load_config
    from hybridray.tuning import run_sweep

    config = load_config(args.config, args.overrides)
    summary = run_sweep(config, sweep_path=args.sweep, num_samples=args.num_samples, overwrite=args.overwrite)
    return 1 if summary["best"] is None else 0  # prints the table and where best.yaml is


def _cmd_plan(args: argparse.Namespace) -> int:
    from hybridray.config import load_config
    from hybridray.plan import format_grid, format_plan, parse_grid, plan, plan_grid

    config = load_config(args.config, args.overrides)  # validates the config and overrides first
    options = dict(gpu_memory_gib=args.gpu_memory, gpus_per_node=args.gpus_per_node, headroom=args.headroom)
    if args.grid:
        from hybridray.config import read_yaml

        tree = read_yaml(args.config, "config file") or {}
        rows = plan_grid(tree, args.overrides, parse_grid(args.grid), **options)
        print(json.dumps([{**s, **p.as_dict()} for s, p in rows], default=str, indent=2)
              if args.json else format_grid(rows))
        return 0
    result = plan(config, **options)
    print(json.dumps(result.as_dict(), default=str, indent=2) if args.json else format_plan(result, config))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from hybridray.evaluate.run import run_eval

    return run_eval(args)


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from hybridray.data.prepare import prepare_lareqa

    langs = args.langs.split(",") if args.langs else None
    summary = prepare_lareqa(
        args.source, args.out, heldout_fraction=args.heldout_fraction, seed=args.seed,
        langs=langs, overwrite=args.overwrite, hard_negatives=args.hard_negatives,
    )
    rows = {split: sum(counts.values()) for split, counts in summary["rows"].items()}
    print(f"hybridray: prepared {args.out}: train {rows['train']} rows ({summary['articles']['train']} article "
          f"clusters), held-out {rows['heldout']} rows ({summary['articles']['heldout']}), "
          f"{len(summary['languages'])} languages, {sum(summary['rejected'].values())} rejected questions; "
          f"details in prepare.json")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from hybridray.run_report import compare_runs

    print(compare_runs(args.runs, out=args.out))
    return 0


def _cmd_data_from_squad(args: argparse.Namespace) -> int:
    from hybridray.data.squad import squad_to_shards

    langs = args.langs.split(",") if args.langs else None
    summary = squad_to_shards(
        args.source, args.out, langs=langs, source_name=args.source_name,
        max_text_chars=args.max_text_chars, overwrite=args.overwrite,
        exclude_passages_of=args.exclude_passages_of,
    )
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def _margin(value: str):
    """A margin flag's value: a number, or ``off``."""
    if value.lower() in ("off", "none"):
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'off', got {value!r}") from None


def _cmd_data_mine(args: argparse.Namespace) -> int:
    from hybridray.data.mine import MineOptions, mine_hard_negatives

    options = MineOptions(
        model=args.model, top_k=args.top_k, range_max=args.range_max, range_max_cap=args.range_max_cap,
        absolute_margin=args.absolute_margin,
        relative_margin=args.relative_margin,
        keep_existing=args.keep_existing, query_prefix=args.query_prefix, passage_prefix=args.passage_prefix,
        pooling=args.pooling, max_length=args.max_length, max_text_chars=args.max_text_chars,
        batch_size=args.batch_size, workers=args.workers,
    )
    summary = mine_hard_negatives(args.shards, args.out, options, overwrite=args.overwrite)
    counts = summary["this_run"]
    print(f"hybridray: mined {args.out}: {summary['shards_mined']} shard(s) mined, {summary['shards_skipped']} "
          f"already done; {counts['negatives'] / max(1, counts['rows']):.2f} negatives per row mined "
          f"({counts['searched_deeper']} row(s) searched beyond --range-max); {counts['short_rows']} row(s) left "
          f"with fewer than {args.top_k}, {counts['empty_rows']} with none; {counts['margin']} candidate(s) "
          f"dropped by the margin; {summary['total_seconds']:.0f} s; details in {args.out}/_mine.json")
    if counts["empty_rows"]:  # counted after --keep-existing's merge: these rows really have none
        print(f"hybridray: note: {counts['empty_rows']} row(s) have no negative (every candidate of their "
              f"--range-max-cap nearest was dropped); a run with loss.hard_negatives > 0 leaves them out as rejects "
              "(data.strict: true refuses the dataset): to keep them, lower --relative-margin, raise "
              "--range-max-cap, or add the mined negatives to existing ones with --keep-existing")
    return 0


def _cmd_model_build(args: argparse.Namespace) -> int:
    from hybridray.models import resolve_model_path

    print(resolve_model_path(args.name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridray",
        description="Hybrid-batch contrastive training of multilingual dense retrievers on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a retriever (Ray Train + DeepSpeed)",
                           description="Train with a YAML config; KEY=VALUE overrides any field.")
    _add_config_arguments(train)
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved config and exit")
    train.add_argument("--overwrite", action="store_true",
                       help="delete an existing run directory of this name first (without it, a run "
                            "with the same config resumes and one with another config is refused)")
    train.add_argument("--verbose", action="store_true",
                       help="show every library's logs and Ray Data's progress bars (or HYBRIDRAY_VERBOSE=1)")
    train.set_defaults(func=_cmd_train)

    tune = sub.add_parser(
        "tune", help="sweep sampler.alpha, loss.temperature or any key (Ray Tune; early stopping, resume)",
        description="Run a Ray Tune sweep of a run config against held-out mAP; results, plots and "
                    "best.yaml go to <run.storage_path>/<name>-sweep/. Running the same command again "
                    "resumes an interrupted sweep.")
    _add_config_arguments(tune)
    tune.add_argument("--sweep", default="tune/alpha_temperature.yaml", help="sweep definition YAML")
    tune.add_argument("--num-samples", type=int, default=None, help="override the sweep's sample count")
    tune.add_argument("--overwrite", action="store_true",
                      help="delete an existing sweep directory of this name first (without it, the same "
                           "sweep resumes and another one is refused)")
    tune.add_argument("--verbose", action="store_true", help="show every library's logs (or HYBRIDRAY_VERBOSE=1)")
    tune.set_defaults(func=_cmd_tune)

    plan = sub.add_parser(
        "plan", help="per-GPU memory of a run: parameters, gradients, optimizer state, activations",
        description="Print the per-GPU memory a run config needs (DeepSpeed's ZeRO estimators for "
                    "model states; activations from batch, lengths, model shape and checkpointing) "
                    "and whether it fits. Reads the model's config only, never its weights.",
    )
    _add_config_arguments(plan)
    plan.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB",
                      help="memory of one GPU in GiB (default 80)")
    plan.add_argument("--gpus-per-node", type=int, default=None, metavar="N",
                      help="GPUs per node (default: min(scaling.num_workers, 8))")
    plan.add_argument("--headroom", type=float, default=0.1, metavar="FRACTION",
                      help="share of GPU memory kept free for CUDA context, NCCL, fragmentation (default 0.1)")
    plan.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                      help="plan every combination of these values (repeatable); prints a markdown table")
    plan.add_argument("--json", action="store_true", help="print JSON instead of text")
    plan.set_defaults(func=_cmd_plan)

    evaluate = sub.add_parser("eval", help="evaluate a retriever (LAReQA, Tatoeba, TyDi QA, AfriQA, BEIR; suites)",
                              description="Evaluate a model on one task (--data) or a suite of tasks "
                                          "(--suite) and write report.json, report.md and plots.")
    from hybridray.evaluate.run import add_eval_arguments

    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=_cmd_eval)

    data = sub.add_parser("data", help="prepare translated-QA shards",
                          description="Data commands.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    prepare = data_sub.add_parser(
        "prepare", help="convert a LAReQA / SQuAD-style directory into shards",
        description="Convert {lang}.json LAReQA / SQuAD-style files into train and held-out "
                    "shards (split by article) plus a held-out LAReQA directory.",
    )
    prepare.add_argument("--source", required=True, help="directory (or s3:// prefix) of {lang}.json files")
    prepare.add_argument("--out", required=True, help="output directory or s3:// prefix")
    prepare.add_argument("--heldout-fraction", type=float, default=0.3,
                         help="share of questions held out, by whole articles (default 0.3)")
    prepare.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    prepare.add_argument("--langs", default=None, help="comma-separated languages (default: all)")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    prepare.add_argument("--hard-negatives", action=argparse.BooleanOptionalAction, default=True,
                         help="write each row's in-context hard negatives: the other sentences of its answer's "
                              "paragraph, in its language (default: on; read only with loss.hard_negatives > 0)")
    prepare.set_defaults(func=_cmd_data_prepare)
    from_squad = data_sub.add_parser(
        "from-squad", help="convert SQuAD-layout {lang}.json files (TyDi QA GoldP) into one shard dataset",
        description="Pair every answerable question of SQuAD v1.1 {lang}.json files with its whole "
                    "paragraph and write one shard dataset (e.g. for data.extra_mono); rejected "
                    "questions go to OUT/_rejects.jsonl.",
    )
    from_squad.add_argument("--source", required=True, help="directory of {lang}.json files")
    from_squad.add_argument("--out", required=True, help="output shard directory")
    from_squad.add_argument("--langs", default=None, help="comma-separated languages (default: all)")
    from_squad.add_argument("--source-name", default=None,
                            help="the rows' source field (default: <parent>/<dir> of --source)")
    from_squad.add_argument("--max-text-chars", type=int, default=4000,
                            help="reject longer passages, as data.max_text_chars does (default 4000)")
    from_squad.add_argument("--exclude-passages-of", default=None, metavar="DIR",
                            help="reject passages that also appear in DIR's {lang}.json files (the "
                                 "evaluation split), so training never sees an evaluation gold passage")
    from_squad.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    from_squad.set_defaults(func=_cmd_data_from_squad)
    mine = data_sub.add_parser(
        "mine", help="mine hard negatives for a shard dataset with a retriever (Ray Data + faiss)",
        description="Encode the queries and passages of --shards with --model (Ray Data, one actor per GPU or "
                    "CPU slot), search each query among the passages of its language (faiss, exact inner "
                    "product), and write a copy of the dataset to --out whose hard_negatives are the best "
                    "passages that are neither the positive nor a translation of it, minus those the margin "
                    "rule drops as likely false negatives. Rerunning the same command resumes.",
    )
    mine.add_argument("--model", required=True, help="the retriever: builtin:multilingual-e5-small, a run's model/ "
                                                     "directory, a local or s3:// HF directory, or a hub id")
    mine.add_argument("--shards", required=True, help="input shard dataset (directory, glob or s3:// prefix); "
                                                      "never written to")
    mine.add_argument("--out", required=True, help="output directory (local)")
    mine.add_argument("--top-k", type=int, default=8, help="negatives per row, best first (default 8)")
    mine.add_argument("--range-max", type=int, default=50,
                      help="nearest passages searched per query (default 50)")
    mine.add_argument("--range-max-cap", type=int, default=1000,
                      help="a row left short of --top-k is searched again, --range-max x4 a step, up to this "
                           "many nearest (default 1000; equal to --range-max: never)")
    mine.add_argument("--relative-margin", type=_margin, default=0.05, metavar="M|off",
                      help="drop a candidate scoring above s_pos - M*|s_pos|, s_pos the positive's score "
                           "(default 0.05)")
    mine.add_argument("--absolute-margin", type=_margin, default=None, metavar="M|off",
                      help="drop a candidate scoring above s_pos - M (default: off)")
    mine.add_argument("--keep-existing", action="store_true",
                      help="keep the input's hard negatives (e.g. data prepare's in-context ones) first, then "
                           "add the mined ones")
    mine.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default 64)")
    mine.add_argument("--workers", type=int, default=None,
                      help="encoder actors (default: one per GPU of the Ray cluster, else one per CPU)")
    mine.add_argument("--max-length", type=int, default=256, help="max tokens per text (default 256)")
    mine.add_argument("--max-text-chars", type=int, default=4000,
                      help="reject longer texts, as data.max_text_chars does (default 4000)")
    mine.add_argument("--query-prefix", default=None, help="default: the model's (e.g. 'query: ' for E5)")
    mine.add_argument("--passage-prefix", default=None, help="default: the model's (e.g. 'passage: ')")
    mine.add_argument("--pooling", default=None, help="mean, cls or last (default: the model's)")
    mine.add_argument("--overwrite", action="store_true",
                      help="replace an --out mined with other parameters (without it, the same command resumes)")
    mine.add_argument("--verbose", action="store_true",
                      help="show every library's logs and Ray Data's progress bars (or HYBRIDRAY_VERBOSE=1)")
    mine.set_defaults(func=_cmd_data_mine)

    report = sub.add_parser("report", help="show a finished run's summary, or compare runs",
                            description="One run directory: its closing summary (held-out before/after, "
                                        "where the model, reports and plots are). Several: one table, a row "
                                        "per run, and with --out a comparison plot.")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (local or s3://), e.g. runs/local-hybrid")
    report.add_argument("--out", default=None, metavar="DIR", help="write comparison.png and comparison.txt here")
    report.set_defaults(func=_cmd_report)

    model = sub.add_parser("model", help="build or locate an encoder",
                           description="Model commands.")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    build = model_sub.add_parser(
        "build", help="build a builtin encoder offline and print its directory",
        description="Build (once, cached) a builtin encoder and print its HF directory; "
                    "any other name is printed unchanged.",
    )
    build.add_argument("name", nargs="?", default="builtin:multilingual-e5-small",
                       help="builtin:multilingual-e5-small (default), builtin:tiny or builtin:tiny-decoder")
    build.set_defaults(func=_cmd_model_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "verbose", False):
        from hybridray.console import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"  # this process, and the Ray workers it starts
    try:
        return args.func(args)
    except UserError as exc:
        print(f"hybridray: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hybridray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
