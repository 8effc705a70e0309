"""LAReQA / SQuAD-style QA files -> translated-QA shards, split by article.

Input layout (MLQA-R, XQuAD-R): a directory of ``{lang}.json`` files, SQuAD v1.1 JSON with
``sentences`` and ``sentence_breaks`` on every paragraph. A question's ``id`` is shared by
its translations. One shard row per (question, language): query = the question, passage =
the gold answer sentence (the sentence whose break span holds ``answers[0].answer_start``),
context = the paragraph.

Article titles are translated too, so "an article" is identified across languages by the
questions it holds: two (language, article) pairs that share a question id are the same
article. The train / held-out split assigns whole articles, so no article — in any
language — and no question is on both sides.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from hybridray.data.schema import RowError, is_valid_lang
from hybridray.errors import UserError


@dataclass
class Question:
    qid: str
    lang: str
    question: str
    sentence: str
    context: str
    article: int  # index of the article in its language's file
    position: tuple[int, int, int]  # (article, paragraph, qa) indices in the file


@dataclass
class LareqaSource:
    """Everything read from a LAReQA directory, with what was rejected and why."""

    files: dict[str, Path]
    raw: dict[str, dict]
    questions: list[Question] = field(default_factory=list)
    #: rejected questions; ``row`` is the question's 1-based ordinal in its file.
    rejects: list[RowError] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # questions in the source, per language


def gold_sentence_index(paragraph: dict, answer_start: int) -> Optional[int]:
    """Index of the sentence whose ``[start, end)`` break span holds ``answer_start``."""
    for i, (start, end) in enumerate(paragraph["sentence_breaks"]):
        if start <= answer_start < end:
            return i
    return None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _paragraph_problem(paragraph: dict) -> Optional[str]:
    """Why a paragraph's questions cannot be paired with a sentence, or None."""
    sentences, breaks = paragraph.get("sentences"), paragraph.get("sentence_breaks")
    if not isinstance(paragraph.get("context"), str):
        return "paragraph has no 'context' string"
    if not (isinstance(sentences, list) and isinstance(breaks, list) and len(sentences) == len(breaks)):
        return "paragraph has no matching 'sentences' / 'sentence_breaks'"
    if not all(isinstance(x, str) for x in sentences):
        return "paragraph 'sentences' must be strings"
    if not all(isinstance(b, list) and len(b) == 2 and all(_is_int(v) for v in b) for b in breaks):
        return "paragraph 'sentence_breaks' must be [start, end] integer pairs"
    return None


