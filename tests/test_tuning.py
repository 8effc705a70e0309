"""``hybridray tune``: sweep files are validated up front; trials' resources come from the
cluster; the held-out subset is fixed and self-consistent; and three real Ray Tune sweeps
(tiny encoder, 2 CPUs): a grid with ASHA where trials are stopped early, its outputs and a
``best.yaml`` that is the best trial's run; an Optuna sweep whose driver is killed and resumed by
running the same command again, without repeating its finished trial.

Each trial is a Ray Train fit (~30-40 s of fixed overhead here): this file runs 4 trials of one
worker (ASHA) and 2 of two workers (Optuna: the held-out evaluation sharded across a trial's workers)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from hybridray.config import build_config
from hybridray.errors import UserError
from hybridray.tuning import concurrent_trials, load_sweep, trial_count, trial_resources

from conftest import REPO


def test_the_shipped_sweeps_are_valid():
    base = build_config({})
    sweep = load_sweep(REPO / "tune" / "alpha_temperature.yaml", base)
    assert sweep.metric == "val_map" and sweep.mode == "max" and sweep.search.algorithm == "grid"
    assert list(sweep.search_space) == ["sampler.alpha", "loss.temperature"]
    assert trial_count(sweep) == 10 and sweep.early_stopping is None  # the published grid: equal budgets
    asha = load_sweep(REPO / "tune" / "alpha_temperature_asha.yaml", base)
    assert asha.search.algorithm == "optuna" and asha.early_stopping.grace_period > 0


@pytest.mark.parametrize(
    "body, message",
    [
        ("search_space: {sampler.alpha: {grid: [0.5, 1.5]}}", "sampler.alpha"),
        ("search_space: {sampler.alfa: {grid: [0.5]}}", "sampler.alfa"),
        ("search_space: {loss.temperature: {normal: [1, 2]}}", "loss.temperature"),
        ("search_space: {loss.temperature: {loguniform: [0.01]}}", "[low, high]"),
        ("search_space: {}", "empty"),
        ("metrik: val_map\nsearch_space: {sampler.alpha: {grid: [0.5]}}", "metrik"),
        ("search: {algorithm: bayes}\nsearch_space: {sampler.alpha: {choice: [0.5]}}", "search.algorithm"),
        ("search: {algorithm: optuna}\nsearch_space: {sampler.alpha: {grid: [0.5]}}", "use choice"),
        ("early_stopping: {grace_period: 5}\nsearch_space: {sampler.alpha: {grid: [0.5]}}", "train.eval_every"),
        ("early_stopping: {grace_period: 500}\noverrides: {train.eval_every: 10}\n"
         "search_space: {sampler.alpha: {grid: [0.5]}}", "grace_period"),
        ("early_stopping: {grace_period: 5, reduction_factor: 1}\nsearch_space: {sampler.alpha: {grid: [0.5]}}",
         "reduction_factor"),
        ("overrides: {train.max_stepz: 5}\nsearch_space: {sampler.alpha: {grid: [0.5]}}", "train.max_stepz"),
        ("metric: val_mAP\nsearch_space: {sampler.alpha: {grid: [0.5]}}", "val_mAP"),
        ("search_space: {train.max_steps: {grid: [50, 100]}}", "one budget"),
        ("search_space: {sampler.batch_size: {uniform: [8, 32]}}", "use choice"),
        ("search_space: {loss.temperature: {loguniform: [0.0, 0.1]}}", "low > 0"),
        ("search_space: {loss.temperature: {uniform: [a, b]}}", "two numbers"),
        ("search_space: {loss.temperature: {uniform: [0.1, 0.01]}}", "low < high"),
        ("search_space: {loss.temperature: {uniform: [0.01, .inf]}}", "both finite"),
        ("search_space: [sampler.alpha]", "search_space: expected a mapping"),
        ("metric: loss\nsearch_space: {sampler.alpha: {grid: [0.5]}}\nmetric: val_map", "line 3: key 'metric' given twice"),
        ("search_space: {sampler.alpha: {grid: [0.5]}, sampler.alpha: {grid: [0.9]}}",
         "line 1: key 'sampler.alpha' given twice"),
        ("num_samples: true\nsearch_space: {sampler.alpha: {grid: [0.5]}}", "num_samples: expected a int, got a boolean"),
    ],
)
def test_bad_sweeps_name_the_problem(tmp_path, body, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(body)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        load_sweep(path, build_config({}))
    assert str(path) in str(info.value)


def test_a_val_metric_needs_heldout_data(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text("search_space: {sampler.alpha: {grid: [0.5]}}")
    with pytest.raises(UserError, match="data.heldout"):
        load_sweep(path, build_config({"data": {"heldout": ""}}))


def test_concurrent_trials_is_what_the_cluster_holds():
    two_workers = build_config({"scaling": {"num_workers": 2, "cpus_per_worker": 0.5}})
    need = trial_resources(two_workers)
    assert need == {"CPU": pytest.approx(0.1 + 2 * 0.5 + 2 * 0.25)}
    assert concurrent_trials(need, {"CPU": 2.0}) == 1  # two would starve each other (the 2-core deadlock)
    assert concurrent_trials(need, {"CPU": 16.0}) == 10
    gpus = trial_resources(build_config({"scaling": {"num_workers": 4, "use_gpu": True, "cpus_per_worker": 2}}))
    assert concurrent_trials(gpus, {"CPU": 64.0, "GPU": 8.0}) == 2
    assert concurrent_trials(gpus, {"CPU": 64.0}) == 0
    slots = trial_resources(build_config({"scaling": {"resources_per_worker": {"trainer_slot": 1}}}))
    assert concurrent_trials(slots, {"CPU": 64.0, "trainer_slot": 4.0}) == 2


def test_heldout_subset_is_fixed_and_self_consistent(mlqa_prepared):
    from hybridray.evaluate.lareqa import load_lareqa, subset_lareqa

    full = load_lareqa(mlqa_prepared / "heldout-lareqa")
    part = subset_lareqa(full, 150)
    again = subset_lareqa(load_lareqa(mlqa_prepared / "heldout-lareqa"), 150)
    assert part.question_ids == again.question_ids  # the same subset every time
    n = sum(len(part.question_ids[lang]) for lang in part.langs)
    assert 140 <= n <= 150
    ids = {lang: set(part.question_ids[lang]) for lang in part.langs}
    chosen = set().union(*ids.values())
    for lang in full.langs:  # whole questions: every language version of a chosen id
        assert {q for q in full.question_ids[lang] if q in chosen} == ids.get(lang, set())
    for lang in part.langs:  # each gold sentence is still the same sentence, and every candidate
        for qid, gold in zip(part.question_ids[lang], part.gold[lang]):  # is from a chosen paragraph
            i = full.question_ids[lang].index(qid)
            assert part.sentences[lang][gold] == full.sentences[lang][full.gold[lang][i]]
        assert set(part.contexts[lang]) == {part.contexts[lang][g] for g in part.gold[lang]}
        assert len(part.sentences[lang]) < len(full.sentences[lang])
    assert subset_lareqa(full, 10**6) is full


def sweep_config(tmp_path, mlqa_prepared, workers=2, **train):
    return {
        "name": f"sweep-{uuid.uuid4().hex[:6]}",
        "model": {"name_or_path": "builtin:tiny", "max_query_length": 24, "max_passage_length": 32},
        "data": {"train": str(mlqa_prepared / "train"), "heldout": str(mlqa_prepared / "heldout-lareqa")},
        "sampler": {"batch_size": 8},
        "optim": {"warmup_steps": 1},
        "train": {"max_steps": 6, "checkpoint_every": 0, "eval_before": False, "eval_every": 2,
                  "eval_max_queries": 60, "log_every": 1, **train},
        "run": {"storage_path": str(tmp_path / "runs"), "max_failures": 0},
        "eval": {"batch_size": 32, "max_length": 32},
        "scaling": {"num_workers": workers, "cpus_per_worker": 1.0 / workers},
    }


@pytest.mark.ray
def test_asha_grid_stops_weak_trials_writes_results_and_best_yaml_is_the_best_trial(ray_session, tmp_path, mlqa_prepared,
                                                                          capsys):
    """α × lr grid, run in Tune's order (keys sorted by name, the first varies fastest):
    (1e-4, α 0), (0.5, α 0), (1e-4, α 1), (0.5, α 1). lr=0.5 wrecks the encoder, and ASHA
    (rungs at steps 2 and 4) stops those trials at step 2, behind the good ones; the first trial
    is alone at every rung and runs to the end. Every trial after a stopped one needs the CPUs
    the stopped one held (one trial fills this 2-CPU Ray), so their finishing shows a stopped
    trial frees its resources."""
    from hybridray.runs import plan_run, run_dir, run_identity
    from hybridray.tuning import run_sweep

    # one worker of 1 CPU per trial: the same footprint as two of 0.5 (one trial fills this
    # 2-CPU Ray), one Train worker process fewer to start for each of the four trials
    config = build_config(sweep_config(tmp_path, mlqa_prepared, workers=1))
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({
        "metric": "val_map", "mode": "max",
        "early_stopping": {"grace_period": 2, "reduction_factor": 2},
        "search_space": {"sampler.alpha": {"grid": [0.0, 1.0]}, "optim.lr": {"grid": [1e-4, 0.5]}},
    }, sort_keys=False))
    summary = run_sweep(config, sweep)
    out = capsys.readouterr().out
    rows = summary["rows"]
    assert len(rows) == 4 and summary["failed"] == 0
    wrecked = [r for r in rows if r["params"]["optim.lr"] == 0.5]
    assert all(r["stopped_early"] and r["steps"] == 2 for r in wrecked)  # behind at the first rung
    assert rows[0]["steps"] == 6 and not rows[0]["stopped_early"]  # the first trial is alone at every rung
    assert summary["stopped_early"] == sum(r["steps"] < 6 for r in rows) >= 2
    assert summary["best"]["params"]["optim.lr"] == 1e-4 and summary["best"]["steps"] == 6
    complete = [r for r in rows if r["status"] == "complete"]  # the best is the highest final val_map of those
    assert summary["best"]["trial"] == max(complete, key=lambda r: r["final"])["trial"]
    for r in rows:
        assert 0.0 < r["final"] <= 1.0 and r["best"] >= r["final"] and r["wall_s"] > 0
        assert r["val_map_mono"] is not None and r["val_rank_distance"] is not None
        assert [s for s, _ in r["history"]] == list(range(2, r["steps"] + 1, 2))  # every evaluation reached Tune

    directory = tmp_path / "runs" / f"{config.name}-sweep"
    assert out.count("[hybridray] trial ") == 4 and "stopped early at step" in out
    assert f"hybridray train {directory / 'best.yaml'}" in out
    csv_rows = (directory / "results.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 5 and csv_rows[0].startswith("trial,sampler.alpha,optim.lr,final_val_map,best_val_map")
    markdown = (directory / "results.md").read_text()
    assert markdown.count("\n| ") == 5 and "| α | optim.lr |" in markdown and "stopped early" in markdown
    assert (directory / "plots" / "val_map_vs_alpha.png").stat().st_size > 10_000
    assert (directory / "plots" / "heatmap.png").stat().st_size > 10_000
    for r in rows:  # each trial trained in its own run directory, and only stopped ones short of the end
        assert (directory / "trials" / f"{config.name}-{r['trial']}").is_dir()

    # best.yaml is a whole config: the best trial's values, the sweep's overrides, a new name
    best_yaml = directory / "best.yaml"
    from hybridray.config import load_config

    best = load_config(best_yaml)
    assert best.name == f"{config.name}-best" and best.optim.lr == 1e-4
    assert best.sampler.alpha == summary["best"]["params"]["sampler.alpha"]
    assert best.train.eval_max_queries == 60 and best.train.max_steps == 6
    # training best.yaml trains what the best trial trained: the same run identity (defining
    # config values and training data) as the one its final checkpoint recorded
    trial_dir = directory / "trials" / f"{config.name}-{summary['best']['trial']}"
    states = sorted(trial_dir.glob("checkpoint_*/trainer_state.json"))
    assert states, f"no checkpoint in {trial_dir}"
    recorded = json.loads(states[-1].read_text())["run"]
    assert run_identity(best).fingerprint == recorded["fingerprint"], run_identity(best).differences(recorded)
    plan = plan_run(best, run_identity(best), overwrite=False)  # what `hybridray train best.yaml` does first:
    assert plan.start_step == 0 and not plan.complete  # a new run of its own, not a trial's directory
    assert run_dir(best) == str(tmp_path / "runs" / best.name)


HYBRIDRAY = [sys.executable, "-m", "hybridray.cli"]


def _tune_command(tmp_path, config_path, sweep_path):
    return subprocess.Popen(
        [*HYBRIDRAY, "tune", str(config_path), "--sweep", str(sweep_path)], cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "RAY_ENABLE_AUTO_CONNECT": "0"},
    )


def _last_step(trial_dir: Path):
    """The step of a Tune trial's last result (its progress.csv), None before any."""
    import csv

    progress = trial_dir / "progress.csv"
    rows = list(csv.DictReader(progress.open())) if progress.is_file() else []
    return int(rows[-1]["step"]) if rows else None


