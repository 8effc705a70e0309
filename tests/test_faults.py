"""Real faults, injected by the OS into `hybridray train` run as a user runs it (the CLI, its
own local Ray): a training worker SIGKILLed mid-run, the driver SIGKILLed and the same command
run again, the S3 server (moto on loopback) stopped briefly and for longer than the retry
budget, the latest checkpoint truncated, a worker frozen (SIGSTOP) until the hang timeout.

Nothing is planted in the code under test. Every run is compared with one uninterrupted run of
the same config (``reference``): the final weights, and the digest of the group ids each step
trained (``groups`` in ``metrics.jsonl``) -- so a resumed run provably trained the same pairs
at the same steps, none lost and none twice.

Each run costs ~60-80 s here (Ray start, DeepSpeed, 16 tiny steps); the file runs nine.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO
from reliability import record

pytestmark = pytest.mark.ray

HYBRIDRAY = str(REPO / ".venv" / "bin" / "hybridray")
STEPS, EVERY = 16, 4  # checkpoints after steps 4, 8, 12 and 16


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def described(process: psutil.Process) -> str:
    try:
        return f"{process.pid}: {' '.join(process.cmdline())[:160]}"
    except psutil.Error:
        return f"{process.pid}: (gone)"


class Run:
    """One ``hybridray train`` process, its console captured, every process it started
    remembered (so a killed driver's Ray processes can be checked for and stopped)."""

    def __init__(self, config: Path, *overrides: str, env: dict | None = None):
        self.out = config.parent / f"console-{uuid.uuid4().hex[:6]}.txt"
        self.file = open(self.out, "w")
        self.proc = subprocess.Popen([HYBRIDRAY, "train", str(config), *overrides], cwd=REPO, stdout=self.file,
                                     stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.seen: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._watch = threading.Thread(target=self._remember, daemon=True)
        self._watch.start()

    def _remember(self):
        while not self._stop.wait(0.2):
            try:
                for child in psutil.Process(self.proc.pid).children(recursive=True):
                    self.seen.setdefault(child.pid, child)
            except psutil.Error:
                pass

    def console(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 240) -> re.Match:
        """The first console line matching ``pattern``; fails if the run ends first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = re.search(pattern, self.console())
            if found:
                return found
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended ({self.proc.returncode}) before {pattern!r}:\n{self.console()[-3000:]}")
            time.sleep(0.05)
        pytest.fail(f"no {pattern!r} within {timeout} s:\n{self.console()[-3000:]}")

    def workers(self) -> list[psutil.Process]:
        """The live Ray Train worker processes of this run (``ray::RayTrainWorker...``)."""
        found = []
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if " ".join(child.cmdline()).startswith("ray::RayTrainWorker"):
                    found.append(child)
            except psutil.Error:
                pass
        return found

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout)
        finally:
            self.close()
        return code, self.console()

    def close(self):
        """Stop this run's processes that are still alive (only these, by PID)."""
        self._stop.set()
        self._watch.join()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        leftovers = [p for p in self.seen.values() if alive(p)]
        for p in leftovers:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(leftovers, timeout=30)
        self.file.close()
        return leftovers


def write_config(tmp: Path, mlqa_prepared: Path, storage_path: str) -> Path:
    tree = {
        "name": "faulty",
        "model": {"name_or_path": "builtin:tiny", "max_query_length": 24, "max_passage_length": 32},
        "data": {"train": str(mlqa_prepared / "train"), "heldout": ""},
        "sampler": {"alpha": 0.5, "batch_size": 8},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"max_steps": STEPS, "checkpoint_every": EVERY, "log_every": 1, "eval_every": 0,
                  "eval_before": False},
        "deepspeed": {"zero_stage": 1},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "run": {"storage_path": storage_path, "max_failures": 0, "checkpoints_to_keep": 2},
    }
    path = tmp / "faulty.yaml"
    path.write_text(json.dumps(tree))  # JSON is YAML
    return path


def outcome(run_dir: str) -> dict:
    """A finished run's steps (each record of ``metrics.jsonl``), group digests and weights."""
    from safetensors.torch import load_file

    from hybridray import storage

    local = Path(storage.local_copy(run_dir))
    history = [json.loads(line) for line in (local / "metrics.jsonl").read_text().splitlines()]
    return {"history": history, "steps": [h["step"] for h in history],
            "groups": {h["step"]: h["groups"] for h in history},
            "weights": load_file(local / "model" / "model.safetensors"),
            "summary": json.loads((local / "summary.json").read_text())}


def assert_same_run(got: dict, want: dict):
    """Every step once, each step the same pairs as the uninterrupted run, the same weights."""
    assert got["steps"] == list(range(1, STEPS + 1))
    assert got["groups"] == want["groups"]
    assert got["weights"].keys() == want["weights"].keys()
    for name, tensor in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, mlqa_prepared):
    """The uninterrupted run every faulty one must equal."""
    tmp = tmp_path_factory.mktemp("reference")
    run = Run(write_config(tmp, mlqa_prepared, str(tmp / "runs")))
    code, console = run.finish()
    assert code == 0, console[-3000:]
    got = outcome(str(tmp / "runs" / "faulty"))
    assert got["steps"] == list(range(1, STEPS + 1)) and len(set(got["groups"].values())) == STEPS
    return got


