"""LAReQA / SQuAD-style QA files -> translated-QA shards, split by article.

Input layout (MLQA-R, XQuAD-R): a directory of ``{lang}.json`` files, SQuAD v1.1 JSON with
``sentences`` and ``sentence_breaks`` on every paragraph. A question's ``id`` is shared by
its translations. One shard row per (question, language): query = the question, passage =
the gold answer sentence (the sentence whose break span holds ``answers[0].answer_start``),
context = the paragraph.

In-context hard negatives (``in_context_negatives``): a LAReQA pool is hardest on the other
sentences of the answer's own paragraph, so each row's ``hard_negatives`` are those sentences,
in the row's (the passage's) language, each with the group id of the question it answers.

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
from typing import Iterable, Optional, Sequence

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


#: A longer sentence is no negative: the reader (at ``data.max_text_chars``' default) would
#: reject the whole row for it.
MAX_NEGATIVE_CHARS = 4000
#: Where a row's in-context negatives came from (``in_context_negatives``), nearest first.
NEGATIVE_SOURCES = ("paragraph", "article", "next_article")


@dataclass
class InContextNegatives:
    """Per ``(qid, lang)``: the negatives and the group each answers (None: none), and where
    they came from (one of ``NEGATIVE_SOURCES``, or None when the split has nothing else)."""

    texts: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    group_ids: dict[tuple[str, str], list[Optional[str]]] = field(default_factory=dict)
    origin: Counter = field(default_factory=Counter)


def _sentences(paragraph) -> list[str]:
    """The non-empty, stripped sentences of a well-formed paragraph (none for a broken one)."""
    if not isinstance(paragraph, dict) or _paragraph_problem(paragraph) is not None:
        return []
    return [s.strip() for s in paragraph["sentences"] if s.strip()]


def in_context_negatives(questions: Sequence[Question], raw: dict[str, dict],
                         answered_by: Optional[Sequence[Question]] = None) -> InContextNegatives:
    """Each question's hard negatives: the other sentences of its answer's paragraph, in its
    language (``raw``: the SQuAD objects per language).

    When the paragraph has no other sentence, the sentences of the article's other paragraphs
    are taken; when the article has none either, those of the next article of the same language
    among ``questions`` (so one split never borrows from the other), so every row has at least
    one negative whenever its split holds a second sentence, and ``loss.hard_negatives=k`` can
    read every row. Never a text equal to the row's positive, nor one longer than
    ``MAX_NEGATIVE_CHARS``. A negative's group id is the id
    of the question (of ``answered_by``, default ``questions``: pass every valid question of
    the source) whose answer sentence it is, else None; a sentence that answers two different
    questions is left out, since a negative names one group and the other question's queries
    would be penalised for their own answer.
    """
    answers: dict[tuple[str, str], set[str]] = {}
    for q in answered_by if answered_by is not None else questions:
        answers.setdefault((q.lang, q.sentence), set()).add(q.qid)
    articles: dict[str, list[int]] = {}  # per language, the split's articles in file order
    for q in questions:
        articles.setdefault(q.lang, [])
        if q.article not in articles[q.lang]:
            articles[q.lang].append(q.article)
    for order in articles.values():
        order.sort()

    def usable(lang: str, texts: Iterable[str], positive: str) -> list[str]:
        kept = []
        for text in texts:
            if (text != positive and len(answers.get((lang, text), ())) <= 1 and text not in kept
                    and len(text) <= MAX_NEGATIVE_CHARS):
                kept.append(text)
        return kept

    def article_sentences(lang: str, a: int, skip: Optional[int] = None) -> list[str]:
        paragraphs = raw[lang]["data"][a].get("paragraphs", [])
        return [s for p, paragraph in enumerate(paragraphs) if p != skip for s in _sentences(paragraph)]

    out = InContextNegatives()
    for q in questions:
        a, p, _ = q.position
        texts = usable(q.lang, _sentences(raw[q.lang]["data"][a]["paragraphs"][p]), q.sentence)
        origin = "paragraph"
        if not texts:
            texts, origin = usable(q.lang, article_sentences(q.lang, a, skip=p), q.sentence), "article"
        if not texts:
            order = articles[q.lang]
            start = order.index(a)
            for other in order[start + 1:] + order[:start]:
                texts = usable(q.lang, article_sentences(q.lang, other), q.sentence)
                if texts:
                    origin = "next_article"
                    break
        key = (q.qid, q.lang)
        out.texts[key] = texts
        out.group_ids[key] = [next(iter(answers[(q.lang, t)])) if (q.lang, t) in answers else None for t in texts]
        out.origin[origin if texts else "none"] += 1
    return out


def question_rows(questions: list[Question], source_name: str, cluster_of: dict,
                  negatives: Optional[InContextNegatives] = None) -> list[dict]:
    """Shard rows, a group's translations adjacent (sorted by group id, then language)."""
    rows = [
        {
            "group_id": q.qid,
            "lang": q.lang,
            "query": q.question,
            "passage": q.sentence,
            "hard_negatives": negatives.texts[(q.qid, q.lang)] if negatives else None,
            "hard_negative_group_ids": negatives.group_ids[(q.qid, q.lang)] if negatives else None,
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
