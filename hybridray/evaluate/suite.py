"""An evaluation suite: several tasks, one model, one report (``hybridray eval --suite``).

A suite YAML (``configs/eval/suite.yaml``; schema :class:`hybridray.config.EvalSuiteConfig`)
lists tasks of the kinds ``hybridray eval --data`` knows -- LAReQA held-out, Tatoeba, TyDi
QA GoldP, AfriQA, BEIR layout (SciFact) -- each evaluated by its own evaluator. The suite
writes to ``--out``:

- ``report.md``: a one-screen summary table (one row per task and query mode: the task's
  headline metric, macro over all languages and per resource group, answer recall@20 where
  there is one, wall time), the low-resource bar chart, then every task's own tables;
- ``report.json``: ``summary`` (those rows), ``tasks.<name>`` (each task's full report, the
  layout of :mod:`hybridray.evaluate.report`), ``timing``, the resolved suite;
- ``low_resource.png``: the headline metric of every low-resource language, one panel per task.

All data is read (and checked) before the model is loaded, so a bad path fails in seconds,
not after an hour of encoding; ``s3://`` data and models are read through a cached local copy
(:func:`hybridray.storage.local_copy`). Resource groups: :mod:`hybridray.evaluate.languages`.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from hybridray.config import EvalSuiteConfig, EvalTaskConfig
from hybridray.evaluate.languages import GROUPS, resource_group

#: Default split of the kinds that have one.
DEFAULT_SPLIT = {"beir": "test", "tydi": "dev", "afriqa": "test"}
#: The headline metric of each kind (the one in the summary table and the bar chart).
HEADLINE = {"lareqa": "mAP multi", "tatoeba": "acc@1", "tydi": "nDCG@10", "afriqa": "nDCG@10", "beir": "nDCG@10"}


@dataclass(frozen=True)
class EncodeSettings:
    """How texts are encoded, the same for every task (a task may change ``max_length``)."""

    query_prefix: str
    passage_prefix: str
    pooling: str
    max_length: int
    batch_size: int
    progress: bool = False


def load_task(task: EvalTaskConfig, directory: Path) -> Any:
    """Read and check a task's data (before any encoding). Returns what its evaluator takes."""
    split = task.split or DEFAULT_SPLIT.get(task.kind)
    if task.kind == "lareqa":
        from hybridray.evaluate.lareqa import load_lareqa

        return load_lareqa(directory, task.langs)
    if task.kind == "tatoeba":
        from hybridray.evaluate.tatoeba import load_tatoeba

        load_tatoeba(directory, task.langs)
        return directory
    if task.kind == "beir":
        from hybridray.evaluate.beir import find_beir_datasets, scan_beir

        for dataset in find_beir_datasets(directory, task.langs):
            scan_beir(dataset, split)  # every line checked, no corpus text kept
        return directory
    if task.kind == "tydi":
        from hybridray.evaluate.tydi import load_tydi

        return load_tydi(directory, task.langs, split=split,
                         distractors=True if task.distractors is None else task.distractors)
    from hybridray.evaluate.afriqa import load_afriqa

    return load_afriqa(directory, task.langs, split=split, corpus=task.corpus or "pivot")


def evaluate_task(model, tokenizer, task: EvalTaskConfig, data: Any, settings: EncodeSettings,
                  resource_groups: Optional[dict] = None) -> dict:
    """Run the evaluator of ``task.kind`` on data from :func:`load_task`; returns its report."""
    common = dict(query_prefix=settings.query_prefix, pooling=settings.pooling, batch_size=settings.batch_size,
                  max_length=task.max_length or settings.max_length, progress=settings.progress)
    if task.kind == "lareqa":
        from hybridray.evaluate.lareqa import evaluate_lareqa

        return evaluate_lareqa(model, tokenizer, data, passage_prefix=settings.passage_prefix,
                               with_context=bool(task.with_context), **common)
    if task.kind == "tatoeba":
        from hybridray.evaluate.tatoeba import evaluate_tatoeba

        return evaluate_tatoeba(model, tokenizer, data, langs=task.langs, **common)
    if task.kind == "beir":
        from hybridray.evaluate.beir import evaluate_beir

        return evaluate_beir(model, tokenizer, data, split=task.split or DEFAULT_SPLIT["beir"], langs=task.langs,
                             passage_prefix=settings.passage_prefix, **common)
    from hybridray.evaluate.qa import evaluate_qa

    return evaluate_qa(model, tokenizer, data, passage_prefix=settings.passage_prefix,
                       resource_groups=resource_groups, **common)


