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
