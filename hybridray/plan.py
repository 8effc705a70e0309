"""``hybridray plan CONFIG``: per-GPU memory of a run, before anything is launched.

Four parts, per GPU (one Ray Train worker per GPU):

- **parameters, gradients, optimizer state** -- DeepSpeed's own ZeRO estimators
  (``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``, the
  functions behind ``estimate_zero*_mem_needs_all_cold``), applied to the *trainable*
  parameters, for the configured world size, ZeRO stage and CPU offloads. Their byte counts
  are those of bf16 mixed precision with Adam: per trainable parameter, 2 bytes of 16-bit weight,
  16 bytes of fp32 gradient partition, master weight and the two moments (``18 = 2 + 4 + 4 + 8``
  at stage 2; ZeRO-3 adds ``4 x`` the largest layer, gathered while it runs). Frozen parameters
  (a LoRA base, a frozen embedding table) only hold their 16-bit weights (partitioned under
  ZeRO-3). DeepSpeed has no estimator for stages 0 and 1; they use the same per-parameter bytes,
  unpartitioned (0) or with only the optimizer state partitioned (1).
- **activations** -- counted tensor by tensor (:func:`layer_token_bytes`), from the micro-batch,
  the query/passage lengths (all padded to the maximum: the worst step), hard negatives, the
  model's shape, activation checkpointing and gradient caching (``loss.cache_chunk_size``:
  one chunk's activations instead of the whole micro-batch's).
- **distillation teacher** (``loss.distill_weight`` > 0) -- a second, frozen copy of the
  starting model: its 16-bit weights (partitioned under ZeRO-3, like the student's), counted
  with the parameters.

The parameter counts come from building the configured encoder (LoRA and frozen parts
included) on PyTorch's ``meta`` device: exact, instant, and with no weights anywhere.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from hybridray.config import Config, build_config
from hybridray.errors import UserError

GiB = 2**30
#: DeepSpeed's estimators size CPU memory with this safety factor (their default).
CPU_BUFFER_FACTOR = 1.5


# ----------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read off the encoder built on the ``meta`` device."""

    name: str
    architecture: str
    #: ``llama``: a decoder with Llama-family blocks (q/k/v/o and gate/up/down projections,
    #: RMSNorm), counted tensor by tensor; ``generic``: any other transformer.
    block: str
    total_params: int
    trainable_params: int
    #: Most parameters held directly by one module (DeepSpeed's "largest layer", which ZeRO-3
    #: gathers whole): usually the embedding table.
    largest_layer_params: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    kv_heads: int
    #: LoRA rank and adapted linear layers per block (0 without LoRA).
    lora_rank: int
    lora_modules_per_layer: int
    #: Projections of a block whose weight or adapter trains (``q_proj``, ..., ``down_proj``):
    #: only their inputs are saved for the backward pass.
    trainable_projections: frozenset
    #: Whether the norm weights train (full fine-tuning) -- then their inputs are saved too.
    norms_trainable: bool
    #: Whether the input embeddings train: if not, nothing before the first block needs a
    #: gradient and the first norm saves no fp32 input.
    embeddings_trainable: bool


LLAMA_PROJECTIONS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})


def plan_model_config(name_or_path: str):
    """Transformers config for planning: the builtin table of published shapes first (no
    download for the 7B/34B examples), else whatever ``AutoConfig`` reads."""
    from hybridray.models import model_config
    from hybridray.models.shapes import published_config

    if not Path(name_or_path).exists():
        published = published_config(name_or_path)
        if published is not None:
            return published
    try:
        return model_config(name_or_path)
    except OSError as exc:
        raise UserError(f"model.name_or_path: cannot read the config of {name_or_path!r}: {exc}") from None


