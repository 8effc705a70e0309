"""A worker's stream of global steps, in chunks: bounded memory, no backpressured executor.

The pipeline (``data.pipeline``) is 45-900x faster than training. Read at the training pace,
a Ray Data stream keeps its streaming executor backpressured, and a backpressured executor
with no task in flight busy-loops in its scheduling thread, holding the GIL next to the
training thread (measured: a 2-worker e5-small step went from 5 s to 15 s). So a reader
thread drains each stream as fast as Ray produces it, and the executor finishes and exits.

Drained as one dataset, the whole run would pile up in the worker (about 75 KB per global
step of 32 pairs at 48/96 tokens: 7 GB for 100k steps). So the run is cut into chunks of
exactly ``data.stream_chunk_steps`` steps (the last may be shorter), one Ray Data dataset
each, built inside the worker when its turn comes. Chunks are cut at step boundaries, not at
planning windows: a window longer than a chunk is split into pieces, each piece plans the
whole window again (no tokenising; ``sampler.plan_window`` is a pure function of the window)
and reads and tokenises only its own steps. The reader thread drains a chunk completely (its
executor ends), then starts the next one only while the consumer is still on the chunk
before it: a worker holds at most ``2 * data.stream_chunk_steps`` tokenised steps (plus the
few rows Ray Data prefetches), whatever ``sampler.window_groups`` and the run's length are,
and no executor is ever left waiting on the consumer.

Ray Train hands an unsplit dataset to each worker as ``dataset.iterator()``, which executes
in the worker's own process (``ray.train.DataConfig.configure``); building each chunk's
dataset in the worker runs the same executor in the same place, with the DataContext Ray
Train copied from the driver into every worker.
"""
from __future__ import annotations

import functools
import logging
import queue
import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator

from hybridray.data.sampler import Segment

#: Chunks held at once: the one being consumed and the one drained ahead of it.
CHUNKS_HELD = 2
#: How long a stopped consumer waits for the reader thread: one Ray Data batch, which at a
#: chunk's start can be a whole window planned and its texts read.
DRAIN_JOIN_TIMEOUT_S = 60.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Piece:
    """The steps ``[lo, hi)`` of one segment (a planning window): a chunk is a run of pieces."""

    segment: Segment
    lo: int
    hi: int

    @property
    def n_steps(self) -> int:
        return self.hi - self.lo

    def row(self) -> dict[str, int]:
        """The segment's fields plus its step range: one input row of ``pipeline._materialise``."""
        return {**asdict(self.segment), "lo": self.lo, "hi": self.hi}


@dataclass(frozen=True)
class StepStream:
    """The steps ``[start_step, stop_step)`` of a run, as a plan a worker turns into Ray Data
    datasets, one per chunk: small and picklable (segments, the stages with the object refs
    of the run's windows), handed to every worker by the driver.

    ``materialise`` turns piece rows (``Piece.row``) into step rows (texts), ``tokenise`` step
    rows into padded ids (``pipeline._materialise`` / ``pipeline._tokenise`` with their
    arguments bound).
    """

    segments: tuple[Segment, ...] = field(repr=False)
    start_step: int
    stop_step: int
    #: Steps per chunk (the last chunk may be shorter); 0 = the whole run as one chunk.
    chunk_steps: int
    materialise: Callable = field(repr=False)
    tokenise: Callable = field(repr=False)
    task_cpus: float

    def __repr__(self) -> str:  # short: Ray Train may str() the loop config into its run state
        chunks = f"chunks of {self.chunk_steps}" if self.chunk_steps else "one chunk"
        return (f"StepStream(steps {self.start_step}-{self.stop_step}, {len(self.segments)} segments, "
                f"{chunks})")

    def steps_in(self, segment: Segment, start_step: int = 0) -> int:
        """How many of ``segment``'s steps this stream yields from ``start_step`` on."""
        lo, hi = self._range(segment, start_step)
        return max(0, hi - lo)

    def _range(self, segment: Segment, start_step: int) -> tuple[int, int]:
        return (max(segment.first_step, self.start_step, start_step),
                min(segment.first_step + segment.n_steps, self.stop_step))

    def chunks(self, start_step: int = 0) -> list[tuple[Piece, ...]]:
        """The steps from ``start_step`` on, cut into chunks of ``chunk_steps`` consecutive
        steps (the last one may be shorter); a window is split wherever a chunk ends."""
        out: list[tuple[Piece, ...]] = []
        current: list[Piece] = []
        n = 0
        for segment in self.segments:
            lo, hi = self._range(segment, start_step)
            while lo < hi:
                take = hi - lo if not self.chunk_steps else min(hi - lo, self.chunk_steps - n)
                current.append(Piece(segment, lo, lo + take))
                n, lo = n + take, lo + take
                if n == self.chunk_steps:
                    out.append(tuple(current))
                    current, n = [], 0
        if current:
            out.append(tuple(current))
        return out

    def dataset(self, chunk: tuple[Piece, ...]):
        """The Ray Data dataset of one chunk's steps, in step order."""
        import ray.data

        ds = (
            ray.data.from_items([p.row() for p in chunk], override_num_blocks=len(chunk))
            .map_batches(self.materialise, batch_size=1, batch_format="pyarrow", num_cpus=self.task_cpus)
            .map_batches(self.tokenise, batch_size=1, batch_format="pyarrow", num_cpus=self.task_cpus)
        )
        ds.context.execution_options.preserve_order = True  # this dataset only, not the global context
        ds.set_name(f"train-steps-{chunk[0].lo}-{chunk[-1].hi}")  # its name in Ray Data's logs and dashboard
        return ds

    def chunk_datasets(self, start_step: int = 0) -> list[Callable[[], Any]]:
        """One maker per chunk: each builds its chunk's dataset when called (by ``drained``,
        when that chunk's turn comes)."""
        return [functools.partial(self.dataset, chunk) for chunk in self.chunks(start_step)]


