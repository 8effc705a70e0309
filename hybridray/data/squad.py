"""SQuAD-layout QA files (TyDi QA GoldP, SQuAD, XQuAD) -> shards of (question, passage) pairs.

``hybridray data prepare`` reads LAReQA files, whose paragraphs carry sentence breaks, and
pairs a question with its answer *sentence*. Plain SQuAD v1.1 JSON has no sentence breaks;
``hybridray data from-squad`` pairs each question with its whole paragraph instead (the gold
passage, as TyDi GoldP defines it). The output is one shard dataset, used whole -- for
example as ``data.extra_mono`` (real, non-translated monolingual data; see
``configs/tydi-extra-mono.yaml``).

Input: a directory of ``{lang}.json`` files (ISO 639-1 names: ``en.json``, ``sw.json``).
One row per answerable question: ``group_id`` = the question ``id`` (so translations that
share an id, as in XQuAD, become one parallel group), ``lang``, ``query`` = the question,
``passage`` = the paragraph, ``article_id`` = ``{lang}:{article index}``, ``source``.
Questions without an answer (SQuAD 2.0's ``is_impossible``), duplicate ids and rows the
shard schema rejects (a passage longer than ``max_text_chars``) are left out and listed in
``OUT/_rejects.jsonl`` with file and reason; ``OUT/_convert.json`` records the counts. Both
names start with ``_`` so that the shard reader skips them.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator, Optional

from hybridray.data.lareqa import find_language_files, read_json
from hybridray.data.schema import RowError, row_problem
from hybridray.data.shards import write_shards
from hybridray.errors import UserError

REJECTS_NAME = "_rejects.jsonl"
SUMMARY_NAME = "_convert.json"


def read_squad(path: Path) -> list[dict]:
    """The articles of a SQuAD v1.1 JSON file (``{"data": [...]}``)."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise UserError(f"{path}: expected a SQuAD object with a 'data' list")
    return data["data"]


def iter_squad(path: Path) -> Iterator[tuple[str, int, str, Optional[dict]]]:
    """``(where, article index, context, qa)`` for every question of a SQuAD file, its
    structure checked (UserError naming the file and ``where``, e.g.
    ``data[3].paragraphs[0].qas[1]``); ``qa`` is None for a paragraph without questions."""
    for a, article in enumerate(read_squad(path)):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise UserError(f"{path}: data[{a}]: expected a 'paragraphs' list")
        for p, paragraph in enumerate(paragraphs):
            where = f"data[{a}].paragraphs[{p}]"
            context = paragraph.get("context") if isinstance(paragraph, dict) else None
            if not isinstance(context, str) or not context.strip():
                raise UserError(f"{path}: {where}: missing or empty 'context'")
            qas = paragraph.get("qas", [])
            if not isinstance(qas, list):
                raise UserError(f"{path}: {where}: 'qas' must be a list")
            if not qas:
                yield where, a, context, None
            for q, qa in enumerate(qas):
                place = f"{where}.qas[{q}]"
                qid = qa.get("id") if isinstance(qa, dict) else None
                if isinstance(qid, bool) or not isinstance(qid, (str, int)) or str(qid) == "":
                    raise UserError(f"{path}: {place}: missing question 'id'")
                if not isinstance(qa.get("question"), str) or not qa["question"].strip():
                    raise UserError(f"{path}: {place}: missing or empty 'question'")
                answers = qa.get("answers", [])
                if not isinstance(answers, list) or not all(
                    isinstance(x, dict) and isinstance(x.get("text"), str) for x in answers
                ):
                    raise UserError(f"{path}: {place}: 'answers' must be a list of {{'text': ...}}")
                yield place, a, context, qa


def answer_texts(qa: dict) -> list[str]:
    """The non-empty gold answers of a question; none for SQuAD 2.0's unanswerable ones."""
    if qa.get("is_impossible"):
        return []
    return [a["text"] for a in qa.get("answers", []) if a["text"].strip()]


def squad_to_shards(
    source_dir: str | Path,
    out_dir: str | Path,
    *,
    langs: Optional[Iterable[str]] = None,
    source_name: Optional[str] = None,
    max_text_chars: int = 4000,
    overwrite: bool = False,
    exclude_passages_of: Optional[str | Path] = None,
) -> dict:
    """Convert every ``{lang}.json`` of ``source_dir`` into one shard dataset at ``out_dir``.

    One question per passage and language: a second question on a passage already used is
    rejected ("passage already used by ..."), because in-batch negatives are masked by group
    and two questions on one passage would make each other's positive a negative.
    ``exclude_passages_of`` (a directory of ``{lang}.json`` files, e.g. the dev split an
    evaluation scores) rejects every passage that also appears there, so training never sees
    an evaluation question's gold passage.
    ``max_text_chars`` should match the training config's ``data.max_text_chars`` (the
    reader rejects longer texts; rejecting them here lists them once, by question).
    Returns the summary written to ``_convert.json``. Example::

        squad_to_shards("../shared/data/tydiqa-goldp/train", "data/tydi-train",
                        exclude_passages_of="../shared/data/tydiqa-goldp/dev")
    """
    files = find_language_files(source_dir, langs)
    resolved = Path(source_dir).resolve()
    source_name = source_name or f"{resolved.parent.name}/{resolved.name}"
    excluded: dict[str, set[str]] = {}
    if exclude_passages_of is not None:
        for lang, path in find_language_files(exclude_passages_of).items():
            excluded[lang] = {context.strip() for _, _, context, _ in iter_squad(path)}
    rows, rejects, counts = [], [], Counter()
    for lang, path in files.items():
        seen: set[str] = set()
        passages: dict[str, str] = {}  # passage text -> the question that uses it
        for ordinal, (where, article, context, qa) in enumerate(
            (item for item in iter_squad(path) if item[3] is not None), 1
        ):
            counts[lang] += 1
            qid = str(qa["id"])
            passage = context.strip()
            row = {"group_id": qid, "lang": lang, "query": qa["question"].strip(), "passage": passage,
                   "article_id": f"{lang}:{article}", "source": source_name}
            problem = ("duplicate question id" if qid in seen else
                       "no answer" if not answer_texts(qa) else
                       f"passage already used by question {passages[passage]!r}" if passage in passages else
                       f"passage also in {exclude_passages_of} (an evaluation split)"
                       if passage in excluded.get(lang, ()) else
                       row_problem(row, max_text_chars=max_text_chars))
            if problem:
                rejects.append(RowError(str(path), ordinal, f"{where}: {problem}"))
                continue
            seen.add(qid)
            passages[passage] = qid
            rows.append(row)
    if not rows:
        raise UserError(f"{source_dir}: no question could be converted ({len(rejects)} rejected)")
    rows.sort(key=lambda r: (r["group_id"], r["lang"]))  # a group's translations adjacent
    manifest = write_shards(rows, out_dir, source=source_name, overwrite=overwrite)
    out_dir = Path(out_dir)
    with open(out_dir / REJECTS_NAME, "w", encoding="utf-8") as f:
        for reject in rejects:
            f.write(json.dumps(asdict(reject), ensure_ascii=False) + "\n")
    summary = {
        "source": str(Path(source_dir).resolve()), "source_name": source_name, "languages": sorted(files),
        "source_questions": dict(sorted(counts.items())), "rows": manifest["rows_per_language"],
        "rejected": dict(sorted(Counter(Path(r.file).stem for r in rejects).items())),
        "max_text_chars": max_text_chars,
        "excluded_passages_of": str(exclude_passages_of) if exclude_passages_of is not None else None,
    }
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary
