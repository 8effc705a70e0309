"""``hybridray eval --workers N``: encoding spread over a pool of N Ray actors.

The texts are cut into chunks; N long-lived Ray actors (one per GPU, or a share of the CPUs
each: :func:`hybridray.device.encode_actor_resources`) encode one chunk per call with the same
``encode_texts`` as one process, and the driver puts each chunk's rows back in input order --
sentence-transformers' ``encode_multi_process`` design (chunks to a pool of workers, results
reassembled by position), with Ray placing the workers across a cluster. The actors are
started once per ``hybridray eval`` run (:func:`encoder_for`): each loads the weights from the
object store once and serves every encoding call of every task (queries, corpora), and is
killed at the end.

A chunk is either texts (held by the driver anyway) or a byte range of a BEIR
``corpus.jsonl`` that the actor reads itself (:func:`hybridray.evaluate.beir.read_corpus_chunk`),
so neither a corpus's texts nor its embeddings sit in one process (the driver holds its ids,
byte offsets and a 16-byte digest per passage, the queries and their embeddings, the qrels
and the running top-k). The file must then be readable at the same path on every node that
runs an actor (one machine, or a shared filesystem). An ``s3://`` BEIR task is downloaded to
the driver's cache first, so on a cluster of several nodes it needs ``--workers 1`` (or a
cache directory on a shared filesystem) -- not fixed yet.

One worker never starts Ray: ``hybridray eval`` then encodes in its own process, as before.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

#: Chunks per actor when the texts fit in fewer than MAX_CHUNK-sized chunks: one. Each chunk is
#: length-sorted and batched on its own, so small chunks pad far more: 3,000 MLQA-R sentences
#: in chunks of 150 cost each actor twice the CPU of chunks of 1,500 (BENCHMARKS.md).
CHUNKS_PER_WORKER = 1
#: The largest in-memory chunk, in texts.
MAX_CHUNK = 5000
#: Seconds for every actor of a pool to be placed and load the model before it is a UserError.
START_TIMEOUT_S = 300


def chunk_length(n: int, workers: int, largest: int) -> int:
    """Texts per chunk of ``n``: all of them for one worker (up to ``largest``), else about
    :data:`CHUNKS_PER_WORKER` chunks per worker."""
    if workers == 1:
        return max(1, min(n, largest))
    return max(1, min(largest, math.ceil(n / (workers * CHUNKS_PER_WORKER))))


class _EncodeActor:
    """One actor of the pool: the model loaded once, then ``encode_texts`` per chunk."""

    def __init__(self, weights: list, threads: int):
        import ray
        import torch

        from hybridray.console import quiet_process
        from hybridray.device import default_device

        quiet_process()
        torch.set_num_threads(threads)
        self.model, self.tokenizer = ray.get(weights[0])
        self.model.to(default_device())

    def ready(self) -> bool:
        return True

    def encode(self, first: int, source, reader: Optional[Callable], settings: dict) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, vectors)`` of one chunk: ``source`` is its texts, or what ``reader`` reads them from."""
        from hybridray.evaluate.encode import encode_texts

        texts = list(source) if reader is None else reader(source)
        vectors = encode_texts(self.model, self.tokenizer, texts, progress=False, **settings)
        return np.arange(first, first + len(texts)), vectors


