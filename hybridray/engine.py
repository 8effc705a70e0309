"""The DeepSpeed engine of a run: its config dict, optimizer, LR schedule and the module it
trains.

DeepSpeed is imported inside functions only: Ray Tune actors and the CLI import this module
on machines where DeepSpeed's accelerator probing is unwanted.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from hybridray.device import default_device, use_bf16
from hybridray.distributed import init_standalone, is_distributed
from hybridray.distributed import world_size as current_world_size
from hybridray.errors import UserError
from hybridray.loss import InfoNCELoss
from hybridray.models.encoder import DualEncoder

#: DeepSpeed prints throughput every ``steps_per_print`` steps; hybridray logs its own metrics.
_NEVER = 10**9


class TrainingModel(nn.Module):
    """Encoder + loss: the module DeepSpeed wraps; ``forward`` returns the local loss.

    Both live in one module because ZeRO-3 gathers partitioned parameters in the forward
    hooks of the wrapped module: encoding and the loss (whose temperature may be a
    parameter) must run inside ``engine(...)``.
    """

    def __init__(self, encoder: DualEncoder, loss: InfoNCELoss):
        super().__init__()
        self.encoder = encoder
        self.loss = loss

    @classmethod
    def from_config(cls, config, model: Optional[nn.Module] = None) -> "TrainingModel":
        """From ``config.model`` / ``config.loss``; ``model`` overrides ``model.name_or_path``."""
        encoder = DualEncoder.from_pretrained(
            model if model is not None else config.model.name_or_path,
            pooling=config.model.pooling,
            freeze_embeddings=config.model.freeze_embeddings,
        )
        return cls(encoder, InfoNCELoss.from_config(config.loss))

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
        query = self.encoder.encode(query_input_ids, query_attention_mask)
        passage = self.encoder.encode(passage_input_ids, passage_attention_mask)
        negatives = None
        if negative_input_ids is not None:
            negatives = self.encoder.encode(negative_input_ids, negative_attention_mask)
        return self.loss(query, passage, negatives, group_ids, negative_group_ids)


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
    ``zero_*`` switches. bf16 only where ``hybridray.device`` says so (GPU), fp32 on CPU.
    """
    return {
        "train_batch_size": config.sampler.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(config, world_size),
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(config.optim.grad_clip),
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
        "bf16": {"enabled": use_bf16(default_device())},
        "fp16": {"enabled": False},
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _NEVER,
        "wall_clock_breakdown": False,
    }


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
    import deepspeed.ops

    # Without this, DeepSpeed builds its shared-memory comm op with g++ (~48 s) on a fresh
    # machine; gloo is enough for the all-reduces of this model size.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not is_distributed():
        init_standalone()
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
    engine.train()
    return engine


def clamp_temperature(engine) -> None:
    """After an optimizer step: put a learned temperature back inside its bounds, in the
    module and in DeepSpeed's fp32 master copy (ZeRO-1/2/3 keep one; the next step would
    otherwise write the unclamped value back). Collective under ZeRO: every rank calls it.
    A fixed temperature is left alone."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    loss = engine.module.loss
    param = loss.log_temperature
    if not isinstance(param, nn.Parameter):
        return
    lo, hi = loss.log_temperature_bounds
    master = safe_get_full_fp32_param(param)
    if master is not None:
        safe_set_full_fp32_param(param, master.clamp(lo, hi))
    zero3 = hasattr(param, "ds_id")
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=zero3):
        loss.clamp_temperature_()
