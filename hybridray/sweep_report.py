"""What a finished (or resumed-and-finished) sweep leaves for a person: one row per trial, the
best trial's config ready to train, and the plots that show where the metric peaks.

``<storage>/<name>-sweep/`` (local or ``s3://``):

=======================  ==================================================================
``results.csv``          one row per trial: swept values, final and best metric (and the
                         step of the best), held-out mono / cross mAP and rank distance of
                         the final evaluation, steps run, stopped early or not, wall time
``results.md``           the same as a markdown table, with the best trial and the plots
``best.yaml``            the best trial's whole config: ``hybridray train best.yaml`` runs it
``plots/<metric>_vs_<key>.png``  the metric against α (or the first swept key), one line per
                         τ bucket (or the second swept key), every trial as a point
``plots/heatmap.png``    best metric over the grid of the two swept keys (two keys swept)
=======================  ==================================================================

The best trial is the one with the best final value among the trials that ran their whole
budget (ASHA stopped the others because they were behind); if none did, among all.
"""
from __future__ import annotations

import csv
import io
import math
import tempfile
from pathlib import Path
from typing import Any, Optional

from hybridray import storage

#: Short column names of the usual swept keys.
SYMBOLS = {"sampler.alpha": "α", "loss.temperature": "τ"}
#: Held-out metrics of the final evaluation shown for every trial.
HELDOUT = (("val_map_mono", "mono"), ("val_map_cross", "cross"), ("val_rank_distance", "rank dist."))
#: More distinct values than this on an axis are binned.
_MAX_LEVELS = 6


