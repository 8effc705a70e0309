"""Figures for RELIABILITY.md: each fault and hostile-input test records what it ran.

``record(...)`` appends one JSON line to ``$HYBRIDRAY_RELIABILITY`` when that is set (by
``tests/reliability_table.py``, which runs the suites and writes the table); otherwise it does
nothing, so the tests run the same either way.
"""
from __future__ import annotations

import json
import os


def record(test: str, *, kind: str, cases: int, outcome: str, lost_steps=None, **extra) -> None:
    """One row: ``kind`` (fault or input class), ``cases`` run, steps lost (faults), outcome."""
    path = os.environ.get("HYBRIDRAY_RELIABILITY")
    if not path:
        return
    row = {"test": test, "kind": kind, "cases": cases, "lost_steps": lost_steps, "outcome": outcome, **extra}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


class Tally:
    """Counts a property test's generated cases by how each ended (accepted / rejected)."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, outcome: str) -> None:
        self.counts[outcome] = self.counts.get(outcome, 0) + 1

    @property
    def cases(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        return ", ".join(f"{n} {k}" for k, n in sorted(self.counts.items()))
