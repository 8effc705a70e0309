"""The ``hybridray`` command. Thin: parses arguments and calls the modules that do the work.

User mistakes (bad config, missing files, malformed data) exit with code 2 and one line on
stderr; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
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
    result = run_training(config, overwrite=args.overwrite)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_tune(args: argparse.Namespace) -> int:
    from hybridray.config import load_config
    from hybridray.tuning import run_sweep

    config = load_config(args.config, args.overrides)
    best = run_sweep(config, sweep_path=args.sweep, num_samples=args.num_samples)
    print(json.dumps(best, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from hybridray.evaluate.run import run_eval

    return run_eval(args)


def _cmd_data_prepare(args: argparse.Namespace) -> int:
    from hybridray.data.prepare import prepare_lareqa

    langs = args.langs.split(",") if args.langs else None
    summary = prepare_lareqa(
        args.source, args.out, heldout_fraction=args.heldout_fraction, seed=args.seed,
        langs=langs, overwrite=args.overwrite,
    )
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0


def _cmd_data_from_squad(args: argparse.Namespace) -> int:
    from hybridray.data.squad import squad_to_shards

    langs = args.langs.split(",") if args.langs else None
    summary = squad_to_shards(
        args.source, args.out, langs=langs, source_name=args.source_name,
        max_text_chars=args.max_text_chars, overwrite=args.overwrite,
    )
    print(json.dumps(summary, indent=2, ensure_ascii=False))
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
    train.set_defaults(func=_cmd_train)

    tune = sub.add_parser("tune", help="search sampler.alpha and loss.temperature (Ray Tune)",
                          description="Run a Ray Tune sweep of a run config against held-out mAP.")
    _add_config_arguments(tune)
    tune.add_argument("--sweep", default="tune/alpha_temperature.yaml", help="sweep definition YAML")
    tune.add_argument("--num-samples", type=int, default=None, help="override the sweep's sample count")
    tune.set_defaults(func=_cmd_tune)

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
    prepare.add_argument("--source", required=True, help="directory of {lang}.json files")
    prepare.add_argument("--out", required=True, help="output directory")
    prepare.add_argument("--heldout-fraction", type=float, default=0.3,
                         help="share of questions held out, by whole articles (default 0.3)")
    prepare.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    prepare.add_argument("--langs", default=None, help="comma-separated languages (default: all)")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing --out")
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
    from_squad.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    from_squad.set_defaults(func=_cmd_data_from_squad)

    model = sub.add_parser("model", help="build or locate an encoder",
                           description="Model commands.")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")
    build = model_sub.add_parser(
        "build", help="build a builtin encoder offline and print its directory",
        description="Build (once, cached) a builtin encoder and print its HF directory; "
                    "any other name is printed unchanged.",
    )
    build.add_argument("name", nargs="?", default="builtin:multilingual-e5-small",
                       help="builtin:multilingual-e5-small (default) or builtin:tiny")
    build.set_defaults(func=_cmd_model_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
