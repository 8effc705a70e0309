"""The DeepSpeed engine of a run: its config dict, optimizer, LR schedule and the module it
trains.

DeepSpeed is imported inside functions only: Ray Tune actors and the CLI import this module
on machines where DeepSpeed's accelerator probing is unwanted.
"""
from __future__ import annotations

import contextlib
import copy
import math
from functools import partial
from typing import Optional

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from hybridray.device import default_device, dist_backend, tell_deepspeed, use_bf16
from hybridray.distributed import init_standalone, is_distributed
from hybridray.distributed import world_size as current_world_size
from hybridray.errors import UserError
from hybridray.grad_cache import cached_embeddings, encode_in_chunks
from hybridray.loss import InfoNCELoss
from hybridray.models.encoder import DualEncoder

#: DeepSpeed prints throughput every ``steps_per_print`` steps; hybridray logs its own metrics.
_NEVER = 10**9


class TrainingModel(nn.Module):
    """Encoder + loss (+ the frozen teacher of distillation): the module DeepSpeed wraps;
    ``forward`` returns the local loss.

    They live in one module because ZeRO-3 gathers partitioned parameters in the forward
    hooks of the wrapped module: encoding and the loss (whose temperature may be a
    parameter) must run inside ``engine(...)``. The teacher is inside too, so that ZeRO-3
    partitions it like the student; its parameters are frozen, so the optimizer never sees
    them and checkpoints leave them out (``exclude_frozen_parameters``): it is the starting
    model, rebuilt identically from ``model.name_or_path`` at every start and resume. It is in
    eval mode always (no dropout) and runs without graph.

    ``cache_chunk_size`` > 0 encodes through ``hybridray.grad_cache.cached_embeddings`` (the
    teacher in chunks of the same size, without graph); ``length_buckets`` > 1 then splits
    each chunk by length.
    """

    def __init__(self, encoder: DualEncoder, loss: InfoNCELoss, teacher: Optional[DualEncoder] = None,
                 cache_chunk_size: int = 0, length_buckets: int = 1):
        super().__init__()
        self.encoder = encoder
        self.loss = loss
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.teacher = teacher
        self.cache_chunk_size = cache_chunk_size
        self.length_buckets = length_buckets

    @classmethod
    def from_config(cls, config, model: Optional[nn.Module] = None) -> "TrainingModel":
        """From ``config.model`` / ``config.loss``; ``model`` overrides ``model.name_or_path``.
        Under ZeRO-3 a named model is loaded straight into partitions (``zero3_loading``).
        With ``loss.distill_weight`` > 0 the teacher is a second, frozen copy of the starting
        model (without LoRA adapters or activation checkpointing)."""
        distill = config.loss.distill_weight > 0
        with zero3_loading(config) if model is None else contextlib.nullcontext():
            starting = copy.deepcopy(model) if distill and model is not None else None
            encoder = DualEncoder.from_config(config.model, model)
            teacher = DualEncoder.frozen_from_config(config.model, starting) if distill else None
        return cls(encoder, InfoNCELoss.from_config(config.loss), teacher, config.loss.cache_chunk_size,
                   config.model.length_buckets)

    def train(self, mode: bool = True) -> "TrainingModel":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher never drops out
        return self

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               encoder: Optional[DualEncoder] = None) -> torch.Tensor:
        """Embeddings of one side by ``encoder`` (default: the student), in row order; with
        ``length_buckets`` > 1 the rows are encoded in that many chunks of similar length
        (``length_chunks``)."""
        encode = (self.encoder if encoder is None else encoder).encode
        if self.length_buckets <= 1:
            return encode(input_ids, attention_mask)
        order, chunks = length_chunks(attention_mask, self.length_buckets)
        parts = [encode(input_ids[rows][:, cols], attention_mask[rows][:, cols]) for rows, cols in chunks]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return torch.cat(parts)[inverse]

    def forward(
        self,
        query_input_ids: torch.Tensor,
        query_attention_mask: torch.Tensor,
        passage_input_ids: torch.Tensor,
        passage_attention_mask: torch.Tensor,
        negative_input_ids: Optional[torch.Tensor] = None,
        negative_attention_mask: Optional[torch.Tensor] = None,
        group_ids: Optional[torch.Tensor] = None,
        negative_group_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Local loss of ``B`` pairs (+ ``B*k`` query-major hard negatives)."""
        inputs = [(query_input_ids, query_attention_mask), (passage_input_ids, passage_attention_mask)]
        if negative_input_ids is not None:
            inputs.append((negative_input_ids, negative_attention_mask))
        chunk = self.cache_chunk_size
        if chunk:
            params = [p for p in self.encoder.parameters() if p.requires_grad]
            embeddings = cached_embeddings(self.encode, inputs, chunk, params)
        else:
            embeddings = [self.encode(ids, mask) for ids, mask in inputs]
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_encode = partial(self.encode, encoder=self.teacher)  # buckets too
                teacher = encode_in_chunks(teacher_encode, inputs, chunk) + [None] * (3 - len(inputs))
        query, passage, *rest = embeddings
        negatives = rest[0] if rest else None
        return self.loss(query, passage, negatives, group_ids, negative_group_ids, teacher)


def length_chunks(attention_mask: torch.Tensor, n: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, slice]]]:
    """``(order, [(rows, columns), ...])``: the rows sorted by length (stable), cut into at most
    ``n`` chunks of consecutive rows, each with the column range its rows use (either padding
    side). Encoding a chunk at its own width gives each text the same embedding as in the full
    batch (padding is masked), at a fraction of the padded tokens when lengths vary."""
    lengths = attention_mask.sum(dim=1)
    order = torch.sort(lengths, stable=True).indices
    chunks = []
    for rows in torch.tensor_split(order, max(1, min(n, len(order)))):
        used = torch.nonzero(attention_mask[rows].any(dim=0)).flatten()
        lo, hi = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 0)
        chunks.append((rows, slice(lo, hi)))
    return order, chunks


# ----------------------------------------------------------------------------- config
def micro_batch_size(config, world_size: int) -> int:
    """Pairs per worker per step: the global batch split evenly over the workers (one forward
    per step; ``optim.grad_accum`` is refused above 1 by the config)."""
    global_batch = config.sampler.batch_size
    if global_batch % world_size:
        raise UserError(f"sampler.batch_size ({global_batch}) must be a multiple of the workers ({world_size})")
    return global_batch // world_size


def deepspeed_config(config, world_size: int) -> dict:
    """The DeepSpeed config dict of a run (``config`` is a ``hybridray.config.Config``).

    ``gradient_clipping`` is always written: DeepSpeed 0.19.8 clips at 1.0 when the key is
    absent, so ``optim.grad_clip: 0`` must become an explicit 0.0 (off). The optimizer is a
    torch one passed to ``deepspeed.initialize`` (no FusedAdam build on CPU), hence the two
    ``zero_*`` switches. bf16 as ``deepspeed.bf16`` says (default: where ``hybridray.device``
    says so, i.e. GPU; fp32 on CPU).
    """
    return {
        "train_batch_size": config.sampler.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(config, world_size),
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(config.optim.grad_clip),
        "zero_optimization": zero_optimization(config.deepspeed),
        "bf16": {"enabled": bf16_enabled(config.deepspeed)},
        "fp16": {"enabled": False},
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }


def bf16_enabled(ds) -> bool:
    """``deepspeed.bf16``, or by default bf16 on GPUs that support it."""
    return use_bf16(default_device()) if ds.bf16 is None else ds.bf16


def zero_optimization(ds) -> dict:
    """The ``zero_optimization`` section: the stage and its CPU offloads (``ds`` is
    ``Config.deepspeed``). Offloaded tensors are pinned only where there is a GPU to copy to."""
    section: dict = {"stage": ds.zero_stage}
    pin = default_device().type == "cuda"
    for key in ("offload_optimizer", "offload_param"):
        device = getattr(ds, key)
        if device != "none":
            section[key] = {"device": device, "pin_memory": pin}
    return section


@contextlib.contextmanager
def zero3_loading(config):
    """Under ZeRO-3, models built inside are created directly as partitions (DeepSpeed's
    ``zero.Init`` through transformers' ``HfDeepSpeedConfig``): no worker ever holds the whole
    model, which is what lets a 34B model load on 8 GPUs. Other stages: no effect."""
    if config.deepspeed.zero_stage != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    _init_deepspeed_comm()
    hf_config = HfDeepSpeedConfig(deepspeed_config(config, current_world_size()))  # noqa: F841 (kept alive)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()


def _init_deepspeed_comm() -> None:
    """DeepSpeed's communication layer on the process group that is already up (Ray Train
    creates it) or, in a single process, on a new one of size 1."""
    tell_deepspeed()
    import deepspeed
    import deepspeed.ops

    # Without this, DeepSpeed builds its shared-memory comm op with g++ (~48 s) on a fresh
    # machine; gloo is enough for the all-reduces of this model size.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not is_distributed():
        init_standalone()
    deepspeed.init_distributed(dist_backend=dist_backend(default_device()))


# ----------------------------------------------------------------------------- optimizer
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: matrices decay; vectors and scalars (biases,
    LayerNorm weights, a learned temperature) do not. Frozen parameters are left out."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based).

    Linear warm-up reaching the peak at step ``warmup_steps - 1`` (so step 0 already moves),
    then ``constant``, ``linear`` decay or ``cosine`` decay towards 0 at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r}")


def build_optimizer(model: nn.Module, config) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """torch AdamW over ``param_groups`` and its LambdaLR over ``lr_factor``."""
    optim = config.optim
    optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr)
    factor = partial(
        lr_factor,
        warmup_steps=optim.warmup_steps,
        total_steps=config.train.max_steps,
        schedule=optim.schedule,
    )
    return optimizer, LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- engine
def build_engine(model: nn.Module, config, world_size: Optional[int] = None, optimizer=None):
    """A DeepSpeed engine training ``model`` (normally a ``TrainingModel``), in train mode.

    Uses the process group that is already up (Ray Train creates it) or, in a single
    process, starts one of size 1. DeepSpeed steps the LR scheduler once per optimizer step.
    ``optimizer`` replaces the configured AdamW (tests use plain SGD to read clipped
    gradients off the update); the LR schedule then drives it.

    Train mode is set here, for every submodule, because ``from_pretrained`` returns models in
    eval mode: without it dropout would be off until something happened to switch it on.
    Evaluation switches to eval mode and back (``hybridray.evaluate.encode.eval_mode``).
    """
    import deepspeed

    _init_deepspeed_comm()
    actual = current_world_size()
    if world_size is not None and world_size != actual:
        raise ValueError(f"world_size={world_size} but the process group has {actual} ranks")
    if optimizer is None:
        optimizer, scheduler = build_optimizer(model, config)
    else:
        scheduler = LambdaLR(optimizer, partial(
            lr_factor, warmup_steps=config.optim.warmup_steps, total_steps=config.train.max_steps,
            schedule=config.optim.schedule,
        ))
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(config, actual),
    )
    skip_needless_work(engine, config, actual)
    engine.train()
    return engine


def skip_needless_work(engine, config, world_size: int) -> None:
    """ZeRO-0 shortcuts: the steps are the plain torch loop's, bit for bit (``tests/test_engine.py``).

    Against DeepSpeed's own ZeRO-0 path two things differ: torch's clip rounds the norm in
    another order (last-bit differences when a step is clipped), and one worker no longer gets
    DeepSpeed's zero-fill of a trainable parameter that received no gradient (its all-reduce
    does it), so AdamW would skip such a parameter instead of decaying it. No model hybridray
    builds has one (the pooler is frozen).

    * One worker: no backward all-reduce. DeepSpeed 0.19.8 otherwise flattens all gradients
      into one buffer, all-reduces it over a group of one and copies it back every step
      (``allreduce_gradients`` -> ``buffered_allreduce_fallback``): an average over one rank.
      Only at stage 0: under ZeRO-1/2/3 the same call moves gradients into the partitions.
    * fp32: clip with torch's ``clip_grad_norm_`` (foreach kernels) instead of DeepSpeed's
      per-parameter loop, its all-reduce of the norm and its unconditional multiply. Stage 0
      only, where every rank holds whole, already averaged gradients, so the local norm is the
      global one; under ZeRO-1/2/3 DeepSpeed must clip its own partitions. Same threshold
      (``optim.grad_clip``), same ``max_norm / (norm + 1e-6)`` coefficient capped at 1.
    """
    if config.deepspeed.zero_stage != 0:
        return
    if world_size == 1:
        engine.enable_backward_allreduce = False
    if engine.gradient_clipping() > 0 and not (engine.fp16_enabled() or engine.bfloat16_enabled()):
        trainable = [p for p in engine.module.parameters() if p.requires_grad]
        max_norm = engine.gradient_clipping()
        engine.clip_fp32_gradients = lambda: torch.nn.utils.clip_grad_norm_(trainable, max_norm)


def clamp_temperature(engine) -> None:
    """After an optimizer step: put a learned temperature back inside its bounds, in the
    module and in DeepSpeed's fp32 master copy (ZeRO-1/2/3 keep one; the next step would
    otherwise write the unclamped value back). Collective under ZeRO: every rank calls it.
    A fixed temperature is left alone."""
    loss = engine.module.loss
    param = loss.log_temperature
    if not isinstance(param, nn.Parameter):
        return
    import deepspeed
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_local_fp32_param,
        safe_set_full_fp32_param,
        safe_set_local_fp32_param,
    )

    lo, hi = loss.log_temperature_bounds
    zero3 = hasattr(param, "ds_id")
    if zero3:  # each rank clamps its own partition (the full-value setter fails on a padded one)
        safe_set_local_fp32_param(param, safe_get_local_fp32_param(param).clamp(lo, hi))
    else:
        master = safe_get_full_fp32_param(param)  # ZeRO-1/2; None under ZeRO-0 (no master copy)
        if master is not None:
            safe_set_full_fp32_param(param, master.clamp(lo, hi))
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=zero3):
        loss.clamp_temperature_()
