"""Tatoeba bitext retrieval (LASER release): accuracy@1 in both directions per language.

Layout: ``tatoeba.<xxx>-eng.<xxx>`` and ``tatoeba.<xxx>-eng.eng``, line i of one is the
translation of line i of the other (ISO 639-3 codes). For every non-English sentence the
nearest English line must be its own translation (``xxx->eng``), and the reverse
(``eng->xxx``); as in LASER and XTREME a hit counts only at the gold line index, so a
duplicate sentence elsewhere in the file is an error.

Both sides are encoded with the *query* prefix: the task is symmetric (E5's advice for
symmetric tasks).

Languages are grouped as in XTREME: the 36 Tatoeba languages XTREME evaluates are "high"
(``HIGH_RESOURCE``), the other 76 of the LASER release are "low".
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from hybridray.errors import UserError
from hybridray.evaluate.search import search

#: XTREME's 36 Tatoeba languages (Hu et al. 2020, arXiv 2003.11080), as LASER's ISO 639-3 codes:
#: af ar bg bn de el es et eu fa fi fr he hi hu id it ja jv ka kk ko ml mr nl pt ru sw ta te
#: th tl tr ur vi zh.
HIGH_RESOURCE = frozenset(
    """afr ara bul ben deu ell spa est eus pes fin fra heb hin hun ind ita jpn jav kat kaz kor
    mal mar nld por rus swh tam tel tha tgl tur urd vie cmn""".split()
)


def _read_lines(path: Path) -> list[str]:
    # Split on "\n" only: str.splitlines would also break on U+2028 etc. and misalign pairs.
    text = path.read_text(encoding="utf-8")
    return [line.rstrip("\r") for line in text.removesuffix("\n").split("\n")]


def load_tatoeba(path: str | Path, langs: Optional[Iterable[str]] = None) -> dict[str, tuple[list[str], list[str]]]:
    """``{xxx: (xxx_lines, eng_lines)}`` for every language found (or ``langs`` only)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a directory")
    found = sorted(p.name.split(".")[1].removesuffix("-eng") for p in path.glob("tatoeba.*-eng.eng"))
    if langs is not None:
        missing = sorted(set(langs) - set(found))
        if missing:
            raise UserError(f"{path}: no tatoeba.<xxx>-eng files for {missing}")
        found = list(langs)
    if not found:
        raise UserError(f"{path}: no tatoeba.<xxx>-eng.eng files")
    pairs = {}
    for lang in found:
        foreign_path = path / f"tatoeba.{lang}-eng.{lang}"
        if not foreign_path.is_file():
            raise UserError(f"{foreign_path}: missing")
        foreign, english = _read_lines(foreign_path), _read_lines(path / f"tatoeba.{lang}-eng.eng")
        if len(foreign) != len(english) or not foreign:
            raise UserError(f"{foreign_path}: {len(foreign)} lines but the .eng file has {len(english)}")
        pairs[lang] = (foreign, english)
    return pairs


def bitext_accuracy(foreign_emb: np.ndarray, english_emb: np.ndarray) -> tuple[float, float]:
    """``(xxx->eng, eng->xxx)`` accuracy@1: the top hit is the line with the same index."""
    gold = np.arange(len(foreign_emb))
    _, to_english = search(foreign_emb, english_emb, 1)
    _, to_foreign = search(english_emb, foreign_emb, 1)
    return float((to_english[:, 0] == gold).mean()), float((to_foreign[:, 0] == gold).mean())


def _group_means(per_language: dict[str, dict], group: str) -> dict:
    rows = [r for r in per_language.values() if group == "all" or r["group"] == group]
    keys = ("xxx_to_eng", "eng_to_xxx", "mean")
    return {"n_languages": len(rows), **{k: float(np.mean([r[k] for r in rows])) if rows else float("nan") for k in keys}}


def evaluate_tatoeba(
    model,
    tokenizer,
    path: str | Path,
    *,
    langs: Optional[Iterable[str]] = None,
    query_prefix: str,
    pooling: str,
    max_length: int,
    batch_size: int,
    progress: bool = False,
) -> dict:
    """Evaluate an encoder on Tatoeba bitext retrieval.

    Inputs: the model and tokenizer, the Tatoeba directory, ISO 639-3 ``langs`` (default:
    all found), and the encoding settings (``query_prefix`` on both sides). Returns the
    report dict: ``per_language[xxx]`` with ``n``, ``xxx_to_eng``, ``eng_to_xxx``, ``mean``,
    ``group``; ``summary.accuracy.{high,low,all}`` with the same means and ``n_languages``.
    All sentences are encoded in one call (sorted by length across languages). Example::

        report = evaluate_tatoeba(model, tok, "../shared/data/tatoeba", langs=["deu", "swh"],
                                  query_prefix="query: ", pooling="mean",
                                  max_length=128, batch_size=64)
        report["summary"]["accuracy"]["high"]["mean"]
    """
    from hybridray.evaluate.encode import encode_texts  # torch + transformers: only when encoding

    pairs = load_tatoeba(path, langs)
    started = time.perf_counter()
    texts = [line for foreign, english in pairs.values() for line in foreign + english]
    embeddings = encode_texts(model, tokenizer, texts, prefix=query_prefix, pooling=pooling,
                              max_length=max_length, batch_size=batch_size, progress=progress)
    per_language, offset = {}, 0
    for lang, (foreign, _) in pairs.items():
        n = len(foreign)
        to_english, to_foreign = bitext_accuracy(embeddings[offset:offset + n], embeddings[offset + n:offset + 2 * n])
        offset += 2 * n
        per_language[lang] = {
            "n": n, "xxx_to_eng": to_english, "eng_to_xxx": to_foreign, "mean": (to_english + to_foreign) / 2,
            "group": "high" if lang in HIGH_RESOURCE else "low",
        }
    return {
        "task": "tatoeba",
        "data": {"path": str(path), "langs": list(pairs)},
        "settings": {"query_prefix": query_prefix, "pooling": pooling, "max_length": max_length,
                     "batch_size": batch_size},
        "summary": {"accuracy": {g: _group_means(per_language, g) for g in ("high", "low", "all")}},
        "per_language": per_language,
        "timing": {"seconds": time.perf_counter() - started},
    }
