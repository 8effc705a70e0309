"""Encoders: builtin offline models, hub/local loading, prefixes and pooling."""
from hybridray.models.loading import (
    BUILTIN_E5,
    BUILTIN_TINY,
    default_prefixes,
    load_encoder,
    resolve_model_path,
)
from hybridray.models.pooling import POOLING_MODES, pool

__all__ = [
    "BUILTIN_E5",
    "BUILTIN_TINY",
    "POOLING_MODES",
    "default_prefixes",
    "load_encoder",
    "pool",
    "resolve_model_path",
]
