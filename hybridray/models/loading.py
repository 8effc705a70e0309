"""One way to name and load an encoder: builtin names, hub ids and local paths alike.

``builtin:`` names are built offline into the cache on first use (see ``offline_e5`` and
``tiny``); anything else goes to ``transformers`` unchanged, so hub users keep hub models.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from hybridray.errors import UserError
from hybridray.models.offline_e5 import E5_PROMPTS, ensure_e5
from hybridray.models.st_format import read_prompts
from hybridray.models.tiny import ensure_tiny

BUILTIN_E5 = "builtin:multilingual-e5-small"
BUILTIN_TINY = "builtin:tiny"
_BUILDERS: dict[str, Callable[[], Path]] = {BUILTIN_E5: ensure_e5, BUILTIN_TINY: ensure_tiny}

E5_PREFIXES = (E5_PROMPTS["query"], E5_PROMPTS["passage"])
NO_PREFIXES = ("", "")
BUILTIN_PREFIXES: dict[str, tuple[str, str]] = {BUILTIN_E5: E5_PREFIXES, BUILTIN_TINY: NO_PREFIXES}

# Architectures whose base model carries a [CLS] pooler. hybridray pools token states itself, and
# an unused pooler would leave DDP with parameters that never receive a gradient.
_POOLER_MODEL_TYPES = {"bert", "roberta", "xlm-roberta"}


def resolve_model_path(name_or_path: str) -> str:
    """Builtin name -> its cache directory (built if needed); ``s3://`` directory -> a cached
    local copy (``hybridray.storage.local_copy``); anything else unchanged."""
    if name_or_path.startswith("s3://"):
        from hybridray.storage import local_copy

        return local_copy(name_or_path)
    if not name_or_path.startswith("builtin:"):
        return name_or_path
    if name_or_path not in _BUILDERS:
        known = ", ".join(sorted(_BUILDERS))
        raise UserError(f"unknown builtin model {name_or_path!r}; expected one of {known}")
    return str(_BUILDERS[name_or_path]())


def load_encoder(
    name_or_path: str, dtype: torch.dtype | str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(base model without pooler, tokenizer) for a builtin name, hub id or local path."""
    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path)
    kwargs = {"add_pooling_layer": False} if config.model_type in _POOLER_MODEL_TYPES else {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModel.from_pretrained(path, config=config, **kwargs)
    return model, AutoTokenizer.from_pretrained(path)


def default_prefixes(name_or_path: str) -> tuple[str, str]:
    """(query prefix, passage prefix) the model was trained with: E5 models need them.

    A local directory that records its prompts (a hybridray export, a sentence-transformers
    model) says so itself; otherwise the builtin table, then the name decides."""
    if name_or_path in BUILTIN_PREFIXES:
        return BUILTIN_PREFIXES[name_or_path]
    recorded = read_prompts(name_or_path) if Path(name_or_path).is_dir() else None
    if recorded is not None:
        return recorded
    return E5_PREFIXES if "e5" in name_or_path.lower() else NO_PREFIXES
