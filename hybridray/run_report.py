"""A finished run, told to a person: the closing summary, training curves, per-language
before/after plots, TensorBoard event files -- and ``hybridray report`` over one or more runs.

Everything here reads what a run left in its directory (local or ``s3://``): ``summary.json``,
``eval/before|after/report.json`` and ``metrics.jsonl`` (one record per optimizer step, written
by the driver from rank 0's progress records). Files this module writes:

====================================  ==========================================================
``metrics.jsonl``                     per step: loss, lr, samples, batch type; val_* after evals
``plots/training_curves.png``         loss per step, held-out multi mAP per evaluation
``plots/heldout_by_language.png``     per language, before / after: multi mAP, rank distance
``tensorboard/``                      the same scalars as TensorBoard events
                                      (``tensorboard --logdir runs/``)
====================================  ==========================================================
"""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from hybridray import storage
from hybridray.errors import UserError

#: (label, summary key path, digits, lower is better) of the held-out table.
HELDOUT_COLUMNS = (
    ("mono mAP", ("map", "mono"), 3, False),
    ("cross mAP", ("map", "cross"), 3, False),
    ("multi mAP", ("map", "multi"), 3, False),
    ("rank dist.", ("rank_distance",), 1, True),
)


def _value(report: Optional[dict], path: Sequence[str]) -> float:
    node = (report or {}).get("summary")
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return float(node) if isinstance(node, (int, float)) else math.nan


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """A plain aligned table (the console's; report.md files keep markdown)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def heldout_table(before: Optional[dict], after: Optional[dict]) -> str:
    """Before / after / change on the held-out set."""
    rows = []
    for name, report in (("before", before), ("after", after)):
        if report is not None:
            rows.append([name] + [f"{_value(report, p):.{d}f}" for _, p, d, _ in HELDOUT_COLUMNS])
    if before is not None and after is not None:
        rows.append(["change"] + [f"{_value(after, p) - _value(before, p):+.{d}f}" for _, p, d, _ in HELDOUT_COLUMNS])
    return text_table(["held-out"] + [c[0] for c in HELDOUT_COLUMNS], rows)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def read_reports(run_dir: str) -> dict[str, Optional[dict]]:
    out = {}
    for stage in ("before", "after"):
        text = storage.read_text(storage.join(run_dir, "eval", stage, "report.json"))
        out[stage] = json.loads(text) if text is not None else None
    return out


def read_history(run_dir: str) -> list[dict]:
    text = storage.read_text(storage.join(run_dir, "metrics.jsonl")) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def closing_summary(run_dir: str, summary: dict, *, wall_s: Optional[float] = None,
                    samples_per_s: Optional[float] = None) -> str:
    """The end-of-run text: held-out table with the change, time and speed, where things are.
    Time and speed default to what ``summary.json`` recorded."""
    reports = read_reports(run_dir)
    metrics = summary.get("metrics") or {}
    wall_s = summary.get("wall_seconds") if wall_s is None else wall_s
    samples_per_s = summary.get("samples_per_s") if samples_per_s is None else samples_per_s
    lines = [f"hybridray: run {summary.get('name')!r}: {metrics.get('step', '?')} steps"
             + (f" in {_duration(wall_s)}" if wall_s is not None else "")
             + (f", {samples_per_s:.1f} samples/s" if samples_per_s is not None and math.isfinite(samples_per_s) else ""),
             ""]
    if reports["before"] or reports["after"]:
        path = (reports["after"] or reports["before"])["data"]["path"]
        n = (reports["after"] or reports["before"])["summary"]["n_queries"]
        lines += [f"held-out LAReQA evaluation ({n} queries, {path}):", "",
                  heldout_table(reports["before"], reports["after"]), ""]
    plots = storage.join(run_dir, "plots")
    lines += [
        f"model    {storage.join(run_dir, 'model')}",
        f"reports  {storage.join(run_dir, 'eval')}/{{before,after}}/report.md",
        f"plots    {plots}/training_curves.png, {plots}/heldout_by_language.png",
        f"metrics  {storage.join(run_dir, 'metrics.jsonl')}; tensorboard --logdir {storage.join(run_dir, 'tensorboard')}",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- artifacts
def plot_training_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, map_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [h["step"] for h in history]
    loss_ax.plot(steps, [h["loss"] for h in history], lw=1, color="tab:blue", alpha=0.5, label="per step")
    window = max(1, len(history) // 20)
    if len(history) >= window:
        smooth = [sum(h["loss"] for h in history[max(0, i - window + 1):i + 1]) / min(window, i + 1)
                  for i in range(len(history))]
        loss_ax.plot(steps, smooth, lw=2, color="tab:blue", label=f"mean of {window}")
    loss_ax.set(xlabel="step", ylabel="InfoNCE loss", title="training loss")
    loss_ax.legend()
    evals = [h for h in history if "val_map" in h]
    if evals:
        for key, label in (("val_map", "multi"), ("val_map_mono", "mono"), ("val_map_cross", "cross")):
            map_ax.plot([h["step"] for h in evals], [h[key] for h in evals], marker="o", label=label)
        map_ax.legend()
    else:
        map_ax.text(0.5, 0.5, "no held-out evaluation during training", ha="center", va="center")
    map_ax.set(xlabel="step", ylabel="held-out mAP", title="held-out mAP")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_languages(before: dict, after: dict, path: Path) -> None:
    """Per query language: multi mAP and rank distance, before and after training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    langs = list(after["per_language"])
    x = np.arange(len(langs))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, title in ((axes[0], "map_multi", "multilingual mAP (higher is better)"),
                           (axes[1], "rank_distance", "rank distance (lower is better)")):
        for offset, (name, report, color) in ((-0.2, ("before", before, "tab:gray")), (0.2, ("after", after, "tab:blue"))):
            values = [report["per_language"].get(lang, {}).get(key) for lang in langs]
            values = [v if isinstance(v, (int, float)) else math.nan for v in values]  # JSON null: no value
            ax.bar(x + offset, values, width=0.4, label=name, color=color)
        ax.set_xticks(x, langs)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tensorboard(history: list[dict], directory: Path) -> None:
    from tensorboardX import SummaryWriter

    with SummaryWriter(str(directory)) as writer:
        for h in history:
            for key in ("loss", "lr", "temperature", "val_map", "val_map_mono", "val_map_cross", "val_rank_distance"):
                if key in h:
                    writer.add_scalar(f"{'train' if not key.startswith('val') else 'heldout'}/{key}", h[key], h["step"])