_END = object()
_CHUNK_END = object()


def drained(chunks: Iterable[Callable[[], Any]]) -> Iterator[dict[str, Any]]:
    """The rows of each chunk's dataset (a ``ray.data.Dataset`` or ``DataIterator``) in
    order, pulled by a background thread as fast as Ray produces them, at most one chunk
    ahead of the consumer (``CHUNKS_HELD``).

    The thread lives exactly as long as the consumer: when the consumer stops early (an error,
    a ``break``, the generator closed or collected), the thread closes Ray Data's iterator
    (which shuts its executor down) and is joined before this generator returns. A thread
    left pulling after its consumer is gone would go on calling into Ray after
    ``ray.shutdown()``, where it auto-starts a second cluster or trips Ray's own checks and
    kills the process (seen in the test suite: a process exit with no message).
    """
    rows: queue.Queue = queue.Queue()  # bounded by the chunks, not by a size
    stop = threading.Event()
    room = threading.Semaphore(CHUNKS_HELD)  # released as the consumer finishes a chunk

    def pull() -> None:
        try:
            for make in chunks:
                room.acquire()
                if stop.is_set():
                    return
                batches = make().iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=2)
                try:
                    for batch in batches:
                        if stop.is_set():
                            return
                        rows.put({k: v[0] for k, v in batch.items()})
                finally:
                    close = getattr(batches, "close", None)
                    if close is not None:
                        close()
                rows.put(_CHUNK_END)
            rows.put(_END)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            rows.put(exc)

    thread = threading.Thread(target=pull, name="hybridray-drain", daemon=True)
    thread.start()
    try:
        while (row := rows.get()) is not _END:
            if row is _CHUNK_END:
                room.release()
                continue
            if isinstance(row, BaseException):
                raise row
            yield row
    finally:
        stop.set()
        room.release()  # a thread waiting for room wakes up, sees the stop and returns
        thread.join(timeout=DRAIN_JOIN_TIMEOUT_S)
        if thread.is_alive():
            message = (f"the batch stream's reader thread did not stop within {DRAIN_JOIN_TIMEOUT_S:.0f} s "
                       "of its consumer: it would go on calling into Ray")
            if _closing_on_error():
                log.error("%s (not raised: the error that stopped the consumer goes on)", message)
            else:
                raise RuntimeError(message)


def _closing_on_error() -> bool:
    """Whether this generator is being closed because of an error (not a ``break`` or a normal
    close): an exception other than ``GeneratorExit`` in the chain being handled. Raising the
    join failure then would hide the real cause behind it."""
    exc = sys.exc_info()[1]
    while exc is not None:
        if not isinstance(exc, GeneratorExit):
            return True
        exc = exc.__context__
    return False
