"""Decoder LLMs as embedders (E5-Mistral, Qwen3-Embedding, BGE-Multilingual-Gemma2 style).

A causal LM embeds a text as the hidden state of its *last* token, which has attended to every
token before it. Three things make that right, and each lives here so that training, evaluation
and the exported model agree:

- **EOS appended.** The published recipes end every text with the EOS token and pool its state.
  The tokenizer's post-processor is rewritten to append it, so the Ray Data pipeline (which
  tokenises with the raw ``tokenizers`` backend), evaluation and the saved ``tokenizer.json``
  that sentence-transformers loads all produce the same ids. Truncation keeps it: the
  ``tokenizers`` library reserves room for post-processor tokens.
- **Padding either side.** ``hybridray.models.pooling.pool(..., "last")`` finds the last
  attended token of each row; :func:`position_inputs` numbers positions from the attention
  mask, so a left-padded row sees the same positions as a right-padded one.
- **An instruction-style query prompt** (``Instruct: ...\\nQuery: ``), passages bare:
  :func:`decoder_prompts` knows the published ones, and the config's ``model.query_prefix``
  overrides it; it is exported as the sentence-transformers ``query`` prompt.

Bidirectional attention (LLM2Vec, NV-Embed) is transformers' own switch, ``config.is_causal =
False``, honoured by models whose attention masks come from ``transformers.masking_utils``.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from hybridray.errors import UserError

#: The task description of hybridray's data (questions -> answer passages).
QA_INSTRUCTION = "Given a question, retrieve passages that answer the question"
WEB_SEARCH = "Given a web search query, retrieve relevant passages that answer the query"

#: Query prompt of decoders with no published one: E5-Mistral's format with our task.
DEFAULT_DECODER_PROMPTS = (f"Instruct: {QA_INSTRUCTION}\nQuery: ", "")

#: Published prompt formats (from the model cards), by a fragment of the model name.
PUBLISHED_PROMPTS: dict[str, tuple[str, str]] = {
    "e5-mistral": (f"Instruct: {WEB_SEARCH}\nQuery: ", ""),
    "gte-qwen": (f"Instruct: {WEB_SEARCH}\nQuery: ", ""),
    "qwen3-embedding": (f"Instruct: {WEB_SEARCH}\nQuery:", ""),
    "bge-multilingual-gemma2": (f"<instruct>{WEB_SEARCH}.\n<query>", ""),
}


def is_decoder(config) -> bool:
    """True for causal-LM architectures (Mistral, Llama, Qwen2, Gemma, GPT-2, ...).

    BERT-family models also have a causal-LM head class in transformers, so "has one" is not
    enough: a decoder is a model type with a causal-LM head and no masked-LM head.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def decoder_prompts(name_or_path: str) -> Optional[tuple[str, str]]:
    """``(query prompt, passage prompt)`` published for a decoder embedder named like
    ``name_or_path``, or None."""
    name = name_or_path.lower()
    for fragment, prompts in PUBLISHED_PROMPTS.items():
        if fragment in name:
            return prompts
    return None


# ----------------------------------------------------------------------------- tokenizer
def apply_tokenizer_recipe(
    tokenizer, *, decoder: bool, append_eos: Optional[bool] = None, padding_side: Optional[str] = None
):
    """The tokenizer as training and export need it: ``tokenizer`` itself, modified, or a
    replacement (so pass one that nothing else holds, e.g. freshly loaded).

    ``append_eos`` None means: yes for decoders, no for encoders. Decoders without a pad token
    pad with EOS (the attention mask tells padding apart). ``padding_side`` None keeps the
    tokenizer's own.
    """
    append = decoder if append_eos is None else append_eos
    if append and not _ends_with_eos(tokenizer):
        tokenizer = _with_eos_appended(tokenizer)
    if decoder and tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"{tokenizer.name_or_path}: decoder tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side is not None:
        tokenizer.padding_side = padding_side
        tokenizer.init_kwargs["padding_side"] = padding_side  # saved with the tokenizer
    return tokenizer


def _probe(tokenizer) -> tuple[list[int], list[int]]:
    text = "a b"
    return tokenizer(text)["input_ids"], tokenizer(text, add_special_tokens=False)["input_ids"]


def _ends_with_eos(tokenizer) -> bool:
    with_special, _ = _probe(tokenizer)
    return tokenizer.eos_token_id is not None and with_special[-1] == tokenizer.eos_token_id


def _with_eos_appended(tokenizer):
    """The tokenizer with a post-processor that adds EOS after the text, as a generic
    ``PreTrainedTokenizerFast`` (model-specific tokenizer classes may rebuild their
    post-processor from their own flags when loaded, which would drop the EOS again).

    The special tokens the tokenizer puts before the text (Llama's BOS) are kept.
    """
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    name = tokenizer.name_or_path
    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    if eos_id is None:
        raise UserError(f"{name}: model.append_eos needs a tokenizer with an EOS token")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"{name}: model.append_eos needs a fast (tokenizers-backed) tokenizer")
    with_special, plain = _probe(tokenizer)
    n_prefix = len(with_special) - len(plain)
    if n_prefix < 0 or with_special[n_prefix:] != plain:
        raise UserError(
            f"{name}: the tokenizer adds special tokens after the text; cannot append EOS "
            "(set model.append_eos=false)"
        )
    prefix = [(tokenizer.convert_ids_to_tokens(i), i) for i in with_special[:n_prefix]]
    head = " ".join(token for token, _ in prefix)
    backend.post_processor = TemplateProcessing(
        single=f"{head} $A:0 {eos}".strip(),
        pair=f"{head} $A:0 $B:1 {eos}:1".strip(),
        special_tokens=sorted(set(prefix + [(eos, eos_id)])),
    )
    if type(tokenizer) is PreTrainedTokenizerFast:
        return tokenizer  # already generic: the new post-processor is saved with it
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    copy = PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=tokenizer.model_max_length,
        padding_side=tokenizer.padding_side, **special,
    )
    copy.name_or_path = name
    return copy


# ----------------------------------------------------------------------------- model
def position_inputs(model: nn.Module, attention_mask: torch.Tensor) -> dict:
    """``{"position_ids": ...}`` numbered from each row's first real token for decoders (so
    left padding does not shift positions), ``{}`` for encoders."""
    if not is_decoder(getattr(model, "config", None)):
        return {}
    return {"position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)}


def prepare_decoder(model: nn.Module, bidirectional: bool = False) -> nn.Module:
    """A decoder set up for embedding: no KV cache; bidirectional attention if asked."""
    model.config.use_cache = False
    if bidirectional:
        module = sys.modules.get(type(model).__module__)
        if getattr(module, "create_causal_mask", None) is None:
            raise UserError(
                f"model.bidirectional: {type(model).__name__} does not build its attention mask "
                "with transformers.masking_utils, so config.is_causal=False would be ignored"
            )
        model.config.is_causal = False
    return model

