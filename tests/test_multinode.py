"""A real two-node Ray cluster on loopback, used the way users use one: ``ray job submit``.

The fixture starts ``ray start --head`` and a second ``ray start --address=...`` raylet, each
with one ``trainer_slot`` resource, so the run's two training workers (one slot each) must sit
on different nodes. Shards, held-out set, checkpoints, model and reports all live in an S3
bucket (the session's moto server on loopback); the cluster gets its endpoint only through
``run.s3_endpoint`` and its credentials only from its environment, with a secret key that the
test then searches for in everything the runs wrote.

Jobs: one uninterrupted run; one stopped with ``ray job stop`` after its first checkpoint and
submitted again, which must resume and end with the same weights.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch

from conftest import MLQA_R, REPO

pytestmark = pytest.mark.ray

BUCKET = "hybridray-cluster"
SECRET = f"secret-{uuid.uuid4().hex}"  # searched for in everything the runs wrote
STEPS, EVERY = 30, 5


def free_ports(n: int) -> list[int]:
    from hybridray.distributed import free_port

    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


class Cluster:
    """Two ``ray start`` nodes on 127.0.0.1 and the CLI environment to talk to them."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.temp = ""

    def start(self) -> None:
        self.temp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths
        gcs, dash, *rest = free_ports(9)
        self.dashboard = f"http://127.0.0.1:{dash}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
        env.update({
            "PATH": f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '')}",
            "AWS_ACCESS_KEY_ID": "cluster-key", "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "token",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_AUTO_CONNECT": "0",
        })
        self.env = env
        common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--resources", json.dumps({"trainer_slot": 1}),
                  "--disable-usage-stats"]
        self.run("ray", "start", "--head", f"--port={gcs}", f"--temp-dir={self.temp}",
                 "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
                 f"--dashboard-agent-listen-port={rest[0]}", f"--metrics-export-port={rest[1]}",
                 f"--ray-client-server-port={rest[2]}", f"--runtime-env-agent-port={rest[3]}", *common)
        self.run("ray", "start", f"--address=127.0.0.1:{gcs}", f"--dashboard-agent-listen-port={rest[4]}",
                 f"--metrics-export-port={rest[5]}", f"--runtime-env-agent-port={rest[6]}", *common)
        self.cli_env = {**env, "RAY_ADDRESS": self.dashboard}

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        """A CLI command against this cluster (``ray start`` before ``RAY_ADDRESS`` exists)."""
        env = self.cli_env if hasattr(self, "cli_env") else self.env
        done = subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def node_ids(self) -> set[str]:
        nodes = json.loads(self.run("ray", "list", "nodes", "--format", "json").stdout)
        return {n["node_id"] for n in nodes if n["state"] == "ALIVE"}

    def stop(self) -> None:
        """Kill every process of this cluster (and only those: other Ray sessions may run)."""
        if not self.temp:
            return
        pids = subprocess.run(["pgrep", "-f", self.temp], capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=BUCKET)
    cluster = Cluster(s3_server)
    try:
        cluster.start()
        assert len(cluster.node_ids()) == 2
        yield cluster
    finally:
        cluster.stop()


def s3_client(endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def s3_keys(endpoint: str, prefix: str) -> list[str]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def train_command(name: str, endpoint: str) -> list[str]:
    return [
        "ray", "job", "submit", "--no-wait", "--working-dir", ".", "--",
        "hybridray", "train", "configs/local.yaml", f"name={name}",
        "model.name_or_path=builtin:tiny", "model.max_query_length=24", "model.max_passage_length=32",
        f"data.train=s3://{BUCKET}/mlqa-r/train", f"data.heldout=s3://{BUCKET}/mlqa-r/heldout-lareqa",
        "eval.langs=[de,es]", "eval.max_length=32", "eval.batch_size=64",
        "sampler.batch_size=8", "optim.lr=0.001", "optim.warmup_steps=2",
        f"train.max_steps={STEPS}", f"train.checkpoint_every={EVERY}", f"train.log_every={EVERY}",
        f"run.storage_path=s3://{BUCKET}/runs", f"run.s3_endpoint={endpoint}", "run.max_failures=0",
        "scaling.resources_per_worker={trainer_slot: 1}",
    ]


def submit(cluster: Cluster, name: str) -> str:
    out = cluster.run(*train_command(name, cluster.endpoint)).stdout
    return re.search(r"raysubmit_\w+", out).group(0)


def status(cluster: Cluster, job: str) -> str:
    """The job's state, read off ``ray job status`` (its wording: ray/dashboard/modules/job/cli.py)."""
    done = cluster.run("ray", "job", "status", job)
    text = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)
    for phrase, state in (("' succeeded", "SUCCEEDED"), ("' was stopped", "STOPPED"), ("' failed", "FAILED")):
        if f"Job '{job}{phrase}" in text:
            return state
    found = re.search(r"Status for job '[^']+': (\w+)", text)
    assert found, text
    return found.group(1)


def wait(cluster: Cluster, job: str, until=("SUCCEEDED", "FAILED", "STOPPED"), timeout: float = 600) -> str:
    """The job's state once it is in ``until``. It waits in ``ray job logs --follow``, which
    returns when the job ends: one idle CLI process, not a ``ray job status`` (a Python start,
    ~1 s of CPU) every 2 s beside the training on these 2 cores."""
    deadline = time.monotonic() + timeout
    cluster.run("ray", "job", "logs", "--follow", job, check=False, timeout=timeout)
    while time.monotonic() < deadline:
        state = status(cluster, job)
        if state in until:
            return state
        time.sleep(2)
    raise AssertionError(f"job {job} still not in {until} after {timeout} s")


