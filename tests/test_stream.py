"""The worker's stream in chunks (``hybridray.data.stream``): the same batches as one unchunked
stream, the same resume, and never more than two chunks held.

The chunking and the reader thread are checked without Ray first (fake datasets that record
when they are started, what they produce and when they are closed); then the real pipeline
runs on the session's Ray with chunks of 3 steps (windows of 2 split across chunks) and of 4
steps (windows of 6) against one chunk for the whole run, from step 0 and resumed inside a
window, inside a chunk and at a chunk boundary.
"""
from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest

from hybridray.data.pipeline import build_train_dataset, iter_worker_batches
from hybridray.data.sampler import Segment
from hybridray.data import stream as stream_module
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


def cut(stream: StepStream, start_step: int = 0) -> list[list[tuple[int, int, int]]]:
    """The chunks as (window, lo, hi) per piece."""
    return [[(p.segment.window, p.lo, p.hi) for p in c] for c in stream.chunks(start_step)]


def test_chunks_are_cut_at_steps_not_windows():
    assert cut(stream_of(windows(5), 3)) == [[(0, 0, 3)], [(0, 3, 5)]]  # a window longer than a chunk
    segs = windows(2, 2, 5, 1, 1, 3)  # steps 0-1, 2-3, 4-8, 9, 10, 11-13
    s = stream_of(segs, 3)
    assert cut(s) == [[(0, 0, 2), (1, 2, 3)], [(1, 3, 4), (2, 4, 6)], [(2, 6, 9)], [(3, 9, 10), (4, 10, 11), (5, 11, 12)],
                      [(5, 12, 14)]]
    assert cut(stream_of(segs, 0)) == cut(stream_of(segs, 100)) == [[(w, s.first_step, s.first_step + s.n_steps)
                                                                      for w, s in enumerate(segs)]]
    # from step 3 on: window 0 is skipped, window 1 counts one step
    assert cut(s, start_step=3) == [[(1, 3, 4), (2, 4, 6)], [(2, 6, 9)], [(3, 9, 10), (4, 10, 11), (5, 11, 12)],
                                    [(5, 12, 14)]]
    # a stream built for steps [5, 12): window 2 has 4 of its steps, window 5 one
    built = stream_of(segs[2:], 3, start_step=5, stop_step=12)
    assert [built.steps_in(x) for x in built.segments] == [4, 1, 1, 1]
    assert cut(built) == [[(2, 5, 8)], [(2, 8, 9), (3, 9, 10), (4, 10, 11)], [(5, 11, 12)]]
    assert built.chunks(start_step=12) == [] and stream_of((), 3).chunks() == []
    # the bound: no chunk over chunk_steps, whatever the windows
    big = stream_of(windows(3125, 3125, 17), 2000)
    assert max(sum(p.n_steps for p in c) for c in big.chunks()) == 2000
    assert sum(p.n_steps for c in big.chunks() for p in c) == 3125 * 2 + 17


def test_a_stream_prints_short():
    s = stream_of(windows(*[25] * 4000), 2000, stop_step=100_000)
    assert repr(s) == str(s) == "StepStream(steps 0-100000, 4000 segments, chunks of 2000)"


class FakeChunk:
    """A dataset of ``n`` rows that records when it is started, each row it produces, and when
    it is closed."""

    def __init__(self, k: int, n: int, log: list):
        self.k, self.n, self.log = k, n, log

    def iter_batches(self, **_):
        self.log.append(("start", self.k))
        try:
            for i in range(self.n):
                self.log.append(("row", self.k))
                yield {"chunk": np.array([self.k]), "i": np.array([i])}
        finally:
            self.log.append(("closed", self.k))


def makers(log: list, n_chunks: int, rows: int = 5):
    return [lambda k=k: FakeChunk(k, rows, log) for k in range(n_chunks)]


class RecordedRoom(threading.Semaphore):
    """The reader's semaphore, logging each time the reader thread waits for room."""

    log: list = []

    def acquire(self, *args, **kwargs):
        if threading.current_thread().name == "hybridray-drain":
            self.log.append(("wait", None))
        return super().acquire(*args, **kwargs)


