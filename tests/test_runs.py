"""What ``hybridray train`` decides for an existing run directory (``hybridray.runs``), on
hand-made run directories laid out as Ray Train and hybridray leave them, local and on S3.
No training here: the end-to-end re-run cases are in ``test_train.py``."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hybridray import storage
from hybridray.checkpointing import rng_state, set_rng_state
from hybridray.config import OPERATIONAL_KEYS, build_config
from hybridray.errors import UserError
from hybridray.runs import plan_run, run_dir, run_identity


def shards(directory: Path, rows: int = 4) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    table = pa.table({"group_id": [f"g{i}" for i in range(rows)], "lang": ["en"] * rows,
                      "query": ["q"] * rows, "passage": ["p"] * rows, "source": ["t"] * rows})
    pq.write_table(table, directory / "part-00000.parquet")
    (directory / "manifest.json").write_text(json.dumps({"schema_version": 1, "rows": rows}))
    return directory


def config(storage_path: str, train: str, **overrides):
    tree = {"name": "r1", "data": {"train": train, "heldout": ""}, "run": {"storage_path": storage_path},
            "train": {"max_steps": 10}}
    return build_config(tree, [f"{k}={v}" for k, v in overrides.items()])


def leave_checkpoint(config, step: int, identity=None) -> str:
    """What a run leaves after a checkpoint at ``step``: Ray Train's snapshot naming it, and
    the checkpoint's trainer state with the run's identity."""
    directory = run_dir(config)
    identity = identity or run_identity(config)
    storage.write_text(storage.join(directory, "checkpoint_manager_snapshot.json"), json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": f"checkpoint_{step}", "metrics": {"step": step}}}))
    storage.write_text(storage.join(directory, f"checkpoint_{step}", "trainer_state.json"),
                       json.dumps({"step": step, "run": identity.as_dict(), "reports": {}}))
    return directory


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path):
    """(storage path, shard dataset) on local disk or in a bucket of the session's S3 server."""
    local = shards(tmp_path / "shards")
    if request.param == "local":
        return str(tmp_path / "runs"), str(local)
    import boto3

    endpoint = request.getfixturevalue("s3_server")
    bucket = f"runs-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    storage.copy_tree(str(local), f"s3://{bucket}/shards")
    return f"s3://{bucket}/runs", f"s3://{bucket}/shards"


def test_new_resumed_and_complete(where):
    runs, train = where
    cfg = config(runs, train)
    assert plan_run(cfg, run_identity(cfg), overwrite=False).start_step == 0  # nothing there: new
    leave_checkpoint(cfg, 4)
    plan = plan_run(cfg, run_identity(cfg), overwrite=False)
    assert (plan.start_step, plan.complete) == (4, False)
    leave_checkpoint(cfg, 10)
    assert plan_run(cfg, run_identity(cfg), overwrite=False).complete


def test_operational_keys_may_change_across_a_resume(where):
    runs, train = where
    cfg = config(runs, train)
    leave_checkpoint(cfg, 4)
    changed = config(runs, train, **{"train.log_every": 1, "train.checkpoint_every": 2, "run.max_failures": 3,
                                     "scaling.cpus_per_worker": 1.0, "scaling.resources_per_worker": "{slot: 1}",
                                     "data.task_cpus": 0.5, "eval.batch_size": 8})
    assert plan_run(changed, run_identity(changed), overwrite=False).start_step == 4


def test_changed_shards_or_config_are_refused(where, tmp_path):
    runs, train = where
    cfg = config(runs, train)
    leave_checkpoint(cfg, 4)
    other = config(runs, train, **{"sampler.alpha": 0.25})
    with pytest.raises(UserError, match=r"different config \(sampler.alpha: 0.5 -> 0.25\)"):
        plan_run(other, run_identity(other), overwrite=False)
    storage.copy_tree(str(shards(tmp_path / "bigger", rows=6)), train)  # the shards rewritten
    with pytest.raises(UserError, match=r"data.train \(the data changed\)"):
        plan_run(cfg, run_identity(cfg), overwrite=False)


def test_distillation_and_gradient_caching_define_the_run(tmp_path):
    """A changed ``loss.distill_weight`` trains another model: another run. So does a changed
    ``loss.cache_chunk_size``: with dropout on, the chunked passes draw other dropout masks, so
    a resume with another value would not end with the uninterrupted run's model."""
    runs, train = str(tmp_path / "runs"), str(shards(tmp_path / "shards"))
    cfg = config(runs, train, **{"loss.distill_weight": 0.5})
    leave_checkpoint(cfg, 4)
    cached = config(runs, train, **{"loss.distill_weight": 0.5, "loss.cache_chunk_size": 4})
    with pytest.raises(UserError, match=r"different config \(loss.cache_chunk_size: 0 -> 4\)"):
        plan_run(cached, run_identity(cached), overwrite=False)
    other = config(runs, train, **{"loss.distill_weight": 0.2})
    with pytest.raises(UserError, match=r"different config \(loss.distill_weight: 0.5 -> 0.2\)"):
        plan_run(other, run_identity(other), overwrite=False)
    off = config(runs, train)
    with pytest.raises(UserError, match=r"loss.distill_weight: 0.5 -> 0.0"):
        plan_run(off, run_identity(off), overwrite=False)


