"""End-to-end Ray Train runs (tiny encoder, 2 CPU workers, DeepSpeed): held-out evaluation
before/after, export, and resume after a worker crash equal to an uninterrupted run.

Each ``fit()`` costs ~45 s of fixed Ray overhead here, so this file runs three of them.
"""
from __future__ import annotations

import json
import uuid

import pytest
import torch

from conftest import SHARED_DATA
from hybridray.config import build_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from hybridray.train import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def small_heldout(tmp_path_factory, mlqa_prepared):
    """A small LAReQA held-out dir: the first few held-out articles of 3 languages."""
    out = tmp_path_factory.mktemp("heldout-small")
    for lang in ("de", "en", "es"):
        data = json.loads((mlqa_prepared / "heldout-lareqa" / f"{lang}.json").read_text())
        data["data"] = data["data"][:6]
        (out / f"{lang}.json").write_text(json.dumps(data))
    return out


def tiny_config(tmp_path, mlqa_prepared, heldout, **overrides):
    tree = {
        "name": f"t-{uuid.uuid4().hex[:8]}",
        "model": {"name_or_path": "builtin:tiny", "max_query_length": 24, "max_passage_length": 32},
        "data": {"train": str(mlqa_prepared / "train"), "heldout": str(heldout)},
        "sampler": {"alpha": 0.5, "batch_size": 8},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"max_steps": 6, "checkpoint_every": 3, "log_every": 3, "eval_every": 0},
        "deepspeed": {"zero_stage": 1},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "run": {"storage_path": str(tmp_path / "runs"), "max_failures": 0},
        "eval": {"batch_size": 32, "max_length": 32},
    }
    return build_config(tree, [f"{k}={v}" for k, v in overrides.items()])


def load_export(path):
    """The exported weights exactly as saved (no loader adds or initialises anything)."""
    from pathlib import Path

    from safetensors.torch import load_file

    return load_file(Path(path) / "model.safetensors")


def test_run_evaluates_before_and_after_and_exports(ray_local, tmp_path, mlqa_prepared, small_heldout):
    from sentence_transformers import SentenceTransformer

    from hybridray.train import run_training

    suite = tmp_path / "suite.yaml"  # train.final_eval_suite: one small TyDi task after training
    suite.write_text(json.dumps({"max_length": 32, "tasks": [{"name": "tydi-sw", "kind": "tydi", "langs": ["sw"],
                                 "path": str(SHARED_DATA / "tydiqa-goldp"), "distractors": False}]}))
    config = tiny_config(tmp_path, mlqa_prepared, small_heldout, **{"train.final_eval_suite": str(suite)})
    summary = run_training(config)
    run_dir = tmp_path / "runs" / config.name
    suite_report = json.loads((run_dir / "eval" / "suite" / "report.json").read_text())
    assert summary["final_eval_suite"] == str(run_dir / "eval" / "suite")
    assert suite_report["model"] == str(run_dir / "model")
    assert suite_report["tasks"]["tydi-sw"]["per_language"]["sw"]["n_queries"] == 499
    metrics = summary["metrics"]
    assert metrics["step"] == 6
    for key in ("val_map", "val_map_mono", "val_map_cross", "val_rank_distance", "before_val_map",
                "loss", "lr", "samples_per_s", "tokens_per_s"):
        assert key in metrics, key
    assert metrics["mono_batches"] + metrics["cross_batches"] == 3  # the last log window
    for stage in ("before", "after"):
        report = json.loads((run_dir / "eval" / stage / "report.json").read_text())
        assert 0.0 < report["summary"]["map"]["multi"] <= 1.0
        assert (run_dir / "eval" / stage / "report.md").exists()
    model = SentenceTransformer(str(run_dir / "model"), device="cpu")
    assert model.encode(["query: hallo welt"]).shape == (1, 64)


def test_resume_after_worker_crash_matches_uninterrupted_run(ray_local, tmp_path, mlqa_prepared, small_heldout):
    from hybridray.train import run_training

    common = {"data.heldout": "''", "train.eval_before": "false"}
    straight = run_training(tiny_config(tmp_path / "a", mlqa_prepared, small_heldout, **common))
    marker = tmp_path / "crashed-once"
    resumed = run_training(
        tiny_config(tmp_path / "b", mlqa_prepared, small_heldout, **common, **{"run.max_failures": 1}),
        inject_fault=(4, str(marker)),
    )
    assert marker.exists(), "the injected crash did not happen"
    a, b = load_export(straight["model"]), load_export(resumed["model"])
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    assert resumed["metrics"]["loss"] == pytest.approx(straight["metrics"]["loss"], rel=1e-5)
