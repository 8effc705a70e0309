"""One way to name and load an encoder: builtin names, hub ids and local paths alike.

``builtin:`` names are built offline into the cache on first use (see ``offline_e5`` and
``tiny``); anything else goes to ``transformers`` unchanged, so hub users keep hub models.
Decoder LLMs get their tokenizer recipe (``decoder.apply_tokenizer_recipe``) here, the one
place every tokenizer of a run is loaded from.
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
from hybridray.models.decoder import (
    DEFAULT_DECODER_PROMPTS,
    apply_tokenizer_recipe,
    decoder_prompts,
    is_decoder,
    prepare_decoder,
)
from hybridray.models.offline_e5 import E5_PROMPTS, ensure_e5
from hybridray.models.shapes import PUBLISHED_SHAPES
from hybridray.models.st_format import read_pooling, read_prompts
from hybridray.models.tiny import ensure_tiny, ensure_tiny_decoder

BUILTIN_E5 = "builtin:multilingual-e5-small"
BUILTIN_TINY = "builtin:tiny"
BUILTIN_TINY_DECODER = "builtin:tiny-decoder"
_BUILDERS: dict[str, Callable[[], Path]] = {
    BUILTIN_E5: ensure_e5, BUILTIN_TINY: ensure_tiny, BUILTIN_TINY_DECODER: ensure_tiny_decoder,
}

E5_PREFIXES = (E5_PROMPTS["query"], E5_PROMPTS["passage"])
NO_PREFIXES = ("", "")
BUILTIN_PREFIXES: dict[str, tuple[str, str]] = {
    BUILTIN_E5: E5_PREFIXES, BUILTIN_TINY: NO_PREFIXES, BUILTIN_TINY_DECODER: DEFAULT_DECODER_PROMPTS,
}

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
    name_or_path: str,
    dtype: torch.dtype | str | None = None,
    *,
    append_eos: bool | None = None,
    padding_side: str | None = None,
    bidirectional: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(base model without pooler or LM head, tokenizer) for a builtin name, hub id or local
    path. A causal LM loads as its base model (``MistralModel`` from a ``MistralForCausalLM``
    checkpoint); the keyword options are the ``model.*`` keys of the decoder recipe."""
    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path)
    model = load_model(name_or_path, dtype, bidirectional=bidirectional, config=config)
    tokenizer = load_tokenizer(path, append_eos=append_eos, padding_side=padding_side, config=config)
    return model, tokenizer


def load_model(
    name_or_path: str,
    dtype: torch.dtype | str | None = None,
    *,
    bidirectional: bool = False,
    config=None,
) -> PreTrainedModel:
    """The base model of ``load_encoder`` without its tokenizer: a second copy of a model
    (a distillation teacher) needs none, and a 250k-token vocabulary takes seconds to load."""
    path = resolve_model_path(name_or_path)
    config = config if config is not None else AutoConfig.from_pretrained(path)
    kwargs = {"add_pooling_layer": False} if config.model_type in _POOLER_MODEL_TYPES else {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModel.from_pretrained(path, config=config, **kwargs)
    if is_decoder(config):
        prepare_decoder(model, bidirectional)
    elif bidirectional:
        raise UserError(f"model.bidirectional: {name_or_path} is not a decoder (already bidirectional)")
    return model


def load_tokenizer(
    name_or_path: str,
    *,
    append_eos: bool | None = None,
    padding_side: str | None = None,
    config=None,
) -> PreTrainedTokenizerBase:
    """The model's tokenizer with the decoder recipe applied (EOS appended, a pad token,
    the padding side): training, evaluation and export all tokenise through this."""
    path = resolve_model_path(name_or_path)
    if config is None:
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError):  # a tokenizer-only directory: not a decoder's
            config = None
    tokenizer = AutoTokenizer.from_pretrained(path)
    return apply_tokenizer_recipe(
        tokenizer, decoder=is_decoder(config), append_eos=append_eos, padding_side=padding_side
    )


def model_config(name_or_path: str):
    """The transformers config of a builtin name, hub id or local path (no weights loaded)."""
    return AutoConfig.from_pretrained(resolve_model_path(name_or_path))


def default_prefixes(name_or_path: str) -> tuple[str, str]:
    """(query prefix, passage prefix) the model was trained with: E5 models need them, and
    decoder embedders an instruction before the query.

    A local directory that records its prompts (a hybridray export, a sentence-transformers
    model) says so itself; otherwise the builtin table, then the name (published decoder
    embedders, then E5), then, for a decoder -- a local checkpoint whose config says so, or an
    LLM of ``shapes.PUBLISHED_SHAPES`` -- the default instruction. Other hub ids are decided
    by name only (no download here): set ``model.query_prefix`` for a hub decoder not listed."""
    if name_or_path in BUILTIN_PREFIXES:
        return BUILTIN_PREFIXES[name_or_path]
    local = Path(name_or_path).is_dir()
    recorded = read_prompts(name_or_path) if local else None
    if recorded is not None:
        return recorded
    published = decoder_prompts(name_or_path)
    if published is not None:
        return published
    if "e5" in name_or_path.lower():
        return E5_PREFIXES
    if name_or_path in PUBLISHED_SHAPES or (
        local and (Path(name_or_path) / "config.json").is_file() and is_decoder(model_config(name_or_path))
    ):
        return DEFAULT_DECODER_PROMPTS
    return NO_PREFIXES


def default_pooling(name_or_path: str) -> str:
    """The pooling a model was trained with: recorded in its sentence-transformers files, else
    ``last`` for decoders (a local checkpoint, a builtin, a listed shape or a decoder embedder
    with published prompts), else ``mean``."""
    if name_or_path == BUILTIN_TINY_DECODER or name_or_path in PUBLISHED_SHAPES or decoder_prompts(name_or_path):
        return "last"  # a decoder embedder known by name (decoder.PUBLISHED_PROMPTS)
    if Path(name_or_path).is_dir():
        recorded = read_pooling(name_or_path)
        if recorded is not None:
            return recorded
        if (Path(name_or_path) / "config.json").is_file() and is_decoder(model_config(name_or_path)):
            return "last"
    return "mean"
