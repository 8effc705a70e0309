"""End-to-end Ray Train runs (tiny encoder, 2 CPU workers, DeepSpeed): held-out evaluation
before/after, export; and what a re-run of an existing run does (complete, refused). Resumes
after real faults (a worker or the driver killed, storage down, a damaged checkpoint, a hung
worker) are in ``test_faults.py``.

Each ``fit()`` costs ~45 s of fixed Ray overhead here, so this file runs two of them.
"""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import pytest

from conftest import SHARED_DATA, heldout_subset
from hybridray.config import build_config

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def small_heldout(tmp_path_factory, mlqa_prepared):
    """A small LAReQA held-out dir: the first few held-out articles of 3 languages."""
    return heldout_subset(tmp_path_factory.mktemp("heldout-small"), mlqa_prepared, articles=6)


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
    from safetensors.torch import load_file

    return load_file(Path(path) / "model.safetensors")


@pytest.fixture(scope="module")
def finished(ray_session, tmp_path_factory, mlqa_prepared, small_heldout):
    """One uninterrupted run with a final evaluation suite (one small TyDi task): what the
    export test checks, and a finished run for the re-run test to run again."""
    from hybridray.train import run_training

    tmp_path = tmp_path_factory.mktemp("finished")
    suite = tmp_path / "suite.yaml"  # train.final_eval_suite: one small TyDi task after training
    suite.write_text(json.dumps({"max_length": 32, "tasks": [{"name": "tydi-sw", "kind": "tydi", "langs": ["sw"],
                                 "path": str(SHARED_DATA / "tydiqa-goldp"), "distractors": False}]}))
    config = tiny_config(tmp_path, mlqa_prepared, small_heldout, **{"train.final_eval_suite": str(suite)})
    return config, run_training(config), tmp_path


def test_run_evaluates_before_and_after_and_exports(finished):
    from sentence_transformers import SentenceTransformer

    config, summary, tmp_path = finished
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
    assert_after_equals_one_process(config, run_dir)


def assert_after_equals_one_process(config, run_dir):
    """The held-out evaluation after training, encoded by the 2 Ray Train workers (a shard
    each), scores what one process scores with the exported model."""
    from hybridray.data.tokenize import prefixes
    from hybridray.evaluate.lareqa import evaluate_lareqa
    from hybridray.models import load_encoder
    from test_distributed_eval import assert_same_scores

    got = json.loads((run_dir / "eval" / "after" / "report.json").read_text())
    model, tokenizer = load_encoder(str(run_dir / "model"))
    query_prefix, passage_prefix = prefixes(config.model)
    want = evaluate_lareqa(model, tokenizer, config.data.heldout, query_prefix=query_prefix,
                           passage_prefix=passage_prefix, pooling=config.model.pooling,
                           max_length=config.eval.max_length, batch_size=config.eval.batch_size)
    assert got["timing"]["encode_workers"] == 2
    assert_same_scores(got, want)


def test_distillation_with_gradient_caching_trains_end_to_end(ray_session, tmp_path, mlqa_prepared, small_heldout):
    """``loss.distill_weight`` and ``loss.cache_chunk_size`` through the real trainer (ZeRO-2,
    2 workers): the run trains, evaluates and exports the student alone; the checkpoint holds
    no teacher weights (a resume rebuilds it: test_distributed_equivalence.py)."""
    import torch

    from hybridray.train import run_training

    config = tiny_config(tmp_path, mlqa_prepared, small_heldout, **{
        "loss.distill_weight": 0.5, "loss.cache_chunk_size": 2, "deepspeed.zero_stage": 2,
        "train.max_steps": 4, "train.checkpoint_every": 4, "train.log_every": 2, "train.eval_before": "false"})
    summary = run_training(config)
    run_dir = tmp_path / "runs" / config.name
    assert summary["metrics"]["step"] == 4
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(0 < loss < 100 for loss in losses)
    kls = [json.loads(line).get("distill_kl") for line in (run_dir / "metrics.jsonl").read_text().splitlines()
           if "loss" in json.loads(line)]
    assert len(kls) == len(losses) and all(kl is not None and 0 <= kl < 100 for kl in kls)  # logged, as a KL
    assert 0.0 < json.loads((run_dir / "eval" / "after" / "report.json").read_text())["summary"]["map"]["multi"] <= 1.0
    states = list(Path(summary["checkpoint"]).glob("deepspeed/mp_rank_00_model_states.pt"))
    assert len(states) == 1
    saved = torch.load(states[0], weights_only=False)["module"]
    assert any(k.startswith("encoder.") for k in saved) and not any(k.startswith("teacher.") for k in saved)
    exported = load_export(summary["model"])
    assert exported and not any("teacher" in k for k in exported)


def test_rerunning_a_run_never_reuses_it_for_another_config(finished, tmp_path):
    """As a user would: the same command again says the run is complete (no training); a
    changed config is refused naming the key; --overwrite starts again."""
    from hybridray.config import dump_config
    from hybridray.runs import plan_run, run_dir, run_identity

    config, summary, _ = finished
    path = tmp_path / "run.yaml"
    path.write_text(dump_config(config))
    again = run_cli("train", str(path))
    assert again.returncode == 0, again.stderr
    assert f"run {config.name!r} is already complete (6/6 steps)" in again.stderr
    assert json.loads((Path(run_dir(config)) / "summary.json").read_text())["metrics"]["step"] == 6
    changed = run_cli("train", str(path), "sampler.alpha=1.0", "loss.temperature=0.02")
    assert changed.returncode == 2
    assert "was trained with a different config (loss.temperature: 0.05 -> 0.02; sampler.alpha: 0.5 -> 1.0)" in changed.stderr
    assert "--overwrite" in changed.stderr and len(changed.stderr.strip().splitlines()) == 1
    assert load_export(summary["model"])  # the finished run is untouched

    copy = config.model_copy(update={"name": config.name + "-copy"})
    shutil.copytree(run_dir(config), run_dir(copy))
    identity = run_identity(copy)
    assert plan_run(copy, identity, overwrite=False).complete
    assert plan_run(copy, identity, overwrite=True).start_step == 0
    assert not Path(run_dir(copy)).exists()


def run_cli(*args):
    import subprocess

    from conftest import REPO

    return subprocess.run([str(REPO / ".venv" / "bin" / "hybridray"), *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
