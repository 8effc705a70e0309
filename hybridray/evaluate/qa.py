"""Passage retrieval for QA sets with gold passages (TyDi QA GoldP, AfriQA): scored per
language and query mode with the BEIR metrics plus answer recall.

A loader (:mod:`hybridray.evaluate.tydi`, :mod:`hybridray.evaluate.afriqa`) turns its files
into a :class:`QaTask`: corpora of unique passages, and query sets that each search one
corpus. Every query has one relevant passage (its gold passage) and its gold answer strings.

Scoring reuses the BEIR scorer as it is (:func:`hybridray.evaluate.beir.score_beir`:
nDCG@10, Recall@100, MRR@10 from a faiss top-k) and adds answer recall@1/5/20
(:mod:`hybridray.evaluate.answers`) on the same ranked list
(:func:`hybridray.evaluate.search.search`), so one tie rule holds for all of them.

Query modes: ``mono`` (TyDi: question and passages in one language), ``cross`` (AfriQA: the
question in an African language, passages in English or French) and ``translated`` (AfriQA:
the question's English/French translation against the same passages -- the monolingual
reference that tells how much of the cross-lingual gap is the language, not the question).
Languages are grouped low / mid / high by :mod:`hybridray.evaluate.languages`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Optional

import numpy as np

from hybridray.evaluate.answers import ANSWER_KS, answer_hits, answer_recall, contains_answer, normalize_answer
from hybridray.evaluate.beir import BeirData, score_beir
from hybridray.evaluate.languages import GROUPS, resource_group
from hybridray.evaluate.search import search

#: Metrics of one query set, in report order.
METRICS = ("ndcg@10", "recall@100", "mrr@10", *(f"answer@{k}" for k in ANSWER_KS))


@dataclass
class Corpus:
    """Unique passages searched by one or more query sets."""

    key: str
    ids: list[str]
    texts: list[str]


@dataclass
class QuerySet:
    """The questions of one language in one mode, against one corpus."""

    lang: str
    mode: str
    corpus: str  # key of its Corpus
    query_ids: list[str]
    texts: list[str]
    qrels: dict[str, dict[str, int]]  # query id -> {gold passage id: 1}
    answers: list[list[str]]  # gold answer strings per query (raw)


@dataclass
class QaTask:
    """What a loader read: corpora, query sets and facts for the report's ``data``."""

    task: str
    path: str
    split: str
    modes: list[str]
    corpora: dict[str, Corpus]
    query_sets: list[QuerySet]
    info: dict = field(default_factory=dict)

    @property
    def langs(self) -> list[str]:
        return list(dict.fromkeys(q.lang for q in self.query_sets))


def score_query_set(queries: QuerySet, corpus: Corpus, query_emb: np.ndarray, corpus_emb: np.ndarray,
                    corpus_normalized: Optional[list[str]] = None) -> dict:
    """BEIR metrics, answer recall and ``answer_in_gold`` (the share of questions whose own
    gold passage contains a gold answer: the ceiling of answer recall by the gold passage)."""
    data = BeirData(name=f"{queries.lang}/{queries.mode}", corpus_ids=corpus.ids, corpus_texts=corpus.texts,
                    query_ids=queries.query_ids, query_texts=queries.texts, qrels=queries.qrels)
    metrics = score_beir(data, query_emb, corpus_emb)
    passages = corpus_normalized if corpus_normalized is not None else [normalize_answer(t) for t in corpus.texts]
    answers = [[normalize_answer(a) for a in answer_list] for answer_list in queries.answers]
    _, hits = search(query_emb, corpus_emb, max(ANSWER_KS))
    metrics.update(answer_recall(answer_hits(hits, passages, answers)))
    row = {doc_id: i for i, doc_id in enumerate(corpus.ids)}
    in_gold = [any(contains_answer(passages[row[doc]], answers[i]) for doc in queries.qrels[qid])
               for i, qid in enumerate(queries.query_ids)]
    metrics["answer_in_gold"] = float(np.mean(in_gold))
    return metrics


def _macro(rows: list[dict]) -> dict:
    """Mean of every metric over languages (NaN for an empty group)."""
    out = {"n_languages": len(rows)}
    for name in METRICS:
        out[name] = float(np.mean([r[name] for r in rows])) if rows else float("nan")
    return out


