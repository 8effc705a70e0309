"""LAReQA answer-sentence retrieval (XQuAD-R, MLQA-R): mono, cross and multi settings.

The directory layout and the gold-sentence rule are those of :mod:`hybridray.data.lareqa`
(one ``{lang}.json`` per language, gold sentence = the break span holding
``answers[0].answer_start``); this module reuses its reader and adds the candidate pools.

Candidates are all sentences of all paragraphs of a language, one per (paragraph, sentence
index): identical text in two paragraphs stays two candidates. A question's relevant set is
its gold sentence in every loaded language where its id exists.

Settings (mAP over the full ranking, see :mod:`hybridray.evaluate.metrics`):

- **mono**: queries in L against L's pool; mean over queries, macro over languages.
- **cross**: queries in X against Y's pool for every ordered pair X != Y; a query with no
  version in Y is skipped for that pair; mean per pair, macro over pairs (pairs with no
  shared question are left out and reported with ``n_queries = 0``).
- **multi**: queries of every language against one pool of all languages; relevant set = all
  the question's versions; mean per query language, macro over languages.
- Recall: Recall@1 for mono and cross, Recall@10 for multi (``RECALL_AT``).
- **Rank distance** (language bias, lower is better): in the multi pool, max minus min rank of
  a query's relevant set; queries with fewer than two versions are left out; mean per query
  language, macro over languages.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from hybridray.data.lareqa import gold_sentence_index, read_lareqa
from hybridray.errors import UserError
from hybridray.evaluate.metrics import average_precision, rank_counts, rank_distance, recall_at_k

#: Recall cut-off per setting, as in the paper (R@1 mono/cross, R@10 multi).
RECALL_AT = {"mono": 1, "cross": 1, "multi": 10}


@dataclass
class LareqaData:
    """A LAReQA directory parsed once: questions and candidate sentences per language."""

    path: str
    langs: list[str]
    question_ids: dict[str, list[str]]
    questions: dict[str, list[str]]
    #: index of each question's gold sentence among its own language's candidates
    gold: dict[str, np.ndarray]
    sentences: dict[str, list[str]]
    #: the paragraph each candidate sentence comes from
    contexts: dict[str, list[str]]
    n_rejected: int = 0

    @property
    def pools(self) -> list[tuple[int, int]]:
        """Row range of each language's candidates in the pooled (multi) candidate array."""
        bounds, start = [], 0
        for lang in self.langs:
            bounds.append((start, start + len(self.sentences[lang])))
            start += len(self.sentences[lang])
        return bounds

    def candidate_texts(self, lang: str, with_context: bool = False) -> list[str]:
        """Candidate texts; ``with_context`` appends the paragraph, as LAReQA does, so that
        truncation cuts the context and never the sentence."""
        if not with_context:
            return self.sentences[lang]
        return [f"{s} {c}" for s, c in zip(self.sentences[lang], self.contexts[lang])]

    def relevant(self, lang: str) -> np.ndarray:
        """``[n_questions(lang), len(langs)]``: pooled index of each question's gold sentence
        in every language, ``-1`` where the question has no version in that language."""
        out = np.full((len(self.question_ids[lang]), len(self.langs)), -1, dtype=np.int64)
        for j, (other, (start, _)) in enumerate(zip(self.langs, self.pools)):
            where = {qid: i for i, qid in enumerate(self.question_ids[other])}
            for i, qid in enumerate(self.question_ids[lang]):
                if qid in where:
                    out[i, j] = start + self.gold[other][where[qid]]
        return out


def load_lareqa(path: str | Path, langs: Optional[Iterable[str]] = None) -> LareqaData:
    """Parse a LAReQA directory (all ``{lang}.json`` files, or ``langs`` only).

    Raises :class:`UserError` for a missing directory or language file, or a language with
    no valid question. Invalid questions (no answer, answer outside every sentence) are
    dropped and counted in ``n_rejected``.
    """
    source = read_lareqa(path, list(langs) if langs is not None else None)
    langs = list(source.files)
    data = LareqaData(str(path), langs, {}, {}, {}, {}, {}, n_rejected=len(source.rejects))
    for lang in langs:
        base: dict[tuple[int, int], int] = {}
        sentences, contexts = [], []
        for a, article in enumerate(source.raw[lang]["data"]):
            for p, paragraph in enumerate(article.get("paragraphs", [])):
                base[(a, p)] = len(sentences)
                for sentence in paragraph.get("sentences") or []:
                    sentences.append(sentence.strip())
                    contexts.append(paragraph["context"])
        data.sentences[lang], data.contexts[lang] = sentences, contexts
        data.question_ids[lang], data.questions[lang], gold = [], [], []
        for q in source.questions:
            if q.lang != lang:
                continue
            a, p, k = q.position
            paragraph = source.raw[lang]["data"][a]["paragraphs"][p]
            start = paragraph["qas"][k]["answers"][0]["answer_start"]
            data.question_ids[lang].append(q.qid)
            data.questions[lang].append(q.question)
            gold.append(base[(a, p)] + gold_sentence_index(paragraph, start))
        if not gold:
            raise UserError(f"{source.files[lang]}: no valid question to evaluate")
        data.gold[lang] = np.asarray(gold, dtype=np.int64)
    return data


