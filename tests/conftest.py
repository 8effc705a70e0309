"""Shared fixtures: where the real data lives and the prepared MLQA-R shards."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
MLQA_R = SHARED_DATA / "mlqa-r"
TATOEBA = SHARED_DATA / "tatoeba"


@pytest.fixture(scope="session")
def mlqa_prepared(tmp_path_factory) -> Path:
    """MLQA-R converted once per session by ``hybridray data prepare`` (seed 0, 30% held out)."""
    from hybridray.data.prepare import prepare_lareqa

    out = tmp_path_factory.mktemp("prepared") / "mlqa-r"
    prepare_lareqa(MLQA_R, out, heldout_fraction=0.3, seed=0)
    return out


def spawn_one_and_two(worker, tmp: Path, names: tuple[str, str]):
    """Run ``worker(rank, ports, outputs)`` as a 1-process and a 2-process gloo group at once
    (3 processes; rank 0 of each group saves to ``outputs[world]``); returns both results."""
    import torch
    import torch.multiprocessing as mp

    from hybridray.distributed import free_port

    ports = {1: free_port(), 2: free_port()}
    outputs = {1: tmp / names[0], 2: tmp / names[1]}
    mp.spawn(worker, args=(ports, outputs), nprocs=3, join=True)
    return torch.load(outputs[1]), torch.load(outputs[2])