def _saved_a_finished_trial(directory: Path) -> bool:
    """Tune's experiment state in the sweep directory (what a resume restores) lists a
    finished trial: Tune saves it every 10 s or more, not when a trial ends."""
    for path in directory.glob("experiment_state-*.json"):
        try:
            trials = json.loads(path.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):  # being written
            continue
        if any('"status": "TERMINATED"' in state for state, _ in trials):
            return True
    return False


@pytest.mark.ray
def test_optuna_sweep_killed_and_resumed_does_not_repeat_finished_trials(tmp_path, mlqa_prepared):
    """``hybridray tune`` as a user runs it, in its own process and its own local Ray: an
    Optuna (TPE) sweep of 2 trials whose driver is killed (SIGKILL, no chance to save
    anything) while its second trial trains; the same command again keeps the first trial as
    it was and finishes the second; a changed base config under the same name is refused."""
    config_path = tmp_path / "config.yaml"
    # 2 workers: the sharded held-out val_map that Tune decides on
    config_path.write_text(yaml.safe_dump(sweep_config(tmp_path, mlqa_prepared, max_steps=4)))
    sweep_path = tmp_path / "sweep.yaml"
    sweep_path.write_text(yaml.safe_dump({
        "metric": "val_map", "mode": "max", "num_samples": 2, "search": {"algorithm": "optuna", "seed": 3},
        "search_space": {"sampler.alpha": {"uniform": [0.0, 1.0]}, "loss.temperature": {"choice": [0.02, 0.05]}},
    }))
    name = yaml.safe_load(config_path.read_text())["name"]
    directory = tmp_path / "runs" / f"{name}-sweep"

    first = _tune_command(tmp_path, config_path, sweep_path)
    seen = []
    try:
        deadline = time.monotonic() + 400
        for line in first.stdout:
            seen.append(line)
            if line.startswith("[hybridray] trial 1/2"):
                break
            assert time.monotonic() < deadline, "".join(seen)
        else:
            pytest.fail("the sweep ended before its first trial finished:\n" + "".join(seen))
        # the second trial has begun (its run directory), and Tune has saved its state since trial 1 ended
        while not (len(list((directory / "trials").iterdir())) >= 2 and _saved_a_finished_trial(directory)):
            assert first.poll() is None and time.monotonic() < deadline, "".join(seen)
            time.sleep(0.2)
        assert first.poll() is None, "".join(seen)
    finally:
        os.kill(first.pid, signal.SIGKILL)  # the driver only, as `kill -9` would: Ray's processes share its fate
        first.wait(timeout=60)
        time.sleep(2)
        try:  # and anything of its session that outlived it, so that nothing is left running
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    finished = {p.name: (p / "progress.csv").read_text() for p in directory.iterdir() if _last_step(p) == 4}
    assert len(finished) == 1, finished  # one trial had finished when the driver died
    assert not (directory / "results.csv").exists()

    second = _tune_command(tmp_path, config_path, sweep_path)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out
    assert "resuming the sweep" in out
    assert out.count("[hybridray] trial ") == 1 and "trial 2/2" in out, out  # only the unfinished one ran
    for trial, progress in finished.items():
        assert (directory / trial / "progress.csv").read_text() == progress  # not run again
    summary = (directory / "results.csv").read_text().strip().splitlines()
    assert len(summary) == 3
    rows = [dict(zip(summary[0].split(","), line.split(","))) for line in summary[1:]]
    assert all(r["status"] == "complete" and r["steps"] == "4" for r in rows)
    assert (directory / "best.yaml").is_file()
    params = [(float(r["sampler.alpha"]), float(r["loss.temperature"])) for r in rows]
    assert len(set(params)) == 2  # TPE proposed two different trials

    third = subprocess.run([*HYBRIDRAY, "tune", str(config_path), "sampler.batch_size=16", "--sweep", str(sweep_path)],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert third.returncode == 2 and "holds another sweep" in third.stderr


def test_a_sweep_is_the_same_sweep_only_on_the_same_training_data(tmp_path, mlqa_prepared):
    """Resuming a sweep directory compares identities: moved shards are the same data, changed
    shards are not (the finished trials were trained on the old data)."""
    import shutil

    from hybridray.tuning import _identity

    path = tmp_path / "sweep.yaml"
    path.write_text("search_space: {sampler.alpha: {grid: [0.5, 1.0]}}")
    moved, changed = tmp_path / "moved", tmp_path / "changed"
    shutil.copytree(mlqa_prepared / "train", moved)
    shutil.copytree(mlqa_prepared / "train", changed)
    shard = sorted(p for p in changed.iterdir() if p.suffix in (".jsonl", ".parquet"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    def identity(train):
        base = build_config({"data": {"train": str(train), "heldout": str(mlqa_prepared / "heldout-lareqa")}})
        return _identity(base, load_sweep(path, base), 1)

    assert identity(mlqa_prepared / "train") == identity(moved)
    assert identity(mlqa_prepared / "train") != identity(changed)
