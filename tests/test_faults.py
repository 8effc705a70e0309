"""Real faults, injected by the OS into `hybridray train` run as a user runs it (the CLI,
joining a running Ray cluster as on a real long-lived one): a training worker frozen (SIGSTOP)
until the hang timeout and another SIGKILLed, the S3 server (moto on loopback) stopped briefly
(during a checkpoint upload) and for longer than the retry budget, the driver SIGKILLed and the
same command run again, the latest checkpoint truncated.

Nothing is planted in the code under test. Every run is compared with one uninterrupted run of
the same config (``reference``): the final weights, the held-out evaluations, and the digest of
the group ids each step trained (``groups`` in ``metrics.jsonl``) -- so a resumed run provably
trained the same pairs at the same steps, none lost and none twice, and evaluated the same.

Faults that restart inside one run are combined in one run, and the module shares one Ray
cluster (``cluster``): seven CLI runs in all, about 6 minutes here.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch

from conftest import REPO, heldout_subset
from reliability import record

pytestmark = pytest.mark.ray

HYBRIDRAY = str(REPO / ".venv" / "bin" / "hybridray")
STEPS, EVERY, EVAL_EVERY = 16, 4, 8  # checkpoints after steps 4, 8, 12, 16; held-out evaluations at 0, 8, 16
HANG = 20  # run.hang_timeout_s of the frozen-worker fault


class Cluster:
    """One ``ray start --head`` on loopback for the module: every run joins it (``RAY_ADDRESS``),
    so a SIGKILLed driver leaves the cluster up and Ray must reap that job's processes."""

    def __init__(self):
        from hybridray.distributed import free_port

        self.temp = tempfile.mkdtemp(prefix="rf-", dir="/tmp")  # short: Ray's socket paths
        ports = set()
        while len(ports) < 7:
            ports.add(free_port())
        gcs, dash, *rest = sorted(ports)
        self.env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "disabled",
                    "RAY_USAGE_STATS_ENABLED": "0"}
        subprocess.run([str(REPO / ".venv" / "bin" / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                        f"--port={gcs}", f"--temp-dir={self.temp}", "--num-cpus=2", "--disable-usage-stats",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                        f"--dashboard-agent-listen-port={rest[0]}", f"--metrics-export-port={rest[1]}",
                        f"--ray-client-server-port={rest[2]}", f"--runtime-env-agent-port={rest[3]}"],
                       env=self.env, check=True, capture_output=True, timeout=120)
        self.address = f"127.0.0.1:{gcs}"

    def processes(self, prefix: str) -> list[psutil.Process]:
        """This cluster's live processes whose command line starts with ``prefix``."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if " ".join(p.info["cmdline"] or []).startswith(prefix) and alive(p) and any(
                        self.temp in " ".join(a.cmdline()) for a in p.parents()):
                    found.append(p)
            except psutil.Error:
                pass
        return found

    def stop(self) -> None:
        """Kill every process of this cluster, by PID (other Ray sessions may run here)."""
        pids = subprocess.run(["pgrep", "-f", self.temp], capture_output=True, text=True).stdout.split()
        roots = [psutil.Process(int(pid)) for pid in pids if psutil.pid_exists(int(pid))]
        procs = {p.pid: p for root in roots for p in [root, *root.children(recursive=True)]}
        for p in procs.values():
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(list(procs.values()), timeout=15)


@pytest.fixture(scope="module")
def cluster(s3_server):
    """Started after the S3 fixture, so its workers have the AWS credentials in their env."""
    started = Cluster()
    try:
        yield started
    finally:
        started.stop()


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop(process: psutil.Process | None) -> None:
    """SIGKILL ``process`` if it is still there (Ray may have ended it already)."""
    try:
        if process is not None:
            process.kill()
    except psutil.Error:
        pass


def described(process: psutil.Process) -> str:
    try:
        return f"{process.pid}: {' '.join(process.cmdline())[:160]}"
    except psutil.Error:
        return f"{process.pid}: (gone)"


class Run:
    """One ``hybridray train`` process on ``cluster``, its console captured."""

    def __init__(self, cluster: Cluster, config: Path, *overrides: str):
        self.cluster = cluster
        self.out = config.parent / f"console-{uuid.uuid4().hex[:6]}.txt"
        self.file = open(self.out, "w")
        self.proc = subprocess.Popen([HYBRIDRAY, "train", str(config), *overrides], cwd=REPO, stdout=self.file,
                                     stderr=subprocess.STDOUT, env={**cluster.env, "RAY_ADDRESS": cluster.address})

    def console(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 240, after: int = 0) -> re.Match:
        """The first console match of ``pattern`` from offset ``after``; fails if the run ends first."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = re.compile(pattern).search(self.console(), after)
            if found:
                return found
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended ({self.proc.returncode}) before {pattern!r}:\n{self.console()[-3000:]}")
            time.sleep(0.05)
        pytest.fail(f"no {pattern!r} within {timeout} s:\n{self.console()[-3000:]}")

    def workers(self) -> list[psutil.Process]:
        """The live Ray Train worker processes (only this run trains on the cluster)."""
        return self.cluster.processes("ray::RayTrainWorker")

    def finish(self, timeout: float = 600) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout)
        finally:
            self.close()
        return code, self.console()

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.file.close()


