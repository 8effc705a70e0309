"""``hybridray tune``: sweep files are validated up front, and a real two-trial Ray Tune sweep
of ``sampler.alpha`` (tiny encoder) reports held-out mAP per trial."""
from __future__ import annotations

import json
import uuid

import pytest

from hybridray.config import build_config
from hybridray.errors import UserError
from hybridray.tuning import load_sweep

from conftest import REPO


def test_the_shipped_sweep_is_valid():
    sweep = load_sweep(REPO / "tune" / "alpha_temperature.yaml", build_config({}))
    assert sweep["metric"] == "val_map" and sweep["mode"] == "max"
    assert set(sweep["search_space"]) == {"sampler.alpha", "loss.temperature"}


@pytest.mark.parametrize(
    "body, message",
    [
        ("search_space: {sampler.alpha: {grid: [0.5, 1.5]}}", "sampler.alpha"),
        ("search_space: {sampler.alfa: {grid: [0.5]}}", "sampler.alfa"),
        ("search_space: {loss.temperature: {normal: [1, 2]}}", "loss.temperature"),
        ("search_space: {loss.temperature: {loguniform: [0.01]}}", "[low, high]"),
        ("search_space: {}", "empty"),
        ("metrik: val_map\nsearch_space: {sampler.alpha: {grid: [0.5]}}", "metrik"),
    ],
)
def test_bad_sweeps_name_the_problem(tmp_path, body, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(body)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_sweep(path, build_config({}))


@pytest.mark.ray
def test_two_trial_alpha_sweep_reports_heldout_map(ray_session, tmp_path, mlqa_prepared):
    from hybridray.tuning import run_sweep

    heldout = tmp_path / "heldout"
    heldout.mkdir()
    for lang in ("de", "en"):
        data = json.loads((mlqa_prepared / "heldout-lareqa" / f"{lang}.json").read_text())
        data["data"] = data["data"][:4]
        (heldout / f"{lang}.json").write_text(json.dumps(data))
    config = build_config({
        "name": f"sweep-{uuid.uuid4().hex[:6]}",
        "model": {"name_or_path": "builtin:tiny", "max_query_length": 24, "max_passage_length": 32},
        "data": {"train": str(mlqa_prepared / "train"), "heldout": str(heldout)},
        "sampler": {"batch_size": 8},
        "train": {"max_steps": 2, "checkpoint_every": 0, "eval_before": False},
        "run": {"storage_path": str(tmp_path / "runs"), "max_failures": 0},
        "eval": {"batch_size": 32, "max_length": 32},
    })
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("metric: val_map\nmode: max\nsearch_space: {sampler.alpha: {grid: [0.0, 1.0]}}\n")
    best = run_sweep(config, sweep)
    assert best["best_params"]["sampler.alpha"] in (0.0, 1.0)
    assert 0.0 < best["best_metrics"]["val_map"] <= 1.0
    assert sorted(t["config/sampler.alpha"] for t in best["trials"]) == [0.0, 1.0]
    assert all(0.0 < t["val_map"] <= 1.0 for t in best["trials"])
