"""Answer recall@k: the retrieval-side exact-match signal of open-domain QA (DPR and after).

A question counts as answered at k when one of its top-k retrieved passages contains one of
its gold answer strings, both normalised as the SQuAD v1.1 evaluation script normalises
(which is what XTREME runs on TyDi QA GoldP):

1. lower case;
2. delete punctuation: ASCII ``string.punctuation`` (SQuAD) and every Unicode punctuation
   character, category ``P*`` (MLQA's multilingual version of the script; it removes the
   Arabic comma, the Bengali danda, CJK full stops);
3. replace the English articles ``a``, ``an``, ``the`` by a space (SQuAD; applied to every
   language, as the SQuAD script does for TyDi GoldP);
4. collapse whitespace to single spaces.

"Contains" is a substring test on the normalised strings, not a whole-token test: in Korean,
Telugu or Finnish a gold answer is often a stem inside a whitespace token (case endings and
particles attach to it), so a token test would say that the gold passage does not answer its
own question (measured on TyDi dev: 27% of Korean and 70% of Telugu gold passages contain
their answer as whole tokens, 100% as a substring). The price is that a short numeric answer
also matches inside a longer number.

Ranked hits come from :func:`hybridray.evaluate.search.search`, so ties follow the same rule
as every other top-k metric here.
"""
from __future__ import annotations

import re
import string
import unicodedata
from typing import Sequence

import numpy as np

#: The cut-offs reported (DPR reports 1, 5, 20, 100; 100 is Recall@100's job here).
ANSWER_KS = (1, 5, 20)

_ASCII_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _is_punct(ch: str) -> bool:
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation with Unicode punctuation (see the module docstring)."""
    text = "".join(ch for ch in text.lower() if not _is_punct(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def contains_answer(passage: str, answers: Sequence[str]) -> bool:
    """Whether the normalised ``passage`` holds one of the normalised ``answers`` (empty
    answers never match)."""
    return any(a and a in passage for a in answers)


def answer_hits(hits: np.ndarray, passages: Sequence[str], answers: Sequence[Sequence[str]]) -> np.ndarray:
    """``[n, k]`` bool: does hit ``j`` of query ``i`` contain one of ``answers[i]``?

    ``hits`` are corpus indices, best first (``-1`` = no hit); ``passages`` and ``answers``
    are already normalised (normalise each passage once, not once per query).
    """
    out = np.zeros(hits.shape, dtype=bool)
    for i, row in enumerate(hits):
        for j, doc in enumerate(row):
            if doc >= 0:
                out[i, j] = contains_answer(passages[doc], answers[i])
    return out


def answer_recall(found: np.ndarray, ks: Sequence[int] = ANSWER_KS) -> dict[str, float]:
    """``{"answer@k": share of queries with an answer in their top k}`` from ``answer_hits``.

    A k beyond the number of hits (a corpus smaller than k) counts every hit there is.
    """
    if len(found) == 0:
        return {f"answer@{k}": float("nan") for k in ks}
    return {f"answer@{k}": float(found[:, :k].any(1).mean()) for k in ks}
