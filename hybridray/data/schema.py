"""The translated-QA shard format, version 1.

A shard dataset is a directory (or ``s3://`` prefix) of parquet files (``*.parquet``; jsonl
``*.jsonl`` is also read) plus a ``manifest.json``. One row is one QA pair in one language:

=================  ============  ========  ==================================================
column             type          required  meaning
=================  ============  ========  ==================================================
``group_id``       string        yes       the parallel item: every translation of one QA
                                           pair shares it
``lang``           string        yes       language code, ISO 639-1 (``en``, ``zh``, ...)
                                           with optional subtags (``zh-Hant``)
``query``          string        yes       the question
``passage``        string        yes       its positive passage (for LAReQA: the gold
                                           answer sentence)
``hard_negatives`` list<string>  no        passages that look relevant but are not
``hard_negative_   list<string>  no        per hard negative, the ``group_id`` of the pair
group_ids``                                it answers (it is that pair's passage or a
                                           translation of it), or null / "" if none; lets
                                           the loss mask it for that pair's queries
``context``        string        no        the passage's surrounding paragraph
``article_id``     string        no        the source document (train / held-out split key)
``source``         string        yes       the dataset the row came from (``mlqa-r``)
=================  ============  ========  ==================================================

``(group_id, lang)`` is unique within a dataset. The manifest records the schema version,
the languages and the row count per language.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

import pyarrow as pa

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

REQUIRED_COLUMNS = ("group_id", "lang", "query", "passage", "source")
OPTIONAL_COLUMNS = ("hard_negatives", "hard_negative_group_ids", "context", "article_id")

ARROW_SCHEMA = pa.schema(
    [
        ("group_id", pa.string()),
        ("lang", pa.string()),
        ("query", pa.string()),
        ("passage", pa.string()),
        ("hard_negatives", pa.list_(pa.string())),
        ("hard_negative_group_ids", pa.list_(pa.string())),
        ("context", pa.string()),
        ("article_id", pa.string()),
        ("source", pa.string()),
    ]
)

# ISO 639-1 codes: the primary subtag of every ``lang``.
ISO_639_1 = frozenset(
    """aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu
    cv cy da de dv dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho
    hr ht hu hy hz ia id ie ig ii ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv
    kw ky la lb lg li ln lo lt lu lv mg mh mi mk ml mn mr ms mt my na nb nd ne ng nl nn no nr
    nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc sd se sg si sk sl sm sn so sq
    sr ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve vi vo wa wo xh
    yi yo za zh zu""".split()
)
_LANG_RE = re.compile(r"^([a-z]{2})(-[A-Za-z0-9]{2,8})*$")


def is_valid_lang(code: Any) -> bool:
    """True for an ISO 639-1 code with optional BCP-47 subtags (``pt-BR``, ``zh-Hant``)."""
    if not isinstance(code, str):
        return False
    match = _LANG_RE.match(code)
    return bool(match) and match.group(1) in ISO_639_1


@dataclass(frozen=True)
class RowError:
    """Why one row of one file was rejected (the rejects report's line)."""

    file: str
    row: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.row}: {self.reason}"


def row_problem(row: dict, *, max_text_chars: int) -> Optional[str]:
    """The reason ``row`` is malformed, or None. Uniqueness is checked by the reader."""
    for column in REQUIRED_COLUMNS:
        value = row.get(column)
        if value is None:
            return f"missing field {column!r}"
        if not isinstance(value, str):
            return f"field {column!r} must be a string, got {type(value).__name__}"
        if not value.strip():
            return f"empty field {column!r}"
    if not is_valid_lang(row["lang"]):
        lang = row["lang"]
        primary, _, rest = lang.partition("-")
        fixed = primary.lower() + (f"-{rest}" if rest else "")
        hint = f" (the language subtag is lower case: {fixed!r})" if is_valid_lang(fixed) else ""
        return f"unknown language code {lang!r}{hint}"
    for column in ("query", "passage"):  # context is kept, never encoded: no length limit
        value = row.get(column)
        if isinstance(value, str) and len(value) > max_text_chars:
            return f"field {column!r} has {len(value)} characters (max {max_text_chars})"
    negatives = row.get("hard_negatives")
    if negatives is not None:
        if not isinstance(negatives, (list, tuple)) or not all(
            isinstance(n, str) and n.strip() for n in negatives
        ):
            return "field 'hard_negatives' must be a list of non-empty strings"
        if any(len(n) > max_text_chars for n in negatives):
            return f"a hard negative has more than {max_text_chars} characters"
    negative_groups = row.get("hard_negative_group_ids")
    if negative_groups is not None:
        if not isinstance(negative_groups, (list, tuple)) or not all(
            g is None or isinstance(g, str) for g in negative_groups
        ):
            return "field 'hard_negative_group_ids' must be a list of strings (or nulls)"
        if len(negative_groups) != len(negatives or ()):
            return (f"field 'hard_negative_group_ids' has {len(negative_groups)} entries but "
                    f"'hard_negatives' has {len(negatives or ())}")
    unknown = set(row) - set(REQUIRED_COLUMNS) - set(OPTIONAL_COLUMNS)
    if unknown:
        return f"unknown field(s) {sorted(unknown)}"
    return None
