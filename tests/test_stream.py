"""The worker's stream in chunks (``hybridray.data.stream``): the same batches as one unchunked
stream, the same resume, and never more than two chunks held.

The chunking and the reader thread are checked without Ray first (fake datasets that record
when they are started); then the real pipeline runs on the session's Ray with chunks of 3
steps against one chunk for the whole run, from step 0 and resumed inside a window, inside a
chunk and at a chunk boundary.
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from hybridray.data.pipeline import build_train_dataset, iter_worker_batches
from hybridray.data.sampler import Segment
from hybridray.data.stream import CHUNKS_HELD, StepStream, drained
from test_pipeline import W, assert_same_tensors, config, data  # noqa: F401  (data: a fixture)


# ----------------------------------------------------------------------------- no Ray
def windows(*sizes: int, first: int = 0) -> tuple[Segment, ...]:
    out, step = [], first
    for w, n in enumerate(sizes):
        out.append(Segment(epoch=0, window=w, ordinal=w, first_step=step, n_steps=n))
        step += n
    return tuple(out)


def stream_of(segments, chunk_steps: int, start_step: int = 0, stop_step: int = 10**9) -> StepStream:
    return StepStream(segments=segments, start_step=start_step, stop_step=stop_step, chunk_steps=chunk_steps,
                      materialise=None, tokenise=None, task_cpus=0.25)


def test_chunks_are_whole_windows_of_at_least_chunk_steps():
    segs = windows(2, 2, 5, 1, 1, 3)  # steps 0-1, 2-3, 4-8, 9, 10, 11-13
    s = stream_of(segs, 3)
    assert [[x.window for x in c] for c in s.chunks()] == [[0, 1], [2], [3, 4, 5]]
    assert [[x.window for x in c] for c in stream_of(segs, 0).chunks()] == [[0, 1, 2, 3, 4, 5]]
    assert [[x.window for x in c] for c in stream_of(segs, 100).chunks()] == [[0, 1, 2, 3, 4, 5]]
    # from step 3 on: window 0 is skipped, window 1 counts one step
    assert [[x.window for x in c] for c in s.chunks(start_step=3)] == [[1, 2], [3, 4, 5]]
    # a stream built for steps [5, 12): window 2 has 4 of its steps, window 5 one
    built = stream_of(segs[2:], 3, start_step=5, stop_step=12)
    assert [built.steps_in(x) for x in built.segments] == [4, 1, 1, 1]
    assert [[x.window for x in c] for c in built.chunks()] == [[2], [3, 4, 5]]
    assert built.chunks(start_step=12) == [] and stream_of((), 3).chunks() == []


class FakeChunk:
    """A dataset of ``n`` rows that records when it is started and when it is closed."""

    def __init__(self, k: int, n: int, log: list):
        self.k, self.n, self.log = k, n, log

    def iter_batches(self, **_):
        self.log.append(("start", self.k))
        try:
            for i in range(self.n):
                yield {"chunk": np.array([self.k]), "i": np.array([i])}
        finally:
            self.log.append(("closed", self.k))


def makers(log: list, n_chunks: int, rows: int = 5):
    return [lambda k=k: FakeChunk(k, rows, log) for k in range(n_chunks)]


def test_the_reader_is_at_most_one_chunk_ahead():
    log: list = []
    seen = []
    for row in drained(makers(log, 6)):
        k = int(row["chunk"])
        started = [c for what, c in log if what == "start"]
        assert max(started) < k + CHUNKS_HELD, (k, started)  # chunk k and k+1 at most
        seen.append((k, int(row["i"])))
    assert seen == [(k, i) for k in range(6) for i in range(5)]
    assert [c for what, c in log if what == "closed"] == list(range(6))  # each executor ran to its end


def test_a_stopped_consumer_stops_the_reader_waiting_for_room():
    log: list = []
    rows = drained(makers(log, 10))
    assert int(next(rows)["chunk"]) == 0
    deadline = time.monotonic() + 30
    while ("closed", 1) not in log and time.monotonic() < deadline:
        time.sleep(0.01)  # the reader drains chunk 1, then waits for room
    rows.close()
    assert not [t for t in threading.enumerate() if t.name == "hybridray-drain"]
    assert max(c for what, c in log if what == "start") == 1


def test_an_error_in_a_chunk_reaches_the_consumer():
    def broken():
        raise OSError("shard gone")

    rows = drained([lambda: FakeChunk(0, 2, []), broken])
    assert [int(r["i"]) for r in (next(rows), next(rows))] == [0, 1]
    with pytest.raises(OSError, match="shard gone"):
        next(rows)


# ----------------------------------------------------------------------------- through Ray
def collect(stream, start_step: int = 0) -> list[list[dict]]:
    return [list(iter_worker_batches(stream, rank=r, world_size=W, start_step=start_step)) for r in range(W)]


def assert_same_steps(got: list[list[dict]], want: list[list[dict]]) -> None:
    assert [len(r) for r in got] == [len(r) for r in want]
    for rank_got, rank_want in zip(got, want):
        for a, b in zip(rank_got, rank_want):
            assert_same_tensors(a, b)


@pytest.fixture(scope="module")
def runs(ray_session, data):  # noqa: F811
    """The 14 steps of a run (hard negatives, an extra set; windows of 2 steps) as one chunk."""
    overrides = {"loss.hard_negatives": 2, "data.extra_mono": [{"path": str(data["extra"]), "weight": 0.5}],
                 "sampler.alpha": 0.7}
    chunked = config(data, **overrides, **{"data.stream_chunk_steps": 3})
    whole = config(data, **overrides, **{"data.stream_chunk_steps": 0})
    reference, _ = build_train_dataset(whole, rejects_path=None)
    return chunked, reference, collect(reference)


def test_chunked_stream_gives_the_batches_of_one_stream(runs):
    chunked, _, want = runs
    stream, _ = build_train_dataset(chunked, rejects_path=None)
    assert [sum(stream.steps_in(s) for s in c) for c in stream.chunks()] == [4, 4, 4, 2]
    assert {s["batch_type"] for s in want[0]} == {"mono", "cross"}
    assert_same_steps(collect(stream), want)


@pytest.mark.parametrize("start_step", [5, 8])  # inside a window and a chunk; at a chunk boundary
def test_chunked_resume_gives_the_tail(runs, start_step):
    chunked, reference, want = runs
    tail = [r[start_step:] for r in want]
    resumed, _ = build_train_dataset(chunked, rejects_path=None, start_step=start_step)  # driver-side skip
    assert_same_steps(collect(resumed, start_step), tail)
    assert_same_steps(collect(reference, start_step), tail)  # one chunk, worker-side skip


def test_worker_side_resume_crosses_a_chunk_boundary(runs):
    """A worker that learns its step from a checkpoint (after the stream was built from step
    0) skips the chunks before it and crosses into the next chunk after one step."""
    chunked, _, want = runs
    stream, _ = build_train_dataset(chunked, rejects_path=None)
    assert [c[0].first_step for c in stream.chunks(start_step=7)] == [6, 10]  # chunk 6-9, then 10-13
    assert_same_steps(collect(stream, 7), [r[7:] for r in want])