class EncoderPool:
    """``encode_texts`` and ``encode_chunks`` on ``workers`` Ray actors, started here and kept
    until :meth:`close` (``with encoder_for(...)`` closes it).

    Pass it where an evaluator takes the model: ``hybridray.evaluate.encode.encode_texts``
    hands the work to it. Ray must be initialised (``hybridray.train.init_ray``). Actors that
    cannot all be placed within :data:`START_TIMEOUT_S` are a UserError, not a hang."""

    def __init__(self, model, tokenizer, workers: int):
        import ray

        from hybridray.device import cpu_threads, encode_actor_resources
        from hybridray.errors import UserError

        self.workers = workers
        self.resources = encode_actor_resources(workers, ray.nodes(), ray.get_runtime_context().get_node_id())
        self.threads = cpu_threads(self.resources["num_cpus"])
        weights = [ray.put((model.to("cpu"), tokenizer))]  # in a list: the actors fetch it, once each
        actor = ray.remote(**self.resources)(_EncodeActor)
        self.actors = [actor.remote(weights, self.threads) for _ in range(workers)]
        ready, missing = ray.wait([a.ready.remote() for a in self.actors], num_returns=workers,
                                  timeout=START_TIMEOUT_S)
        if missing:
            self.close()
            raise UserError(f"--workers {workers}: {len(missing)} of {workers} encoding actors could not be started "
                            f"within {START_TIMEOUT_S} s (each needs {self.resources}); use fewer workers")
        ray.get(ready)  # an actor that failed to load the model raises here

    def encode_texts(self, texts: Sequence[str], *, prefix: str = "", progress: bool = False, **settings) -> np.ndarray:
        """As :func:`hybridray.evaluate.encode.encode_texts`, rows in input order; each distinct
        text is encoded once, in one chunk, so equal texts get bit-identical vectors.
        ``progress`` is ignored (the actors' bars would interleave)."""
        from hybridray.evaluate.encode import distinct

        if len(texts) == 0:
            raise ValueError("encode_texts: no texts to encode")
        texts, where = distinct(texts)
        size = chunk_length(len(texts), self.workers, MAX_CHUNK)
        out: Optional[np.ndarray] = None
        written = np.zeros(len(texts), dtype=np.int64)
        chunks = [(i, texts[i:i + size]) for i in range(0, len(texts), size)]
        for rows, vectors in self._run(chunks, None, prefix=prefix, **settings):
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            out[rows] = vectors
            written[rows] += 1
        if not (written == 1).all():
            raise RuntimeError(f"EncoderPool: {int((written != 1).sum())} of {len(texts)} rows not written exactly once")
        return out[where]

    def encode_chunks(self, chunks: Iterable[tuple[int, object]], reader: Callable, *, prefix: str = "",
                      progress: bool = False, **settings) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows, vectors)`` of each chunk ``(first row, source)``, in any order; the actors
        read ``reader(source)`` themselves."""
        yield from self._run(list(chunks), reader, prefix=prefix, **settings)

    def _run(self, chunks: list[tuple[int, object]], reader: Optional[Callable], **settings):
        """Each chunk to the next free actor (one chunk in flight per actor), results as they finish."""
        from ray.util import ActorPool

        from ray.exceptions import RayTaskError

        from hybridray.errors import UserError

        pool = ActorPool(self.actors)
        results = pool.map_unordered(lambda actor, chunk: actor.encode.remote(chunk[0], chunk[1], reader, settings),
                                     chunks)
        while True:
            try:
                rows, vectors = next(results)
            except StopIteration:
                return
            except RayTaskError as exc:  # a UserError in an actor (a corpus it cannot read): its one line
                if isinstance(exc.cause, UserError):
                    raise UserError(str(exc.cause.args[0]) if exc.cause.args else str(exc.cause)) from None
                raise
            yield rows, np.asarray(vectors, dtype=np.float32)

    def close(self) -> None:
        """Kill the actors (their resources go back to the cluster)."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


@contextlib.contextmanager
def encoder_for(model, tokenizer, workers: int):
    """What evaluators encode with, for the ``with`` block: the model itself on this process's
    device (one worker), or an :class:`EncoderPool` of ``workers`` actors (Ray started here if
    it is not up yet) for every task of the run, its actors killed at the end."""
    from hybridray.errors import UserError

    if workers < 1:
        raise UserError(f"--workers {workers}: expected 1 or more")
    if workers == 1:
        from hybridray.device import default_device

        yield model.to(default_device())
        return
    from hybridray.console import quiet_process
    from hybridray.train import init_ray

    quiet_process()  # Ray's INFO lines off, as in training (--verbose: on)
    init_ray()
    pool = EncoderPool(model, tokenizer, workers)
    try:
        yield pool
    finally:
        pool.close()