def subset_lareqa(data: LareqaData, max_queries: int) -> LareqaData:
    """The same task on a fixed subset of the questions: whole questions (every language
    version of one id), taken in the order of a hash of their id until ``max_queries``
    queries are reached, and as candidates only the sentences of the paragraphs those
    questions come from, in every language.

    This is LAReQA on a smaller collection, built the way LAReQA builds its pools, so that
    frequent evaluation (``train.eval_max_queries``) costs a fraction of the full one. Its
    pools are smaller, so its mAP is higher than the full set's: compare subset numbers
    with subset numbers only. The subset depends on the question ids alone, so every run
    and every evaluation of a sweep sees the same one. ``max_queries`` at or above the
    number of queries returns ``data`` itself."""
    if max_queries >= sum(len(data.question_ids[lang]) for lang in data.langs):
        return data
    versions: dict[str, int] = {}
    for lang in data.langs:
        for qid in data.question_ids[lang]:
            versions[qid] = versions.get(qid, 0) + 1
    chosen, total = set(), 0
    for qid in sorted(versions, key=lambda q: hashlib.sha256(q.encode()).hexdigest()):
        if total + versions[qid] <= max_queries:
            chosen.add(qid)
            total += versions[qid]
    if not chosen:
        raise UserError(f"train.eval_max_queries={max_queries}: fewer than the versions of any one question")
    out = LareqaData(data.path, [], {}, {}, {}, {}, {}, n_rejected=data.n_rejected)
    for lang in data.langs:
        keep = [i for i, qid in enumerate(data.question_ids[lang]) if qid in chosen]
        if not keep:
            continue
        paragraphs = {data.contexts[lang][data.gold[lang][i]] for i in keep}
        kept = [j for j, context in enumerate(data.contexts[lang]) if context in paragraphs]
        new_index = {j: n for n, j in enumerate(kept)}
        out.langs.append(lang)
        out.question_ids[lang] = [data.question_ids[lang][i] for i in keep]
        out.questions[lang] = [data.questions[lang][i] for i in keep]
        out.gold[lang] = np.asarray([new_index[int(data.gold[lang][i])] for i in keep], dtype=np.int64)
        out.sentences[lang] = [data.sentences[lang][j] for j in kept]
        out.contexts[lang] = [data.contexts[lang][j] for j in kept]
    return out


