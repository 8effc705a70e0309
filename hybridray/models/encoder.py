"""The shared-weight dual encoder: one HF model for queries and passages (as in the paper).

Queries and passages go through the same weights; they differ only by their text prefix,
which the data pipeline adds. Embeddings are pooled (``hybridray.models.pooling``) and
L2-normalised, so dot products are cosines.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from hybridray.errors import UserError
from hybridray.models.decoder import position_inputs
from hybridray.models.lora import apply_lora, export_lora, is_lora
from hybridray.models.pooling import POOLING_MODES, pool
from hybridray.models.st_format import write_sentence_transformers_files


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every layer in the backward pass (transformers' own checkpointing: its
    ``activation_checkpointing_enable``, ``gradient_checkpointing_enable`` before 5.x).
    Non-reentrant, which is right with frozen inputs (LoRA) and ZeRO-3's parameter hooks."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"model.activation_checkpointing: {type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class DualEncoder(nn.Module):
    """``encode(input_ids, attention_mask)`` -> L2-normalised [batch, dim] embeddings."""

    def __init__(self, model: nn.Module, pooling: str = "mean", freeze_embeddings: bool = False):
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLING_MODES}")
        self.model = model
        self.pooling = pooling
        self.tokenizer = None  # set by from_pretrained; saved by save_pretrained
        pooler = getattr(model, "pooler", None)
        if isinstance(pooler, nn.Module):
            # The HF pooler (dense + tanh on [CLS], BERT/XLM-R) feeds none of our pooling
            # modes. Left trainable it gets no gradient, yet DeepSpeed hands it zeros and
            # AdamW still weight-decays it; frozen, it stays out of the optimizer and is
            # exported unchanged.
            pooler.requires_grad_(False)
        if freeze_embeddings:
            # Only the word-embedding table: most of a multilingual encoder's parameters
            # (250k x 384 in multilingual-e5-small), kept out of the optimizer so that rows of
            # languages absent from training do not move. Position/type embeddings still train.
            model.get_input_embeddings().weight.requires_grad_(False)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: Union[str, Path, nn.Module],
        pooling: str = "mean",
        freeze_embeddings: bool = False,
        **load_options,
    ) -> "DualEncoder":
        """From a built module, or anything ``hybridray.models.load_encoder`` loads (builtin
        names, hub ids, local directories; ``load_options`` are its keyword options); the
        tokenizer is kept as ``.tokenizer``."""
        if isinstance(name_or_path, nn.Module):
            return cls(name_or_path, pooling, freeze_embeddings)
        from hybridray.models import load_encoder

        model, tokenizer = load_encoder(str(name_or_path), **load_options)
        encoder = cls(model, pooling, freeze_embeddings)
        encoder.tokenizer = tokenizer
        return encoder

    @classmethod
    def from_config(cls, model_cfg, model: Optional[nn.Module] = None) -> "DualEncoder":
        """The training encoder of ``model_cfg`` (``hybridray.config.ModelConfig``): loaded with
        the decoder recipe, then activation checkpointing and LoRA if configured. ``model``
        (a built module) replaces ``model_cfg.name_or_path``."""
        if model is None:
            from hybridray.models import load_encoder

            model, tokenizer = load_encoder(
                model_cfg.name_or_path, append_eos=model_cfg.append_eos,
                padding_side=model_cfg.padding_side, bidirectional=model_cfg.bidirectional,
            )
        else:
            tokenizer = None
        if model_cfg.activation_checkpointing:
            enable_activation_checkpointing(model)
        if model_cfg.lora is not None:
            model = apply_lora(model, model_cfg.lora)
        encoder = cls(model, model_cfg.pooling, model_cfg.freeze_embeddings and model_cfg.lora is None)
        encoder.tokenizer = tokenizer
        return encoder

    @classmethod
    def frozen_from_config(cls, model_cfg, model: Optional[nn.Module] = None) -> "DualEncoder":
        """The starting model of ``model_cfg`` as it is before training, frozen and in eval mode
        (a distillation teacher): loaded with the same recipe and pooling, without LoRA
        adapters or activation checkpointing. ``model`` (a built module, not shared with the
        student) replaces ``model_cfg.name_or_path``."""
        if model is None:  # the student's tokenizer serves it: only the weights are loaded
            from hybridray.models import load_model

            model = load_model(model_cfg.name_or_path, bidirectional=model_cfg.bidirectional)
        encoder = cls(model, model_cfg.pooling)
        encoder.requires_grad_(False)
        return encoder.eval()

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = position_inputs(self.model, attention_mask)  # decoders: padding-side proof
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **positions).last_hidden_state
        return F.normalize(pool(hidden, attention_mask, self.pooling), dim=-1)

    forward = encode

    def save_pretrained(
        self,
        directory: Union[str, Path],
        tokenizer=None,
        prompts: Optional[dict[str, str]] = None,
        max_seq_length: Optional[int] = None,
        adapter_directory: Optional[Union[str, Path]] = None,
    ) -> Path:
        """Write an HF model directory that ``SentenceTransformer(directory)`` also loads
        (Transformer -> Pooling in this encoder's mode -> Normalize).

        ``prompts`` (e.g. ``{"query": "query: ", "passage": "passage: "}``) are recorded for
        sentence-transformers' ``prompt_name=``; ``max_seq_length`` defaults to the model's
        position limit; ``tokenizer`` defaults to the one ``from_pretrained`` loaded. A LoRA
        model is written with its adapters merged into the base weights; ``adapter_directory``
        then also receives the adapter alone.
        """
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model = self.model
        if is_lora(model):
            model = export_lora(model, adapter_directory)
        elif adapter_directory is not None:
            raise ValueError("adapter_directory: this encoder has no LoRA adapter")
        model.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        config = model.config
        no_pooler = getattr(model, "pooler", "n/a") is None  # BERT-family loaded without one
        write_sentence_transformers_files(
            directory,
            dim=config.hidden_size,
            max_seq_length=max_seq_length or getattr(config, "max_position_embeddings", 512),
            prompts=prompts,
            pooling=self.pooling,
            model_args={"add_pooling_layer": False} if no_pooler else None,
        )
        return directory