# ----------------------------------------------------------------------------- summary
def per_language_values(task: EvalTaskConfig, report: dict) -> dict[str, dict[str, float]]:
    """``{setting: {label: headline value}}`` of one task report; a label is a language,
    or a BEIR dataset name (its language: :func:`language_of`)."""
    kind = task.kind
    if kind == "lareqa":
        return {"multi": {lang: r["map_multi"] for lang, r in report["per_language"].items()}}
    if kind == "tatoeba":
        return {"both directions": {lang: r["mean"] for lang, r in report["per_language"].items()}}
    if kind == "beir":
        return {"": {name: r["ndcg@10"] for name, r in report["per_dataset"].items()}}
    return {mode: {lang: r[mode]["ndcg@10"] for lang, r in report["per_language"].items()}
            for mode in report["data"]["modes"]}


def language_of(task: EvalTaskConfig, label: str) -> str:
    """The language of a per-language label: a BEIR task's ``lang`` when set, else the label."""
    return task.lang if task.kind == "beir" and task.lang else label


def _mean(values) -> float:
    values = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def summary_rows(task: EvalTaskConfig, report: dict, seconds: float, resource_groups: Optional[dict]) -> list[dict]:
    """The summary-table rows of one task: one per setting (AfriQA: cross and translated)."""
    rows = []
    for setting, values in per_language_values(task, report).items():
        groups = {label: resource_group(language_of(task, label), resource_groups) for label in values}
        row = {"task": task.name, "kind": task.kind, "setting": setting, "metric": HEADLINE[task.kind],
               "all": _mean(values.values()), "n_languages": len(values)}
        for group in GROUPS:
            row[group] = _mean([v for lang, v in values.items() if groups[lang] == group])
            row[f"n_{group}"] = sum(g == group for g in groups.values())
        row["answer@20"] = (report["summary"][setting]["all"]["answer@20"]
                            if task.kind in ("tydi", "afriqa") else None)
        row["seconds"] = seconds
        rows.append(row)
    return rows


def low_resource_values(task: EvalTaskConfig, report: dict, resource_groups: Optional[dict]) -> dict[str, dict[str, float]]:
    """``{setting: {low-resource language: headline value}}`` (empty settings dropped)."""
    out = {}
    for setting, values in per_language_values(task, report).items():
        low = {label: v for label, v in values.items()
               if resource_group(language_of(task, label), resource_groups) == "low"}
        if low:
            out[setting] = low
    return out


