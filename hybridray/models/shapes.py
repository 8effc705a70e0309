"""Published shapes of well-known LLMs, so that ``hybridray plan`` can size them offline.

``hybridray plan`` needs a model's config, never its weights. For a local directory or a
builtin it reads ``config.json``; for these hub ids it uses the shapes below, copied from their
published ``config.json`` files, so planning a 7B or 34B run needs no download. Any other hub
id is read with ``AutoConfig`` (a download of ``config.json`` only).
"""
from __future__ import annotations

_MISTRAL_7B = dict(
    model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=4096,
)
_YI_34B = dict(
    model_type="llama", vocab_size=64000, hidden_size=7168, intermediate_size=20480,
    num_hidden_layers=60, num_attention_heads=56, num_key_value_heads=8,
    max_position_embeddings=4096, rms_norm_eps=1e-5,
)
_CODELLAMA_34B = dict(
    model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=22016,
    num_hidden_layers=48, num_attention_heads=64, num_key_value_heads=8,
    max_position_embeddings=16384, rms_norm_eps=1e-5,
)

#: hub id -> config keys (model_type + shape), as published.
PUBLISHED_SHAPES: dict[str, dict] = {
    "mistralai/Mistral-7B-v0.1": _MISTRAL_7B,
    "intfloat/e5-mistral-7b-instruct": _MISTRAL_7B,
    "01-ai/Yi-34B": _YI_34B,
    "codellama/CodeLlama-34b-hf": _CODELLAMA_34B,
}


def published_config(name: str):
    """The transformers config of a model in ``PUBLISHED_SHAPES``, or None."""
    shape = PUBLISHED_SHAPES.get(name)
    if shape is None:
        return None
    from transformers import AutoConfig

    shape = dict(shape)
    config = AutoConfig.for_model(shape.pop("model_type"), **shape, use_cache=False)
    config._name_or_path = name
    return config