def test_the_reader_waits_with_no_executor_alive_and_holds_two_chunks(monkeypatch):
    """The two properties the design rests on: the reader blocks only once the chunk it
    drained is closed (no executor is ever left waiting on the consumer), and at most two
    chunks of rows are produced and not yet consumed."""
    log: list = []
    monkeypatch.setattr(RecordedRoom, "log", log)
    monkeypatch.setattr(stream_module.threading, "Semaphore", RecordedRoom)
    n_chunks, rows = 6, 5
    consumed = 0
    for row in drained(makers(log, n_chunks, rows)):
        k = int(row["chunk"])
        consumed += 1
        # let the reader get as far ahead as it may: chunk k+1 drained once chunk k started
        want = min(n_chunks, k + CHUNKS_HELD) * rows
        deadline = time.monotonic() + 10
        while sum(1 for e in list(log) if e[0] == "row") < want and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.005)
        produced = sum(1 for e in list(log) if e[0] == "row")
        assert produced >= want, (k, produced)  # the reader did run ahead
        assert produced - consumed <= CHUNKS_HELD * rows, (k, produced, consumed)
    assert consumed == n_chunks * rows
    waits = [i for i, e in enumerate(log) if e[0] == "wait"]
    assert len(waits) == n_chunks  # once before each chunk
    for i in waits:
        started = {c for what, c in log[:i] if what == "start"}
        closed = {c for what, c in log[:i] if what == "closed"}
        assert started == closed, (i, log[:i])
    for j in range(1, n_chunks):
        assert log.index(("closed", j - 1)) < log.index(("start", j))
    assert [c for what, c in log if what == "closed"] == list(range(n_chunks))  # each executor ran to its end


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


class StuckChunk:
    """A dataset whose first batch does not come until ``release`` is set (a chunk's first
    window being planned and read)."""

    def __init__(self, release: threading.Event):
        self.release = release

    def iter_batches(self, **_):
        self.release.wait(30)
        yield {"chunk": np.array([1]), "i": np.array([0])}


def test_a_reader_that_cannot_stop_does_not_hide_the_consumers_error(monkeypatch, caplog):
    """Closed by an error, the stream logs that its reader did not stop and lets the error
    go on; closed by a plain ``close()``, it raises that the reader did not stop."""
    monkeypatch.setattr(stream_module, "DRAIN_JOIN_TIMEOUT_S", 0.2)
    release = threading.Event()
    try:
        with pytest.raises(ValueError, match="the training step failed"):
            rows = drained([lambda: FakeChunk(0, 1, []), lambda: StuckChunk(release)])
            with contextlib.closing(rows):
                for _ in rows:
                    raise ValueError("the training step failed")
        assert "did not stop within 0 s" in caplog.text
        rows = drained([lambda: FakeChunk(0, 1, []), lambda: StuckChunk(release)])
        next(rows)
        with pytest.raises(RuntimeError, match="did not stop within 0 s"):
            rows.close()
    finally:
        release.set()


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
    assert [sum(p.n_steps for p in c) for c in stream.chunks()] == [3, 3, 3, 3, 2]  # windows of 2 split
    assert {s["batch_type"] for s in want[0]} == {"mono", "cross"}
    assert_same_steps(collect(stream), want)


@pytest.mark.parametrize("start_step", [5, 9])  # inside a window and a chunk; at a chunk boundary inside a window
def test_chunked_resume_gives_the_tail(runs, start_step):
    chunked, reference, want = runs
    tail = [r[start_step:] for r in want]
    resumed, _ = build_train_dataset(chunked, rejects_path=None, start_step=start_step)  # driver-side skip
    assert_same_steps(collect(resumed, start_step), tail)
    assert_same_steps(collect(reference, start_step), tail)  # one chunk, worker-side skip


def test_worker_side_resume_crosses_a_chunk_boundary(runs):
    """A worker that learns its step from a checkpoint (after the stream was built from step
    0) starts its chunks there, in the middle of a window."""
    chunked, _, want = runs
    stream, _ = build_train_dataset(chunked, rejects_path=None)
    assert [(c[0].lo, c[-1].hi) for c in stream.chunks(start_step=7)] == [(7, 10), (10, 13), (13, 14)]
    assert_same_steps(collect(stream, 7), [r[7:] for r in want])


def test_windows_longer_than_a_chunk_give_the_batches_of_one_stream(ray_session, data):  # noqa: F811
    """Windows of 6 steps (all 49 groups) in chunks of 4: every window is split, and chunks
    span windows and epochs."""
    big = {"sampler.window_groups": 48, "loss.hard_negatives": 1}
    chunked, _ = build_train_dataset(config(data, **big, **{"data.stream_chunk_steps": 4}), rejects_path=None)
    whole, _ = build_train_dataset(config(data, **big, **{"data.stream_chunk_steps": 0}), rejects_path=None)
    assert [s.n_steps for s in chunked.segments] == [6, 6, 6]
    assert [[(p.lo, p.hi) for p in c] for c in chunked.chunks()] == [
        [(0, 4)], [(4, 6), (6, 8)], [(8, 12)], [(12, 14)]]
    got, want = collect(chunked), collect(whole)
    assert len(want[0]) == 14 and {s["batch_type"] for s in want[0]} == {"mono", "cross"}
    assert_same_steps(got, want)
