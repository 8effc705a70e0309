"""LoRA adapters through ``peft``: train a few low-rank matrices, keep the base model frozen.

``model.lora: {r, alpha, dropout, target_modules}`` wraps the loaded encoder in a
``peft.PeftModel`` before DeepSpeed sees it, so only the adapters reach the optimizer (and
ZeRO partitions only their gradients and optimizer state). The loss, the gathered negatives and
the training loop do not know LoRA is there: the wrapped model takes the same inputs and
returns the same ``last_hidden_state``.

Export writes the adapter merged into the base weights (a plain transformers model that
sentence-transformers loads with no ``peft`` installed) and, optionally, the adapter alone.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional, Union

from torch import nn

from hybridray.errors import UserError


def apply_lora(model: nn.Module, lora_cfg) -> nn.Module:
    """``model`` wrapped with LoRA adapters (``lora_cfg`` is ``hybridray.config.LoraSection``);
    every base parameter is frozen by ``peft``."""
    from peft import LoraConfig, get_peft_model

    targets = lora_cfg.target_modules
    peft_config = LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(targets) if isinstance(targets, list) else targets,
        bias="none",
    )
    try:
        return get_peft_model(model, peft_config)
    except ValueError as exc:  # peft's "Target modules {...} not found in the base model"
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise UserError(
            f"model.lora.target_modules: {exc.args[0].splitlines()[0]} (linear layers of this "
            f"model: {', '.join(names)})"
        ) from None


def is_lora(model: nn.Module) -> bool:
    """True for a ``peft`` model (duck-typed: importing peft is not free)."""
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def export_lora(model: nn.Module, adapter_directory: Optional[Union[str, Path]] = None) -> nn.Module:
    """The adapters merged into a copy of the base weights (a plain transformers model);
    ``adapter_directory`` also receives the adapter alone (``peft`` format, loadable with
    ``PeftModel.from_pretrained(base, adapter_directory)``).

    ``model`` is left untouched and must hold full tensors (under ZeRO-3, call this inside
    ``GatheredParameters``). The copy is built from the state dict on a CPU model whose
    parameters start on the ``meta`` device, so the base is never held twice.
    """
    from accelerate import init_empty_weights
    from peft import get_peft_model
    from transformers import AutoModel

    state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
    base_config = copy.deepcopy(model.get_base_model().config)
    peft_config = copy.deepcopy(model.peft_config["default"])
    # where the base weights came from (a hub id or directory), recorded in adapter_config.json
    peft_config.base_model_name_or_path = base_config._name_or_path or None
    with init_empty_weights():  # parameters on meta; buffers (e.g. RoPE frequencies) real
        copy_model = get_peft_model(AutoModel.from_config(base_config), peft_config)
    copy_model.load_state_dict(state, strict=True, assign=True)
    if adapter_directory is not None:
        copy_model.save_pretrained(str(adapter_directory))
    return copy_model.merge_and_unload()
