"""Tokenisation inside the data pipeline: prefixes, truncation, dynamic padding.

Padding is to the longest sequence of the *global* batch here; ``iter_worker_batches`` then
trims each worker's slice to its own longest sequence, so every worker gets the tensors of
"pad to the longest in my slice" without tokenising anything itself.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


def prefixes(model_cfg) -> tuple[str, str]:
    """``(query prefix, passage prefix)``: the config's, or the model family's default."""
    from hybridray.models import default_prefixes

    default_q, default_p = default_prefixes(model_cfg.name_or_path)
    q, p = model_cfg.query_prefix, model_cfg.passage_prefix
    return (default_q if q is None else q, default_p if p is None else p)


@functools.lru_cache(maxsize=4)
def load_tokenizer(name_or_path: str, append_eos: bool | None = None, padding_side: str | None = None):
    """The model's Hugging Face tokenizer with the decoder recipe applied (driver side;
    tasks use ``TokenizerSpec``)."""
    from hybridray.models import load_tokenizer as load

    return load(name_or_path, append_eos=append_eos, padding_side=padding_side)


@dataclass(frozen=True)
class TokenizerSpec:
    """What a Ray Data task needs to tokenise, without importing ``transformers``.

    A fresh Ray worker that imports transformers spends ~5 s doing it (50 s for a handful
    of cold workers on a busy 2-core machine); the fast tokenizer's Rust backend is all
    tokenisation needs. ``backend`` is its JSON, or an ObjectRef to it (it is ~17 MB for
    XLM-R: shipped once through the object store, parsed once per worker process).
    """

    backend: Any
    pad_id: int
    pad_left: bool = False


def tokenizer_spec(
    name_or_path: str, *, put: bool = False, append_eos: bool | None = None, padding_side: str | None = None
) -> TokenizerSpec:
    """Load the tokenizer once on the driver and describe it for the pipeline's tasks
    (``append_eos`` / ``padding_side``: the ``model.*`` keys of the decoder recipe)."""
    tok = load_tokenizer(name_or_path, append_eos, padding_side)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{name_or_path}: the pipeline needs a fast (tokenizers-backed) tokenizer")
    text = backend.to_str()
    if put:
        import ray

        text = ray.put(text)
    return TokenizerSpec(text, int(tok.pad_token_id if tok.pad_token_id is not None else 0),
                         tok.padding_side == "left")


_BACKENDS: dict[str, Any] = {}


def backend_of(spec: TokenizerSpec):
    """The spec's ``tokenizers.Tokenizer``, parsed once per process."""
    from tokenizers import Tokenizer

    text = spec.backend
    key = text if isinstance(text, str) and len(text) < 256 else (
        text.hex() if hasattr(text, "hex") else str(hash(text))
    )
    if key not in _BACKENDS:
        if not isinstance(text, str):
            import ray

            text = ray.get(text)
        tok = Tokenizer.from_str(text)
        tok.no_padding()
        _BACKENDS[key] = tok
    return _BACKENDS[key]


def encode(spec: TokenizerSpec, texts: Sequence[str], prefix: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids int32 [n, L], attention_mask int8 [n, L])``: special tokens added,
    truncated to ``max_length`` (special tokens included), padded to the longest row --
    what ``tokenizer(texts, truncation=True, max_length=..., padding="longest")`` returns."""
    tok = backend_of(spec)
    tok.enable_truncation(max_length)
    encodings = tok.encode_batch([prefix + t for t in texts])
    L = max((len(e.ids) for e in encodings), default=0)
    ids = np.full((len(encodings), L), spec.pad_id, dtype=np.int32)
    mask = np.zeros((len(encodings), L), dtype=np.int8)
    for i, e in enumerate(encodings):
        n = len(e.ids)
        cols = slice(L - n, L) if spec.pad_left else slice(0, n)
        ids[i, cols] = e.ids
        mask[i, cols] = 1
    return ids, mask
