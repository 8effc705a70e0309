"""``hybridray train`` with a decoder LLM, as a user runs it: the tiny decoder, 2 Ray workers,
ZeRO-3 with the model loaded into partitions, LoRA and activation checkpointing, real MLQA-R
shards through Ray Data, held-out evaluation before and after, and the export (merged model
plus adapter). One ``fit()`` (~1 min here)."""
from __future__ import annotations

import json
import shutil
import subprocess
import uuid

import pytest
import yaml

from conftest import REPO
from test_train import small_heldout  # noqa: F401 (fixture)

pytestmark = pytest.mark.ray

HYBRIDRAY = shutil.which("hybridray", path=str(REPO / ".venv" / "bin")) or shutil.which("hybridray")


def test_hybridray_train_decoder_lora_zero3(tmp_path, mlqa_prepared, small_heldout):  # noqa: F811
    from sentence_transformers import SentenceTransformer

    name = f"llm-{uuid.uuid4().hex[:8]}"
    config = {
        "name": name,
        "model": {
            "name_or_path": "builtin:tiny-decoder", "pooling": "last", "padding_side": "left",
            "max_query_length": 24, "max_passage_length": 32, "activation_checkpointing": True,
            "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"},
        },
        "data": {"train": str(mlqa_prepared / "train"), "heldout": str(small_heldout)},
        "sampler": {"alpha": 0.5, "batch_size": 8},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"max_steps": 4, "checkpoint_every": 4, "log_every": 2},
        "deepspeed": {"zero_stage": 3},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "run": {"storage_path": str(tmp_path / "runs"), "max_failures": 0},
        "eval": {"batch_size": 32, "max_length": 32},
    }
    path = tmp_path / "decoder.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([HYBRIDRAY, "train", str(path)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 4/4" in result.stdout

    run_dir = tmp_path / "runs" / name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["step"] == 4 and "val_map" in summary["metrics"]
    for stage in ("before", "after"):
        report = json.loads((run_dir / "eval" / stage / "report.json").read_text())
        assert 0.0 < report["summary"]["map"]["multi"] <= 1.0
        assert report["settings"]["pooling"] == "last"
        assert report["settings"]["query_prefix"].startswith("Instruct: ")
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4
    model = SentenceTransformer(str(run_dir / "model"), device="cpu")
    assert model.tokenizer.padding_side == "left"
    assert model.tokenizer("hallo")["input_ids"][-1] == model.tokenizer.eos_token_id
    assert model.encode(["Wie heißt die Hauptstadt?"], prompt_name="query").shape == (1, 64)
