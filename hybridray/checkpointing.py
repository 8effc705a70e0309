"""What a checkpoint holds beyond DeepSpeed's own state: the data position and RNG state.

Each rank writes its own files into the same directory (DeepSpeed's files are already
per-rank); Ray Train uploads them all into one checkpoint in the run's storage. Because the
batch sequence is a pure function of (seed, step), the step is the whole data position.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from hybridray.distributed import rank

STATE_FILE = "trainer_state.json"
DEEPSPEED_TAG = "deepspeed"


def _rng_file(directory: Path) -> Path:
    return directory / f"rng_rank{rank()}.pt"


def save_state(engine, directory: str | Path, *, step: int, reports: dict) -> None:
    """Collective: every rank calls it. ``step`` = optimizer steps done."""
    directory = Path(directory)
    engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG)
    torch.save(
        {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        _rng_file(directory),
    )
    if rank() == 0:
        state = {"step": step, "reports": {k: v for k, v in reports.items() if v is not None}}
        (directory / STATE_FILE).write_text(json.dumps(state))


def load_state(engine, directory: str | Path) -> tuple[int, dict]:
    """Collective. Restores DeepSpeed (weights, optimizer, scheduler) and this rank's RNG;
    returns the step to continue from and the saved trainer state."""
    directory = Path(directory)
    load_path, _ = engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG)
    if load_path is None:
        raise RuntimeError(f"{directory}: no DeepSpeed checkpoint with tag {DEEPSPEED_TAG!r}")
    rng = torch.load(_rng_file(directory), weights_only=False)
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    state = json.loads((directory / STATE_FILE).read_text())
    return int(state["step"]), state