def plot_low_resource(panels: dict[str, dict[str, dict[str, float]]], metrics: dict[str, str], path: Path) -> Optional[Path]:
    """One bar panel per task (grouped bars per setting) of its low-resource languages."""
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = [max(len(next(iter(p.values()))), 2) for p in panels.values()]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.2 + 0.75 * sum(widths) + 0.8 * len(panels), 3.4),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    for ax, (name, settings) in zip(axes[0], panels.items()):
        langs = sorted({lang for values in settings.values() for lang in values})
        width = 0.8 / len(settings)
        for i, (setting, values) in enumerate(settings.items()):
            x = np.arange(len(langs)) + (i - (len(settings) - 1) / 2) * width
            bars = ax.bar(x, [values.get(lang, np.nan) for lang in langs], width, label=setting or None)
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
        ax.set_xticks(range(len(langs)), langs)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}: {metrics[name]}", fontsize=9)
        if len(settings) > 1:
            ax.legend(fontsize=7)
    fig.suptitle("Low-resource languages (Joshi et al. 2020 classes 0-2)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _f(value, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.{digits}f}"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def suite_markdown(result: dict, task_markdown: list[str]) -> str:
    """The report: summary table, chart, then each task's tables."""
    from hybridray.evaluate.report import _table

    rows = [[r["task"] + (f" ({r['setting']})" if r["setting"] else ""), r["metric"], _f(r["all"]),
             *(f"{_f(r[g])} ({r[f'n_{g}']})" if r[f"n_{g}"] else "–" for g in GROUPS),
             _f(r["answer@20"]), _duration(r["seconds"])] for r in result["summary"]]
    head = (f"# Evaluation suite: `{result['model']}`\n\n"
            + (f"{result['label']}. " if result.get("label") else "")
            + f"Suite `{result['suite']['path']}`, {len(result['tasks'])} tasks, "
            f"{_duration(result['timing']['total_seconds'])} in all (wall time per task includes encoding). "
            "Columns low / mid / high: macro mean over the task's languages of that resource group "
            "(Joshi et al. 2020 classes 0-2 / 3 / 4-5; number of languages in brackets; Tatoeba's own "
            "table below keeps XTREME's high / low split).\n\n"
            + _table(["task", "metric", "all", "low", "mid", "high", "Ans@20", "wall time"], rows) + "\n")
    chart = ("\n![headline metric of the low-resource languages](low_resource.png)\n"
             if result.get("chart") else "\nNo task has a low-resource language: no chart.\n")
    return head + chart + "\n" + "\n".join(task_markdown)


# ----------------------------------------------------------------------------- driver
def local_data(location: str) -> Path:
    """A task's data as a local directory: itself, or a cached copy of an ``s3://`` prefix."""
    from hybridray.errors import UserError
    from hybridray.storage import local_copy

    directory = Path(local_copy(location))
    if not directory.is_dir():
        raise UserError(f"{location}: not a directory")
    return directory


def model_location(name_or_path: str) -> str:
    """Where the model is read from: a cached local copy of an ``s3://`` model directory,
    anything else as given (builtins and hub ids resolve when loaded)."""
    from hybridray.models import resolve_model_path
    from hybridray.storage import is_remote

    return resolve_model_path(name_or_path) if is_remote(name_or_path) else name_or_path


def resolve_settings(suite: EvalSuiteConfig, model_path: str, overrides: Optional[dict] = None,
                     progress: bool = False) -> EncodeSettings:
    """Encoding settings: ``overrides`` (CLI flags, the training config) over the suite file
    over the model's own prefixes and pooling."""
    from hybridray.models import default_pooling, default_prefixes

    query_default, passage_default = default_prefixes(model_path)
    values = {
        "query_prefix": query_default if suite.query_prefix is None else suite.query_prefix,
        "passage_prefix": passage_default if suite.passage_prefix is None else suite.passage_prefix,
        "pooling": suite.pooling or default_pooling(model_path), "max_length": suite.max_length,
        "batch_size": suite.batch_size,
    }
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return EncodeSettings(**values, progress=progress)


def run_suite(
    suite: EvalSuiteConfig,
    model_name: str,
    out_dir: str | Path,
    *,
    suite_path: str = "",
    overrides: Optional[dict] = None,
    label: str = "",
    progress: bool = False,
    workers: int = 1,
) -> dict:
    """Evaluate ``model_name`` (builtin, hub id or local directory) on every task of
    ``suite`` and write ``report.md``, ``report.json`` and ``low_resource.png`` to
    ``out_dir``. ``overrides``: ``query_prefix``, ``passage_prefix``, ``pooling``,
    ``max_length``, ``batch_size`` (None values ignored). ``workers`` > 1 encodes on a pool of
    Ray actors (:mod:`hybridray.evaluate.pool`). Returns the ``report.json`` dict.
    """
    from hybridray.evaluate.pool import encoder_for
    from hybridray.evaluate.report import MARKDOWN, _strict_json
    from hybridray.models import load_encoder

    started = time.perf_counter()
    groups = dict(suite.resource_groups)
    data = {task.name: load_task(task, local_data(task.path)) for task in suite.tasks}
    model_path = model_location(model_name)
    settings = resolve_settings(suite, model_path, overrides, progress)
    model, tokenizer = load_encoder(model_path)
    with encoder_for(model, tokenizer, workers) as encoder:  # one actor pool for every task
        reports, rows, panels, seconds, markdown = {}, [], {}, {}, []
        for task in suite.tasks:
            task_started = time.perf_counter()
            report = evaluate_task(encoder, tokenizer, task, data[task.name], settings, groups)
            report = {"model": model_name, **report, "data": {**report["data"], "path": task.path}}
            seconds[task.name] = time.perf_counter() - task_started
            report["timing"].update(total_seconds=seconds[task.name], encode_workers=workers)
            reports[task.name] = report
            rows.extend(summary_rows(task, report, seconds[task.name], groups))
            low = low_resource_values(task, report, groups)
            if low:
                panels[task.name] = low
            markdown.append(f"---\n\n*Task `{task.name}`*\n\n" + MARKDOWN[task.kind](report))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chart = plot_low_resource(panels, {t.name: HEADLINE[t.kind] for t in suite.tasks}, out_dir / "low_resource.png")
    result = {
        "model": model_name,
        "label": label,
        "suite": {"path": suite_path, "config": suite.model_dump()},
        "settings": asdict(settings),
        "summary": rows,
        "low_resource": panels,
        "chart": chart.name if chart else None,
        "tasks": reports,
        "timing": {"tasks": seconds, "total_seconds": time.perf_counter() - started, "encode_workers": workers},
    }
    (out_dir / "report.json").write_text(
        json.dumps(_strict_json(result), indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(suite_markdown(result, markdown), encoding="utf-8")
    return result