def model_shape(model_cfg) -> ModelShape:
    """The shape of the encoder a run would train (``model_cfg`` is ``Config.model``)."""
    import torch
    from torch import nn
    from transformers import AutoModel

    from hybridray.models.decoder import is_decoder
    from hybridray.models.encoder import DualEncoder
    from hybridray.models.loading import _POOLER_MODEL_TYPES

    config = plan_model_config(model_cfg.name_or_path)
    kwargs = {"add_pooling_layer": False} if config.model_type in _POOLER_MODEL_TYPES else {}
    with torch.device("meta"):
        encoder = DualEncoder.from_config(model_cfg, AutoModel.from_config(config, **kwargs))
    params = list(encoder.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in encoder.modules())
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    adapted = sum(1 for name, m in encoder.named_modules() if name.endswith("lora_A") and isinstance(m, nn.ModuleDict))
    first_block = [(n.split("."), p.requires_grad) for n, p in encoder.named_parameters() if ".layers.0." in n]
    projections = {part for parts, _ in first_block for part in parts if part in LLAMA_PROJECTIONS}
    trainable = {part for parts, grad in first_block if grad for part in parts if part in LLAMA_PROJECTIONS}
    return ModelShape(
        name=model_cfg.name_or_path,
        architecture=type(encoder.model.get_base_model() if model_cfg.lora else encoder.model).__name__,
        block="llama" if is_decoder(config) and projections == LLAMA_PROJECTIONS else "generic",
        trainable_projections=frozenset(trainable),
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        largest_layer_params=largest,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=layers,
        num_heads=heads,
        head_dim=head_dim,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        lora_rank=model_cfg.lora.r if model_cfg.lora else 0,
        lora_modules_per_layer=adapted // layers,
        norms_trainable=model_cfg.lora is None,
        embeddings_trainable=encoder.model.get_input_embeddings().weight.requires_grad,
    )


# ----------------------------------------------------------------------------- model states
def model_states(shape: ModelShape, config: Config, gpus_per_node: int) -> dict:
    """Bytes per GPU of parameters, gathered layer, gradients and optimizer state, and bytes
    of CPU memory per node (offloads), from DeepSpeed's estimators (see module docstring).

    Also returns ``deepspeed_gpu`` / ``deepspeed_cpu``: the estimator's own totals for the
    trainable parameters, which the breakdown must add up to."""
    estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs = _estimators()
    ds = config.deepspeed
    world = config.scaling.num_workers
    nodes = math.ceil(world / gpus_per_node)
    trainable, frozen = shape.trainable_params, shape.total_params - shape.trainable_params
    largest = shape.largest_layer_params
    off_opt, off_param = ds.offload_optimizer == "cpu", ds.offload_param == "cpu"
    gpu = dict(parameters=0.0, gathered_layer=0.0, gradients=0.0, optimizer=0.0)
    cpu = 0.0
    ds_gpu = ds_cpu = None
    if ds.zero_stage == 3:
        ds_cpu, ds_gpu, gathered = estimate_zero3_model_states_mem_needs(
            trainable, largest, gpus_per_node, nodes, cpu_offload=off_opt,
            cpu_offload_params=off_param, zero_init=True, additional_buffer_factor=CPU_BUFFER_FACTOR,
        )
        gpu["gathered_layer"] = gathered  # 4 bytes x largest layer: 16-bit weight + gradient
        if off_param:
            cpu += 2 * frozen / nodes * CPU_BUFFER_FACTOR
        else:
            gpu["parameters"] = 2 * (trainable + frozen) / world
        if not off_opt:
            gpu["gradients"] = 4 * trainable / world  # fp32 gradient partition
            gpu["optimizer"] = 12 * trainable / world  # fp32 master weight + Adam moments
        cpu += ds_cpu if (off_opt or off_param) else 0.0
    elif ds.zero_stage == 2:
        ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(
            trainable, gpus_per_node, nodes, cpu_offload=off_opt, additional_buffer_factor=CPU_BUFFER_FACTOR,
        )
        gpu["parameters"] = 2 * (trainable + frozen)
        if not off_opt:
            gpu["gradients"] = 6 * trainable / world  # 16-bit + fp32 gradient partitions
            gpu["optimizer"] = 12 * trainable / world
        else:
            cpu += ds_cpu
    else:  # no DeepSpeed estimator: the same bytes, partitioned as the stage partitions them
        partition = world if ds.zero_stage == 1 else 1
        gpu["parameters"] = 2 * (trainable + frozen)
        gpu["gradients"] = 2 * trainable + (0 if off_opt else 4 * trainable / partition)
        if off_opt:
            cpu += 16 * trainable / nodes * CPU_BUFFER_FACTOR
        else:
            gpu["optimizer"] = 12 * trainable / partition
    if config.loss.distill_weight > 0:  # the teacher: the starting model without adapters, frozen
        teacher = shape.total_params - (trainable if config.model.lora else 0)
        if ds.zero_stage == 3 and off_param:
            cpu += 2 * teacher / nodes * CPU_BUFFER_FACTOR
        else:
            gpu["parameters"] += 2 * teacher / (world if ds.zero_stage == 3 else 1)
    if not _bf16(config):  # fp32 training: 4-byte weights and gradients, no 16-bit copies
        gpu["parameters"] *= 2
        gpu["gathered_layer"] *= 2
    return {"gpu": gpu, "cpu_per_node": cpu, "deepspeed_gpu": ds_gpu, "deepspeed_cpu": ds_cpu}


