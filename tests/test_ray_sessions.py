"""Ray started and stopped several times in one process, in shuffled orders, with batch streams
abandoned half-read: the process must survive it, with no thread left calling into Ray.

The suite used to die here without a word (exit 1, no pytest summary): a test abandoned a
batch stream, whose reader thread went on pulling from Ray Data after ``ray.shutdown()``;
with the next ``ray.init()`` in the same process it auto-started a second cluster and tripped
a fatal check inside Ray (``PeekObjectRefStream``), which ends the process at once.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

pytestmark = pytest.mark.ray

SCRIPT = textwrap.dedent('''
    import os, random, sys, threading, time
    import ray, ray.data
    from hybridray.data.pipeline import _drained, iter_worker_batches
    from hybridray.train import init_ray

    def slow(batch):
        time.sleep(0.005)
        return batch

    def stream(n=5000):
        return ray.data.range(n, override_num_blocks=50).map_batches(slow, batch_size=10)

    def abandon():      # the consumer breaks out after a few rows
        for i, _ in enumerate(_drained(stream())):
            if i == 3:
                break

    def fail():         # the consumer raises on the first row (a stream of the wrong steps)
        steps = stream().map(lambda r: {"step": r["id"] + 5})
        try:
            next(iter_worker_batches(steps, rank=0, world_size=1))
        except RuntimeError as exc:
            assert "expected step 0" in str(exc)
        else:
            raise AssertionError("no error")

    def finish():       # read to the end
        assert sum(1 for _ in _drained(stream(200))) == 200

    phases = [abandon, fail, finish, abandon]
    random.Random(int(sys.argv[1])).shuffle(phases)
    for phase in phases:
        init_ray(num_cpus=2, _temp_dir=sys.argv[2])
        phase()
        left = [t.name for t in threading.enumerate() if t.name == "hybridray-drain"]
        assert not left, f"{phase.__name__}: reader thread still running"
        ray.shutdown()
    print("sessions", len([d for d in os.listdir(sys.argv[2]) if d.startswith("session_2")]))
''')


@pytest.mark.parametrize("seed", [5])  # abandon, fail, abandon, finish: a new session after each abandoned stream
def test_repeated_ray_sessions_survive_abandoned_streams(seed):
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit
    try:
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(seed), temp],
            capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ENABLE_AUTO_CONNECT": "0"},
        )
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "sessions 4" in done.stdout, done.stdout  # one per phase: no second cluster started