def summarize(per_language: dict[str, dict], modes: list[str]) -> dict:
    """``summary[mode][group]``: macro means over the languages of ``low``, ``mid``,
    ``high`` and ``all`` (unlisted languages count in ``all`` only)."""
    summary = {}
    for mode in modes:
        rows = {lang: r[mode] for lang, r in per_language.items() if mode in r}
        summary[mode] = {
            group: _macro([m for lang, m in rows.items() if group == "all" or per_language[lang]["group"] == group])
            for group in (*GROUPS, "all")
        }
    return summary


def evaluate_qa(
    model,
    tokenizer,
    task: QaTask,
    *,
    query_prefix: str,
    passage_prefix: str,
    pooling: str,
    max_length: int,
    batch_size: int,
    resource_groups: Optional[Mapping[str, str]] = None,
    progress: bool = False,
) -> dict:
    """Encode every corpus and query set of ``task`` once and score each query set.

    Inputs: the model and tokenizer (evaluated where the weights are), a loaded
    :class:`QaTask`, the encoding settings as in training, and optional
    ``resource_groups`` overrides (``{"xx": "low"}``). Returns the report dict:
    ``per_language[lang]`` with ``group``, ``corpus``, ``n_queries``, ``n_corpus`` and one
    entry per mode holding ``ndcg@10``, ``recall@100``, ``mrr@10``, ``answer@{1,5,20}``,
    ``answer_in_gold``; ``summary[mode][low|mid|high|all]`` with their macro means and
    ``n_languages``. Example::

        task = load_tydi("../shared/data/tydiqa-goldp", ["sw", "te"])
        report = evaluate_qa(model, tok, task, query_prefix="query: ", passage_prefix="passage: ",
                             pooling="mean", max_length=256, batch_size=64)
        report["summary"]["mono"]["low"]["ndcg@10"], report["per_language"]["sw"]["mono"]["answer@20"]
    """
    from hybridray.evaluate.encode import encode_texts  # torch + transformers: only when encoding

    started = time.perf_counter()
    encode = dict(pooling=pooling, max_length=max_length, batch_size=batch_size, progress=progress)
    corpora = list(task.corpora.values())
    passages = encode_texts(model, tokenizer, [t for c in corpora for t in c.texts], prefix=passage_prefix, **encode)
    bounds = np.cumsum([0] + [len(c.texts) for c in corpora])
    corpus_emb = {c.key: passages[a:b] for c, a, b in zip(corpora, bounds, bounds[1:])}
    questions = encode_texts(model, tokenizer, [t for q in task.query_sets for t in q.texts], prefix=query_prefix, **encode)
    encoded = time.perf_counter()

    normalized = {c.key: [normalize_answer(t) for t in c.texts] for c in corpora}
    per_language: dict[str, dict] = {}
    offset = 0
    for queries in task.query_sets:
        q_emb = questions[offset:offset + len(queries.texts)]
        offset += len(queries.texts)
        corpus = task.corpora[queries.corpus]
        entry = per_language.setdefault(queries.lang, {
            "group": resource_group(queries.lang, resource_groups), "corpus": corpus.key,
            "n_queries": len(queries.query_ids), "n_corpus": len(corpus.ids),
        })
        metrics = score_query_set(queries, corpus, q_emb, corpus_emb[corpus.key], normalized[corpus.key])
        entry[queries.mode] = {name: metrics[name] for name in (*METRICS, "answer_in_gold")}
    scored = time.perf_counter()
    return {
        "task": task.task,
        "data": {"path": task.path, "split": task.split, "langs": task.langs, "modes": task.modes,
                 "n_corpus": {key: len(c.ids) for key, c in task.corpora.items()}, **task.info},
        "settings": {"query_prefix": query_prefix, "passage_prefix": passage_prefix, "pooling": pooling,
                     "max_length": max_length, "batch_size": batch_size},
        "summary": summarize(per_language, task.modes),
        "per_language": per_language,
        "timing": {"encode_seconds": encoded - started, "score_seconds": scored - encoded},
    }