def _estimators():
    """DeepSpeed's ZeRO-2 and ZeRO-3 model-state estimators. Importing DeepSpeed the first time
    logs its accelerator choice to stdout; here that goes to stderr, so that the plan (and its
    ``--json``) owns stdout."""
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


def _bf16(config: Config) -> bool:
    """The precision the run would use on its target: ``deepspeed.bf16``, else bf16 on GPU."""
    bf16 = config.deepspeed.bf16
    return config.scaling.use_gpu if bf16 is None else bf16


# ----------------------------------------------------------------------------- activations
def layer_token_bytes(shape: ModelShape, dtype_bytes: int, kv_width: Optional[int] = None) -> float:
    """Bytes saved for the backward pass per token per transformer block.

    For Llama-family decoder blocks (RMSNorm, grouped-query attention through SDPA, gated
    MLP) as transformers writes them, with ``e`` = ``dtype_bytes``; a projection's input is saved
    only if its weight or adapter trains (a frozen projection back-propagates through its
    weight alone):

    =========================================  ============================================
    saved tensor                               bytes per token
    =========================================  ============================================
    2 RMSNorms: fp32 input, 1/rms              2 x (4h + 4), + 2 x e*h if norm weights train
    q/k/v input, if any of q/k/v trains        e*h
    SDPA: q, output (= o_proj's input)         2 x e*h
    SDPA: k, v                                 2 x e*kv_width
    SDPA: log-sum-exp (fp32, per head)         4 x heads
    gate/up input, if gate or up trains        e*h
    gate, act(gate), up                        3 x e*I
    act(gate)*up (down's input), if it trains  e*I
    LoRA: each adapter's low-rank input        e*r per adapted projection
    =========================================  ============================================

    ``kv_width`` is the width of k and v as SDPA sees them: transformers repeats them to all
    heads (``h``, the default) whenever a padding mask is present, which every padded batch
    has; without a mask they stay ``kv_heads x head_dim``. Other architectures (BERT-style
    encoders, non-Llama decoders) use the generic ``34 h`` per token per layer of Korthikanti
    et al. (2022, 16-bit, memory-efficient attention), scaled by ``e / 2``.
    """
    e, h, trains = dtype_bytes, shape.hidden_size, shape.trainable_projections
    if shape.block != "llama":
        return 34 * h * e / 2
    kv = h if kv_width is None else kv_width
    norms = 2 * (4 * h + 4 + (e * h if shape.norms_trainable else 0))
    attention = (e * h if trains & {"q_proj", "k_proj", "v_proj"} else 0) + 2 * e * h + 2 * e * kv + 4 * shape.num_heads
    inter = shape.intermediate_size
    mlp = (e * h if trains & {"gate_proj", "up_proj"} else 0) + 3 * e * inter + (e * inter if "down_proj" in trains else 0)
    lora = e * shape.lora_rank * shape.lora_modules_per_layer
    return norms + attention + mlp + lora


