"""A worker's stream of global steps, in chunks: bounded memory, no backpressured executor.

The pipeline (``data.pipeline``) is 45-900x faster than training. Read at the training pace,
a Ray Data stream keeps its streaming executor backpressured, and a backpressured executor
with no task in flight busy-loops in its scheduling thread, holding the GIL next to the
training thread (measured: a 2-worker e5-small step went from 5 s to 15 s). So a reader
thread drains each stream as fast as Ray produces it, and the executor finishes and exits.

Drained as one dataset, the whole run would pile up in the worker (about 75 KB per global
step of 32 pairs at 48/96 tokens: 7 GB for 100k steps). So the run is cut into chunks of
whole segments (planning windows) of about ``data.stream_chunk_steps`` steps, one Ray Data
dataset each, built inside the worker when its turn comes. The reader thread drains a chunk
completely (its executor ends), then starts the next one only while the consumer is still
on the chunk before it: a worker holds at most two chunks of tokenised steps however long
the run, and no executor is ever left waiting on the consumer.

Ray Train hands an unsplit dataset to each worker as ``dataset.iterator()``, which executes
in the worker's own process (``ray.train.DataConfig.configure``); building each chunk's
dataset in the worker runs the same executor in the same place, with the DataContext Ray
Train copied from the driver into every worker.
"""
from __future__ import annotations

import functools
import queue
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

from hybridray.data.sampler import Segment

#: Chunks held at once: the one being consumed and the one drained ahead of it.
CHUNKS_HELD = 2
#: How long a stopped consumer waits for the reader thread (one Ray Data batch at most).
DRAIN_JOIN_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class StepStream:
    """The steps ``[start_step, stop_step)`` of a run, as a plan a worker turns into Ray Data
    datasets, one per chunk: small and picklable (segments, the stages with the object refs
    of the run's windows), handed to every worker by the driver.

    ``materialise`` turns segment rows into step rows (texts), ``tokenise`` step rows into
    padded ids (``pipeline._materialise`` / ``pipeline._tokenise`` with their arguments bound).
    """

    segments: tuple[Segment, ...]
    start_step: int
    stop_step: int
    #: Steps per chunk, whole segments (a chunk is at least one window); 0 = one chunk.
    chunk_steps: int
    materialise: Callable
    tokenise: Callable
    task_cpus: float

    def steps_in(self, segment: Segment, start_step: int = 0) -> int:
        """How many of ``segment``'s steps this stream yields from ``start_step`` on."""
        lo = max(segment.first_step, self.start_step, start_step)
        return max(0, min(segment.first_step + segment.n_steps, self.stop_step) - lo)

    def chunks(self, start_step: int = 0) -> list[tuple[Segment, ...]]:
        """The segments with steps at ``start_step`` or later, grouped into chunks of whole
        segments of at least ``chunk_steps`` steps (the last one may be shorter)."""
        live = [s for s in self.segments if self.steps_in(s, start_step)]
        if not self.chunk_steps:
            return [tuple(live)] if live else []
        out: list[tuple[Segment, ...]] = []
        current: list[Segment] = []
        n = 0
        for segment in live:
            current.append(segment)
            n += self.steps_in(segment, start_step)
            if n >= self.chunk_steps:
                out.append(tuple(current))
                current, n = [], 0
        if current:
            out.append(tuple(current))
        return out

    def dataset(self, chunk: tuple[Segment, ...]):
        """The Ray Data dataset of one chunk's steps, in step order."""
        import ray.data

        ds = (
            ray.data.from_items([asdict(s) for s in chunk], override_num_blocks=len(chunk))
            .map_batches(self.materialise, batch_size=1, batch_format="pyarrow", num_cpus=self.task_cpus)
            .map_batches(self.tokenise, batch_size=1, batch_format="pyarrow", num_cpus=self.task_cpus)
        )
        ds.context.execution_options.preserve_order = True  # this dataset only, not the global context
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
            raise RuntimeError(
                f"the batch stream's reader thread did not stop within {DRAIN_JOIN_TIMEOUT_S:.0f} s "
                "of its consumer: it would go on calling into Ray"
            )
