"""Tiny random models with the real multilingual-e5 tokenizer, for fast tests.

Same vocabulary and tokenizer as the default encoder, so data pipelines, collators and
checkpoints are exercised exactly as in real runs, but with a 64-dim, 2-layer body that trains
in milliseconds. They need only the tokenizer package, not the 4-bit weights.

- ``builtin:tiny``: a BERT encoder shaped like multilingual-e5-small.
- ``builtin:tiny-decoder``: a Mistral-architecture decoder (RoPE, RMSNorm, SwiGLU, grouped-query
  attention) whose tokenizer behaves like Llama/Mistral's: BOS before the text, no EOS after
  it, so the decoder recipe (``hybridray.models.decoder``) has to append it, as for a real LLM.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertModel, MistralConfig, MistralModel, PreTrainedTokenizerFast

from hybridray.models.offline_e5 import cached_build, e5_config, save_encoder, xlmr_tokenizer

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


# ----------------------------------------------------------------------------- decoder
TINY_DECODER_DIRNAME = "tiny-decoder-random"
TINY_DECODER_SEED = 0
TINY_DECODER_SHAPE = dict(
    vocab_size=250_002,  # the XLM-R tokenizer's pieces
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, as in Mistral-7B
    intermediate_size=128,
    max_position_embeddings=512,
    sliding_window=None,
)


def tiny_decoder_config() -> MistralConfig:
    """The tiny decoder's config; ``<s>``/``</s>``/``<pad>`` are XLM-R's ids 0/2/1."""
    return MistralConfig(**TINY_DECODER_SHAPE, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                         use_cache=False)


def tiny_decoder() -> MistralModel:
    """Randomly initialised from seed 0 without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_DECODER_SEED)
        return MistralModel(tiny_decoder_config()).eval()


def llama_style_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """The XLM-R tokenizer with Llama's special-token convention: ``<s>`` text, no ``</s>``."""
    from tokenizers.processors import TemplateProcessing

    backend = xlmr_tokenizer(model_max_length).backend_tokenizer
    backend.post_processor = TemplateProcessing(
        single="<s> $A:0", pair="<s> $A:0 $B:1", special_tokens=[("<s>", 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", model_max_length=model_max_length,
    )


def build_tiny_decoder(directory: Path) -> None:
    """A base-LLM directory (weights + tokenizer), like a hub checkpoint: no
    sentence-transformers files until hybridray exports a trained embedder from it."""
    tiny_decoder().save_pretrained(directory)
    llama_style_tokenizer(TINY_DECODER_SHAPE["max_position_embeddings"]).save_pretrained(directory)


def ensure_tiny_decoder() -> Path:
    """Directory of the tiny random decoder, building it on first use."""
    return cached_build(TINY_DECODER_DIRNAME, build_tiny_decoder)
