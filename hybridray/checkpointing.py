"""What a checkpoint holds beyond DeepSpeed's own state: the data position, the RNG state and
the fingerprint of the run that wrote it.

Each rank writes its own files into the same directory (DeepSpeed's files are already
per-rank); Ray Train uploads them all into one checkpoint in the run's storage. Because the
batch sequence is a pure function of (seed, step), the step is the whole data position. The
RNG state (Python, numpy, torch CPU and, on GPU machines, every visible CUDA device) makes
dropout after a resume draw exactly what the uninterrupted run drew.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hybridray.distributed import rank

STATE_FILE = "trainer_state.json"
DEEPSPEED_TAG = "deepspeed"


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
    engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG)
    torch.save(rng_state(), _rng_file(directory))
    if rank() == 0:
        state = {"step": step, "run": run, "reports": {k: v for k, v in reports.items() if v is not None}}
        (directory / STATE_FILE).write_text(json.dumps(state))


def read_state(directory: str | Path) -> Optional[dict]:
    """The trainer state of a checkpoint directory, or None if it has none."""
    path = Path(directory) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_state(engine, directory: str | Path) -> tuple[int, dict]:
    """Collective. Restores DeepSpeed (weights, optimizer, scheduler) and this rank's RNG;
    returns the step to continue from and the saved trainer state."""
    directory = Path(directory)
    load_path, _ = engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG)
    if load_path is None:
        raise RuntimeError(f"{directory}: no DeepSpeed checkpoint with tag {DEEPSPEED_TAG!r}")
    set_rng_state(torch.load(_rng_file(directory), weights_only=False))
    state = read_state(directory)
    if state is None:
        raise RuntimeError(f"{directory}: no {STATE_FILE}")
    return int(state["step"]), state