def find_language_files(source_dir: str | Path, langs: Optional[Iterable[str]] = None) -> dict[str, Path]:
    """``{lang: path}`` for the ``{lang}.json`` files of a LAReQA directory."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise UserError(f"{source_dir}: not a directory")
    candidates = [p for p in sorted(source_dir.glob("*.json")) if not p.name.startswith(".")]  # hidden: not data
    files = {p.stem: p for p in candidates if is_valid_lang(p.stem)}
    if langs is None:  # every visible *.json is a language file: none is skipped without a word
        for path in candidates:
            if path.stem not in files:
                raise UserError(f"{path}: not a language file name ({{lang}}.json with a lower-case ISO 639-1 "
                                "code, e.g. en.json); rename or move it, or name the languages with --langs")
    if langs is not None:
        missing = sorted(set(langs) - set(files))
        if missing:
            raise UserError(f"{source_dir}: no file for language(s) {missing}")
        files = {lang: files[lang] for lang in langs}
    if not files:
        raise UserError(f"{source_dir}: no {{lang}}.json files (expected e.g. en.json, de.json)")
    return files


def _question_problem(qa: dict, paragraph: dict) -> Optional[str]:
    if not isinstance(qa.get("id"), str) or not qa["id"].strip():
        return "missing question id"
    if not isinstance(qa.get("question"), str) or not qa["question"].strip():
        return "empty question"
    answers = qa.get("answers")
    if not answers:
        return "no answers"
    if not isinstance(answers, list) or not isinstance(answers[0], dict):
        return "answers must be a list of objects"
    start = answers[0].get("answer_start")
    if not _is_int(start):
        return "answers[0].answer_start is not an integer"
    index = gold_sentence_index(paragraph, start)
    if index is None:
        return f"answer_start {start} is in no sentence break"
    if not paragraph["sentences"][index].strip():
        return f"the answer sentence ({index}) is empty"
    return None


def _structure(path: Path, where: str, value, kind: type, what: str):
    """``value`` if it is a ``kind``, else a UserError naming the file and the place."""
    if not isinstance(value, kind):
        raise UserError(f"{path}: {where}: expected {what}, got {type(value).__name__}")
    return value


def read_lareqa(source_dir: str | Path, langs: Optional[Iterable[str]] = None) -> LareqaSource:
    """Read and validate every question of every language file (``source_dir`` local or
    ``s3://``, fetched once into the cache)."""
    from hybridray.storage import local_copy

    files = find_language_files(local_copy(str(source_dir)), langs)
    source = LareqaSource(files=files, raw={})
    for lang, path in files.items():
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise UserError(f"{path}: expected a SQuAD object with a 'data' list")
        source.raw[lang] = data
        seen: set[str] = set()
        for a, article in enumerate(data["data"]):
            _structure(path, f"data[{a}]", article, dict, "an article object")
            for p, paragraph in enumerate(_structure(path, f"data[{a}].paragraphs", article.get("paragraphs", []),
                                                     list, "a list")):
                _structure(path, f"data[{a}].paragraphs[{p}]", paragraph, dict, "a paragraph object")
                paragraph_problem = _paragraph_problem(paragraph)
                qas = _structure(path, f"data[{a}].paragraphs[{p}].qas", paragraph.get("qas", []), list, "a list")
                for q, qa in enumerate(qas):
                    source.counts[lang] += 1
                    where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                    _structure(path, where, qa, dict, "a question object")
                    problem = paragraph_problem or _question_problem(qa, paragraph)
                    if problem is None and qa["id"] in seen:
                        problem = f"duplicate question id {qa['id']!r}"
                    if problem is not None:
                        source.rejects.append(RowError(str(path), source.counts[lang], f"{where}: {problem}"))
                        continue
                    seen.add(qa["id"])
                    index = gold_sentence_index(paragraph, qa["answers"][0]["answer_start"])
                    source.questions.append(
                        Question(
                            qa["id"], lang, qa["question"].strip(), paragraph["sentences"][index].strip(),
                            paragraph["context"], a, (a, p, q),
                        )
                    )
    return source


def read_json(path: Path):
    """A JSON file's value; anything unreadable (I/O, not UTF-8, not JSON, nested too deeply)
    is one UserError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        detail = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise UserError(f"{path}: cannot read SQuAD JSON: {detail}") from None


def article_clusters(questions: list[Question]) -> dict[tuple[str, int], str]:
    """Map each (lang, article) to a cluster key: articles linked by shared question ids.

    Union-find over (lang, article) nodes; the key of a cluster is its smallest question id,
    which is stable under reordering of the input.
    """
    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(node):
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    first_node_of_qid: dict[str, tuple[str, int]] = {}
    for q in questions:
        node = (q.lang, q.article)
        parent.setdefault(node, node)
        other = first_node_of_qid.setdefault(q.qid, node)
        parent[find(node)] = find(other)
    smallest: dict[tuple[str, int], str] = {}
    for q in questions:
        root = find((q.lang, q.article))
        smallest[root] = min(smallest.get(root, q.qid), q.qid)
    return {node: smallest[find(node)] for node in parent}


def split_by_article(questions: list[Question], heldout_fraction: float, seed: int) -> set[str]:
    """Cluster keys of the held-out side: clusters shuffled by ``seed``, then taken until
    ``heldout_fraction`` of the questions is reached. Deterministic for (data, seed)."""
    cluster_of = article_clusters(questions)
    sizes = Counter(cluster_of[(q.lang, q.article)] for q in questions)
    keys = sorted(sizes)
    random.Random(seed).shuffle(keys)
    target = heldout_fraction * len(questions)
    heldout, taken = set(), 0
    for key in keys:
        if taken >= target:
            break
        heldout.add(key)
        taken += sizes[key]
    return heldout


def question_rows(questions: list[Question], source_name: str, cluster_of: dict) -> list[dict]:
    """Shard rows, a group's translations adjacent (sorted by group id, then language)."""
    rows = [
        {
            "group_id": q.qid,
            "lang": q.lang,
            "query": q.question,
            "passage": q.sentence,
            "context": q.context,
            "article_id": cluster_of[(q.lang, q.article)],
            "source": source_name,
        }
        for q in questions
    ]
    rows.sort(key=lambda r: (r["group_id"], r["lang"]))
    return rows


def filter_lareqa(raw: dict, keep: list[Question]) -> dict:
    """A copy of one language's SQuAD object holding only the articles and questions of
    ``keep`` (all of those articles' paragraphs stay: they are the candidate pool)."""
    positions = {q.position for q in keep}
    kept_articles = {q.article for q in keep}
    articles = []
    for a, article in enumerate(raw["data"]):
        if a not in kept_articles:
            continue
        paragraphs = [
            {**paragraph, "qas": [qa for k, qa in enumerate(paragraph.get("qas", [])) if (a, p, k) in positions]}
            for p, paragraph in enumerate(article.get("paragraphs", []))
        ]
        articles.append({**article, "paragraphs": paragraphs})
    return {**raw, "data": articles}