def outside_token_bytes(shape: ModelShape, dtype_bytes: int) -> float:
    """Bytes saved per token outside the blocks: the final norm, the rotary cos/sin (per
    position of each row: positions come from the attention mask) and, if the embedding table
    trains, the token ids (int64)."""
    h = shape.hidden_size
    if shape.block != "llama":
        return 0.0
    final_norm = 4 * h + 4 + (dtype_bytes * h if shape.norms_trainable else 0)
    ids = 8 if shape.embeddings_trainable else 0
    return final_norm + 2 * dtype_bytes * shape.head_dim + ids


def stored_token_bytes(shape: ModelShape, dtype_bytes: int, checkpointing: bool,
                       kv_width: Optional[int] = None) -> float:
    """Bytes kept per token from the forward to the backward pass, over the whole model.

    With checkpointing each block keeps only its input (``e*h``). Without it every block keeps
    :func:`layer_token_bytes`, except that the first block's input norm saves no fp32 input
    when the embeddings are frozen (nothing before it needs a gradient).
    """
    if checkpointing:
        return shape.num_layers * shape.hidden_size * dtype_bytes + outside_token_bytes(shape, dtype_bytes)
    blocks = shape.num_layers * layer_token_bytes(shape, dtype_bytes, kv_width)
    if shape.block == "llama" and not shape.embeddings_trainable:
        blocks -= 4 * shape.hidden_size + 4
    return blocks + outside_token_bytes(shape, dtype_bytes)


