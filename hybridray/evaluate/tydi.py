"""TyDi QA gold passages (``tydi:DIR``) as monolingual passage retrieval, one task per language.

Layout: ``DIR/{split}/{lang}.json`` (SQuAD v1.1 JSON, one paragraph -- the gold passage --
per article; questions written natively in each language), ``split`` ``dev`` by default,
and optionally ``DIR/train/{lang}.json``.

Per language: the corpus is the language's unique passages (identical text is one passage,
so a passage that answers several questions is one document) plus, with ``distractors``, the
unique passages of ``DIR/train/{lang}.json`` when that file exists (en, ko, sw in the
release); a question's one relevant document is its own passage. Questions marked
``is_impossible`` or without answers (SQuAD 2.0 style) are skipped and counted; anything else
malformed is a :class:`UserError` naming the file and the question's place in it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from hybridray.data.schema import is_valid_lang
from hybridray.data.squad import answer_texts, iter_squad
from hybridray.errors import UserError
from hybridray.evaluate.qa import Corpus, QaTask, QuerySet

DISTRACTOR_SPLIT = "train"


def find_tydi_files(path: Path, split: str, langs: Optional[Iterable[str]]) -> dict[str, Path]:
    """``{lang: DIR/split/lang.json}``, all languages found or ``langs`` only."""
    split_dir = path / split
    if not split_dir.is_dir():
        raise UserError(f"{path}: no {split}/ directory (TyDi GoldP layout: {split}/{{lang}}.json)")
    files = {p.stem: p for p in sorted(split_dir.glob("*.json")) if is_valid_lang(p.stem)}
    if langs is not None:
        langs = list(langs)
        missing = sorted(set(langs) - set(files))
        if missing:
            raise UserError(f"{split_dir}: no file for language(s) {missing}")
        files = {lang: files[lang] for lang in langs}
    if not files:
        raise UserError(f"{split_dir}: no {{lang}}.json files")
    return files


def load_tydi(
    path: str | Path,
    langs: Optional[Iterable[str]] = None,
    *,
    split: str = "dev",
    distractors: bool = True,
) -> QaTask:
    """Read TyDi GoldP (or any SQuAD-layout ``{split}/{lang}.json`` set) into a :class:`QaTask`.

    ``data`` facts recorded for the report: ``n_questions`` (per language, as in the file),
    ``n_skipped`` (unanswerable), ``n_distractors`` (passages added from ``train/``).
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory")
    files = find_tydi_files(path, split, langs)
    corpora: dict[str, Corpus] = {}
    query_sets: list[QuerySet] = []
    info = {"distractors": distractors, "n_questions": {}, "n_skipped": {}, "n_distractors": {}}
    for lang, file in files.items():
        doc_of: dict[str, str] = {}

        def doc_id(text: str) -> str:
            return doc_of.setdefault(text, f"{lang}-p{len(doc_of)}")

        queries = QuerySet(lang, "mono", lang, [], [], {}, [])
        n_questions = n_skipped = 0
        seen: set[str] = set()
        for place, _, context, qa in iter_squad(file):
            doc = doc_id(context.strip())
            if qa is None:
                continue
            n_questions += 1
            qid = str(qa["id"])
            if qid in seen:
                raise UserError(f"{file}: {place}: duplicate question id {qid!r}")
            seen.add(qid)
            answers = answer_texts(qa)
            if not answers:
                n_skipped += 1
                continue
            queries.query_ids.append(qid)
            queries.texts.append(qa["question"].strip())
            queries.qrels[qid] = {doc: 1}
            queries.answers.append(answers)
        if not queries.query_ids:
            raise UserError(f"{file}: no answerable question to evaluate")
        n_own = len(doc_of)
        extra = path / DISTRACTOR_SPLIT / f"{lang}.json"
        if distractors and split != DISTRACTOR_SPLIT and extra.is_file():
            for _, _, context, _ in iter_squad(extra):
                doc_id(context.strip())
        corpora[lang] = Corpus(lang, list(doc_of.values()), list(doc_of))
        query_sets.append(queries)
        info["n_questions"][lang] = n_questions
        info["n_skipped"][lang] = n_skipped
        info["n_distractors"][lang] = len(doc_of) - n_own
    return QaTask("tydi", str(path), split, ["mono"], corpora, query_sets, info)
