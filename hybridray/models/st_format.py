"""The sentence-transformers side of a model directory: written once here, for the offline
encoder build and for trained-model export alike."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

#: Our pooling mode -> the ``1_Pooling/config.json`` flag that means it.
POOLING_FLAGS = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "last": "pooling_mode_lasttoken",
}
CONFIG_NAME = "config_sentence_transformers.json"


def write_sentence_transformers_files(
    directory: Path,
    *,
    dim: int,
    max_seq_length: int,
    prompts: Optional[dict[str, str]],
    pooling: str = "mean",
    model_args: Optional[dict] = None,
) -> None:
    """Transformer -> Pooling (``pooling``) -> Normalize, so ``SentenceTransformer(directory)``
    loads the HF model in ``directory`` and embeds as hybridray does. ``prompts`` (e.g.
    ``{"query": "query: ", "passage": "passage: "}``) serve ``prompt_name=`` and
    :func:`read_prompts`."""
    directory = Path(directory)
    modules = [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate([("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")])
    ]
    pooling_config = {"word_embedding_dimension": dim}
    pooling_config.update({flag: mode == pooling for mode, flag in POOLING_FLAGS.items()})
    pooling_config.update(pooling_mode_max_tokens=False, pooling_mode_mean_sqrt_len_tokens=False)
    bert_config = {"max_seq_length": max_seq_length, "do_lower_case": False}
    if model_args:
        bert_config["model_args"] = model_args
    files = {
        "modules.json": modules,
        "sentence_bert_config.json": bert_config,
        CONFIG_NAME: {"prompts": prompts or {}, "default_prompt_name": None, "similarity_fn_name": "cosine"},
        "1_Pooling/config.json": pooling_config,
    }
    (directory / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (directory / "2_Normalize").mkdir(exist_ok=True)
    for name, content in files.items():
        (directory / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def read_prompts(directory: str | Path) -> Optional[tuple[str, str]]:
    """``(query prompt, passage prompt)`` recorded in a local model directory, if any."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        return None
    prompts = json.loads(path.read_text(encoding="utf-8")).get("prompts") or {}
    if "query" not in prompts and "passage" not in prompts:
        return None
    return prompts.get("query", ""), prompts.get("passage", "")


def read_pooling(directory: str | Path) -> Optional[str]:
    """The pooling mode recorded in a local model directory's ``1_Pooling/config.json``."""
    path = Path(directory) / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    flags = json.loads(path.read_text(encoding="utf-8"))
    modes = [mode for mode, flag in POOLING_FLAGS.items() if flags.get(flag)]
    return modes[0] if len(modes) == 1 else None
