"""What a person sees while hybridray runs: a quiet console, one live progress bar in the
driver, and a closing summary.

Quiet by default: the libraries' start-up chatter and Ray Data's per-worker progress bars and
operator tables are turned down in every process of a run (``quiet_process``), so the driver's
own progress bar is the one moving thing on screen. Errors and warnings are never hidden.
``--verbose`` or ``HYBRIDRAY_VERBOSE=1`` brings everything back.

The progress bar lives in the driver, not in a worker: rank 0 pushes one small record per step
to a ``ProgressBoard`` actor (fire and forget, no barrier between ranks) and a driver thread
draws it -- a tqdm bar on a terminal, a plain line every ``train.log_every`` steps otherwise
(CI, ``ray job logs``), so that no cursor-control debris lands in a log file.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from typing import Optional

VERBOSE_ENV = "HYBRIDRAY_VERBOSE"

#: Loggers of the libraries a run drives, turned down to warnings unless verbose.
_CHATTY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "DeepSpeed", "deepspeed")


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_process(verbose: Optional[bool] = None) -> None:
    """Turn down library chatter in this process (the driver, or a Ray worker at its start).

    Warnings and errors still show, except two deprecation warnings that other libraries raise
    about their own calls, filtered by their exact text because they are not ours to fix and
    every worker process prints them: DeepSpeed 0.19.8 calls
    ``torch.distributed.all_gather_into_tensor`` (deprecated in torch 2.13; hybridray's own
    gather uses the non-deprecated ``all_gather_single``), and Ray Train's default
    ``DataConfig`` sets Ray Data's deprecated ``ExecutionOptions.exclude_resources``.
    """
    verbose = is_verbose() if verbose is None else verbose
    if verbose:
        return
    # Import first: Ray Data and Ray Train set their own loggers up when imported.
    try:
        import ray.data
        import ray.train  # noqa: F401
        from ray.util.debug import log_once
    except ImportError:
        ray = None
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    except ImportError:
        pass
    for name in [*_CHATTY_LOGGERS, *logging.root.manager.loggerDict]:
        if name.startswith(_CHATTY_LOGGERS):  # their children too: some set their own level
            logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated", category=FutureWarning
    )
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions\.exclude_resources` is deprecated")
    try:  # Ray Train 2.60 logs every report at INFO through a logger named by its file path
        import ray.train.v2._internal.execution.context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    if ray is not None:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False
        context.enable_operator_progress_bars = False
        context.print_on_execution_start = False
        # Ray Data says once per process that progress bars are off; they are off on purpose.
        log_once("ray_data_progress_manager_disabled")


def train_logging_config(verbose: Optional[bool] = None):
    """Ray Train's own log level (``RunConfig(logging_config=...)``): its controller and
    workers report every ``ray.train.report`` at INFO."""
    import ray.train

    verbose = is_verbose() if verbose is None else verbose
    return ray.train.LoggingConfig(log_level="INFO" if verbose else "WARNING")


def ray_logging_config(verbose: Optional[bool] = None):
    """The ``ray.init(logging_config=...)`` of a run: warnings and up from every Ray worker and
    actor (Ray Train's controller, Ray Data's executors), unless verbose."""
    import ray

    verbose = is_verbose() if verbose is None else verbose
    return ray.LoggingConfig(log_level="INFO" if verbose else "WARNING")


# ----------------------------------------------------------------------------- progress
def _board_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        """Where rank 0 leaves one record per step and the driver picks them up."""

        def __init__(self):
            self.items: list[dict] = []

        def push(self, item: dict) -> None:
            self.items.append(item)

        def drain(self) -> list[dict]:
            items, self.items = self.items, []
            return items

    return ProgressBoard


def new_board():
    """A ``ProgressBoard`` actor (num_cpus=0: it never takes a training CPU)."""
    return _board_class().remote()


def failure_callback(board):
    """A Ray Train callback that tells the console when workers fail: Ray Train logs its
    restart decision at INFO, which the quiet console drops, so without this a retried
    failure (``run.max_failures``) would pass without a word."""
    from ray.train import UserCallback

    class SayFailures(UserCallback):
        def after_exception(self, run_context, worker_exceptions) -> None:
            for rank, exc in sorted(worker_exceptions.items()):
                first = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
                board.push.remote({"message": f"worker rank {rank} failed: {type(exc).__name__}: {first[:300]} "
                                              "(restarting from the last checkpoint if run.max_failures allows)"})

    return SayFailures()


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class ProgressDisplay:
    """Draws the run's progress from the board's records, in a driver thread.

    A step record (see ``train.train_func``) has ``step`` (done), ``time`` (rank 0's clock),
    ``loss``, ``lr``, ``samples`` (pairs in the step), ``batch_type`` and, after an evaluation,
    ``val_*``; a ``message`` record is a line to show once. Each step record also goes to
    ``on_record`` (the run's ``RunLog``). Speed and ETA come from the records' own times,
    from the first step record on, so start-up (Ray, model loading, the evaluation before
    training) is not counted as training time. A step that comes again (workers restarted
    from a checkpoint) replaces what followed it.
    """

    def __init__(self, board, total_steps: int, start_step: int, *, every: int, stream=None,
                 on_record=None, interval_s: float = 0.5):
        self.board, self.total, self.start, self.every = board, total_steps, start_step, max(1, every)
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty()
        self.on_record = on_record
        self.interval_s = interval_s
        self.history: list[dict] = []
        #: (step trained again from, last step done before) of every restart seen
        self.restarts: list[tuple[int, int]] = []
        self.val_map: Optional[float] = None
        self._stop = threading.Event()
        self._bar = None
        self._failed = False
        self._thread = threading.Thread(target=self._run, name="hybridray-progress", daemon=True)

    def __enter__(self) -> "ProgressDisplay":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._pull()  # whatever arrived last
        if self._bar is not None:
            self._bar.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._pull()

    def _pull(self) -> None:
        import ray

        try:
            items = ray.get(self.board.drain.remote())
        except (ray.exceptions.RayActorError, ray.exceptions.RaySystemError):
            return  # the board went away with the run; the run itself says why
        self.deliver(items)

    def deliver(self, items: list[dict]) -> None:
        """Show records; a failure here is said once and never stops the run."""
        for item in items:
            try:
                self._show(item)
            except Exception as exc:  # noqa: BLE001 - said once, and training goes on
                if not self._failed:
                    self._failed = True
                    print(f"hybridray: the progress display failed ({type(exc).__name__}: {exc}); "
                          "training goes on", file=self.stream, flush=True)

    def counts(self) -> dict[str, int]:
        out = {"mono": 0, "cross": 0, "x-x": 0}
        for h in self.history:
            out[h["batch_type"]] = out.get(h["batch_type"], 0) + 1
        return out

    def samples_per_s(self) -> Optional[float]:
        """Training throughput between the first and the last step record (None: too few)."""
        if len(self.history) < 2 or self.history[-1]["time"] <= self.history[0]["time"]:
            return None
        return sum(h["samples"] for h in self.history[1:]) / (self.history[-1]["time"] - self.history[0]["time"])

    def _eta(self, step: int) -> str:
        if len(self.history) < 2:
            return "?"
        first, last = self.history[0], self.history[-1]
        per_step = (last["time"] - first["time"]) / max(1, last["step"] - first["step"])
        return format_duration(per_step * (self.total - step))

    def _say(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _show(self, item: dict) -> None:
        if "message" in item:
            self._say(f"[hybridray] {item['message']}")
            return
        if self.history and item["step"] <= self.history[-1]["step"]:
            reached = self.history[-1]["step"]
            self.history = [h for h in self.history if h["step"] < item["step"]]
            self.restarts.append((item["step"], reached))
            lost = reached - item["step"] + 1
            self._say(f"[hybridray] restarted: training again from step {item['step']} (the work since the last "
                      f"checkpoint, {lost} step{'s' * (lost != 1)} up to step {reached}, is redone)")
        self.history.append(item)
        if self.on_record is not None:
            self.on_record(item)
        if "val_map" in item:
            self.val_map = item["val_map"]
        counts = self.counts()
        fields = {"loss": f"{item['loss']:.3f}"}
        if item.get("distill_kl") is not None:  # loss.distill_weight > 0: the distillation term alone
            fields["kl"] = f"{item['distill_kl']:.4f}"
        fields["lr"] = f"{item['lr']:.1e}"
        speed = self.samples_per_s()
        if speed is not None:
            fields["samples/s"] = f"{speed:.1f}"
        fields["mono/cross"] = f"{counts['mono']}/{counts['cross']}"
        if counts.get("x-x"):
            fields["x-x"] = str(counts["x-x"])
        if self.val_map is not None:
            fields["val_map"] = f"{self.val_map:.3f}"
        if self.interactive:
            if self._bar is None:  # made at the first step, so its clock is the training's
                from tqdm.auto import tqdm

                self._bar = tqdm(total=self.total, initial=item["step"] - 1, desc="train", unit="step",
                                 file=self.stream, dynamic_ncols=True, smoothing=0.1)
            self._bar.n = item["step"]
            self._bar.set_postfix(fields, refresh=True)
        elif item["step"] % self.every == 0 or item["step"] == self.total or "val_map" in item:
            line = " ".join(f"{k} {v}" for k, v in fields.items())
            self._say(f"[hybridray] step {item['step']}/{self.total} {line} eta {self._eta(item['step'])}")
