"""The recipe table (issue 14, item 5): the paper's Table 1 layout on MLQA-R held-out, plus
Tatoeba by resource group, for the baselines, hybrid batching, hybrid + each of the four
issue-14 options alone, and the best combination.

Every row is ``hybridray train configs/local.yaml`` (2 workers, e5-small, ZeRO-1, batch 32)
with the same budget (``--steps``, seed 0; seeds 0 and 1 for the hybrid and best rows) and
``model.length_buckets=4`` (same loss function, a quarter of the padding: the table fits its
time), plus the row's overrides. The held-out scores are the run's own final evaluation
(``eval/after/report.json``); zero-shot is the first run's evaluation before training. Tatoeba
is ``hybridray eval --data tatoeba:...`` of each run's exported model, in both directions,
averaged per resource group (Joshi et al. classes, ``hybridray.evaluate.languages``).

Options (each alone on top of hybrid α = 0.5):
- ``ctx``: in-context hard negatives (``data prepare``'s, the answer paragraph's other
  sentences), ``loss.hard_negatives=1`` (the paper's triplets: one per query);
- ``mined``: hard negatives mined with the base model (``hybridray data mine --relative-margin
  off``: the 8 nearest passages that are neither the positive nor a translation of it; with
  the default margin a few rows are left without one, which training rejects),
  ``loss.hard_negatives=1``;
- ``cache``: what gradient caching is for, a 4x larger global batch (128, in chunks of 16
  texts), for the same number of training pairs: a quarter of the steps, warm-up scaled alike,
  lr × 2 = sqrt(4) as usual for a larger batch. Caching itself is the same maths as no
  caching, so this row measures the larger batch (four changes against hybrid), not caching;
- ``distill``: ``loss.distill_weight=0.5`` against the frozen starting model.

The best combination is every option whose row beats hybrid's mean of its two seeds on the
mean of the three held-out mAPs (``--best`` names it instead); with both negatives sources it
reads ``data mine --keep-existing`` shards (the ~5.9 in-context + 8 mined negatives of a row in
one list) with ``loss.hard_negatives=2`` drawn uniformly from that list (about 43% in-context;
not one of each).
α = 1 and α = 0 are then run with the same options on (the paper's best-or-tied question).

Run (from the repository root, under the shared lock; ~1.5 h on 2 cores)::

    flock /tmp/hybridray-heavy.lock env PYTHONPATH=$PWD .venv/bin/python benchmarks/recipe_table.py \
        --work /tmp/hybridray-recipe --out /tmp/hybridray-recipe/table.md

A row already finished in ``--work`` (its ``summary.json`` and Tatoeba report) is read, not
run again; delete its directory to re-run it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_common import MLQA_R, REPO  # noqa: E402

BIN = REPO / ".venv" / "bin" / "hybridray"
TATOEBA = REPO.parent / "shared" / "data" / "tatoeba"
#: Tatoeba languages: high-resource (three training languages and one unseen), low-resource.
TATOEBA_LANGS = "ara,deu,cmn,rus,amh,swh,tel,xho,mar"
WORK_LABEL = "/tmp/hybridray-recipe"
OPTIONS = ("ctx", "mined", "cache", "distill")
#: What each option is, as the table names it.
OPTION_LABELS = {"ctx": "in-context negatives", "mined": "mined negatives (no margin)",
                 "cache": "4× batch by gradient caching (lr 1e-4)", "distill": "distillation 0.5"}
LABELS = {"zero-shot": "Zero-shot (base multilingual-e5-small)", "hybrid": "Hybrid (α = 0.5)",
          "xx": "X-X (sampler.mode: x-x)", "mono": "X-X-mono (α = 1)", "cross": "X-Y (α = 0)",
          **{f"hybrid-{o}": f"Hybrid + {label}" for o, label in OPTION_LABELS.items()}}


def label(key: str, best: list[str]) -> str:
    """The table's name of a row (the best rows name their options)."""
    options = " + ".join(OPTION_LABELS[o] for o in best) or "nothing"
    return {"best": f"**Hybrid + {options} (best)**", "best-mono": f"α = 1 + {options}",
            "best-cross": f"α = 0 + {options}"}.get(key) or LABELS[key]