@pytest.fixture(scope="module")
def small_heldout(tmp_path_factory, mlqa_prepared):
    """A small LAReQA held-out set (3 languages, the first 4 articles each): every run evaluates
    before training, at step 8 and at the end, so a resume is checked to evaluate the same."""
    return heldout_subset(tmp_path_factory.mktemp("heldout-small"), mlqa_prepared, articles=4)


def write_config(tmp: Path, mlqa_prepared: Path, heldout: Path, storage_path: str) -> Path:
    tree = {
        "name": "faulty",
        "model": {"name_or_path": "builtin:tiny", "max_query_length": 24, "max_passage_length": 32},
        "data": {"train": str(mlqa_prepared / "train"), "heldout": str(heldout)},
        "sampler": {"alpha": 0.5, "batch_size": 8},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "train": {"max_steps": STEPS, "checkpoint_every": EVERY, "log_every": EVERY, "eval_every": EVAL_EVERY,
                  "eval_before": True},
        "deepspeed": {"zero_stage": 1},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "run": {"storage_path": storage_path, "max_failures": 0, "checkpoints_to_keep": 2},
        "eval": {"batch_size": 32, "max_length": 32},
    }
    path = tmp / "faulty.yaml"
    path.write_text(json.dumps(tree))  # JSON is YAML
    return path


def outcome(run_dir: str) -> dict:
    """A finished run's steps (each record of ``metrics.jsonl``), group digests, held-out
    evaluations, weights and summary."""
    from safetensors.torch import load_file

    from hybridray import storage

    local = Path(storage.local_copy(run_dir))
    history = [json.loads(line) for line in (local / "metrics.jsonl").read_text().splitlines()]
    return {"history": history, "steps": [h["step"] for h in history],
            "groups": {h["step"]: h["groups"] for h in history},
            "evals": {h["step"]: h["val_map"] for h in history if "val_map" in h},
            "weights": load_file(local / "model" / "model.safetensors"),
            "summary": json.loads((local / "summary.json").read_text())}


