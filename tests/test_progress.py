"""The driver's progress display and run log on their own (no Ray): line cadence, restarts,
messages, a failing consumer, and metrics.jsonl / TensorBoard / plots across a resume."""
from __future__ import annotations

import io
import json

from hybridray.console import ProgressDisplay
from hybridray.run_report import RunLog, read_history


def record(step, batch_type="mono", **extra):
    return {"step": step, "time": 100.0 + step, "loss": 2.0 - step / 10, "lr": 1e-3, "samples": 8,
            "batch_type": batch_type, **extra}


def display(total=6, every=2, start=0, on_record=None):
    out = io.StringIO()  # not a terminal: plain lines
    return ProgressDisplay(board=None, total_steps=total, start_step=start, every=every, stream=out,
                           on_record=on_record), out


def test_plain_lines_every_n_steps_and_after_evaluations():
    shown, out = display()
    shown._show({"message": "2 worker(s) on 1 node(s): a, b"})
    for step in range(1, 7):
        shown._show(record(step, "cross" if step == 5 else "mono", **({"val_map": 0.5} if step == 3 else {})))
    lines = out.getvalue().splitlines()
    assert lines[0] == "[hybridray] 2 worker(s) on 1 node(s): a, b"
    assert [line.split()[2] for line in lines[1:]] == ["2/6", "3/6", "4/6", "6/6"]
    assert "val_map 0.500" in lines[2] and "mono/cross 5/1" in lines[-1]
    assert "samples/s 8.0" in lines[-1]  # 5 steps of 8 pairs in 5 s of rank 0's clock
    assert shown.samples_per_s() == 8.0


def test_a_restarted_step_replaces_what_followed():
    seen = []
    shown, out = display(on_record=seen.append)
    for step in (1, 2, 3, 4, 3, 4, 5, 6):
        shown._show(record(step))
    assert [h["step"] for h in shown.history] == [1, 2, 3, 4, 5, 6]
    assert shown.counts()["mono"] == 6  # not 8
    assert ("[hybridray] restarted: training again from step 3 (the work since the last checkpoint, 2 steps up "
            "to step 4, is redone)") in out.getvalue()
    assert shown.restarts == [(3, 4)]
    assert [r["step"] for r in seen] == [1, 2, 3, 4, 3, 4, 5, 6]  # the run log gets every record


def test_a_failing_consumer_is_said_once_and_training_goes_on():
    def broken(_):
        raise ValueError("disk full")

    shown, out = display(on_record=broken)
    shown.deliver([record(1), record(2)])
    shown.deliver([record(3)])
    assert out.getvalue().count("the progress display failed (ValueError: disk full)") == 1
    assert [h["step"] for h in shown.history] == [1, 2, 3]


def test_run_log_is_live_survives_a_restart_and_a_resume(tmp_path):
    run = tmp_path / "run"
    log = RunLog(str(run))
    for step in (1, 2, 3, 4):
        log.add(record(step))
    assert [h["step"] for h in read_history(str(run))] == [1, 2, 3, 4]  # on disk while running
    log.add(record(3, val_map=0.4))  # workers restarted from the step-2 checkpoint
    log.add(record(4))
    log.close()
    assert [h["step"] for h in read_history(str(run))] == [1, 2, 3, 4]
    assert "val_map" in read_history(str(run))[2]
    assert (run / "plots" / "training_curves.png").exists()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    resumed = RunLog(str(run), start_step=2)  # a new attempt resumed from the step-2 checkpoint
    for step in (3, 4, 5):
        resumed.add(record(step))
    resumed.close()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5]


def test_verbose_leaves_every_library_as_it_was():
    import logging

    from hybridray.console import quiet_process

    logger = logging.getLogger("ray.data")
    before = logger.level
    logger.setLevel(logging.INFO)
    try:
        quiet_process(verbose=True)
        assert logger.level == logging.INFO
        quiet_process(verbose=False)
        assert logger.level == logging.WARNING
    finally:
        logger.setLevel(before)