def option_overrides(options: set[str], steps: int, data: dict[str, Path]) -> list[str]:
    """The ``KEY=VALUE`` overrides of a set of options (see the module docstring)."""
    out = []
    if "ctx" in options and "mined" in options:
        out += [f"data.train={data['both']}", "loss.hard_negatives=2"]
    elif "mined" in options:
        out += [f"data.train={data['mined']}", "loss.hard_negatives=1"]
    elif "ctx" in options:
        out += ["loss.hard_negatives=1"]
    if "cache" in options:
        out += ["sampler.batch_size=128", "loss.cache_chunk_size=16", f"train.max_steps={max(1, steps // 4)}",
                f"train.checkpoint_every={max(1, steps // 4)}", f"optim.warmup_steps={max(1, steps // 40)}",
                "optim.lr=1e-4"]
    if "distill" in options:
        out += ["loss.distill_weight=0.5"]
    return out


def train_command(name: str, seed: int, steps: int, work: Path, data: dict[str, Path], extra: list[str],
                  eval_before: bool) -> list[str]:
    cmd = [str(BIN), "train", "configs/local.yaml", f"name={name}", f"seed={seed}",
           f"train.max_steps={steps}", f"optim.warmup_steps={max(1, steps // 10)}",
           f"train.checkpoint_every={steps}", f"train.eval_before={str(eval_before).lower()}",
           "model.length_buckets=4", f"data.train={data['ctx']}", f"data.heldout={data['heldout']}",
           # the plain recipe whatever configs/local.yaml's defaults are (the table ran when they
           # were these; the demo's default now has negatives and distillation on)
           "loss.hard_negatives=0", "loss.distill_weight=0", "loss.cache_chunk_size=0",
           f"run.storage_path={work / 'runs'}"]
    return cmd + extra  # later overrides win (data.train, max_steps, warmup_steps of an option)


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` from the repository root, output to ``log``; its wall seconds."""
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {shlex.join(cmd)}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def tatoeba(model: str, out: Path, log: Path) -> dict:
    """Tatoeba acc@1 (mean of both directions) per resource group, and its command."""
    from hybridray.evaluate.languages import resource_group

    cmd = [str(BIN), "eval", "--model", model, "--data", f"tatoeba:{TATOEBA}", "--langs", TATOEBA_LANGS,
           "--no-progress", "--out", str(out)]
    if not (out / "report.json").exists():
        run(cmd, log)
    report = json.loads((out / "report.json").read_text())
    groups: dict[str, list[float]] = {}
    for lang, r in report["per_language"].items():
        groups.setdefault(resource_group(lang), []).append(r["mean"])
    return {"high": statistics.mean(groups["high"]), "low": statistics.mean(groups["low"]),
            "n_high": len(groups["high"]), "n_low": len(groups["low"]), "command": shlex.join(cmd)}


def heldout(report_path: Path) -> dict:
    s = json.loads(report_path.read_text())["summary"]
    return {"map": s["map"], "recall": s["recall"], "recall_at": s["recall_at"], "rank_distance": s["rank_distance"]}


class Table:
    def __init__(self, work: Path, steps: int, data: dict[str, Path]):
        self.work, self.steps, self.data = work, steps, data
        self.rows: list[dict] = []
        self.ran = self.reused = 0  # rows trained by this invocation, rows read from an earlier one

    def train(self, key: str, label: str, seed: int, extra: list[str], eval_before: bool = False,
              with_tatoeba: bool = True) -> dict:
        name = f"{key}-s{seed}"
        run_dir = self.work / "runs" / name
        cmd = train_command(name, seed, self.steps, self.work, self.data, extra, eval_before)
        if not (run_dir / "summary.json").exists():
            run(cmd, self.work / f"{name}.log")
            self.ran += 1
        else:
            self.reused += 1
        summary = json.loads((run_dir / "summary.json").read_text())
        row = {"key": key, "label": label, "seed": seed, "command": shlex.join(cmd).replace(str(REPO) + "/", ""),
               "wall_s": summary["wall_seconds"], "steps": summary["metrics"]["step"],
               **heldout(run_dir / "eval" / "after" / "report.json")}
        if with_tatoeba:
            row["tatoeba"] = tatoeba(str(run_dir / "model"), self.work / "tatoeba" / name, self.work / f"{name}-tatoeba.log")
        self.rows.append(row)
        self.save()
        return row

    def save(self) -> None:
        (self.work / "rows.json").write_text(json.dumps(self.rows, indent=1))


def mean_map(row: dict) -> float:
    return statistics.mean(row["map"].values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/hybridray-recipe"))
    ap.add_argument("--out", type=Path, required=True, help="the markdown table")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--best", default=None, help="comma-separated options of the best row (default: chosen)")
    ap.add_argument("--render", action="store_true", help="only write the table from --work's rows.json")
    args = ap.parse_args()
    work = args.work.resolve()
    if args.render:
        rows = json.loads((work / "rows.json").read_text())
        args.out.write_text(render(rows, json.loads((work / "meta.json").read_text())))
        return
    (work / "runs").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    data_dir = work / "mlqa-r"
    if not (data_dir / "prepare.json").exists():
        run([str(BIN), "data", "prepare", "--source", str(MLQA_R), "--out", str(data_dir), "--overwrite"],
            work / "prepare.log")
    data = {"ctx": data_dir / "train", "heldout": data_dir / "heldout-lareqa",
            "mined": work / "mlqa-r-mined", "both": work / "mlqa-r-mined-ctx"}
    # margin off: the default margin (0.05) leaves rows whose positive scores below every
    # candidate without a negative, and a run with loss.hard_negatives > 0 rejects those (when
    # the table was run it refused the dataset): margin-free mining keeps every row
    mine = [str(BIN), "data", "mine", "--model", "builtin:multilingual-e5-small", "--shards", str(data["ctx"]),
            "--relative-margin", "off"]
    mine_seconds = {}
    if not (data["mined"] / "_mine.json").exists() or not (data["mined"] / "manifest.json").exists():
        mine_seconds["mined"] = run(mine + ["--out", str(data["mined"])], work / "mine.log")

    table = Table(work, args.steps, data)
    # zero-shot comes from the first run's evaluation before training
    first = table.train("hybrid", "Hybrid (α = 0.5)", 0, [], eval_before=True)
    zero = {"key": "zero-shot", "label": "Zero-shot (base multilingual-e5-small)", "seed": None,
            **heldout(work / "runs" / "hybrid-s0" / "eval" / "before" / "report.json"),
            "tatoeba": tatoeba("builtin:multilingual-e5-small", work / "tatoeba" / "zero-shot", work / "zero-tatoeba.log"),
            "command": first["command"] + "  # its evaluation before training", "wall_s": None, "steps": 0}
    table.rows.insert(0, zero)
    table.train("hybrid", "Hybrid (α = 0.5)", 1, [])
    table.train("xx", "X-X (sampler.mode: x-x)", 0, ["sampler.mode=x-x"])
    table.train("mono", "X-X-mono (α = 1)", 0, ["sampler.alpha=1"])
    table.train("cross", "X-Y (α = 0)", 0, ["sampler.alpha=0"])
    for option in OPTIONS:
        table.train(f"hybrid-{option}", f"Hybrid + {option}", 0, option_overrides({option}, args.steps, data))

    hybrid = statistics.mean(mean_map(r) for r in table.rows if r["key"] == "hybrid")
    if args.best:
        best = set(args.best.split(","))
    else:
        best = {o for o in OPTIONS if mean_map(next(r for r in table.rows if r["key"] == f"hybrid-{o}")) > hybrid}
    if {"ctx", "mined"} <= best and not (data["both"] / "manifest.json").exists():
        mine_seconds["both"] = run(mine + ["--out", str(data["both"]), "--keep-existing"], work / "mine-both.log")
    tag = "+".join(sorted(best)) or "none"
    extra = option_overrides(best, args.steps, data)
    for seed in (0, 1):
        table.train("best", f"Hybrid + {tag} (best)", seed, extra)
    table.train("best-mono", f"α = 1 + {tag}", 0, ["sampler.alpha=1", *extra], with_tatoeba=False)
    table.train("best-cross", f"α = 0 + {tag}", 0, ["sampler.alpha=0", *extra], with_tatoeba=False)

    # a resumed table (rows read from an earlier invocation) adds this invocation's time to the
    # earlier ones' and keeps their mining times; one that ran nothing keeps the earlier total
    before = json.loads((work / "meta.json").read_text()) if (work / "meta.json").exists() and table.reused else {}
    spent = time.perf_counter() - t_start if table.ran or not before else 0
    meta = {"steps": args.steps, "best": sorted(best), "hybrid_mean_map": hybrid,
            "mine_seconds": {**before.get("mine_seconds", {}), **mine_seconds},
            "total_s": before.get("total_s", 0) + spent, "tatoeba_langs": TATOEBA_LANGS}
    (work / "meta.json").write_text(json.dumps(meta, indent=1))
    table.save()  # with zero-shot
    args.out.write_text(render(table.rows, meta))
    print(args.out.read_text())


def _spread(values: list[float], fmt: str = "{:.3f}") -> str:
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format((max(values) - min(values)) / 2)}"


def _portable(command: str) -> str:
    """A command as a reader types it: ``hybridray`` (the venv's) and ``../shared/data``."""
    command = re.sub(r"\S*\.venv/bin/hybridray", "hybridray", command)
    return re.sub(r"[^\s:=]*/shared/data/", "../shared/data/", command)


def _pairs(row: dict) -> str:
    """Training pairs of a run: steps x global batch."""
    batch = next((int(a.split("=")[1]) for a in shlex.split(row["command"]) if a.startswith("sampler.batch_size=")), 32)
    return f"{row['steps']} × {batch}" if row["steps"] else "—"


def render(rows: list[dict], meta: dict) -> str:
    """Table 1's layout: one line per row (seed-averaged where two seeds ran, ± half the range),
    then each run's command."""
    lines = ["| row | seeds | steps × batch | mono mAP | cross mAP | multi mAP | R@1 mono | R@1 cross | R@10 multi "
             "| rank distance | Tatoeba high | Tatoeba low | wall (s) |", "|" + "---|" * 13]
    for key in dict.fromkeys(r["key"] for r in rows):
        group = [r for r in rows if r["key"] == key]

        def cell(get, fmt="{:.3f}"):
            values = [get(r) for r in group if get(r) is not None]
            if not values:
                return "—"
            return _spread(values, fmt) if len(values) > 1 else fmt.format(values[0])

        def tat(side):
            return lambda r: r["tatoeba"][side] if "tatoeba" in r else None
        lines.append("| " + " | ".join([
            label(key, meta["best"]), ",".join(str(r["seed"]) for r in group if r["seed"] is not None) or "—",
            _pairs(group[0]),
            cell(lambda r: r["map"]["mono"]), cell(lambda r: r["map"]["cross"]), cell(lambda r: r["map"]["multi"]),
            cell(lambda r: r["recall"]["mono"]), cell(lambda r: r["recall"]["cross"]), cell(lambda r: r["recall"]["multi"]),
            cell(lambda r: r["rank_distance"], "{:.1f}"),
            cell(tat("high")), cell(tat("low")), cell(lambda r: r["wall_s"], "{:.0f}"),
        ]) + " |")
    lines += ["", f"Best combination (chosen by the rule above): {', '.join(meta['best']) or 'none'}; "
              f"the whole table took {meta['total_s'] / 60:.0f} min.", "", "Commands (from the repository root; "
              f"`{WORK_LABEL}` is the script's `--work`):", "",
              f"- Data: `hybridray data prepare --source ../shared/data/mlqa-r --out {WORK_LABEL}/mlqa-r --overwrite`",
              f"- Mined: `hybridray data mine --model builtin:multilingual-e5-small --shards {WORK_LABEL}/mlqa-r/train "
              f"--relative-margin off --out {WORK_LABEL}/mlqa-r-mined` (and `--out {WORK_LABEL}/mlqa-r-mined-ctx "
              "--keep-existing` for the best rows)"]
    for r in rows:
        seed = "—" if r["seed"] is None else r["seed"]
        lines.append(f"- {label(r['key'], meta['best'])}, seed {seed}: `{_portable(r['command'])}`")
        if "tatoeba" in r:
            lines.append(f"  - Tatoeba: `{_portable(r['tatoeba']['command'])}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