def snapshot_checkpoints(run_dir: str) -> list[str]:
    """The checkpoints Ray Train's run snapshot lists (what a resume can start from): a
    checkpoint counts once the controller has registered it, a moment after its upload."""
    from hybridray import storage

    try:
        text = storage.read_text(storage.join(run_dir, "checkpoint_manager_snapshot.json"))
        snapshot = json.loads(text) if text else {}
    except ValueError:  # being written
        return []
    return [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results") or []]


def wait_for_checkpoints(run: "Run", run_dir: str, count: int, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while len(snapshot_checkpoints(run_dir)) < count:
        assert run.proc.poll() is None, f"the run ended before checkpoint {count}:\n{run.console()[-3000:]}"
        assert time.monotonic() < end, run.console()[-3000:]
        time.sleep(0.02)


def lost_steps(summary: dict) -> int:
    return sum(r["reached_step"] - r["from_step"] + 1 for r in summary.get("restarts", []))


def test_a_worker_killed_mid_run_resumes_from_its_checkpoint_and_trains_every_step_once(reference, tmp_path,
                                                                                       mlqa_prepared):
    run = Run(write_config(tmp_path, mlqa_prepared, str(tmp_path / "runs")), "run.max_failures=1")
    try:
        wait_for_checkpoints(run, str(tmp_path / "runs" / "faulty"), 1)  # the step-4 checkpoint registered
        victim = run.workers()[0]
        victim.send_signal(signal.SIGKILL)
        code, console = run.finish()
    finally:
        run.close()
    assert code == 0, console[-3000:]
    assert not victim.is_running()
    assert re.search(r"worker rank \d failed: .*\(restarting from the last checkpoint", console), console[-3000:]
    restarted = re.search(r"restarted: training again from step (\d+)", console)
    assert restarted and int(restarted.group(1)) % EVERY == 1, console[-3000:]
    got = outcome(str(tmp_path / "runs" / "faulty"))
    assert_same_run(got, reference)
    lost = lost_steps(got["summary"])
    assert 1 <= lost <= 2 * EVERY  # since the last checkpoint the controller had registered
    record("test_faults.py::test_a_worker_killed_mid_run_resumes_from_its_checkpoint_and_trains_every_step_once",
           kind="training worker SIGKILLed mid-run", cases=1, lost_steps=lost,
           outcome=f"restarted from step {restarted.group(1)} (run.max_failures=1); all {STEPS} step digests and "
                   "final weights equal the uninterrupted run")


@pytest.fixture(scope="module")
def killed_driver(tmp_path_factory, mlqa_prepared):
    """A run whose driver (the `hybridray train` process) was SIGKILLed once its run snapshot
    listed two checkpoints (steps 4 and 8): the storage as the kill left it, the steps it had
    logged, and the processes of its private Ray that outlived it."""
    tmp = tmp_path_factory.mktemp("killed-driver")
    run_dir = tmp / "runs" / "faulty"
    run = Run(write_config(tmp, mlqa_prepared, str(tmp / "runs")))
    try:
        wait_for_checkpoints(run, str(run_dir), 2)
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait()
        reached = max(json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines())
        outlived = psutil.wait_procs([p for p in run.seen.values() if alive(p)], timeout=60)[1]
        outlived = [described(p) for p in outlived if alive(p)]
    finally:
        leftovers = run.close()
    return {"tmp": tmp, "reached": reached, "outlived": outlived, "leftovers": leftovers}


def resume_copy(killed: dict, tmp_path: Path, mlqa_prepared: Path) -> Path:
    """The killed run's storage copied to ``tmp_path`` (each test resumes its own copy)."""
    shutil.copytree(killed["tmp"] / "runs", tmp_path / "runs")
    return write_config(tmp_path, mlqa_prepared, str(tmp_path / "runs"))


def test_the_driver_killed_then_the_same_command_again_resumes_with_the_same_weights(reference, killed_driver,
                                                                                    tmp_path, mlqa_prepared):
    # Ray's per-node agents (ray::DashboardAgent, ray::RuntimeEnvAgent) outlive a SIGKILLed
    # driver (idle; stopped by this test); nothing that trains or writes the run may.
    training = [p for p in killed_driver["outlived"] if not re.search(r"ray::(DashboardAgent|RuntimeEnvAgent)", p)]
    assert training == [], f"the killed driver's Ray processes outlived it: {training}"
    config = resume_copy(killed_driver, tmp_path, mlqa_prepared)
    code, console = Run(config).finish()
    assert code == 0, console[-3000:]
    resumed = re.search(rf"resuming run 'faulty' from step (\d+)/{STEPS}", console)
    assert resumed and int(resumed.group(1)) == 8, console[-3000:]
    got = outcome(str(tmp_path / "runs" / "faulty"))
    assert_same_run(got, reference)
    lost = killed_driver["reached"] - int(resumed.group(1))
    record("test_faults.py::test_the_driver_killed_then_the_same_command_again_resumes_with_the_same_weights",
           kind="driver (`hybridray train`) SIGKILLed, same command again", cases=1, lost_steps=lost,
           outcome=f"resumed from step {resumed.group(1)} (killed at step {killed_driver['reached']}); step digests and "
                   "final weights equal the uninterrupted run; no training process outlived the driver"
                   + (f" (idle Ray agents did: {', '.join(p.split(': ', 1)[1].strip() for p in killed_driver['outlived'])})"
                      if killed_driver["outlived"] else ""))


def test_a_truncated_latest_checkpoint_is_passed_over_for_the_previous_one(reference, killed_driver, tmp_path,
                                                                          mlqa_prepared):
    config = resume_copy(killed_driver, tmp_path, mlqa_prepared)
    run_dir = tmp_path / "runs" / "faulty"
    previous, latest = snapshot_checkpoints(str(run_dir))[-2:]
    victim = max((p for p in (run_dir / latest).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:  # a transfer cut short: the file's second half is gone
        f.truncate(victim.stat().st_size // 2)
    code, console = Run(config).finish()
    assert code == 0, console[-3000:]
    warning = re.search(r"warning: checkpoint (\S+) is damaged \((.*)\); resuming from the previous checkpoint (\S+) "
                        r"\(step (\d+)\)", console)
    assert warning, console[-3000:]
    assert warning.group(1).endswith(latest) and warning.group(3).endswith(previous)
    assert victim.relative_to(run_dir / latest).as_posix() in warning.group(2) and "truncated" in warning.group(2)
    assert re.search(rf"resuming run 'faulty' from step 4/{STEPS}", console), console[-3000:]
    got = outcome(str(run_dir))
    assert_same_run(got, reference)
    record("test_faults.py::test_a_truncated_latest_checkpoint_is_passed_over_for_the_previous_one",
           kind="latest checkpoint truncated (largest file cut in half)", cases=1,
           lost_steps=killed_driver["reached"] - 4,
           outcome="detected at resume by its checksums, warning naming both checkpoints; resumed from step 4 "
                   "(the previous checkpoint); step digests and final weights equal the uninterrupted run")


def test_a_frozen_worker_is_detected_by_the_hang_timeout(reference, tmp_path, mlqa_prepared):
    """SIGSTOP freezes a worker as a stuck machine would; its peer's all-reduce fails after
    ``run.hang_timeout_s`` and the run restarts from its checkpoint (``run.max_failures``)."""
    timeout = 20
    run = Run(write_config(tmp_path, mlqa_prepared, str(tmp_path / "runs")), "run.max_failures=1",
              f"run.hang_timeout_s={timeout}")
    victim = None
    try:
        wait_for_checkpoints(run, str(tmp_path / "runs" / "faulty"), 1)
        victim = run.workers()[0]
        victim.suspend()
        frozen = time.monotonic()
        failed = run.wait_for(r"worker rank \d failed: [^\n]*", timeout=timeout + 120)
        detected = time.monotonic() - frozen
        code, console = run.finish()
    finally:
        if victim is not None and victim.is_running():
            victim.kill()
        run.close()
    assert code == 0, console[-3000:]
    assert timeout - 1 <= detected <= timeout + 60, (detected, failed.group(0))
    got = outcome(str(tmp_path / "runs" / "faulty"))
    assert_same_run(got, reference)
    lost = lost_steps(got["summary"])
    record("test_faults.py::test_a_frozen_worker_is_detected_by_the_hang_timeout",
           kind="training worker frozen (SIGSTOP): a hang", cases=1, lost_steps=lost,
           outcome=f"detected after {detected:.0f} s (run.hang_timeout_s={timeout}) -- {failed.group(0)[:120]} -- "
                   "restarted from the last checkpoint; step digests and final weights equal the uninterrupted run")


class StoppableS3:
    """A moto S3 server on a fixed loopback port that can be stopped (its port closed: every
    request is refused) and started again on the same port with the same buckets (moto keeps
    its state in this process)."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        from hybridray.distributed import free_port

        self._server_class = ThreadedMotoServer
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()

    def start(self):
        self.server = self._server_class(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self):
        self.server.stop()
        self.server = None


@pytest.fixture(scope="module")
def s3(s3_server):
    import boto3

    server = StoppableS3()
    server.bucket = f"faults-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=server.bucket)
    yield server
    if server.server is not None:
        server.stop()


def test_storage_down_for_a_few_seconds_is_retried_and_the_run_goes_on(reference, s3, tmp_path, mlqa_prepared):
    outage = 6
    uri = f"s3://{s3.bucket}/brief"
    run = Run(write_config(tmp_path, mlqa_prepared, uri), f"run.s3_endpoint={s3.endpoint}", "run.storage_retry_s=30")
    try:
        run.wait_for(rf"step 2/{STEPS}")
        s3.stop()
        time.sleep(outage)
        s3.start()
        restarted = time.time()
        code, console = run.finish()
    finally:
        if s3.server is None:
            s3.start()
        run.close()
    assert code == 0, console[-3000:]
    got = outcome(f"{uri}/faulty")
    assert_same_run(got, reference)
    # a checkpoint's upload waited for the server: the step after it started only once it was back
    times = {h["step"]: h["time"] for h in got["history"]}
    stalled = [s for s in range(EVERY, STEPS, EVERY) if times[s + 1] >= restarted and times[s + 1] - times[s] >= outage / 2]
    assert stalled, times
    from hybridray.checkpointing import checkpoint_problem
    from hybridray.runs import latest_checkpoint

    assert checkpoint_problem(latest_checkpoint(f"{uri}/faulty")[0]) is None
    record("test_faults.py::test_storage_down_for_a_few_seconds_is_retried_and_the_run_goes_on",
           kind=f"S3 server (moto) stopped for {outage} s mid-run", cases=1, lost_steps=0,
           outcome=f"the step-{stalled[0]} checkpoint upload waited and went through (run.storage_retry_s=30); "
                   "no restart; step digests and final weights equal the uninterrupted run")


def test_storage_down_beyond_the_retry_budget_fails_in_one_line_and_the_checkpoint_resumes(reference, s3, tmp_path,
                                                                                          mlqa_prepared):
    from hybridray.checkpointing import checkpoint_problem
    from hybridray.runs import latest_checkpoint

    uri = f"s3://{s3.bucket}/long"
    config = write_config(tmp_path, mlqa_prepared, uri)
    run = Run(config, f"run.s3_endpoint={s3.endpoint}", "run.storage_retry_s=3")
    try:
        wait_for_checkpoints(run, f"{uri}/faulty", 1)  # the step-4 checkpoint registered
        s3.stop()
        code, console = run.finish(timeout=300)  # the server stays down until the run gives up
    finally:
        if s3.server is None:
            s3.start()
        run.close()
    assert code == 2, console[-3000:]
    reached = max(int(k) for k in re.findall(rf"step (\d+)/{STEPS}", console))
    errors = [line for line in console.splitlines() if line.startswith("hybridray: error:")]
    assert len(errors) == 1 and console.rstrip().endswith(errors[0]), console[-3000:]
    assert re.match(r"hybridray: error: run 'faulty' failed \(.*s3://.*(retried for 3 s|connect)", errors[0]), errors[0]
    assert "run the same command again to resume" in errors[0]
    checkpoint, state, _ = latest_checkpoint(f"{uri}/faulty")
    assert checkpoint_problem(checkpoint) is None and state["step"] % EVERY == 0
    code, console = Run(config, f"run.s3_endpoint={s3.endpoint}").finish()
    assert code == 0, console[-3000:]
    assert f"resuming run 'faulty' from step {state['step']}/{STEPS}" in console
    got = outcome(f"{uri}/faulty")
    assert_same_run(got, reference)
    record("test_faults.py::test_storage_down_beyond_the_retry_budget_fails_in_one_line_and_the_checkpoint_resumes",
           kind="S3 server (moto) stopped for longer than the retry budget", cases=1,
           lost_steps=reached - state["step"],
           outcome=f"failed with one line (run.storage_retry_s=3); the step-{state['step']} checkpoint was intact; the "
                   "same command resumed from it; step digests and final weights equal the uninterrupted run",
           error_line=errors[0])