def _mean(values) -> float:
    """Mean ignoring NaN (an empty setting); NaN if nothing is left."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def score_lareqa(
    data: LareqaData,
    query_emb: dict[str, np.ndarray],
    cand_emb: dict[str, np.ndarray],
    *,
    chunk_size: int = 256,
) -> dict:
    """All LAReQA metrics from embeddings: ``{"summary", "per_language", "pairs"}``.

    One score matrix per chunk of queries against the pooled candidates serves every
    setting: mono and cross ranks count within one language's slice, multi ranks over all.
    ``pairs[X][Y]`` holds ``map``, ``recall`` (@1) and ``n_queries`` for queries in X
    against Y's pool (the diagonal is mono).
    """
    langs, pools = data.langs, data.pools
    candidates = np.concatenate([cand_emb[lang] for lang in langs])
    pairs: dict[str, dict[str, dict]] = {}
    per_language: dict[str, dict] = {}
    for x, lang in enumerate(langs):
        relevant = data.relevant(lang)
        # Existing versions first, empty columns dropped: MLQA questions have 2-4 of their 7
        # versions, so this saves almost half of the comparisons. slot_lang: language of a slot.
        slot_lang = np.argsort(relevant < 0, axis=1, kind="stable")[:, : (relevant >= 0).sum(1).max()]
        slots = np.take_along_axis(relevant, slot_lang, axis=1)
        counts = rank_counts(query_emb[lang], candidates, slots, pools, chunk_size=chunk_size)
        valid = slots >= 0
        own_pool = np.where(valid, 1 + np.take_along_axis(counts, slot_lang[:, :, None], axis=2)[:, :, 0], 0)
        multi = np.where(valid, 1 + counts.sum(-1), 0)
        pairs[lang] = {}
        for y, other in enumerate(langs):
            ranks = own_pool[valid & (slot_lang == y)][:, None]
            pairs[lang][other] = {
                "map": _mean(average_precision(ranks)),
                "recall": _mean(recall_at_k(ranks, RECALL_AT["mono" if y == x else "cross"])),
                "n_queries": int(len(ranks)),
            }
        per_language[lang] = {
            "n_queries": int(len(relevant)),
            "n_candidates": int(pools[x][1] - pools[x][0]),
            "map_mono": pairs[lang][lang]["map"],
            "recall_mono": pairs[lang][lang]["recall"],
            "map_cross": _mean([pairs[lang][o]["map"] for o in langs if o != lang]),
            "map_multi": _mean(average_precision(multi)),
            "recall_multi": _mean(recall_at_k(multi, RECALL_AT["multi"])),
            "rank_distance": _mean(rank_distance(multi)),
        }
    cross = [pairs[x][y] for x in langs for y in langs if x != y and pairs[x][y]["n_queries"]]
    summary = {
        "map": {
            "mono": _mean([s["map_mono"] for s in per_language.values()]),
            "cross": _mean([p["map"] for p in cross]),
            "multi": _mean([s["map_multi"] for s in per_language.values()]),
        },
        "recall": {
            "mono": _mean([s["recall_mono"] for s in per_language.values()]),
            "cross": _mean([p["recall"] for p in cross]),
            "multi": _mean([s["recall_multi"] for s in per_language.values()]),
        },
        "recall_at": dict(RECALL_AT),
        "rank_distance": _mean([s["rank_distance"] for s in per_language.values()]),
        "n_queries": sum(s["n_queries"] for s in per_language.values()),
        "n_candidates": len(candidates),
        "n_cross_pairs": len(cross),
    }
    return {"summary": summary, "per_language": per_language, "pairs": pairs}


def evaluate_lareqa(
    model,
    tokenizer,
    data: str | Path | LareqaData,
    *,
    langs: Optional[Iterable[str]] = None,
    query_prefix: str,
    passage_prefix: str,
    pooling: str,
    max_length: int,
    batch_size: int,
    with_context: bool = False,
    progress: bool = False,
) -> dict:
    """Evaluate an encoder on LAReQA answer-sentence retrieval.

    Inputs:

    ==================  =========================================================
    ``model``           a transformers encoder (output ``last_hidden_state``),
                        evaluated on the device its weights are on
    ``tokenizer``       its tokenizer
    ``data``            a LAReQA directory, or a :class:`LareqaData` already
                        loaded with :func:`load_lareqa` (parse once, evaluate often)
    ``langs``           languages to load; only with a directory
    prefixes, pooling,  as in training (E5: ``"query: "`` / ``"passage: "``)
    lengths, batch
    ``with_context``    encode candidates as ``sentence + " " + paragraph``
    ==================  =========================================================

    Returns the report dict (``task``, ``data``, ``settings``, ``summary``,
    ``per_language``, ``pairs``, ``timing``); see :mod:`hybridray.evaluate.report` for the
    key paths. Example::

        data = load_lareqa("../shared/data/mlqa-r")
        report = evaluate_lareqa(model, tok, data, query_prefix="query: ",
                                 passage_prefix="passage: ", pooling="mean",
                                 max_length=128, batch_size=64)
        report["summary"]["map"]["multi"], report["summary"]["rank_distance"]
    """
    from hybridray.evaluate.encode import encode_texts  # torch + transformers: only when encoding

    if isinstance(data, LareqaData):
        if langs is not None and list(langs) != data.langs:
            raise ValueError("langs selects languages at load time: pass it to load_lareqa")
    else:
        data = load_lareqa(data, langs)
    started = time.perf_counter()
    encode = dict(pooling=pooling, max_length=max_length, batch_size=batch_size, progress=progress)
    questions, candidates = lareqa_texts(data, with_context)
    q_all = encode_texts(model, tokenizer, questions, prefix=query_prefix, **encode)
    c_all = encode_texts(model, tokenizer, candidates, prefix=passage_prefix, **encode)
    settings = {"query_prefix": query_prefix, "passage_prefix": passage_prefix, "pooling": pooling,
                "max_length": max_length, "batch_size": batch_size, "with_context": with_context}
    return lareqa_report(data, q_all, c_all, settings, encode_seconds=time.perf_counter() - started)


def lareqa_texts(data: LareqaData, with_context: bool = False) -> tuple[list[str], list[str]]:
    """(every question, every candidate text), languages in ``data.langs`` order: the rows of
    the two embedding arrays that :func:`lareqa_report` scores."""
    questions = [q for lang in data.langs for q in data.questions[lang]]
    candidates = [c for lang in data.langs for c in data.candidate_texts(lang, with_context)]
    return questions, candidates


def lareqa_report(data: LareqaData, q_all: np.ndarray, c_all: np.ndarray, settings: dict,
                  encode_seconds: float, encode_workers: int = 1) -> dict:
    """The report of :func:`evaluate_lareqa` from the embeddings of :func:`lareqa_texts`
    (however they were encoded: one process, or split over the ranks of a training run)."""
    started = time.perf_counter()
    q_split = np.cumsum([len(data.questions[lang]) for lang in data.langs])[:-1]
    query_emb = dict(zip(data.langs, np.split(q_all, q_split)))
    cand_emb = {lang: c_all[lo:hi] for lang, (lo, hi) in zip(data.langs, data.pools)}
    scores = score_lareqa(data, query_emb, cand_emb)
    return {
        "task": "lareqa",
        "data": {
            "path": data.path,
            "langs": data.langs,
            "n_queries": {lang: len(data.questions[lang]) for lang in data.langs},
            "n_candidates": {lang: len(data.sentences[lang]) for lang in data.langs},
            "n_rejected_questions": data.n_rejected,
        },
        "settings": dict(settings),
        **scores,
        "timing": {"encode_seconds": encode_seconds, "score_seconds": time.perf_counter() - started,
                   "encode_workers": encode_workers},
    }