def test_outputs_without_a_checkpoint_are_refused_and_overwrite_deletes(where):
    runs, train = where
    cfg = config(runs, train)
    storage.write_text(storage.join(run_dir(cfg), "summary.json"), "{}")
    with pytest.raises(UserError, match=r"holds outputs of an earlier run \(summary.json\)"):
        plan_run(cfg, run_identity(cfg), overwrite=False)
    assert plan_run(cfg, run_identity(cfg), overwrite=True).start_step == 0
    assert not storage.exists(storage.join(run_dir(cfg), "summary.json"))


def test_a_damaged_run_directory_is_one_clear_error(tmp_path):
    cfg = config(str(tmp_path / "runs"), str(shards(tmp_path / "shards")))
    directory = leave_checkpoint(cfg, 4)
    Path(directory, "checkpoint_4", "trainer_state.json").unlink()
    with pytest.raises(UserError, match="no intact checkpoint to resume from .*checkpoint_4: no trainer_state.json"):
        plan_run(cfg, run_identity(cfg), overwrite=False)
    Path(directory, "checkpoint_manager_snapshot.json").write_text('{"latest_checkpoint_result": ')
    with pytest.raises(UserError) as caught:
        plan_run(cfg, run_identity(cfg), overwrite=False)
    message = str(caught.value)  # says what is kept, and that --overwrite would delete it
    assert "checkpoint_manager_snapshot.json: not valid JSON" in message and "\n" not in message
    assert "its 1 checkpoint(s) are untouched (newest: checkpoint_4)" in message
    assert message.endswith("or pass --overwrite to delete the run and start it again")
    assert Path(directory, "checkpoint_4").is_dir()


def test_every_operational_key_is_a_real_key():
    for key in OPERATIONAL_KEYS:
        node = build_config({})
        for part in key.split("."):
            assert hasattr(node, part), key
            node = getattr(node, part)


def test_cuda_rng_state_is_saved_and_restored(monkeypatch):
    """GPU resumes are exact too: every visible device's generator goes into the checkpoint."""
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["state-gpu0", "state-gpu1"])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.setdefault("set", states))
    state = rng_state()
    assert state["cuda"] == ["state-gpu0", "state-gpu1"]
    set_rng_state(state)
    assert calls["set"] == ["state-gpu0", "state-gpu1"]


def sealed_checkpoints(cfg, steps) -> str:
    """Two sealed checkpoints (as ``checkpointing.seal`` leaves them, one rank) and a Ray Train
    snapshot listing them, the last one latest."""
    import tempfile

    from hybridray.checkpointing import seal

    directory, identity = run_dir(cfg), run_identity(cfg)
    results = []
    for step in steps:
        with tempfile.TemporaryDirectory() as local:
            Path(local, "deepspeed").mkdir()
            Path(local, "deepspeed", "model_states.pt").write_bytes(bytes(range(256)) * 64)
            Path(local, "trainer_state.json").write_text(json.dumps(
                {"step": step, "world_size": 1, "run": identity.as_dict(), "reports": {}}))
            seal(local)
            storage.copy_tree(local, storage.join(directory, f"checkpoint_{step}"))
        results.append({"checkpoint_dir_name": f"checkpoint_{step}", "metrics": {"step": step}})
    storage.write_text(storage.join(directory, "checkpoint_manager_snapshot.json"), json.dumps(
        {"checkpoint_results": results, "checkpoint_report_indices": list(range(len(results))),
         "latest_checkpoint_result": results[-1]}))
    return directory


def damage(uri: str, how: str) -> None:
    if how == "flipped byte":
        fs, path = storage.filesystem_for(uri)
        with fs.open_input_stream(path) as f:
            data = bytearray(f.read())
        data[100] ^= 0x01
        with fs.open_output_stream(path) as f:
            f.write(bytes(data))
    else:  # the seal never arrived
        fs, path = storage.filesystem_for(uri)
        fs.delete_file(path)