def activations(shape: ModelShape, config: Config) -> dict:
    """Activation bytes per GPU at the largest step of ``config``.

    The queries, passages and hard negatives of a micro-batch are encoded one after the other
    and all stay alive until the loss's backward pass. Without checkpointing each keeps every
    block's saved tensors; with it, only each block's input (``e*h`` per token per block).
    In the backward pass one block's full activations of the largest encode call are live on
    top (recomputed under checkpointing, or gradient temporaries without it).

    With gradient caching (``loss.cache_chunk_size`` = c) every encode call is at most c rows
    and only one is alive at a time: the largest chunk's stored and working activations, plus
    the cached embeddings of the whole micro-batch and their gradient. A distillation teacher
    runs without graph: one block's working activations of its largest call, and its scores.
    """
    from hybridray.engine import micro_batch_size

    e = 2 if _bf16(config) else 4
    batch = micro_batch_size(config, config.scaling.num_workers)
    k = config.loss.hard_negatives
    rows = {"queries": batch, "passages": batch, "hard_negatives": batch * k}
    lengths = {"queries": config.model.max_query_length, "passages": config.model.max_passage_length,
               "hard_negatives": config.model.max_passage_length}
    calls = {kind: rows[kind] * lengths[kind] for kind in rows}
    tokens = sum(calls.values())
    chunk = config.loss.cache_chunk_size
    if chunk:  # one chunk alive at a time
        calls = {kind: min(chunk, rows[kind]) * lengths[kind] for kind in rows}
    live = max(calls.values()) if chunk else tokens
    stored = live * stored_token_bytes(shape, e, config.model.activation_checkpointing)
    working = max(calls.values()) * layer_token_bytes(shape, e)
    if config.loss.distill_weight > 0:
        working += max(calls.values()) * layer_token_bytes(shape, e)  # the teacher's, without graph
    columns = config.sampler.batch_size * (1 + k)
    distill = 2 if config.loss.distill_weight > 0 else 1
    loss = 3 * 4 * batch * columns * (2 if config.loss.symmetric else 1) * distill  # fp32 scores, softmax, grad
    if chunk:
        loss += 2 * e * sum(rows.values()) * shape.hidden_size  # cached embeddings + their gradient
    return {"stored": stored, "working": working, "loss": loss, "tokens": tokens, "micro_batch": batch}


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU bytes of each part, their total, and whether it fits ``gpu_memory``."""

    shape: ModelShape
    world_size: int
    gpus_per_node: int
    zero_stage: int
    bf16: bool
    micro_batch: int
    parameters: float
    gathered_layer: float
    gradients: float
    optimizer: float
    activations: float
    cpu_per_node: float
    deepspeed_gpu: Optional[float]
    deepspeed_cpu: Optional[float]
    gpu_memory: float
    headroom: float

    @property
    def total(self) -> float:
        return self.parameters + self.gathered_layer + self.gradients + self.optimizer + self.activations

    @property
    def usable(self) -> float:
        """GPU memory left for the plan once the headroom (CUDA context, NCCL buffers, ZeRO-3
        prefetch, allocator fragmentation) is set aside."""
        return self.gpu_memory * (1 - self.headroom)

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    def as_dict(self) -> dict:
        out = asdict(self)
        out.update(total=self.total, usable=self.usable, fits=self.fits)
        return out


def plan(config: Config, gpu_memory_gib: float = 80.0, gpus_per_node: Optional[int] = None,
         headroom: float = 0.1, shape: Optional[ModelShape] = None) -> MemoryPlan:
    """The memory plan of ``config`` on GPUs of ``gpu_memory_gib`` GiB."""
    if gpu_memory_gib <= 0:
        raise UserError(f"--gpu-memory: must be positive, got {gpu_memory_gib}")
    if not 0 <= headroom < 1:
        raise UserError(f"--headroom: must be in [0, 1), got {headroom}")
    world = config.scaling.num_workers
    gpus_per_node = gpus_per_node or min(world, 8)
    if gpus_per_node < 1:
        raise UserError(f"--gpus-per-node: must be at least 1, got {gpus_per_node}")
    shape = shape or model_shape(config.model)
    states = model_states(shape, config, gpus_per_node)
    acts = activations(shape, config)
    return MemoryPlan(
        shape=shape, world_size=world, gpus_per_node=gpus_per_node,
        zero_stage=config.deepspeed.zero_stage, bf16=_bf16(config), micro_batch=acts["micro_batch"],
        activations=acts["stored"] + acts["working"] + acts["loss"],
        cpu_per_node=states["cpu_per_node"], deepspeed_gpu=states["deepspeed_gpu"],
        deepspeed_cpu=states["deepspeed_cpu"], gpu_memory=gpu_memory_gib * GiB, headroom=headroom,
        **states["gpu"],
    )


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def format_plan(p: MemoryPlan, config: Config) -> str:
    """The human-readable plan (what ``hybridray plan`` prints for one config)."""
    s, m = p.shape, config.model
    nodes = math.ceil(p.world_size / p.gpus_per_node)
    levers = [f"ZeRO-{p.zero_stage}", "bf16" if p.bf16 else "fp32"]
    if m.activation_checkpointing:
        levers.append("activation checkpointing")
    if config.loss.cache_chunk_size:
        levers.append(f"gradient caching ({config.loss.cache_chunk_size} texts per pass)")
    if config.loss.distill_weight > 0:
        levers.append("a frozen teacher (distillation)")
    ds = config.deepspeed
    levers += [f"{k.replace('_', ' ')}: cpu" for k in ("offload_optimizer", "offload_param") if getattr(ds, k) == "cpu"]
    trainable = f"{_count(s.trainable_params)} trainable"
    if m.lora:
        trainable += f" (LoRA r={m.lora.r}, {s.lora_modules_per_layer} modules per block)"
    lines = [
        f"model      {s.name} ({s.architecture}): {_count(s.total_params)} parameters, {trainable}, "
        f"largest layer {_count(s.largest_layer_params)}",
        f"cluster    {p.world_size} GPUs ({nodes} node(s) x {p.gpus_per_node}), {', '.join(levers)}",
        f"batch      {p.micro_batch} pairs per GPU (global {config.sampler.batch_size}); queries "
        f"{m.max_query_length} tokens, passages {m.max_passage_length} tokens, "
        f"{config.loss.hard_negatives} hard negatives per query",
        "",
        "per GPU                      GiB",
        f"  parameters           {_gib(p.parameters):>10}",
    ]
    if p.zero_stage == 3:
        lines.append(f"  gathered layer       {_gib(p.gathered_layer):>10}")
    lines += [
        f"  gradients            {_gib(p.gradients):>10}",
        f"  optimizer state      {_gib(p.optimizer):>10}",
        f"  activations          {_gib(p.activations):>10}",
        f"  total                {_gib(p.total):>10}",
        "",
        f"{'FITS' if p.fits else 'DOES NOT FIT'}: {_gib(p.total)} GiB of {_gib(p.usable)} GiB usable "
        f"({_gib(p.gpu_memory)} GiB GPU, {p.headroom:.0%} headroom)",
    ]
    if p.cpu_per_node:
        lines.append(f"CPU memory per node for offloaded state: {_gib(p.cpu_per_node)} GiB")
    if p.deepspeed_gpu is not None:
        lines.append(
            f"DeepSpeed ZeRO-{p.zero_stage} estimator for the {_count(s.trainable_params)} trainable "
            f"parameters (frozen ones are added above): {_gib(p.deepspeed_gpu)} GiB per GPU, "
            f"{_gib(p.deepspeed_cpu)} GiB CPU per node"
        )
    else:
        lines.append(f"(DeepSpeed has no estimator for ZeRO-{p.zero_stage}: same bytes per parameter, "
                     "partitioned as the stage does)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- grids
def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["sampler.batch_size=256,1024"]`` -> ``[("sampler.batch_size", ["256", "1024"])]``."""
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise UserError(f"--grid {item!r}: expected KEY=V1,V2,..., e.g. sampler.batch_size=256,1024")
        grid.append((key, values.split(",")))
    return grid


