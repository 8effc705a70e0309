"""A finished run, told to a person: the closing summary, training curves, per-language
before/after plots, TensorBoard event files -- and ``hybridray report`` over one or more runs.

Everything here reads what a run left in its directory (local or ``s3://``): ``summary.json``,
``eval/before|after/report.json`` and ``metrics.jsonl`` (one record per optimizer step, written
by the driver from rank 0's progress records). Files this module writes:

====================================  ==========================================================
``metrics.jsonl``                     per step: loss (distill_kl with distillation), lr, samples,
                                      batch type; val_* after evals
``plots/training_curves.png``         loss per step, held-out multi mAP per evaluation
``plots/heldout_by_language.png``     per language, before / after: multi mAP, rank distance
``tensorboard/``                      the same scalars as TensorBoard events
                                      (``tensorboard --logdir runs/``)
====================================  ==========================================================
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from hybridray import storage
from hybridray.console import format_duration
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
    """The end-of-run text: held-out table with the change, time and speed (of this attempt,
    when the run was resumed), and where the outputs are (only those that exist)."""
    reports = read_reports(run_dir)
    metrics = summary.get("metrics") or {}
    wall_s = summary.get("wall_seconds") if wall_s is None else wall_s
    samples_per_s = summary.get("samples_per_s") if samples_per_s is None else samples_per_s
    resumed = summary.get("start_step") or 0
    lines = [f"hybridray: run {summary.get('name')!r}: {metrics.get('step', '?')} steps"
             + (f" (resumed at step {resumed}; this attempt" if resumed else "")
             + (f" in {format_duration(wall_s)}" if wall_s is not None else "")
             + (f", {samples_per_s:.1f} samples/s" if samples_per_s is not None and math.isfinite(samples_per_s) else "")
             + (")" if resumed else ""),
             ""]
    if reports["before"] or reports["after"]:
        path = (reports["after"] or reports["before"])["data"]["path"]
        n = (reports["after"] or reports["before"])["summary"]["n_queries"]
        lines += [f"held-out LAReQA evaluation ({n} queries, {path}):", "",
                  heldout_table(reports["before"], reports["after"]), ""]
    where = [("model", ["model"]), ("adapter", ["adapter"]),
             ("reports", [f"eval/{stage}/report.md" for stage in ("before", "after")]),
             ("plots", ["plots/training_curves.png", "plots/heldout_by_language.png"]),
             ("metrics", ["metrics.jsonl"])]
    for label, parts in where:
        found = [storage.join(run_dir, p) for p in parts if storage.exists(storage.join(run_dir, p))]
        if found:
            lines.append(f"{label:<8} {', '.join(found)}")
    if storage.exists(storage.join(run_dir, "tensorboard")):
        lines.append(f"{'curves':<8} tensorboard --logdir {storage.join(run_dir, 'tensorboard')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- artifacts
def plot_training_curves(history: list[dict], path: Path, before: Optional[dict] = None) -> None:
    """Loss per step; held-out mAP per evaluation, from the evaluation before training (step 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, map_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = [h["step"] for h in history]
    loss_ax.plot(steps, [h["loss"] for h in history], lw=1, color="tab:blue", alpha=0.5, label="per step")
    window = len(history) // 20  # a running mean over 5% of the run, once it means something
    if window > 1:
        smooth = [sum(h["loss"] for h in history[max(0, i - window + 1):i + 1]) / min(window, i + 1)
                  for i in range(len(history))]
        loss_ax.plot(steps, smooth, lw=2, color="tab:blue", label=f"mean of {window}")
    loss_ax.set(xlabel="step", ylabel="InfoNCE loss", title="training loss")
    loss_ax.legend()
    evals = [h for h in history if "val_map" in h]
    if before is not None:
        summary = before["summary"]
        evals = [{"step": 0, "val_map": summary["map"]["multi"], "val_map_mono": summary["map"]["mono"],
                  "val_map_cross": summary["map"]["cross"]}] + evals
    if evals:
        for key, label in (("val_map", "multi"), ("val_map_mono", "mono"), ("val_map_cross", "cross")):
            map_ax.plot([h["step"] for h in evals], [h.get(key, math.nan) for h in evals], marker="o", label=label)
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


#: Record keys written to TensorBoard, and their section.
_SCALARS = {"loss": "train", "distill_kl": "train", "lr": "train", "temperature": "train", "val_map": "heldout",
            "val_map_mono": "heldout", "val_map_cross": "heldout", "val_rank_distance": "heldout"}
#: How often a remote (``s3://``) run directory receives the live files.
UPLOAD_EVERY_S = 60.0


class RunLog:
    """A run's step records as they arrive: ``metrics.jsonl`` and TensorBoard events, live.

    In a local run directory every record is appended to ``metrics.jsonl`` and to the
    TensorBoard event file at once, so ``tensorboard --logdir runs/`` follows the run; for an
    ``s3://`` one both are kept in a local directory and uploaded every ``UPLOAD_EVERY_S``
    seconds, at every checkpoint step (``sync_every``: a run resumed from a checkpoint finds
    the records up to it) and at the end, a stopped run's too (``sync``). A resumed run keeps
    the records of earlier attempts up to its start step; a restart inside a run (a retried
    worker failure) drops the records from the step it restarted at, in the file and in
    TensorBoard (``purge_step``).
    """

    def __init__(self, run_dir: str, start_step: int = 0, sync_every: int = 0):
        self.run_dir = run_dir
        self.sync_every = sync_every
        self.remote = storage.is_remote(run_dir)
        self.local = Path(tempfile.mkdtemp(prefix="hybridray-log-") if self.remote else run_dir)
        self.records = {h["step"]: h for h in read_history(run_dir) if h["step"] <= start_step}
        self._writer = None
        self._uploaded = time.monotonic()
        self._restart(start_step + 1)

    @property
    def history(self) -> list[dict]:
        return [self.records[step] for step in sorted(self.records)]

    def _restart(self, step: int) -> None:
        """Forget the records from ``step`` on; rewrite the file; restart TensorBoard there."""
        from tensorboardX import SummaryWriter

        self.records = {k: v for k, v in self.records.items() if k < step}
        self.local.mkdir(parents=True, exist_ok=True)
        (self.local / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in self.history))
        if self._writer is not None:
            self._writer.close()
        self._writer = SummaryWriter(str(self.local / "tensorboard"), purge_step=step)

    def add(self, record: dict) -> None:
        if self.records and record["step"] <= max(self.records):
            self._restart(record["step"])
        self.records[record["step"]] = record
        with open(self.local / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, section in _SCALARS.items():
            if key in record:
                self._writer.add_scalar(f"{section}/{key}", record[key], record["step"])
        self._writer.flush()
        checkpointed = self.sync_every and record["step"] % self.sync_every == 0
        if self.remote and (checkpointed or time.monotonic() - self._uploaded > UPLOAD_EVERY_S):
            try:
                self.sync()
            except UserError as exc:  # storage out for longer than its retries: sent again later
                self._uploaded = time.monotonic()
                print(f"hybridray: warning: metrics not uploaded yet ({exc}); trying again in "
                      f"{UPLOAD_EVERY_S:.0f} s", file=sys.stderr, flush=True)

    def sync(self) -> None:
        """Everything logged so far into the run directory (a remote one: uploaded now)."""
        self._writer.flush()
        if self.remote:
            storage.copy_tree(str(self.local), self.run_dir)
        self._uploaded = time.monotonic()

    def close(self) -> None:
        """The plots of a finished run (its curves, its held-out languages); flush; upload."""
        reports = read_reports(self.run_dir)
        plots = self.local / "plots"
        plots.mkdir(exist_ok=True)
        history = self.history
        if history:
            plot_training_curves(history, plots / "training_curves.png", before=reports["before"])
        if reports["before"] and reports["after"]:
            plot_languages(reports["before"], reports["after"], plots / "heldout_by_language.png")
        self.sync()
        self._writer.close()


# ----------------------------------------------------------------------------- hybridray report
def _lareqa_report(directory: str) -> Optional[dict]:
    text = storage.read_text(storage.join(directory, "report.json"))
    report = json.loads(text) if text is not None else None
    return report if report and report.get("task") == "lareqa" else None


def compare_runs(run_dirs: Sequence[str], out: Optional[str] = None) -> str:
    """One run: its closing summary. Several: one table, a row per run (its held-out report
    after training), and with ``out`` a bar chart of the three mAPs per run
    (``out/comparison.png``). A ``hybridray eval --out`` directory (a LAReQA ``report.json``)
    counts as a run too, so two held-out sets, or a model before and after, line up."""
    summaries = []
    for run_dir in run_dirs:
        text = storage.read_text(storage.join(run_dir, "summary.json"))
        if text is not None:
            summaries.append(json.loads(text))
        elif _lareqa_report(run_dir) is not None:
            summaries.append(None)
        else:
            raise UserError(f"{run_dir}: no summary.json (a finished hybridray run) and no LAReQA "
                            "report.json (a hybridray eval --out directory)")
    if len(run_dirs) == 1 and summaries[0] is not None:
        return closing_summary(run_dirs[0], summaries[0])
    rows, reports = [], []
    for run_dir, summary in zip(run_dirs, summaries):
        if summary is None:  # an evaluation directory
            report, name, stage = {"before": None, "after": _lareqa_report(run_dir)}, run_dir.rstrip("/"), "eval"
        else:
            report, name = read_reports(run_dir), str(summary.get("name"))
            stage = "after" if report["after"] else "before"
        reports.append(report)
        shown = report["after"] or report["before"]
        rows.append([name, stage] + [f"{_value(shown, p):.{d}f}" for _, p, d, _ in HELDOUT_COLUMNS])
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