def assert_same_run(got: dict, want: dict):
    """Every step once, each step the same pairs as the uninterrupted run, the same held-out
    scores at the evaluations it ran, the same weights (equal weights after evaluations also
    prove that evaluating leaves train mode as it found it)."""
    assert got["steps"] == list(range(1, STEPS + 1))
    assert got["groups"] == want["groups"]
    assert got["evals"] and STEPS in got["evals"], got["evals"]
    for step, score in got["evals"].items():
        assert score == pytest.approx(want["evals"][step], abs=1e-6), (step, score, want["evals"][step])
    assert got["weights"].keys() == want["weights"].keys()
    for name, tensor in want["weights"].items():
        torch.testing.assert_close(got["weights"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory, mlqa_prepared, small_heldout):
    """The uninterrupted run every faulty one must equal."""
    tmp = tmp_path_factory.mktemp("reference")
    code, console = Run(cluster, write_config(tmp, mlqa_prepared, small_heldout, str(tmp / "runs"))).finish()
    assert code == 0, console[-3000:]
    got = outcome(str(tmp / "runs" / "faulty"))
    assert got["steps"] == list(range(1, STEPS + 1)) and len(set(got["groups"].values())) == STEPS
    assert sorted(got["evals"]) == [EVAL_EVERY, STEPS], got["evals"]
    return got


def registered_step(run_dir: str) -> int:
    """The step of the newest checkpoint Ray Train's run snapshot lists (what a resume or an
    in-run restart starts from): a checkpoint counts once the controller has registered it, a
    moment after its upload."""
    from hybridray import storage

    try:
        text = storage.read_text(storage.join(run_dir, "checkpoint_manager_snapshot.json"))
        snapshot = json.loads(text) if text else {}
    except ValueError:  # being written
        return 0
    return max((r["metrics"].get("step", 0) for r in snapshot.get("checkpoint_results") or []), default=0)


def wait_for_checkpoint(run: Run, run_dir: str, step: int, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while registered_step(run_dir) < step:
        assert run.proc.poll() is None, f"the run ended before checkpoint {step}:\n{run.console()[-3000:]}"
        assert time.monotonic() < end, run.console()[-3000:]
        time.sleep(0.05)


def lost_steps(summary: dict) -> int:
    return sum(r["reached_step"] - r["from_step"] + 1 for r in summary.get("restarts", []))


class StoppableS3:
    """A moto S3 server on a fixed loopback port that can be stopped -- its port closed and
    every connection it had accepted cut, so a client's pooled keep-alive connection fails too
    -- and started again on the same port with the same buckets (moto keeps its state here).

    ``hold_first(wanted)`` ties an outage to a request: the first request ``wanted(method,
    path)`` accepts is held unanswered (``held`` is set) until ``stop()`` cuts its connection,
    so the client that sent it meets the outage mid-request."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        from hybridray.distributed import free_port

        self._server_class = ThreadedMotoServer
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self._wanted = None
        self.held = threading.Event()
        self.held_request = ""
        self._released = threading.Event()
        self.start()

    def start(self):
        self.server = self._server_class(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        wsgi = self.server._server  # werkzeug's server: remember each connection it accepts
        accept = wsgi.get_request

        def get_request():
            connection, address = accept()
            self.connections.append(connection)
            return connection, address

        wsgi.get_request = get_request
        wsgi.app = self._holding(wsgi.app)

    def _holding(self, app):
        def held_or_served(environ, start_response):
            with self._lock:
                wanted = self._wanted
                hold = wanted is not None and wanted(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""))
                if hold:
                    self._wanted = None
                    self.held_request = f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO', '')}"
            if not hold:
                return app(environ, start_response)
            self.held.set()
            self._released.wait(120)  # stop() cuts this connection: the client never gets this answer
            start_response("503 Service Unavailable", [("Content-Length", "0")])
            return [b""]

        return held_or_served

    def hold_first(self, wanted) -> None:
        with self._lock:
            self.held.clear()
            self._released.clear()
            self.held_request = ""
            self._wanted = wanted

    def stop(self):
        self.server.stop()
        self.server = None
        for connection in self.connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.connections.clear()
        self._released.set()


CHECKPOINT_DIR = re.compile(r"/(checkpoint_\d[^/]*)/")


def checkpoint_dirs(s3: StoppableS3, prefix: str) -> set[str]:
    """The names of the checkpoint directories under ``prefix`` in the bucket, as listed now."""
    import boto3

    pages = boto3.client("s3", endpoint_url=s3.endpoint).get_paginator("list_objects_v2").paginate(
        Bucket=s3.bucket, Prefix=prefix + "/")
    return {m.group(1) for page in pages for o in page.get("Contents", [])
            if (m := CHECKPOINT_DIR.search("/" + o["Key"]))}


def a_new_checkpoint_upload(known: set[str]):
    """Wanted by ``StoppableS3.hold_first``: a request writing a file (PUT, or POST of a
    multipart upload) into a checkpoint directory not in ``known``."""
    def wanted(method: str, path: str) -> bool:
        found = CHECKPOINT_DIR.search(path)
        return method in ("PUT", "POST") and not path.endswith("/") and found is not None \
            and found.group(1) not in known

    return wanted


@pytest.fixture(scope="module")
def s3(s3_server):
    import boto3

    server = StoppableS3()
    server.bucket = f"faults-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=server.bucket)
    yield server
    if server.server is not None:
        server.stop()


RESTARTED = r"restarted: training again from step (\d+)"


def test_in_run_faults_a_frozen_worker_storage_down_briefly_a_killed_worker(cluster, reference, s3, tmp_path,
                                                                           mlqa_prepared, small_heldout):
    """One run on S3 meets three faults and restarts in-run from its checkpoints
    (``run.max_failures=2``): a worker frozen (SIGSTOP, as a stuck machine) after checkpoint 4
    is detected by ``run.hang_timeout_s``; the S3 server goes down for 6 s at the first upload
    request of the next checkpoint (held, then cut with the server), which the worker's upload
    retries (``run.storage_retry_s``) with no restart; a worker SIGKILLed after checkpoint 12.
    Each restart is from the last checkpoint Ray Train had registered at the fault (or a later
    one registered before the restart), never an older one. Still every step once with the same
    pairs, scores and weights."""
    outage = 6
    uri = f"s3://{s3.bucket}/in-run"
    run_dir = f"{uri}/faulty"
    run = Run(cluster, write_config(tmp_path, mlqa_prepared, small_heldout, uri), "run.max_failures=2",
              f"run.hang_timeout_s={HANG}", f"run.s3_endpoint={s3.endpoint}", "run.storage_retry_s=30")
    frozen = killed = None
    try:
        wait_for_checkpoint(run, run_dir, EVERY)
        frozen = run.workers()[0]
        registered = {"freeze": registered_step(run_dir)}
        frozen.suspend()
        since = time.monotonic()
        failed = run.wait_for(r"worker rank \d failed: [^\n]*", timeout=HANG + 120)
        detected = time.monotonic() - since
        # The frozen group writes nothing more: the next new checkpoint directory is the restarted
        # run's first checkpoint, and its first upload request starts the outage.
        s3.hold_first(a_new_checkpoint_upload(checkpoint_dirs(s3, "in-run/faulty")))
        stop(frozen)  # detected: end it now rather than wait for Ray's 30 s process-group shutdown
        first = run.wait_for(RESTARTED, timeout=240)
        registered["first restart"] = registered_step(run_dir)

        end = time.monotonic() + 240
        while not s3.held.wait(0.05):
            assert run.proc.poll() is None and time.monotonic() < end, run.console()[-3000:]
        stopped = time.time()
        uploading = {p.pid for p in run.workers()}  # the Ray Train workers the held request can come from
        s3.stop()
        time.sleep(outage)
        s3.start()
        back = time.time()

        wait_for_checkpoint(run, run_dir, 3 * EVERY)
        killed = run.workers()[0]
        registered["kill"] = registered_step(run_dir)
        killed.send_signal(signal.SIGKILL)
        second = run.wait_for(RESTARTED, timeout=240, after=first.end())
        registered["second restart"] = registered_step(run_dir)
        code, console = run.finish()
    finally:
        for victim in (frozen, killed):
            stop(victim)
        if s3.server is None:
            s3.start()
        run.close()
    assert code == 0, console[-3000:]
    assert HANG - 1 <= detected <= HANG + 60, (detected, failed.group(0))
    got = outcome(run_dir)
    assert_same_run(got, reference)
    restarts = got["summary"]["restarts"]
    first_from, second_from = int(first.group(1)), int(second.group(1))
    assert [r["from_step"] for r in restarts] == [first_from, second_from], restarts

    # Each restart is from a checkpoint (step % EVERY == 0), not older than the newest one Ray Train
    # had registered when the fault struck, and at most one registered before the restart; so
    # the work lost is at most what was done since the checkpoint registered at the fault.
    for (fault, restart), from_step, r in zip((("freeze", "first restart"), ("kill", "second restart")),
                                              (first_from, second_from), restarts):
        assert (from_step - 1) % EVERY == 0, (from_step, registered, console[-3000:])
        assert registered[fault] <= from_step - 1 <= registered[restart], (from_step, registered)
        lost = r["reached_step"] - from_step + 1
        assert 0 < lost <= r["reached_step"] - registered[fault], (r, registered)
    assert registered["kill"] == 3 * EVERY and second_from == 3 * EVERY + 1, (registered, second_from)

    # The outage met the upload of the restarted run's first checkpoint: the server held that
    # checkpoint's first upload request and went down with it; a worker's upload said it retried
    # (the same checkpoint directory); the step after it began only once the server was back.
    written = first_from - 1 + EVERY
    assert written <= 3 * EVERY, (first_from, registered)  # so the kill below comes after it
    held = CHECKPOINT_DIR.search(s3.held_request)
    assert held, s3.held_request
    # A checkpoint upload's retry line: a local file copied into that checkpoint directory
    # (``checkpointing.upload_checkpoint``), as the user sees it, and in the log of a Ray Train
    # worker that was alive when the request was held (forwarded without Ray's "(RayTrainWorker pid=...)"
    # prefix: Ray 2.60 drops it when ray.init is given a logging_config, as train.init_ray does).
    upload = (rf"hybridray: storage: (s3://\S+/{re.escape(held.group(1))}): cannot copy /\S+ to \1: "
              r"[^\n]*?retrying for up to 30 s \(run.storage_retry_s\)")
    retry = re.search(upload, console)
    assert retry, (s3.held_request, console[-3000:])
    logs = Path(cluster.temp, "session_latest", "logs")
    retried_by = [log.name for pid in uploading for log in logs.glob(f"**/worker-*-{pid}.err")  # old/: dead ones
                  if re.search(upload, text := log.read_text(errors="replace")) and "RayTrainWorker" in text]
    assert retried_by, (uploading, s3.held_request)
    times = {h["step"]: h["time"] for h in got["history"]}
    assert times[written] < stopped and back <= times[written + 1], (stopped, back, times)

    test = "test_faults.py::test_in_run_faults_a_frozen_worker_storage_down_briefly_a_killed_worker"
    record(test, kind="training worker frozen (SIGSTOP): a hang", cases=1,
           lost_steps=restarts[0]["reached_step"] - first_from + 1,
           outcome=f"detected after {detected:.0f} s (run.hang_timeout_s={HANG}) -- {failed.group(0)[:110]} -- "
                   f"restarted from step {first_from} (reached step {restarts[0]['reached_step']}; last checkpoint "
                   f"Ray Train had registered at the fault: step {registered['freeze']})")
    record(test, kind=f"S3 server (moto) stopped for {outage} s from the first upload request of checkpoint "
                      f"{written} (that request held, then cut with the server)",
           cases=1, lost_steps=0,
           outcome="the Ray Train worker's checkpoint upload retried and said so (`" + retry.group(0)
                   + "`, also in its log " + retried_by[0] + "), the upload went through; no restart")
    record(test, kind=f"training worker SIGKILLed mid-run (same run, after checkpoint {registered['kill']} was "
                      "registered)", cases=1,
           lost_steps=restarts[1]["reached_step"] - second_from + 1,
           outcome=f"restarted from step {second_from} (reached step {restarts[1]['reached_step']}; "
                   f"run.max_failures=2); after all three faults, all {STEPS} step digests, the held-out scores "
                   "and the final weights equal the uninterrupted run")


@pytest.fixture(scope="module")
def killed_driver(cluster, tmp_path_factory, mlqa_prepared, small_heldout):
    """A run whose driver (the `hybridray train` process) was SIGKILLed once its run snapshot
    listed checkpoint 8: its config, the step it had logged, and the run's processes (Ray Train
    workers and controller) still alive on the cluster 20 s later."""
    tmp = tmp_path_factory.mktemp("killed-driver")
    config = write_config(tmp, mlqa_prepared, small_heldout, str(tmp / "runs"))
    run = Run(cluster, config)
    try:
        wait_for_checkpoint(run, str(tmp / "runs" / "faulty"), 2 * EVERY)
        registered = registered_step(str(tmp / "runs" / "faulty"))
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait()
    finally:
        run.close()
    lines = (tmp / "runs" / "faulty" / "metrics.jsonl").read_text().splitlines()
    reached = max(json.loads(line)["step"] for line in lines)
    end = time.monotonic() + 20
    while (left := cluster.processes("ray::RayTrainWorker") + cluster.processes("ray::TrainController")) and \
            time.monotonic() < end:
        time.sleep(0.2)
    outlived = [described(p) for p in left]
    for p in left:
        stop(p)
    return {"config": config, "run_dir": tmp / "runs" / "faulty", "reached": reached, "registered": registered,
            "outlived": outlived}


def test_the_driver_killed_then_the_same_command_again_resumes_with_the_same_weights(cluster, reference,
                                                                                    killed_driver):
    assert killed_driver["outlived"] == [], f"the killed driver's training processes outlived it"
    code, console = Run(cluster, killed_driver["config"]).finish()
    assert code == 0, console[-3000:]
    resumed = re.search(rf"resuming run 'faulty' from step (\d+)/{STEPS}", console)
    assert resumed, console[-3000:]
    # from the checkpoint Ray Train had registered at the kill (the controller may have registered
    # a later one before it went down with the driver), never an older one
    from_step, registered, reached = int(resumed.group(1)), killed_driver["registered"], killed_driver["reached"]
    assert from_step % EVERY == 0 and 2 * EVERY <= registered <= from_step, (from_step, registered, reached)
    got = outcome(str(killed_driver["run_dir"]))
    assert got["summary"]["data"]["start_step"] == from_step  # nothing before it planned or tokenised
    assert_same_run(got, reference)
    lost = reached - from_step
    assert lost <= reached - registered
    record("test_faults.py::test_the_driver_killed_then_the_same_command_again_resumes_with_the_same_weights",
           kind="driver (`hybridray train`) SIGKILLed, same command again", cases=1, lost_steps=lost,
           outcome=f"resumed from step {from_step} (killed at step {reached}, checkpoint {registered} registered); "
                   "the job's Ray Train workers and controller were gone within 20 s; step digests, held-out scores "
                   "and final weights equal the uninterrupted run")


def test_storage_down_beyond_the_retry_budget_then_a_truncated_checkpoint(cluster, reference, s3, tmp_path,
                                                                          mlqa_prepared, small_heldout):
    """S3 stopped after checkpoint 8 and left down: the run fails with one line, checkpoint 8 is
    intact, and the same command run again resumes from it (the same steps, scores and weights).
    Then, on a copy of the failed run taken before that resume, checkpoint 8's largest file is
    cut in half (a transfer cut short): the same command passes over it with a warning naming
    both checkpoints and resumes from checkpoint 4."""
    import boto3

    from hybridray.checkpointing import checkpoint_problem
    from hybridray.runs import latest_checkpoint

    uri = f"s3://{s3.bucket}/long"
    config = write_config(tmp_path, mlqa_prepared, small_heldout, uri)
    run = Run(cluster, config, f"run.s3_endpoint={s3.endpoint}", "run.storage_retry_s=3")
    try:
        wait_for_checkpoint(run, f"{uri}/faulty", 2 * EVERY)
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
    assert state["step"] == 2 * EVERY and checkpoint_problem(checkpoint) is None  # the last complete one is intact

    # The failed run as it was left, copied object by object for the truncation below.
    client = boto3.client("s3", endpoint_url=s3.endpoint)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix="long/")
    for key in [o["Key"] for page in pages for o in page.get("Contents", [])]:
        client.copy_object(Bucket=s3.bucket, Key="long-copy/" + key[len("long/"):],
                           CopySource={"Bucket": s3.bucket, "Key": key})

    code, console = Run(cluster, config, f"run.s3_endpoint={s3.endpoint}").finish()
    assert code == 0, console[-3000:]
    assert re.search(rf"resuming run 'faulty' from step {2 * EVERY}/{STEPS}", console), console[-3000:]
    assert "is damaged" not in console, console[-3000:]
    got = outcome(f"{uri}/faulty")
    assert got["summary"]["data"]["start_step"] == 2 * EVERY
    assert_same_run(got, reference)

    copy_uri = f"s3://{s3.bucket}/long-copy"
    (tmp_path / "copy").mkdir()
    copy_config = write_config(tmp_path / "copy", mlqa_prepared, small_heldout, copy_uri)
    prefix = f"long-copy/faulty/{checkpoint.rstrip('/').rsplit('/', 1)[1]}/"
    objects = client.list_objects_v2(Bucket=s3.bucket, Prefix=prefix)["Contents"]
    victim = max(objects, key=lambda o: o["Size"])
    body = client.get_object(Bucket=s3.bucket, Key=victim["Key"])["Body"].read()
    client.put_object(Bucket=s3.bucket, Key=victim["Key"], Body=body[: len(body) // 2])
    code, console = Run(cluster, copy_config, f"run.s3_endpoint={s3.endpoint}").finish()
    assert code == 0, console[-3000:]
    warning = re.search(r"warning: checkpoint (\S+) is damaged \((.*)\); resuming from the previous checkpoint (\S+) "
                        r"\(step (\d+)\)", console)
    assert warning and warning.group(1).rstrip("/") == f"s3://{s3.bucket}/{prefix}".rstrip("/"), console[-3000:]
    assert victim["Key"][len(prefix):] in warning.group(2) and "truncated" in warning.group(2), warning.group(0)
    assert re.search(rf"resuming run 'faulty' from step {EVERY}/{STEPS}", console), console[-3000:]
    got = outcome(f"{copy_uri}/faulty")
    assert got["summary"]["data"]["start_step"] == EVERY
    assert_same_run(got, reference)
    record("test_faults.py::test_storage_down_beyond_the_retry_budget_then_a_truncated_checkpoint",
           kind="S3 server (moto) stopped for longer than the retry budget", cases=1,
           lost_steps=reached - state["step"],
           outcome=f"failed with one line (run.storage_retry_s=3); the step-{state['step']} checkpoint was intact, "
                   f"and the same command resumed from it (step {state['step']}): step digests, held-out scores and "
                   "final weights equal the uninterrupted run",
           error_line=errors[0])
    record("test_faults.py::test_storage_down_beyond_the_retry_budget_then_a_truncated_checkpoint",
           kind="latest checkpoint truncated (largest file cut in half, on S3; a copy of the failed run above)",
           cases=1, lost_steps=state["step"] - EVERY,
           outcome=f"detected at resume by its checksums, warning naming both checkpoints; resumed from step {EVERY} "
                   "(the previous checkpoint); step digests, held-out scores and final weights equal the "
                   "uninterrupted run")