def has_checkpoint(endpoint: str, name: str) -> bool:
    """Ray Train's run snapshot names a latest checkpoint: a resume would find it."""
    try:
        body = s3_client(endpoint).get_object(Bucket=BUCKET, Key=f"runs/{name}/checkpoint_manager_snapshot.json")["Body"]
    except s3_client(endpoint).exceptions.NoSuchKey:
        return False
    return bool((json.loads(body.read()).get("latest_checkpoint_result") or {}).get("checkpoint_dir_name"))


def exported_weights(endpoint: str, name: str) -> dict:
    from safetensors.torch import load

    body = s3_client(endpoint).get_object(Bucket=BUCKET, Key=f"runs/{name}/model/model.safetensors")["Body"].read()
    return load(body)


@pytest.fixture(scope="module")
def prepared(cluster):
    """`hybridray data prepare --out s3://...`: MLQA-R shards written straight to the bucket."""
    done = subprocess.run(
        [str(REPO / ".venv" / "bin" / "hybridray"), "data", "prepare", "--source", str(MLQA_R),
         "--out", f"s3://{BUCKET}/mlqa-r"],
        env={**cluster.env, "AWS_ENDPOINT_URL": cluster.endpoint}, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    keys = s3_keys(cluster.endpoint, "mlqa-r/")
    assert {"mlqa-r/prepare.json", "mlqa-r/train/manifest.json", "mlqa-r/heldout-lareqa/de.json"} <= set(keys)
    return keys


@pytest.fixture(scope="module")
def straight(cluster, prepared):
    """An uninterrupted job: what every later comparison is against."""
    job = submit(cluster, "straight")
    assert wait(cluster, job) == "SUCCEEDED", cluster.run("ray", "job", "logs", job).stdout[-4000:]
    return job


def test_job_runs_on_two_nodes_with_everything_on_s3(cluster, straight):
    logs = cluster.run("ray", "job", "logs", straight).stdout
    assert "[hybridray] 2 worker(s) on 2 node(s)" in logs  # the job's logs reach `ray job logs`
    assert f"[hybridray] step {STEPS}/{STEPS}" in logs
    summary = json.loads(s3_client(cluster.endpoint).get_object(Bucket=BUCKET, Key="runs/straight/summary.json")["Body"].read())
    nodes = summary["metrics"]["worker_nodes"].split(",")
    assert len(nodes) == 2 and len(set(nodes)) == 2 and set(nodes) <= cluster.node_ids()
    keys = s3_keys(cluster.endpoint, "runs/straight/")
    for expected in ("summary.json", "rejects.jsonl", "model/model.safetensors", "model/modules.json",
                     "eval/before/report.json", "eval/after/report.md"):
        assert f"runs/straight/{expected}" in keys, expected
    assert any(re.match(r"runs/straight/checkpoint_[^/]+/trainer_state\.json", k) for k in keys)
    # nothing of the run on a node's disk: the job ran in Ray's copy of the working dir there
    assert not [p for p in Path(cluster.temp).rglob("runs") if p.is_dir()]
    print("worker nodes:", nodes, "\nS3 keys:", "\n".join(k for k in keys if "checkpoint_" not in k))


def test_the_secret_key_is_nowhere_in_what_the_runs_wrote(cluster, straight, prepared):
    client = s3_client(cluster.endpoint)
    texts = [client.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in s3_keys(cluster.endpoint, "")]
    assert texts and not any(SECRET.encode() in body for body in texts)
    assert SECRET not in cluster.run("ray", "job", "logs", straight).stdout
    # and nowhere in the nodes' Ray logs (driver, workers, Ray Data tasks, dashboard, raylets)
    logs = [p for p in Path(cluster.temp).rglob("logs/*") if p.is_file()]
    assert logs and not [p for p in logs if SECRET.encode() in p.read_bytes()]


def test_stopped_job_resumes_when_submitted_again(cluster, straight):
    job = submit(cluster, "stopped")
    deadline, next_status = time.monotonic() + 600, 0.0
    while not has_checkpoint(cluster.endpoint, "stopped"):
        assert time.monotonic() < deadline, status(cluster, job)
        if time.monotonic() >= next_status:  # a job that ended fails here (each check is a CLI start)
            assert status(cluster, job) in ("PENDING", "RUNNING"), status(cluster, job)
            next_status = time.monotonic() + 10
        time.sleep(0.5)
    cluster.run("ray", "job", "stop", job)
    assert wait(cluster, job) == "STOPPED"
    done = [k for k in s3_keys(cluster.endpoint, "runs/stopped/") if k.endswith("model/model.safetensors")]
    assert not done, "the job finished before it could be stopped: nothing was tested"

    again = submit(cluster, "stopped")
    assert wait(cluster, again) == "SUCCEEDED", cluster.run("ray", "job", "logs", again).stdout[-4000:]
    logs = cluster.run("ray", "job", "logs", again).stdout
    resumed_from = int(re.search(r"resuming run 'stopped' from step (\d+)/", logs).group(1))
    assert 0 < resumed_from < STEPS
    body = s3_client(cluster.endpoint).get_object(Bucket=BUCKET, Key="runs/stopped/metrics.jsonl")["Body"].read()
    assert [json.loads(line)["step"] for line in body.decode().splitlines()] == list(range(1, STEPS + 1))
    want, got = exported_weights(cluster.endpoint, "straight"), exported_weights(cluster.endpoint, "stopped")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    print(f"resumed from step {resumed_from}; final weights equal to the uninterrupted job's")
