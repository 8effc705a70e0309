"""Pooling of token states into one vector per text.

Kept separate from the encoder so that training, evaluation and export pool the same way.
"""
from __future__ import annotations

import torch

POOLING_MODES = ("mean", "cls", "last")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool ``hidden`` [batch, seq, dim] under ``attention_mask`` [batch, seq].

    - ``mean``: average of the non-padding tokens (E5, XLM-R, most sentence encoders);
    - ``cls``: the first token (LaBSE, BERT-style [CLS] models);
    - ``last``: the last non-padding token (the EOS the decoder recipe appends), for decoder
      LLM embedders; the same row for left and right padding, since it is found from the mask.
    """
    if mode == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.long() * positions).argmax(1)  # index of each row's last real token
        return hidden[torch.arange(hidden.size(0), device=hidden.device), last]
    raise ValueError(f"unknown pooling {mode!r}; expected one of {POOLING_MODES}")