def _number(value: Any) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def summarise(results, sweep, *, max_steps: int) -> dict:
    """Rows (one per trial, in trial order) and the best row from a Tune ``ResultGrid``."""
    metric, keys = sweep.metric, list(sweep.search_space)
    better = max if sweep.mode == "max" else min
    rows = []
    for result in results:
        last = result.metrics or {}
        history = []
        frame = result.metrics_dataframe
        if frame is not None and metric in frame and "step" in frame:
            history = [(int(s), float(v)) for s, v in zip(frame["step"], frame[metric]) if _number(v) is not None]
        best = better(history, key=lambda sv: sv[1]) if history else None
        steps = last.get("step")
        status = "failed" if result.error else ("stopped early" if steps is not None and steps < max_steps
                                                else "complete")
        rows.append({
            "trial": last.get("trial_id") or Path(result.path).name,
            "params": {k: (result.config or {}).get(k) for k in keys},
            "final": _number(last.get(metric)),
            "best": best[1] if best else None,
            "best_step": best[0] if best else None,
            **{k: _number(last.get(k)) for k, _ in HELDOUT},
            "steps": steps,
            "stopped_early": status == "stopped early",
            "status": status,
            "wall_s": _number(last.get("time_total_s")),
            "history": history,
        })
    rows.sort(key=lambda r: r["trial"])
    scored = [r for r in rows if r["final"] is not None]
    pool = [r for r in scored if r["status"] == "complete"] or scored
    best = better(pool, key=lambda r: r["final"]) if pool else None
    return {"metric": metric, "mode": sweep.mode, "keys": keys, "max_steps": max_steps, "rows": rows,
            "best": best, "stopped_early": sum(r["stopped_early"] for r in rows),
            "failed": sum(r["status"] == "failed" for r in rows)}


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _param(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def table_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the results table (also the console's)."""
    from hybridray.console import format_duration

    metric = summary["metric"]
    header = (["trial"] + [SYMBOLS.get(k, k) for k in summary["keys"]]
              + [f"final {metric}", f"best {metric} (step)"] + [name for _, name in HELDOUT]
              + ["steps", "stopped early", "wall time"])
    cells = []
    for r in summary["rows"]:
        mark = " *" if summary["best"] is r else ""
        best = "–" if r["best"] is None else f"{r['best']:.4f} ({r['best_step']})"
        cells.append([r["trial"] + mark] + [_param(r["params"][k]) for k in summary["keys"]]
                     + [_fmt(r["final"]), best] + [_fmt(r[k]) for k, _ in HELDOUT]
                     + [f"{r['steps'] if r['steps'] is not None else '–'}/{summary['max_steps']}",
                        "failed" if r["status"] == "failed" else _fmt(r["stopped_early"]),
                        format_duration(r["wall_s"]) if r["wall_s"] is not None else "–"])
    return header, cells


def markdown_table(summary: dict) -> str:
    header, cells = table_rows(summary)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    return "\n".join(lines)


def write_csv(summary: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    metric = summary["metric"]
    writer.writerow(["trial", *summary["keys"], f"final_{metric}", f"best_{metric}", "best_step",
                     *[k for k, _ in HELDOUT], "steps", "max_steps", "stopped_early", "status", "wall_s", "best_trial"])
    for r in summary["rows"]:
        writer.writerow([r["trial"], *[r["params"][k] for k in summary["keys"]], r["final"], r["best"], r["best_step"],
                         *[r[k] for k, _ in HELDOUT], r["steps"], summary["max_steps"], r["stopped_early"], r["status"],
                         None if r["wall_s"] is None else round(r["wall_s"], 1), summary["best"] is r])
    return out.getvalue()


# ----------------------------------------------------------------------------- plots
def _axes_keys(summary: dict) -> tuple[Optional[str], Optional[str]]:
    """The x key (α if swept, else the first numeric swept key) and the bucket key (τ if
    swept, else the next swept key)."""
    numeric = [k for k in summary["keys"] if all(_number(r["params"][k]) is not None for r in summary["rows"])]
    if not numeric:
        return None, None
    x = "sampler.alpha" if "sampler.alpha" in numeric else numeric[0]
    others = [k for k in summary["keys"] if k != x]
    bucket = "loss.temperature" if "loss.temperature" in others else (others[0] if others else None)
    return x, bucket


def _levels(values: list[Any]) -> tuple[list[str], list[int]]:
    """Labels of the levels of one axis and each value's level: each distinct value when there
    are few, else log- (positive) or equal-spaced bins."""
    distinct = sorted(set(values), key=lambda v: (_number(v) is None, _number(v) or 0, str(v)))
    if len(distinct) <= _MAX_LEVELS or any(_number(v) is None for v in distinct):
        return [_param(v) for v in distinct], [distinct.index(v) for v in values]
    import numpy as np

    nums = np.asarray(values, dtype=float)
    log = bool((nums > 0).all())
    lo, hi = (np.log(nums.min()), np.log(nums.max())) if log else (nums.min(), nums.max())
    edges = np.linspace(lo, hi, 5)
    where = np.clip(np.searchsorted(edges, np.log(nums) if log else nums, side="right") - 1, 0, 3)
    shown = np.exp(edges) if log else edges
    return [f"{shown[i]:.3g}–{shown[i + 1]:.3g}" for i in range(4)], [int(w) for w in where]


def _axis_label(key: str) -> str:
    return f"{SYMBOLS[key]} ({key})" if key in SYMBOLS else key


def plot_metric_vs_key(summary: dict, path: Path) -> Optional[Path]:
    """The final metric of every trial against the x key, one line per bucket (mean over the
    trials of a bucket at each x that ran their whole budget); stopped trials hollow."""
    x_key, bucket_key = _axes_keys(summary)
    rows = [r for r in summary["rows"] if r["final"] is not None]
    if x_key is None or not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, where = _levels([r["params"][bucket_key] for r in rows]) if bucket_key else (["all"], [0] * len(rows))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for level, label in enumerate(labels):
        members = [r for r, w in zip(rows, where) if w == level]
        color = plt.cm.viridis(level / max(1, len(labels) - 1)) if len(labels) > 1 else "C0"
        full = [r for r in members if r["status"] == "complete"]
        xs = sorted({float(r["params"][x_key]) for r in full})
        means = [sum(r["final"] for r in full if float(r["params"][x_key]) == x)
                 / sum(1 for r in full if float(r["params"][x_key]) == x) for x in xs]
        name = f"{SYMBOLS.get(bucket_key, bucket_key)} = {label}" if bucket_key else None
        if xs:
            ax.plot(xs, means, "-", color=color, label=name, alpha=0.8)
        done = [r for r in members if r["status"] == "complete"]
        stopped = [r for r in members if r["status"] != "complete"]
        ax.scatter([r["params"][x_key] for r in done], [r["final"] for r in done], color=color, zorder=3,
                   label=None if xs else name)
        if stopped:
            ax.scatter([r["params"][x_key] for r in stopped], [r["final"] for r in stopped], facecolors="none",
                       edgecolors=color, zorder=3)
    if any(r["status"] != "complete" for r in rows):
        ax.scatter([], [], facecolors="none", edgecolors="grey", label="stopped early (value when stopped)")
    ax.set_xlabel(_axis_label(x_key))
    ax.set_ylabel(f"final {summary['metric']}")
    ax.set_title(f"{summary['metric']} against {SYMBOLS.get(x_key, x_key)}")
    ax.grid(alpha=0.3)
    if bucket_key or any(r["status"] != "complete" for r in rows):
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_heatmap(summary: dict, path: Path) -> Optional[Path]:
    """Best metric (over each trial's evaluations, the best trial of a cell) over the grid of
    the two swept keys; None unless exactly two keys are swept."""
    if len(summary["keys"]) != 2:
        return None
    rows = [r for r in summary["rows"] if r["best"] is not None]
    if not rows:
        return None
    x_key, y_key = _axes_keys(summary)
    if x_key is None or y_key is None:
        x_key, y_key = summary["keys"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x_labels, x_at = _levels([r["params"][x_key] for r in rows])
    y_labels, y_at = _levels([r["params"][y_key] for r in rows])
    better = np.fmax if summary["mode"] == "max" else np.fmin
    grid = np.full((len(y_labels), len(x_labels)), np.nan)
    for r, i, j in zip(rows, y_at, x_at):
        grid[i, j] = better(grid[i, j], r["best"])
    fig, ax = plt.subplots(figsize=(1.2 * len(x_labels) + 2.4, 0.8 * len(y_labels) + 1.8))
    image = ax.imshow(grid, cmap="viridis" if summary["mode"] == "max" else "viridis_r", aspect="auto",
                      origin="lower")
    for i in range(len(y_labels)):
        for j in range(len(x_labels)):
            if not np.isnan(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if grid[i, j] < np.nanmean(grid) else "black")
    ax.set_xticks(range(len(x_labels)), x_labels)
    ax.set_yticks(range(len(y_labels)), y_labels)
    ax.set_xlabel(_axis_label(x_key))
    ax.set_ylabel(_axis_label(y_key))
    ax.set_title(f"best {summary['metric']}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- outputs
def write_outputs(summary: dict, directory: str, best_config, *, title: str) -> None:
    """Write results.csv, results.md, best.yaml and plots/ into ``directory`` (local or
    ``s3://``) and print the table and where best.yaml is."""
    from hybridray.config import dump_config
    from hybridray.console import format_duration

    with tempfile.TemporaryDirectory(prefix="hybridray-sweep-") as tmp:
        local = Path(directory) if not storage.is_remote(directory) else Path(tmp)
        local.mkdir(parents=True, exist_ok=True)
        (local / "results.csv").write_text(write_csv(summary), encoding="utf-8")
        x_key, _ = _axes_keys(summary)
        plots = []
        if x_key is not None:
            name = f"{summary['metric']}_vs_{x_key.split('.')[-1]}.png"
            plots.append(plot_metric_vs_key(summary, local / "plots" / name))
        plots.append(plot_heatmap(summary, local / "plots" / "heatmap.png"))
        plots = [p for p in plots if p is not None]
        best = summary["best"]
        best_yaml = storage.join(directory, "best.yaml")
        lines = [f"# {title}", "", markdown_table(summary), ""]
        counts = (f"{len(summary['rows'])} trial(s), {summary['stopped_early']} stopped early, "
                  f"{summary['failed']} failed; wall time {format_duration(summary.get('wall_seconds') or 0)}")
        lines.append(counts + ".")
        if best is not None:
            params = ", ".join(f"{k}={_param(v)}" for k, v in best["params"].items())
            lines += ["", f"Best trial (*): `{best['trial']}` ({params}), final {summary['metric']} "
                          f"{best['final']:.4f}. Train it: `hybridray train {best_yaml}`."]
            header = (f"# The best trial ({best['trial']}: {params}; final {summary['metric']} {best['final']:.4f} "
                      f"after {best['steps']} steps) of {title.removeprefix('Sweep ')}.\n"
                      f"# Run it as it is: hybridray train best.yaml (raise train.max_steps for a longer run)\n")
            (local / "best.yaml").write_text(header + dump_config(best_config), encoding="utf-8")
        lines += [""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
        (local / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        if storage.is_remote(directory):
            storage.copy_tree(str(local), directory)
    summary["best_yaml"] = best_yaml if best is not None else None
    summary["plots"] = [storage.join(directory, "plots", p.name) for p in plots]
    from hybridray.run_report import text_table

    print("\n" + text_table(*table_rows(summary)), flush=True)
    print(f"\n{counts}; results in {directory} (results.md, results.csv, plots/)", flush=True)
    if best is not None:
        print(f"best: {best['trial']} ({params}), final {summary['metric']} {best['final']:.4f}\n"
              f"train it: hybridray train {best_yaml}", flush=True)
