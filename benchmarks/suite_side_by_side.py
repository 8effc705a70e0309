"""Two evaluation-suite reports side by side (the BENCHMARKS.md section "Evaluation suite").

Reads the ``report.json`` of ``hybridray eval --suite`` for a base model and a trained one and
writes Markdown: the summary rows of both with their difference and the wall time of every
task, then the per-language headline metric of TyDi, AfriQA and Tatoeba (base, trained,
difference) with each language's resource group and whether the training data had it.

    .venv/bin/python benchmarks/suite_side_by_side.py \\
        --base reports/suite-e5/report.json --trained reports/suite-demo/report.json \\
        --trained-langs ar,de,en,es,hi,vi,zh --out benchmarks/RESULTS-suite.md
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
from pathlib import Path

from hybridray.evaluate.languages import ISO_639_3


def _f(value, digits=3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _d(a, b) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b):
        return "–"
    return f"{b - a:+.3f}"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _table(header, rows) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def summary_table(base: dict, trained: dict) -> str:
    def key(row):
        return row["task"], row["setting"]

    other = {key(r): r for r in trained["summary"]}
    rows = []
    for r in base["summary"]:
        t = other[key(r)]
        name = r["task"] + (f" ({r['setting']})" if r["setting"] else "")
        cells = [name, r["metric"]]
        for group in ("all", "low", "mid", "high"):
            cells.append("–" if group != "all" and not r[f"n_{group}"] else
                         f"{_f(r[group])} → {_f(t[group])} ({_d(r[group], t[group])})")
        cells.append(f"{_f(r['answer@20'])} → {_f(t['answer@20'])}" if r["answer@20"] is not None else "–")
        cells.append(f"{_minutes(r['seconds'])} / {_minutes(t['seconds'])}")
        rows.append(cells)
    return _table(["task", "metric", "all: base → trained (Δ)", "low", "mid", "high", "Ans@20", "wall time base / trained"], rows)


def language_table(base: dict, trained: dict, task: str, seen: set[str]) -> str:
    b, t = base["tasks"][task], trained["tasks"][task]
    rows = []
    if b["task"] == "tatoeba":
        for lang, r in sorted(b["per_language"].items()):
            seen_lang = ISO_639_3.get(lang, lang) in seen
            rows.append([lang, _group(base, lang), "yes" if seen_lang else "no", str(r["n"]),
                         _f(r["mean"]), _f(t["per_language"][lang]["mean"]), _d(r["mean"], t["per_language"][lang]["mean"])])
        return _table(["lang", "group", "in training", "pairs", "acc base", "acc trained", "Δ"], rows)
    modes = b["data"]["modes"]
    for lang, r in sorted(b["per_language"].items(), key=lambda item: (item[1]["group"], item[0])):
        code = ISO_639_3.get(lang, lang)
        cells = [lang, r["group"], "yes" if code in seen else "no", str(r["n_queries"])]
        for mode in modes:
            x, y = r[mode]["ndcg@10"], t["per_language"][lang][mode]["ndcg@10"]
            cells += [f"{_f(x)} → {_f(y)}", _d(x, y)]
        x, y = r[modes[0]]["answer@20"], t["per_language"][lang][modes[0]]["answer@20"]
        cells += [f"{_f(x)} → {_f(y)}"]
        rows.append(cells)
    header = ["lang", "group", "in training", "queries"]
    for mode in modes:
        header += [f"nDCG@10 {mode}", "Δ"]
    header += [f"Ans@20 {modes[0]}"]
    return _table(header, rows)


def _group(report: dict, lang: str) -> str:
    from hybridray.evaluate.languages import resource_group

    return resource_group(lang, report["suite"]["config"].get("resource_groups"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="report.json of the base model's suite run")
    parser.add_argument("--trained", required=True, help="report.json of the trained model's suite run")
    parser.add_argument("--trained-langs", default="ar,de,en,es,hi,vi,zh",
                        help="languages of the training data (default: MLQA-R's)")
    parser.add_argument("--out", default=None, help="write the Markdown here (default: print)")
    args = parser.parse_args()
    base, trained = (json.loads(Path(p).read_text()) for p in (args.base, args.trained))
    seen = set(args.trained_langs.split(","))
    parts = [
        f"Base `{base['model']}`, trained `{trained['model']}`; suite `{base['suite']['path']}`. "
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, load average "
        f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} when this table was written. Total wall time: "
        f"base {_minutes(base['timing']['total_seconds'])}, trained {_minutes(trained['timing']['total_seconds'])}.",
        "### Summary (headline metric, macro over languages; Δ = trained − base)", summary_table(base, trained),
    ]
    for task, r in base["tasks"].items():
        if r["task"] in ("tydi", "afriqa", "tatoeba"):
            parts += [f"### `{task}` per language (\"in training\": the language is in the training data)",
                      language_table(base, trained, task, seen)]
    text = "\n\n".join(parts) + "\n"
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