def write_run_artifacts(run_dir: str, history: list[dict], *, start_step: int = 0) -> None:
    """``metrics.jsonl`` (the records of earlier attempts up to ``start_step`` kept), the two
    plots and the TensorBoard events, written locally and copied into ``run_dir``."""
    earlier = [h for h in read_history(run_dir) if h["step"] <= start_step]
    history = earlier + [h for h in history if h["step"] > start_step]
    reports = read_reports(run_dir)
    with tempfile.TemporaryDirectory(prefix="hybridray-report-") as tmp:
        out = Path(tmp)
        (out / "plots").mkdir()
        (out / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        if history:
            plot_training_curves(history, out / "plots" / "training_curves.png")
            write_tensorboard(history, out / "tensorboard")
        if reports["before"] and reports["after"]:
            plot_languages(reports["before"], reports["after"], out / "plots" / "heldout_by_language.png")
        storage.delete_tree(storage.join(run_dir, "tensorboard"))  # one event stream per run
        storage.copy_tree(tmp, run_dir)


# ----------------------------------------------------------------------------- hybridray report
def compare_runs(run_dirs: Sequence[str], out: Optional[str] = None) -> str:
    """One run: its closing summary. Several: one table, a row per run (after training), and
    with ``out`` a bar chart of the three mAPs per run (``out/comparison.png``)."""
    summaries = []
    for run_dir in run_dirs:
        text = storage.read_text(storage.join(run_dir, "summary.json"))
        if text is None:
            raise UserError(f"{run_dir}: no summary.json (not a finished hybridray run)")
        summaries.append(json.loads(text))
    if len(run_dirs) == 1:
        return closing_summary(run_dirs[0], summaries[0])
    rows, reports = [], []
    for run_dir, summary in zip(run_dirs, summaries):
        report = read_reports(run_dir)
        reports.append(report)
        after = report["after"] or report["before"]
        rows.append([str(summary.get("name")), "after" if report["after"] else "before"]
                    + [f"{_value(after, p):.{d}f}" for _, p, d, _ in HELDOUT_COLUMNS])
    table = text_table(["run", "model"] + [c[0] for c in HELDOUT_COLUMNS], rows)
    if out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np

        fig, ax = plt.subplots(figsize=(2 + 1.6 * len(rows), 3.6))
        x = np.arange(len(rows))
        for i, (name, path, _, _) in enumerate(HELDOUT_COLUMNS[:3]):
            ax.bar(x + (i - 1) * 0.27, [_value(r["after"] or r["before"], path) for r in reports], width=0.27, label=name)
        ax.set_xticks(x, [r[0] for r in rows])
        ax.set_ylabel("held-out mAP")
        ax.legend()
        fig.tight_layout()
        Path(out).mkdir(parents=True, exist_ok=True)
        fig.savefig(Path(out) / "comparison.png", dpi=110)
        plt.close(fig)
        (Path(out) / "comparison.txt").write_text(table + "\n")
        table += f"\n\nplot: {Path(out) / 'comparison.png'}"
    return table
