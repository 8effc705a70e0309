"""``hybridray eval --workers N``: encoding spread over a pool of N Ray actors.

The texts are cut into chunks; a Ray Data ``map_batches`` actor pool (one actor per GPU, or
an equal share of the CPUs each: :func:`hybridray.device.encode_actor_resources`) encodes one
chunk per call with the same ``encode_texts`` as one process, and the driver puts each chunk's
rows back in input order -- sentence-transformers' ``encode_multi_process`` design (chunks to
a pool of workers, results reassembled by position), with Ray placing the workers across a
cluster. The weights go to the object store once; each actor loads them once per dataset.

A chunk is either texts (held by the driver anyway) or a byte range of a BEIR
``corpus.jsonl`` that the actor reads itself (:func:`hybridray.evaluate.beir.read_corpus_chunk`),
so a corpus of millions of passages never sits in one process. The file must then be readable
at the same path on every node that runs an actor (one machine, or a shared filesystem).

One worker never starts Ray: ``hybridray eval`` then encodes in its own process, as before.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

#: Chunks per actor of an in-memory text list (as sentence-transformers: small enough that a
#: slow actor does not hold up the end, large enough that each call sorts a useful batch).
CHUNKS_PER_WORKER = 10
#: The largest in-memory chunk, in texts.
MAX_CHUNK = 5000


def _python(value):
    """A numpy scalar of a batch column as the Python value (a string column holds ``str``)."""
    return value.item() if isinstance(value, np.generic) else value


def chunk_length(n: int, workers: int, largest: int) -> int:
    """Texts per chunk of ``n``: all of them for one worker (up to ``largest``), else about
    :data:`CHUNKS_PER_WORKER` chunks per worker."""
    if workers == 1:
        return max(1, min(n, largest))
    return max(1, min(largest, math.ceil(n / (workers * CHUNKS_PER_WORKER))))


class _EncodeActor:
    """One actor of the pool: the model loaded once, then ``encode_texts`` per chunk."""

    def __init__(self, weights: list, threads: int, reader: Optional[Callable], settings: dict):
        import ray
        import torch

        from hybridray.console import quiet_process
        from hybridray.device import default_device

        quiet_process()
        torch.set_num_threads(threads)
        self.model, self.tokenizer = ray.get(weights[0])
        self.model.to(default_device())
        self.reader, self.settings = reader, settings

    def __call__(self, batch: dict) -> dict:
        from hybridray.evaluate.encode import encode_texts

        rows, vectors = [], []
        parts = sorted((key for key in batch if key.startswith("source")), key=lambda key: int(key[6:]))
        for i, first in enumerate(batch["first"]):
            if self.reader is None:
                texts = [str(text) for text in batch["texts"][i]]
            else:
                texts = self.reader(tuple(_python(batch[key][i]) for key in parts))
            vectors.append(encode_texts(self.model, self.tokenizer, texts, progress=False, **self.settings))
            rows.append(np.arange(int(first), int(first) + len(texts)))
        return {"row": np.concatenate(rows), "embedding": np.concatenate(vectors)}


class EncoderPool:
    """``encode_texts`` and ``encode_chunks`` on ``workers`` Ray actors.

    Pass it where an evaluator takes the model: ``hybridray.evaluate.encode.encode_texts``
    hands the work to it. Ray must be initialised (``hybridray.train.init_ray``)."""

    def __init__(self, model, tokenizer, workers: int):
        import ray

        from hybridray.device import cpu_threads, encode_actor_resources

        self.workers = workers
        self.resources = encode_actor_resources(workers, ray.cluster_resources())
        self.threads = cpu_threads(self.resources["num_cpus"])
        self._weights = [ray.put((model.to("cpu"), tokenizer))]  # in a list: Ray Data must not resolve it

    def encode_texts(self, texts: Sequence[str], *, prefix: str = "", progress: bool = False, **settings) -> np.ndarray:
        """As :func:`hybridray.evaluate.encode.encode_texts`, rows in input order; each distinct
        text is encoded once, in one chunk, so equal texts get bit-identical vectors."""
        from hybridray.evaluate.encode import distinct

        if len(texts) == 0:
            raise ValueError("encode_texts: no texts to encode")
        texts, where = distinct(texts)
        size = chunk_length(len(texts), self.workers, MAX_CHUNK)
        chunks = [{"first": i, "texts": list(texts[i:i + size])} for i in range(0, len(texts), size)]
        out: Optional[np.ndarray] = None
        for rows, vectors in self._run(chunks, None, prefix=prefix, **settings):
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            out[rows] = vectors
        return out[where]

    def encode_chunks(self, chunks: Iterable[tuple[int, object]], reader: Callable, *, prefix: str = "",
                      progress: bool = False, **settings) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(rows, vectors)`` of each chunk ``(first row, source)``, in any order; the actors
        read ``reader(source)`` themselves."""
        # a source (path, start, end) travels as columns source0, source1, ...: one type each
        items = [{"first": first, **{f"source{j}": part for j, part in enumerate(source)}} for first, source in chunks]
        yield from self._run(items, reader, prefix=prefix, **settings)

    def _run(self, items: list[dict], reader: Optional[Callable], **settings):
        import ray.data

        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _EncodeActor, batch_size=1, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=self.workers),
            fn_constructor_kwargs={"weights": self._weights, "threads": self.threads, "reader": reader,
                                   "settings": settings},
            **self.resources,
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            yield batch["row"], np.asarray(batch["embedding"], dtype=np.float32)


def encoder_for(model, tokenizer, workers: int):
    """What evaluators encode with: the model itself on this process's device (one worker), or
    an :class:`EncoderPool` of ``workers`` actors (Ray started here if it is not up yet)."""
    from hybridray.errors import UserError

    if workers < 1:
        raise UserError(f"--workers {workers}: expected 1 or more")
    if workers == 1:
        from hybridray.device import default_device

        return model.to(default_device())
    from hybridray.console import quiet_process
    from hybridray.train import init_ray

    quiet_process()  # Ray Data's progress bars and INFO lines off, as in training (--verbose: on)
    init_ray()
    return EncoderPool(model, tokenizer, workers)
