"""Encoders: builtin offline models, hub/local loading, prefixes and pooling."""
from hybridray.models.loading import (
    BUILTIN_E5,
    BUILTIN_TINY,
    BUILTIN_TINY_DECODER,
    default_pooling,
    default_prefixes,
    load_encoder,
    load_model,
    load_tokenizer,
    model_config,
    resolve_model_path,
)
from hybridray.models.pooling import POOLING_MODES, pool

__all__ = [
    "BUILTIN_E5",
    "BUILTIN_TINY",
    "BUILTIN_TINY_DECODER",
    "POOLING_MODES",
    "default_pooling",
    "default_prefixes",
    "load_encoder",
    "load_model",
    "load_tokenizer",
    "model_config",
    "pool",
    "resolve_model_path",
]
