"""What a checkpoint holds beyond DeepSpeed's own state: the data position, the RNG state, the
fingerprint of the run that wrote it, and a checksum of every file.

Each rank writes its own files into the same directory (DeepSpeed's files are already
per-rank); Ray Train uploads them all into one checkpoint in the run's storage. Because the
batch sequence is a pure function of (seed, step), the step is the whole data position. The
RNG state (Python, numpy, torch CPU and, on GPU machines, every visible CUDA device) makes
dropout after a resume draw exactly what the uninterrupted run drew.

Integrity: each rank seals what it wrote (``seal``: ``checksums_rank{r}.json``, the size and
SHA-256 of every file) just before the upload, which sends the seal last
(``upload_checkpoint``), and ``trainer_state.json`` records the world size. A checkpoint is
intact when every rank's seal is there and every file it lists has its size and checksum
(``checkpoint_problem``, run by the driver before a resume): a truncated upload, a lost file or
a flipped byte is caught before any worker loads it.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hybridray.distributed import rank, world_size

STATE_FILE = "trainer_state.json"
DEEPSPEED_TAG = "deepspeed"
SEAL_PREFIX = "checksums_rank"


def _rng_file(directory: Path) -> Path:
    return directory / f"rng_rank{rank()}.pt"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(engine, directory: str | Path, *, step: int, reports: dict, run: dict) -> None:
    """Collective: every rank calls it. ``step`` = optimizer steps done; ``run`` = the run's
    identity (``hybridray.runs.RunIdentity.as_dict()``), checked before any resume."""
    directory = Path(directory)
    # Frozen weights (a LoRA base, frozen embeddings) never change: they come back from the
    # base model at every start, so checkpoints leave them out (14 GB less per 7B checkpoint).
    engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, exclude_frozen_parameters=True)
    torch.save(rng_state(), _rng_file(directory))
    if rank() == 0:
        state = {"step": step, "world_size": world_size(), "run": run,
                 "reports": {k: v for k, v in reports.items() if v is not None}}
        (directory / STATE_FILE).write_text(json.dumps(state))


def read_state(directory: str | Path) -> Optional[dict]:
    """The trainer state of a checkpoint directory, or None if it has none."""
    path = Path(directory) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_state(engine, directory: str | Path) -> tuple[int, dict]:
    """Collective. Restores DeepSpeed (weights, optimizer, scheduler) and this rank's RNG;
    returns the step to continue from and the saved trainer state."""
    directory = Path(directory)
    load_path, _ = engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG, load_module_strict=False)
    if load_path is None:
        raise RuntimeError(f"{directory}: no DeepSpeed checkpoint with tag {DEEPSPEED_TAG!r}")
    set_rng_state(torch.load(_rng_file(directory), weights_only=False))
    state = read_state(directory)
    if state is None:
        raise RuntimeError(f"{directory}: no {STATE_FILE}")
    return int(state["step"]), state


def _sha256(read_chunk) -> str:
    import hashlib

    digest = hashlib.sha256()
    while chunk := read_chunk(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def seal(directory: str | Path) -> Path:
    """Write this rank's seal: ``{relative path: [size, sha256]}`` of every file it wrote into
    ``directory`` (call it last, after the model export too)."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(SEAL_PREFIX)):
        with open(path, "rb") as f:
            files[path.relative_to(directory).as_posix()] = [path.stat().st_size, _sha256(f.read)]
    out = directory / f"{SEAL_PREFIX}{rank()}.json"
    out.write_text(json.dumps({"rank": rank(), "files": files}))
    return out


def upload_checkpoint(storage_uri: str):
    """A ``checkpoint_upload_fn`` for ``ray.train.report``: this rank's files go to the
    checkpoint directory one by one, each retried on a transient storage error
    (``storage.copy_tree``), its seal last -- so a seal in storage means every file it lists
    was uploaded whole. ``storage_uri`` is ``run.storage_path`` (the URI form of Ray Train's
    storage paths). Ray Train retries the whole call on an AWS error (3 attempts)."""
    from hybridray import storage

    def upload(checkpoint, checkpoint_dir_name: str):
        import ray.train

        context = ray.train.get_context().get_storage()
        fs_path = context.build_checkpoint_path_from_name(checkpoint_dir_name)
        target = storage.uri_of(storage_uri, fs_path)
        seals = [p.name for p in Path(checkpoint.path).glob(f"{SEAL_PREFIX}*.json")]
        storage.copy_tree(checkpoint.path, target, last=seals)
        return ray.train.Checkpoint(path=fs_path, filesystem=context.storage_filesystem)

    return upload


def checkpoint_problem(uri: str, *, checksums: bool = True) -> Optional[str]:
    """Why the checkpoint at ``uri`` (local or ``s3://``) cannot be trusted, or None when every
    rank's seal is there and every file it lists has its size and checksum. A checkpoint
    written before seals existed (no ``world_size`` in its trainer state) is taken as it is.
    ``checksums=False`` checks the seals and the sizes only (a listing, no download): enough to
    name where a failed run stands; a resume checks the checksums as well."""
    from hybridray import storage

    text = storage.read_text(storage.join(uri, STATE_FILE))
    if text is None:
        return f"no {STATE_FILE}"
    try:
        state = json.loads(text)
    except ValueError:
        return f"{STATE_FILE} is not valid JSON"
    if not isinstance(state, dict):
        return f"{STATE_FILE} is not a JSON object"
    ranks = state.get("world_size")
    if ranks is not None and type(ranks) is not int:
        return f"{STATE_FILE} has no whole-number world_size ({ranks!r:.40})"
    if ranks is None:
        return None
    if ranks < 1:
        return f"{STATE_FILE} gives world_size {ranks}"
    for r in range(ranks):
        seal_text = storage.read_text(storage.join(uri, f"{SEAL_PREFIX}{r}.json"))
        if seal_text is None:
            return f"rank {r} never finished uploading ({SEAL_PREFIX}{r}.json is missing)"
        try:
            listed = json.loads(seal_text)["files"]
        except (ValueError, TypeError, KeyError):
            return f"{SEAL_PREFIX}{r}.json is not valid JSON"
        unreadable = _seal_shape_problem(listed, needs_state=r == 0)
        if unreadable:
            return f"{SEAL_PREFIX}{r}.json is unreadable ({unreadable})"
        for name, (size, digest) in sorted(listed.items()):
            file_uri = storage.join(uri, name)
            found = storage.file_sha256(file_uri) if checksums else storage.file_size(file_uri)
            if found is None:
                return f"{name} is missing"
            if found[0] != size:
                return f"{name} has {found[0]} bytes, {size} were written (truncated?)"
            if checksums and found[1] != digest:
                return f"{name} does not match its checksum (corrupted)"
    return None


def _seal_shape_problem(listed, *, needs_state: bool) -> Optional[str]:
    """What is wrong with a seal's ``files`` mapping (None if nothing): every entry a relative
    path inside the checkpoint with ``[size, sha256 hex]``; rank 0's lists the trainer state."""
    import re

    if not isinstance(listed, dict) or not listed:
        return "no files listed"
    for name, entry in listed.items():
        parts = name.split("/")
        if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
            return f"file name {name!r} is not a path inside the checkpoint"
        if not (isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is int and entry[0] >= 0
                and isinstance(entry[1], str) and re.fullmatch(r"[0-9a-f]{64}", entry[1])):
            return f"{name}: expected [size, sha256], got {entry!r:.60}"
    if needs_state and STATE_FILE not in listed:
        return f"{STATE_FILE} not listed"
    return None
