"""Evaluation reports: ``report.json``, ``report.md`` and PNG plots in one directory.

Key paths of ``report.json`` (every task has ``task``, ``model``, ``data``, ``settings``,
``summary``, ``timing``):

- LAReQA (``task == "lareqa"``):
  ``summary.map.{mono,cross,multi}``, ``summary.recall.{mono,cross,multi}`` (cut-offs in
  ``summary.recall_at``: 1, 1, 10), ``summary.rank_distance``, ``summary.n_queries``,
  ``summary.n_candidates`` (the multi pool), ``summary.n_cross_pairs``;
  ``per_language.<L>.{n_queries, n_candidates, map_mono, recall_mono, map_cross, map_multi,
  recall_multi, rank_distance}`` (``map_cross``: mean over pools Y of L->Y);
  ``pairs.<X>.<Y>.{map, recall, n_queries}`` (queries in X, pool Y; X == Y is mono);
  ``timing.{encode_seconds, score_seconds, total_seconds}``.
  Plots: ``pairs_map.png`` (per-pair mAP heatmap), ``rank_distance.png`` (per language).
- BEIR layout: ``summary.{ndcg@10, recall@100, mrr@10}`` (macro over datasets),
  ``per_dataset.<name>.{ndcg@10, recall@100, mrr@10, n_queries, n_corpus}``.
- Tatoeba: ``summary.accuracy.{high,low,all}.{xxx_to_eng, eng_to_xxx, mean, n_languages}``,
  ``per_language.<xxx>.{n, xxx_to_eng, eng_to_xxx, mean, group}``.
- TyDi QA GoldP (``task == "tydi"``, mode ``mono``) and AfriQA (``task == "afriqa"``, modes
  ``cross`` and ``translated``): ``summary.<mode>.{low,mid,high,all}.{ndcg@10, recall@100,
  mrr@10, answer@1, answer@5, answer@20, n_languages}`` (macro over languages);
  ``per_language.<L>.{group, corpus, n_queries, n_corpus}`` and
  ``per_language.<L>.<mode>.{ndcg@10, recall@100, mrr@10, answer@1, answer@5, answer@20,
  answer_in_gold}``; ``timing.{encode_seconds, score_seconds}``. Groups: Joshi et al. 2020
  classes (:mod:`hybridray.evaluate.languages`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _f(value: float, digits: int = 3) -> str:
    return "–" if value is None or np.isnan(value) else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def lareqa_markdown(report: dict) -> str:
    """The paper's layout (Mo. / Cr. / Mul. mAP, recall, rank distance), then per language
    and the per-pair mAP matrix (rows: query language, columns: pool language)."""
    s, langs = report["summary"], report["data"]["langs"]
    k = s["recall_at"]
    summary = _table(
        ["model", "Mo. mAP", "Cr. mAP", "Mul. mAP", f"Mo. R@{k['mono']}", f"Cr. R@{k['cross']}",
         f"Mul. R@{k['multi']}", "rank dist."],
        [[f"`{report.get('model', '?')}`", _f(s["map"]["mono"]), _f(s["map"]["cross"]), _f(s["map"]["multi"]),
          _f(s["recall"]["mono"]), _f(s["recall"]["cross"]), _f(s["recall"]["multi"]), _f(s["rank_distance"], 1)]],
    )
    per_language = _table(
        ["lang", "queries", "candidates", "Mo. mAP", "Cr. mAP (as query)", "Mul. mAP", "Mul. R@10", "rank dist."],
        [[lang, str(r["n_queries"]), str(r["n_candidates"]), _f(r["map_mono"]), _f(r["map_cross"]),
          _f(r["map_multi"]), _f(r["recall_multi"]), _f(r["rank_distance"], 1)]
         for lang, r in report["per_language"].items()],
    )
    pairs = _table(
        ["query \\ pool", *langs],
        [[x, *(_f(report["pairs"][x][y]["map"]) for y in langs)] for x in langs],
    )
    return (
        f"## LAReQA retrieval: `{report['data']['path']}`\n\n"
        f"{s['n_queries']} queries, {s['n_candidates']} pooled candidates, {len(langs)} languages, "
        f"{s['n_cross_pairs']} cross pairs.\n\n{summary}\n\n### Per language\n\n{per_language}\n\n"
        f"### mAP per (query language, pool language)\n\n{pairs}\n"
    )


def beir_markdown(report: dict) -> str:
    names = list(report["summary"])
    rows = [[name, str(d["n_queries"]), str(d["n_corpus"]), *(_f(d[m]) for m in names)]
            for name, d in report["per_dataset"].items()]
    rows.append(["**mean**", "", "", *(_f(report["summary"][m]) for m in names)])
    return (f"## BEIR-layout retrieval: `{report['data']['path']}` ({report['data']['split']})\n\n"
            f"Model `{report.get('model', '?')}`.\n\n" + _table(["dataset", "queries", "corpus", *names], rows) + "\n")


def tatoeba_markdown(report: dict) -> str:
    acc = report["summary"]["accuracy"]
    summary = _table(
        ["XTREME group", "languages", "xxx→eng", "eng→xxx", "mean"],
        [[g, str(acc[g]["n_languages"]), _f(acc[g]["xxx_to_eng"]), _f(acc[g]["eng_to_xxx"]), _f(acc[g]["mean"])]
         for g in ("high", "low", "all")],
    )
    per_language = _table(
        ["lang", "XTREME group", "pairs", "xxx→eng", "eng→xxx"],
        [[lang, r["group"], str(r["n"]), _f(r["xxx_to_eng"]), _f(r["eng_to_xxx"])]
         for lang, r in sorted(report["per_language"].items(), key=lambda item: (item[1]["group"], item[0]))],
    )
    return (f"## Tatoeba bitext retrieval, accuracy@1: `{report['data']['path']}`\n\n"
            f"Model `{report.get('model', '?')}`. \"high\" = the 36 XTREME languages, \"low\" = the rest.\n\n"
            f"{summary}\n\n### Per language\n\n{per_language}\n")


QA_TITLES = {
    "tydi": "TyDi QA gold-passage retrieval",
    "afriqa": "AfriQA cross-lingual gold-passage retrieval",
}
QA_MODES = {
    "mono": "question and passages in one language",
    "cross": "question in the African language -> English / French passages",
    "translated": "the question's English / French translation -> the same passages (monolingual reference)",
}
QA_COLUMNS = ("ndcg@10", "recall@100", "mrr@10", "answer@1", "answer@5", "answer@20")
QA_HEADER = ["nDCG@10", "R@100", "MRR@10", "Ans@1", "Ans@5", "Ans@20"]


def qa_markdown(report: dict) -> str:
    """TyDi / AfriQA: per mode, the low / mid / high / all macro table, then per language."""
    data = report["data"]
    parts = [f"## {QA_TITLES.get(report['task'], report['task'])}: `{data['path']}` ({data['split']})\n\n"
             f"Model `{report.get('model', '?')}`. Groups: Joshi et al. 2020 classes (low 0-2, mid 3, "
             f"high 4-5); Ans@k = a top-k passage contains a gold answer (SQuAD normalisation).\n"]
    for mode in data["modes"]:
        summary = report["summary"][mode]
        parts.append(f"### {mode}: {QA_MODES.get(mode, mode)}\n\n" + _table(
            ["group", "languages", *QA_HEADER],
            [[g, str(summary[g]["n_languages"]), *(_f(summary[g][m]) for m in QA_COLUMNS)]
             for g in ("low", "mid", "high", "all")]) + "\n")
        rows = [[lang, r["group"], r["corpus"], str(r["n_queries"]), str(r["n_corpus"]),
                 *(_f(r[mode][m]) for m in QA_COLUMNS), _f(r[mode]["answer_in_gold"])]
                for lang, r in sorted(report["per_language"].items(), key=lambda item: (item[1]["group"], item[0]))]
        parts.append(_table(["lang", "group", "corpus", "queries", "passages", *QA_HEADER, "answer in gold"], rows) + "\n")
    return "\n".join(parts)


MARKDOWN = {"lareqa": lareqa_markdown, "beir": beir_markdown, "tatoeba": tatoeba_markdown,
            "tydi": qa_markdown, "afriqa": qa_markdown}


def plot_lareqa(report: dict, out_dir: Path) -> list[Path]:
    """Per-pair mAP heatmap and rank distance per language (Agg backend, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = report["data"]["langs"]
    matrix = np.array([[report["pairs"][x][y]["map"] for y in langs] for x in langs], dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(langs), 0.6 + 0.7 * len(langs)))
    image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=1.0)
    for i in range(len(langs)):
        for j in range(len(langs)):
            if not np.isnan(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if matrix[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(langs)), langs)
    ax.set_yticks(range(len(langs)), langs)
    ax.set_xlabel("pool language")
    ax.set_ylabel("query language")
    ax.set_title("mAP per language pair (diagonal: mono)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    heatmap = out_dir / "pairs_map.png"
    fig.savefig(heatmap, dpi=120)
    plt.close(fig)

    distances = [report["per_language"][lang]["rank_distance"] for lang in langs]
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(langs), 3.2))
    ax.bar(langs, distances, color="tab:blue")
    ax.axhline(report["summary"]["rank_distance"], color="tab:red", linestyle="--", label="macro mean")
    ax.set_xlabel("query language")
    ax.set_ylabel("rank distance (lower is better)")
    ax.set_title("Language bias in the multilingual pool")
    ax.legend()
    fig.tight_layout()
    bars = out_dir / "rank_distance.png"
    fig.savefig(bars, dpi=120)
    plt.close(fig)
    return [heatmap, bars]


def _strict_json(value):
    """NaN (an empty setting) becomes null: ``report.json`` stays standard JSON."""
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def write_report(report: dict, out_dir: str | Path) -> str:
    """Write ``report.json``, ``report.md`` (and the LAReQA plots) to ``out_dir``; return the
    Markdown. NaN values are written as ``null``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(_strict_json(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    markdown = MARKDOWN[report["task"]](report)
    (out_dir / "report.md").write_text(markdown, encoding="utf-8")
    if report["task"] == "lareqa":
        plot_lareqa(report, out_dir)
    return markdown
