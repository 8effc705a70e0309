"""What a person sees: ``hybridray train`` run as a user runs it, once on a terminal (a pseudo-
terminal) and once into a pipe (CI, ``ray job logs``); then ``hybridray report`` on both runs.

On a terminal: one live tqdm bar, no library chatter, the closing summary at the end. Into a
pipe: plain progress lines, no cursor-control debris, the same closing summary. Both runs leave
their plots, ``metrics.jsonl`` and TensorBoard events in the run directory.
"""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from conftest import REPO, heldout_subset

pytestmark = pytest.mark.ray

HYBRIDRAY = str(REPO / ".venv" / "bin" / "hybridray")
STEPS = 6
#: What a quiet console must not show: Ray Data's tables, worker prefixes, library chatter.
NOISE = ("Dataset train_", "MapBatches(", "RayTrainWorker", "is deprecated", "[INFO", "Reporting training result",
         "Setting accelerator", "Loading weights", "Progress bars disabled")


@pytest.fixture(scope="module")
def heldout(tmp_path_factory, mlqa_prepared):
    return heldout_subset(tmp_path_factory.mktemp("heldout"), mlqa_prepared, articles=4)


def command(name, runs, mlqa_prepared, heldout):
    return [HYBRIDRAY, "train", "configs/local.yaml", f"name={name}", f"run.storage_path={runs}",
            "model.name_or_path=builtin:tiny", "model.max_query_length=24", "model.max_passage_length=32",
            f"data.train={mlqa_prepared / 'train'}", f"data.heldout={heldout}", "eval.max_length=32",
            "sampler.batch_size=8", "optim.lr=0.001", "optim.warmup_steps=1", f"train.max_steps={STEPS}",
            "train.log_every=2", "train.checkpoint_every=3", "train.eval_every=3"]


def run_in_pty(args: list[str], timeout: float = 600) -> str:
    """Run ``args`` with stdout and stderr on a pseudo-terminal, as in an interactive shell."""
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, columns: a real terminal's
    process = subprocess.Popen(args, stdout=child, stderr=child, stdin=child, cwd=REPO, close_fds=True,
                               env={**os.environ, "COLUMNS": "120", "TERM": "xterm"})
    os.close(child)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([parent], [], [], 1.0)
        if ready:
            try:
                data = os.read(parent, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    process.wait(timeout=60)
    os.close(parent)
    assert process.returncode == 0, b"".join(chunks).decode(errors="replace")[-4000:]
    return b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mlqa_prepared, heldout, no_ray_in_this_process):
    """(terminal output, pipe output, storage path) of two real training runs."""
    storage_path = tmp_path_factory.mktemp("console-runs")
    tty = run_in_pty(command("on-a-terminal", storage_path, mlqa_prepared, heldout))
    piped = subprocess.run(command("into-a-pipe", storage_path, mlqa_prepared, heldout), cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)  # as 2>&1
    assert piped.returncode == 0, piped.stdout[-4000:]
    return tty, piped.stdout, storage_path


def test_terminal_output_is_one_bar_and_the_summary(runs):
    tty, _, storage_path = runs
    assert "train: " in tty and f"{STEPS}/{STEPS}" in tty  # the tqdm bar reached the end
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", tty).replace("\r", "\n")
    assert "hybridray: run 'on-a-terminal': 6 steps" in text
    assert re.search(r"change\s+[+-]\d\.\d{3}\s+[+-]\d\.\d{3}\s+[+-]\d\.\d{3}\s+[+-]\d+\.\d", text)
    assert f"model    {storage_path / 'on-a-terminal' / 'model'}" in text
    for noise in NOISE:
        assert noise not in text, noise


def test_piped_output_is_plain_lines_and_the_summary(runs):
    _, piped, _ = runs
    assert "\x1b[" not in piped and "\r" not in piped  # no cursor-control debris in a log file
    lines = piped.splitlines()
    assert len(lines) < 40, piped
    steps = [int(m.group(1)) for m in re.finditer(r"^\[hybridray\] step (\d+)/6 loss \S+ kl \d+\.\d{4} ", piped,
                                                  re.M)]
    assert steps == [2, 3, 4, 6], (steps, piped)  # every log_every steps, and after each evaluation
    assert "[hybridray] held-out evaluation before training ..." in piped, piped
    assert re.search(r"^\[hybridray\] step 3/6 .*val_map 0\.\d{3}", piped, re.M), piped
    assert "hybridray: run 'into-a-pipe': 6 steps" in piped, piped
    assert lines[-1].startswith("curves   tensorboard --logdir "), piped[-3000:]  # it ends on its summary
    for noise in NOISE:
        assert noise not in piped, (noise, piped[-3000:])


def tensorboard_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of TensorBoard event files (TFRecord framing: length, crc, event, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_run_directory_has_plots_curves_and_tensorboard(runs):
    _, _, storage_path = runs
    run = storage_path / "into-a-pipe"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, STEPS + 1))
    assert [h["step"] for h in history if "val_map" in h] == [3, 6]
    for plot in ("training_curves.png", "heldout_by_language.png"):
        assert (run / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scalars = tensorboard_scalars(run / "tensorboard")
    assert [step for step, _ in scalars["train/loss"]] == list(range(1, STEPS + 1))
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([h["loss"] for h in history])
    # configs/local.yaml distils: its term is logged alone, per step, in both places
    assert [v for _, v in scalars["train/distill_kl"]] == pytest.approx([h["distill_kl"] for h in history])
    assert len(history) == STEPS and all(h["distill_kl"] >= 0 for h in history)
    assert [step for step, _ in scalars["heldout/val_map"]] == [3, 6]


def test_report_shows_one_run_and_compares_two(runs, tmp_path):
    _, piped, storage_path = runs
    one = subprocess.run([HYBRIDRAY, "report", str(storage_path / "into-a-pipe")], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert one.returncode == 0, one.stderr
    assert piped[piped.index("hybridray: run 'into-a-pipe'"):].strip() == one.stdout.strip()  # the run's own summary
    both = subprocess.run([HYBRIDRAY, "report", str(storage_path / "on-a-terminal"), str(storage_path / "into-a-pipe"),
                           "--out", str(tmp_path / "cmp")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert both.returncode == 0, both.stderr
    rows = [line.split()[0] for line in both.stdout.splitlines()[2:4]]
    assert rows == ["on-a-terminal", "into-a-pipe"]
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    missing = subprocess.run([HYBRIDRAY, "report", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert missing.returncode == 2 and "no summary.json" in missing.stderr
