"""Run the fault and hostile-input suites and write RELIABILITY.md's table from what they ran.

    flock /tmp/hybridray-heavy.lock .venv/bin/python tests/reliability_table.py

Each test ``record``s its row (``tests/reliability.py``: fault or input class, cases run,
steps lost, outcome); pytest's JUnit report gives each test's wall time (fixtures included,
e.g. the uninterrupted reference run is counted in the first fault test). The table between
the markers in RELIABILITY.md is replaced; the prose around it is kept.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITES = ["tests/test_faults.py", "tests/test_path_safety.py", "tests/test_hostile_shards.py",
          "tests/test_hostile_converters.py", "tests/test_hostile_beir.py", "tests/test_hostile_config.py"]
BEGIN, END = "<!-- reliability-table:begin -->", "<!-- reliability-table:end -->"


def main(suites: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        rows_file, junit = Path(tmp) / "rows.jsonl", Path(tmp) / "junit.xml"
        done = subprocess.run([sys.executable, "-m", "pytest", *suites, "-p", "no:cacheprovider", "-q",
                               f"--junitxml={junit}", "-o", "junit_duration_report=total"],
                              cwd=REPO, env={**os.environ, "HYBRIDRAY_RELIABILITY": str(rows_file)})
        rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.exists() else []
        cases = ET.parse(junit).getroot().iter("testcase")
        seconds, failed, skipped, total = {}, [], [], 0
        for case in cases:
            name = f"{case.get('classname').split('.')[-1]}.py::{case.get('name').split('[')[0]}"
            seconds[name] = seconds.get(name, 0.0) + float(case.get("time"))
            total += float(case.get("time"))
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(name)
            if case.find("skipped") is not None:
                skipped.append(name)
    lines = [
        f"Last run: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, `{' '.join(['pytest', *suites])}`: "
        f"{'all passed' if done.returncode == 0 else f'FAILED ({done.returncode}): ' + ', '.join(failed)}"
        f"{', skipped: ' + ', '.join(skipped) if skipped else ', no skips'}; {total / 60:.1f} min in all.",
        "",
        "| Fault or input class | Test | Cases run | Steps lost | Outcome | Time (s) |",
        "|---|---|---:|---:|---|---:|",
    ]
    recorded = {row["test"] for row in rows}
    for name in dict.fromkeys(failed):  # a failed test records no row: it must not vanish from the table
        if name not in recorded:
            rows.append({"kind": "FAILED: see the pytest output", "test": name, "cases": "-", "lost_steps": None,
                         "outcome": "failed"})
    for row in rows:
        lost = "-" if row["lost_steps"] is None else str(row["lost_steps"])
        outcome = row["outcome"].replace("|", "\\|")
        if row.get("error_line"):
            outcome += f"; the line: `{row['error_line'][:300]}`"
        lines.append(f"| {row['kind']} | `{row['test']}` | {row['cases']} | {lost} | {outcome} | "
                     f"{seconds.get(row['test'], 0.0):.1f} |")
    path = REPO / "RELIABILITY.md"
    text = path.read_text()
    head, rest = text.split(BEGIN)
    path.write_text(head + BEGIN + "\n" + "\n".join(lines) + "\n" + END + rest.split(END)[1])
    print("\n".join(lines))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or SUITES))  # other suites: to try the script itself
