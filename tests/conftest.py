"""Shared fixtures: where the real data lives, the prepared MLQA-R shards, one S3-API server
and one local Ray for the whole session.

Ray is started once per test session (``ray_session``), never per module: starting and
stopping Ray repeatedly in one process is where the suite used to die without a word. The one
exception is a module that runs ``hybridray`` commands with their own local Ray
(``no_ray_in_this_process``): it stops the session's first, and the next module that needs Ray
starts it again -- never in the suite's file order (test_console runs before any module that
uses Ray), only when such a module is run after one that does (``pytest tests/test_mine.py
tests/test_console.py``), where it used to fail instead.
``RAY_ENABLE_AUTO_CONNECT=0`` makes any Ray call made outside a live session fail loudly
instead of silently starting a second cluster next to the first.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")  # before anything imports ray

REPO = Path(__file__).resolve().parents[1]

try:  # the generated hostile-input tests: the same examples on every run, none remembered
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "hybridray", derandomize=True, database=None, deadline=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture],
    )
    settings.load_profile("hybridray")
except ImportError:  # hypothesis is a test dependency (pyproject.toml); without it those tests fail to import
    pass
SHARED_DATA = REPO.parent / "shared" / "data"
MLQA_R = SHARED_DATA / "mlqa-r"
TATOEBA = SHARED_DATA / "tatoeba"


def heldout_subset(out: Path, mlqa_prepared: Path, articles: int, langs=("de", "en", "es")) -> Path:
    """A small LAReQA held-out directory in ``out``: the first ``articles`` articles of each of
    ``langs`` from the prepared MLQA-R held-out split (tests that evaluate, kept fast)."""
    out.mkdir(parents=True, exist_ok=True)
    for lang in langs:
        data = json.loads((mlqa_prepared / "heldout-lareqa" / f"{lang}.json").read_text())
        data["data"] = data["data"][:articles]
        (out / f"{lang}.json").write_text(json.dumps(data))
    return out


@pytest.fixture(scope="session")
def mlqa_prepared(tmp_path_factory) -> Path:
    """MLQA-R converted once per session by ``hybridray data prepare`` (seed 0, 30% held out)."""
    from hybridray.data.prepare import prepare_lareqa

    out = tmp_path_factory.mktemp("prepared") / "mlqa-r"
    prepare_lareqa(MLQA_R, out, heldout_fraction=0.3, seed=0)
    return out


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 for the session; the usual ``AWS_*`` variables point at it.

    Set before Ray starts (``ray_session`` depends on it), so Ray workers inherit them, as on a
    real cluster where endpoint and credentials are in the environment before ``ray start``.
    Tests create their own buckets.
    """
    import logging

    from moto.server import ThreadedMotoServer

    from hybridray import storage

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    storage._s3.cache_clear()
    yield endpoint
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    storage._s3.cache_clear()
    server.stop()


@pytest.fixture(scope="session")
def _ray_stopped_at_the_end():
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def ray_session(s3_server, _ray_stopped_at_the_end):
    """One local Ray (2 CPUs, loopback) shared by every test that needs Ray: started by the
    first module that asks, kept for the next, started again after a module that needed
    this process without one (``no_ray_in_this_process``)."""
    from hybridray.train import init_ray

    init_ray(num_cpus=2)  # nothing to do when it is up


@pytest.fixture(scope="module")
def no_ray_in_this_process():
    """For a module whose tests run ``hybridray`` commands that start their own local Ray: a
    second local cluster on the machine (the session's, in this process) makes Ray Train's
    state queries fail ("Found multiple active Ray instances", a traceback on the command's
    console), so the session's is stopped first, whatever module ran before."""
    import ray

    ray.shutdown()


def pytest_runtest_logstart(nodeid, location):
    """Record the test that is starting (``tests/run.sh`` names it if the process dies)."""
    progress = os.environ.get("HYBRIDRAY_TEST_PROGRESS")
    if progress:
        Path(progress).write_text(nodeid + "\n")


def pytest_sessionfinish(session, exitstatus):
    progress = os.environ.get("HYBRIDRAY_TEST_PROGRESS")
    if progress:
        Path(progress).write_text(f"finished with exit status {int(exitstatus)}\n")


def spawn_one_and_two(worker, tmp: Path, names: tuple[str, str]):
    """Run ``worker(rank, ports, outputs)`` as a 1-process and a 2-process gloo group at once
    (3 processes; rank 0 of each group saves to ``outputs[world]``); returns both results."""
    import torch
    import torch.multiprocessing as mp

    from hybridray.distributed import free_port

    ports = {1: free_port(), 2: free_port()}
    outputs = {1: tmp / names[0], 2: tmp / names[1]}
    mp.spawn(run_spawned, args=(worker, ports, outputs), nprocs=3, join=True)
    return torch.load(outputs[1]), torch.load(outputs[2])


def run_spawned(index, worker, *args):
    """``worker(index, *args)`` in a spawned process, with Python's traceback of every thread
    on a fatal signal (``faulthandler``: a worker once died of SIGABRT in CI with no trace),
    and an exit without interpreter teardown once it returned: the work is done and saved, and
    a gloo or DeepSpeed destructor aborting at exit must not fail a finished run. Deliberately
    so: a teardown abort is ignored, not diagnosed, and atexit handlers (coverage of spawned
    ranks) do not run."""
    import faulthandler
    import sys

    faulthandler.enable(all_threads=True)
    worker(index, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