@pytest.mark.parametrize("how", ["flipped byte", "missing seal"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(where, how, capfd):
    from hybridray.runs import latest_checkpoint

    runs, train = where
    cfg = config(runs, train)
    directory = sealed_checkpoints(cfg, [4, 8])
    target = "deepspeed/model_states.pt" if how == "flipped byte" else "checksums_rank0.json"
    damage(storage.join(directory, "checkpoint_8", target), how)
    plan = plan_run(cfg, run_identity(cfg), overwrite=False)
    assert plan.start_step == 4 and plan.checkpoint == storage.join(directory, "checkpoint_4")
    warning = capfd.readouterr().err
    assert f"checkpoint {storage.join(directory, 'checkpoint_8')} is damaged (" in warning
    assert ("model_states.pt does not match its checksum" if how == "flipped byte" else "rank 0 never finished") in warning
    assert f"resuming from the previous checkpoint {storage.join(directory, 'checkpoint_4')} (step 4)" in warning
    # Ray Train resumes from the same checkpoint: the damaged one is gone from its snapshot
    snapshot = json.loads(storage.read_text(storage.join(directory, "checkpoint_manager_snapshot.json")))
    assert [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]] == ["checkpoint_4"]
    assert latest_checkpoint(directory)[0] == storage.join(directory, "checkpoint_4")
    # both damaged: one line naming both, nothing guessed
    sealed_checkpoints(cfg, [4, 8])
    damage(storage.join(directory, "checkpoint_8", target), how)
    damage(storage.join(directory, "checkpoint_4", target), how)
    with pytest.raises(UserError, match="no intact checkpoint to resume from .*checkpoint_8: .*checkpoint_4: ") as exc:
        plan_run(cfg, run_identity(cfg), overwrite=False)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("files, state, why", [
    ({"x": "abc"}, 1, "x: expected [size, sha256]"),
    ({}, 1, "no files listed"),
    ({"../outside": [1, "0" * 64], "trainer_state.json": [1, "0" * 64]}, 1, "not a path inside the checkpoint"),
    ({"deepspeed/model_states.pt": [16384, "0" * 64]}, 1, "trainer_state.json not listed"),
    (None, 0, "world_size 0"),
    (None, "2", "no whole-number world_size ('2')"),
    (None, True, "no whole-number world_size (True)"),
])
def test_a_malformed_seal_is_a_damaged_checkpoint_not_a_traceback(tmp_path, files, state, why):
    """A seal is data read back from storage: any shape of it is a reason, never an exception,
    and a degenerate one (nothing listed, no ranks) is not taken as intact."""
    from hybridray.checkpointing import checkpoint_problem

    checkpoint = tmp_path / "checkpoint_8"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"step": 8, "world_size": state}))
    if files is not None:
        (checkpoint / "checksums_rank0.json").write_text(json.dumps({"files": files}))
    problem = checkpoint_problem(str(checkpoint))
    assert problem is not None and why in problem, problem


def test_a_damaged_checkpoint_is_left_listed_unless_the_run_resumes(tmp_path, capfd):
    """Only a resume that goes ahead rewrites Ray Train's snapshot: not a look at the latest
    checkpoint (the failure line), not a run refused for another config."""
    from hybridray.runs import latest_checkpoint

    train = str(shards(tmp_path / "shards"))
    cfg = config(str(tmp_path / "runs"), train)
    directory = sealed_checkpoints(cfg, [4, 8])
    damage(storage.join(directory, "checkpoint_8", "deepspeed/model_states.pt"), "flipped byte")
    snapshot = storage.read_text(storage.join(directory, "checkpoint_manager_snapshot.json"))
    assert latest_checkpoint(directory)[0] == storage.join(directory, "checkpoint_4")
    other = config(str(tmp_path / "runs"), train, **{"sampler.alpha": 0.9})
    with pytest.raises(UserError, match="different config"):
        plan_run(other, run_identity(other), overwrite=False)
    assert storage.read_text(storage.join(directory, "checkpoint_manager_snapshot.json")) == snapshot
    assert "warning" not in capfd.readouterr().err
    assert plan_run(cfg, run_identity(cfg), overwrite=False).start_step == 4  # the resume repairs it
    assert "checkpoint_8" not in storage.read_text(storage.join(directory, "checkpoint_manager_snapshot.json"))


def test_sizes_only_finds_a_truncated_checkpoint_without_reading_it(tmp_path):
    """``checksums=False`` (a failed run's last line) lists sizes instead of downloading:
    it passes over a cut-short file, but a same-size corruption needs the checksums."""
    from hybridray.runs import latest_checkpoint

    cfg = config(str(tmp_path / "runs"), str(shards(tmp_path / "shards")))
    directory = sealed_checkpoints(cfg, [4, 8])
    damage(storage.join(directory, "checkpoint_8", "deepspeed/model_states.pt"), "flipped byte")
    assert latest_checkpoint(directory, checksums=False)[0] == storage.join(directory, "checkpoint_8")
    assert latest_checkpoint(directory)[0] == storage.join(directory, "checkpoint_4")
    state = Path(directory, "checkpoint_8", "deepspeed", "model_states.pt")
    state.write_bytes(state.read_bytes()[:50])
    assert latest_checkpoint(directory, checksums=False)[0] == storage.join(directory, "checkpoint_4")
