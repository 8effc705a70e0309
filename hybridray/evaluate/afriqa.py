"""AfriQA gold passages (``afriqa:DIR``): cross-lingual retrieval from African languages into
English / French, with the translated question as the monolingual reference.

Layout: ``DIR/<lang>.<pivot>.<split>.jsonl``, one JSON object per line with
``question_lang`` (the question in the African language), ``question_translated`` (its
translation into the pivot language), ``context`` (the gold passage, in the pivot language),
``answer_pivot`` (``{"text": [...], "answer_start": [...]}``), ``answer_lang``, ``title``,
``id``. Language codes are the files' (ISO 639-3: ``hau``, ``swa``, ``yor``, ...).

Corpus: the unique contexts of every file of the split that shares the pivot
(``corpus="pivot"``, the default: one English pool for eight languages, one French pool for
Fon) or of the question's own file (``corpus="file"``). The English pool does not depend on
which languages are evaluated: every ``*.en.<split>.jsonl`` file contributes its passages.

Two query modes per language, same corpus and relevance (the question's own context):
``cross`` (``question_lang``) and ``translated`` (``question_translated``). Rows with no
context (AfriQA has a few questions without a gold passage) are skipped and counted; a line
that is not a JSON object or lacks a question is a :class:`UserError` naming ``file:line``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Optional

from hybridray.errors import UserError
from hybridray.evaluate.qa import Corpus, QaTask, QuerySet

FILE_NAME = re.compile(r"^(?P<lang>[a-z]{2,3})\.(?P<pivot>[a-z]{2,3})\.(?P<split>[a-z]+)\.jsonl$")
MODES = ("cross", "translated")
CORPUS_CHOICES = ("pivot", "file")


def find_afriqa_files(path: Path, split: str) -> dict[str, tuple[str, Path]]:
    """``{lang: (pivot, file)}`` of every ``<lang>.<pivot>.<split>.jsonl`` file."""
    if not path.is_dir():
        raise UserError(f"{path}: not a directory")
    found: dict[str, tuple[str, Path]] = {}
    for file in sorted(path.glob(f"*.{split}.jsonl")):
        match = FILE_NAME.match(file.name)
        if not match:
            continue
        lang = match["lang"]
        if lang in found:
            raise UserError(f"{path}: two {split} files for {lang}: {found[lang][1].name}, {file.name}")
        found[lang] = (match["pivot"], file)
    if not found:
        raise UserError(f"{path}: no <lang>.<pivot>.{split}.jsonl files")
    return found


def read_afriqa_file(file: Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` of every non-blank line, each checked (a row without a context
    is kept unchecked beyond that: it is skipped, and AfriQA has one such row with a NaN
    question, twi.en.dev.jsonl:109)."""
    rows = []
    try:
        lines = file.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{file}: cannot read: {exc}") from None
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{file}:{line_no}: not JSON: {exc}") from None
        if not isinstance(row, dict):
            raise UserError(f"{file}:{line_no}: expected a JSON object")
        if row.get("context") is not None and not isinstance(row["context"], str):
            raise UserError(f"{file}:{line_no}: 'context' must be a string or null")
        if not (row.get("context") or "").strip():
            rows.append((line_no, row))  # no gold passage: skipped and counted, whatever else it holds
            continue
        for key in ("question_lang", "question_translated"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise UserError(f"{file}:{line_no}: missing or empty {key!r}")
        if not isinstance(row.get("id"), (str, int)) or str(row["id"]) == "":
            raise UserError(f"{file}:{line_no}: missing 'id'")
        answer = row.get("answer_pivot")
        answers = [] if answer is None else answer.get("text") if isinstance(answer, dict) else None
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise UserError(f"{file}:{line_no}: 'answer_pivot' must be {{'text': [strings], ...}}")
        rows.append((line_no, row))
    return rows


def load_afriqa(
    path: str | Path,
    langs: Optional[Iterable[str]] = None,
    *,
    split: str = "test",
    corpus: str = "pivot",
) -> QaTask:
    """Read AfriQA into a :class:`QaTask` (modes ``cross`` and ``translated``).

    ``data`` facts recorded for the report: ``pivot`` per language, ``n_rows`` per
    language (lines of its file), ``n_skipped`` (rows without a context), ``corpus``.
    """
    if corpus not in CORPUS_CHOICES:
        raise UserError(f"afriqa corpus {corpus!r}: expected one of {', '.join(CORPUS_CHOICES)}")
    path = Path(path)
    files = find_afriqa_files(path, split)
    if langs is not None:
        langs = list(langs)
        missing = sorted(set(langs) - set(files))
        if missing:
            raise UserError(f"{path}: no {split} file for language(s) {missing}")
    selected = list(langs) if langs is not None else list(files)
    pools = {lang: (pivot if corpus == "pivot" else f"{lang}.{pivot}") for lang, (pivot, _) in files.items()}
    rows = {lang: read_afriqa_file(file) for lang, (_, file) in files.items()
            if lang in selected or pools[lang] in {pools[s] for s in selected}}

    docs: dict[str, dict[str, str]] = {}  # pool -> {text: doc id}
    for lang, lang_rows in rows.items():  # file order: a pool's ids do not depend on `langs`
        pool = docs.setdefault(pools[lang], {})
        for _, row in lang_rows:
            text = (row.get("context") or "").strip()
            if text:
                pool.setdefault(text, f"{pools[lang]}-p{len(pool)}")

    query_sets: list[QuerySet] = []
    info = {"corpus": corpus, "pivot": {}, "n_rows": {}, "n_skipped": {}}
    for lang in selected:
        pivot, file = files[lang]
        sets = {mode: QuerySet(lang, mode, pools[lang], [], [], {}, []) for mode in MODES}
        skipped = 0
        for line_no, row in rows[lang]:
            text = (row.get("context") or "").strip()
            if not text:
                skipped += 1
                continue
            qid = f"{lang}:{row['id']}"
            if qid in sets["cross"].qrels:
                raise UserError(f"{file}:{line_no}: duplicate id {row['id']!r}")
            answers = [a for a in (row.get("answer_pivot") or {}).get("text") or [] if a.strip()]
            for mode, key in zip(MODES, ("question_lang", "question_translated")):
                sets[mode].query_ids.append(qid)
                sets[mode].texts.append(row[key].strip())
                sets[mode].qrels[qid] = {docs[pools[lang]][text]: 1}
                sets[mode].answers.append(answers)
        if not sets["cross"].query_ids:
            raise UserError(f"{file}: no question with a context to evaluate")
        query_sets.extend(sets.values())
        info["pivot"][lang] = pivot
        info["n_rows"][lang] = len(rows[lang])
        info["n_skipped"][lang] = skipped
    corpora = {key: Corpus(key, list(texts.values()), list(texts)) for key, texts in docs.items()
               if key in {q.corpus for q in query_sets}}
    return QaTask("afriqa", str(path), split, list(MODES), corpora, query_sets, info)
