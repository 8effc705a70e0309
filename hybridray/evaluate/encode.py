"""Batched inference encoding: texts in, L2-normalised float32 vectors out.

Texts are tokenised once, sorted by token length and batched longest first, so each batch
pads to near its own length (sentences of 10 and 200 tokens never share a batch) and an
out-of-memory error shows up on the first batch rather than the last.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from hybridray.device import use_bf16
from hybridray.models.decoder import position_inputs
from hybridray.models.pooling import pool


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for ``model`` and all its submodules, then each submodule back in
    exactly the mode it had: ``model.train(was_training)`` alone would switch submodules that
    were in eval mode (a frozen part, a freshly loaded HF model) to train mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def distinct(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """``(unique, where)``: the distinct texts in first-seen order, and for each input text its
    row in ``unique`` (``unique[where[i]] == texts[i]``). A text's vector depends a little on the
    batch it is padded with, so every path encodes each distinct text once and copies its vector
    to every occurrence: equal texts then tie exactly and the seeded key orders them, whatever the
    batching, chunking or number of workers."""
    first: dict[str, int] = {}
    where = np.fromiter((first.setdefault(t, len(first)) for t in texts), dtype=np.int64, count=len(texts))
    return list(first), where


def _last_hidden_state(output) -> torch.Tensor:
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def encode_texts(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    prefix: str = "",
    max_length: int = 256,
    batch_size: int = 64,
    pooling: str = "mean",
    device: Optional[torch.device | str] = None,
    progress: bool = True,
) -> np.ndarray:
    """Encode ``texts`` (each prefixed with ``prefix``) into ``[len(texts), dim]`` float32
    unit vectors, in input order.

    Runs under ``torch.inference_mode`` with the model in eval mode (``eval_mode``: every
    submodule's mode is restored afterwards, so the trainer can call this mid-run), with bf16 autocast on GPUs
    only. ``device`` defaults to where the model's weights already are: the caller placed
    the model (with :func:`hybridray.device.default_device`), this function never moves it
    unless asked. Each distinct text is encoded once (:func:`distinct`): equal texts get
    bit-identical vectors.

    ``model`` may also be an encoding pool (:class:`hybridray.evaluate.pool.EncoderPool`,
    ``hybridray eval --workers N``), which spreads the same encoding over its actors.
    """
    if hasattr(model, "encode_texts"):  # a pool of actors (hybridray.evaluate.pool) encodes itself
        return model.encode_texts(texts, prefix=prefix, max_length=max_length, batch_size=batch_size,
                                  pooling=pooling, progress=progress)
    if len(texts) == 0:
        raise ValueError("encode_texts: no texts to encode")
    texts, where = distinct(texts)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    max_length = min(max_length, tokenizer.model_max_length)  # never past the position table
    features = tokenizer([prefix + t for t in texts], truncation=True, max_length=max_length)
    order = np.argsort([-len(ids) for ids in features["input_ids"]], kind="stable")
    out: Optional[np.ndarray] = None
    with eval_mode(model), torch.inference_mode(), \
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(device)):
        # a bar on a terminal only: piped into a log, its carriage returns are debris
        for start in tqdm(range(0, len(texts), batch_size), desc="encode", unit="batch",
                          disable=not (progress and sys.stderr.isatty())):
            rows = order[start:start + batch_size]
            batch = tokenizer.pad({key: [values[i] for i in rows] for key, values in features.items()},
                                  return_tensors="pt")
            batch = {key: value.to(device) for key, value in batch.items()}
            hidden = _last_hidden_state(model(**batch, **position_inputs(model, batch["attention_mask"])))
            vectors = F.normalize(pool(hidden, batch["attention_mask"], pooling).float(), dim=-1)
            if out is None:
                out = np.empty((len(texts), vectors.shape[-1]), dtype=np.float32)
            out[rows] = vectors.cpu().numpy()
    return out[where]


def encode_chunks(
    model,
    tokenizer,
    chunks: Iterable[tuple[int, object]],
    reader: Callable[[object], list[str]],
    **settings,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(rows, vectors)`` for each chunk ``(first row, source)`` of a corpus too large to hold:
    ``reader(source)`` gives the chunk's texts, rows ``first .. first + len - 1``. One chunk's
    texts are in memory at a time; a pool (``model.encode_chunks``) has its actors read them
    and yields the chunks in any order. ``settings``: those of :func:`encode_texts`."""
    if hasattr(model, "encode_chunks"):
        yield from model.encode_chunks(chunks, reader, **settings)
        return
    for first, source in chunks:
        texts = reader(source)
        yield np.arange(first, first + len(texts)), encode_texts(model, tokenizer, texts, **settings)
