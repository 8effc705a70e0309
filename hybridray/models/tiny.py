"""A tiny random encoder with the real multilingual-e5 tokenizer, for fast tests.

Same vocabulary and tokenizer as the default encoder, so data pipelines, collators and
checkpoints are exercised exactly as in real runs, but with a 64-dim, 2-layer body that trains
in milliseconds. It needs only the tokenizer package, not the 4-bit weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertModel

from hybridray.models.offline_e5 import cached_build, e5_config, save_encoder

TINY_DIRNAME = "tiny-random"
TINY_SEED = 0
TINY_SHAPE = dict(
    vocab_size=250_037,  # multilingual-e5-small's embedding rows (tokenizer: 250,002 pieces)
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    max_position_embeddings=128,
    type_vocab_size=2,
    layer_norm_eps=1e-12,
)


def tiny_model() -> BertModel:
    """Randomly initialised from seed 0 without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return BertModel(e5_config(TINY_SHAPE), add_pooling_layer=False).eval()


def build_tiny(directory: Path) -> None:
    save_encoder(directory, tiny_model(), TINY_SHAPE["max_position_embeddings"], prompts={})


def ensure_tiny() -> Path:
    """Directory of the tiny random encoder, building it on first use."""
    return cached_build(TINY_DIRNAME, build_tiny)
