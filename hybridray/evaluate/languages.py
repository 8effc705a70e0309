"""Which languages are low-, mid- or high-resource: one list decides, for every task.

The list is the language taxonomy of Joshi et al. 2020, "The State and Fate of Linguistic
Diversity and Inclusion in the NLP World" (ACL 2020; classes published as ``lang2tax.txt``
with the paper). It puts every language in a class from 0 (no labelled data, almost no
unlabelled data) to 5 (English, Spanish, German, Japanese, French, ...). hybridray maps

======  ========  ====================================================================
group   classes   languages of the evaluation sets shipped beside hybridray
======  ========  ====================================================================
high    4 and 5   ar de en es fr ja zh (5); fi hi ko ru vi (4)
mid     3         bn id
low     0 to 2    am ha sw xh yo zu (2); ig rw te tw (1); bem fon (0)
======  ========  ====================================================================

The table below holds the languages of the shipped sets (TyDi QA, AfriQA, MLQA-R, the
Tatoeba languages of the benchmark suite) and a few more of each class, keyed by ISO 639-1
and by the ISO 639-3 codes the AfriQA and Tatoeba file names use. A language not in it is
"unlisted"; a suite config can place it (``resource_groups: {xx: low}``).
"""
from __future__ import annotations

from typing import Mapping, Optional

#: Joshi et al. (2020) class per language (ISO 639-1 where it exists, else ISO 639-3).
JOSHI_CLASS: dict[str, int] = {
    # 5: the winners
    "ar": 5, "de": 5, "en": 5, "es": 5, "fr": 5, "ja": 5, "zh": 5,
    # 4: the underdogs
    "ca": 4, "cs": 4, "eu": 4, "fa": 4, "fi": 4, "hi": 4, "hu": 4, "it": 4, "ko": 4, "nl": 4,
    "pl": 4, "pt": 4, "ru": 4, "sv": 4, "tr": 4, "vi": 4,
    # 3: the rising stars
    "af": 3, "bg": 3, "bn": 3, "da": 3, "el": 3, "et": 3, "he": 3, "id": 3, "ro": 3, "ta": 3,
    "th": 3, "tl": 3, "uk": 3, "ur": 3,
    # 2: the hopefuls
    "am": 2, "ha": 2, "mr": 2, "sw": 2, "xh": 2, "yo": 2, "zu": 2,
    # 1: the scraping-bys
    "ig": 1, "rw": 1, "te": 1, "tw": 1,
    # 0: the left-behinds
    "bem": 0, "fon": 0,
}

#: ISO 639-3 codes (AfriQA and Tatoeba file names) -> the key of ``JOSHI_CLASS``.
ISO_639_3: dict[str, str] = {
    "afr": "af", "amh": "am", "ara": "ar", "ben": "bn", "bul": "bg", "cat": "ca", "ces": "cs",
    "cmn": "zh", "dan": "da", "deu": "de", "ell": "el", "eng": "en", "est": "et", "eus": "eu",
    "fin": "fi", "fra": "fr", "hau": "ha", "heb": "he", "hin": "hi", "hun": "hu", "ibo": "ig",
    "ind": "id", "ita": "it", "jpn": "ja", "kin": "rw", "kor": "ko", "mar": "mr", "nld": "nl",
    "pes": "fa", "pol": "pl", "por": "pt", "ron": "ro", "rus": "ru", "spa": "es", "swa": "sw",
    "swe": "sv", "swh": "sw", "tam": "ta", "tel": "te", "tgl": "tl", "tha": "th", "tur": "tr",
    "twi": "tw", "ukr": "uk", "urd": "ur", "vie": "vi", "xho": "xh", "yor": "yo", "zul": "zu",
}

GROUPS = ("low", "mid", "high")
UNLISTED = "unlisted"


def joshi_class(code: str) -> Optional[int]:
    """The Joshi et al. class of a language code (ISO 639-1 or 639-3, subtags ignored)."""
    base = code.split("-")[0].split("_")[0].lower()
    return JOSHI_CLASS.get(ISO_639_3.get(base, base))


def resource_group(code: str, overrides: Optional[Mapping[str, str]] = None) -> str:
    """``low`` (class 0-2), ``mid`` (3), ``high`` (4-5) or ``unlisted``; ``overrides`` (a
    suite's ``resource_groups``) wins over the table."""
    if overrides and code in overrides:
        return overrides[code]
    cls = joshi_class(code)
    if cls is None:
        return UNLISTED
    return "high" if cls >= 4 else "mid" if cls == 3 else "low"