def plan_grid(tree: dict, overrides: list[str], grid: list[tuple[str, list[str]]], **kwargs) -> list[tuple[dict, MemoryPlan]]:
    """A plan per combination of grid values (the model is built once per model setting)."""
    shapes: dict[str, ModelShape] = {}
    rows = []
    for values in itertools.product(*(v for _, v in grid)):
        setting = dict(zip((k for k, _ in grid), values))
        config = build_config(tree, [*overrides, *(f"{k}={v}" for k, v in setting.items())])
        model = config.model
        key = repr((model.name_or_path, model.lora, model.freeze_embeddings))  # what the shape depends on
        if key not in shapes:
            shapes[key] = model_shape(config.model)
        rows.append((setting, plan(config, shape=shapes[key], **kwargs)))
    return rows


def format_grid(rows: list[tuple[dict, MemoryPlan]]) -> str:
    """A markdown table, one row per grid point: per-GPU GiB of model states (``params``
    includes ZeRO-3's gathered layer) and activations, whether the total fits, and the CPU
    memory per node that offloading needs."""
    keys = list(rows[0][0])
    offload = any(p.cpu_per_node for _, p in rows)
    head = [*keys, "pairs/GPU", "params", "grads", "optim", "activations", "total GiB", "fits",
            *(["CPU GiB/node"] if offload else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for setting, p in rows:
        cells = [*(setting[k] for k in keys), str(p.micro_batch), _gib(p.parameters + p.gathered_layer),
                 _gib(p.gradients), _gib(p.optimizer), _gib(p.activations), _gib(p.total),
                 "yes" if p.fits else "no", *([_gib(p.cpu_per_node)] if offload else [])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
