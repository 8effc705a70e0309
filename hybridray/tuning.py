"""``hybridray tune``: a Ray Tune sweep of the hybrid mix α, the temperature τ or any other
config key against held-out mAP, with early stopping, a real searcher, resources derived from
the cluster, resume, and results a person can read (``hybridray.sweep_report``).

A sweep is a YAML file (``tune/alpha_temperature.yaml``; every key is in ``SweepConfig``)::

    metric: val_map              # any metric a run reports; val_map = multi mAP on held-out
    mode: max
    search: {algorithm: grid}    # grid | random | optuna (Optuna's TPE)
    early_stopping: {grace_period: 20, reduction_factor: 2}   # ASHA; omit for equal budgets
    overrides: {train.max_steps: 60, train.eval_every: 20}   # applied to every trial
    search_space:
      sampler.alpha: {grid: [0.0, 0.25, 0.5, 0.75, 1.0]}
      loss.temperature: {grid: [0.02, 0.05]}

How it runs:

- **Trials.** Each trial is a function trainable that builds its run's ``TorchTrainer``
  (Train V2 has no ``Tuner(TorchTrainer)``) in ``<storage>/<name>-sweep/trials/<name>-<trial
  id>/`` and forwards rank 0's reports that carry the sweep metric to Tune (``_TuneReports``).
- **Early stopping.** ASHA on the sweep metric, with the step as its clock: rungs at
  ``grace_period × reduction_factor^k`` steps; it decides at held-out evaluations
  (``train.eval_every``, cheap with ``train.eval_max_queries``). A stopped trial's actor is
  ended, and with it its Train controller, workers, placement group and Ray Data executors
  (all owned by it), so the next trial starts at once.
- **Resources.** A trial's Tune actor holds only ``TRIAL_ACTOR_CPU``; its Train workers and
  Ray Data tasks are scheduled by Ray Train, outside Tune's accounting. So Tune is told how
  many trials may run at once: ``max_concurrent_trials`` defaults to how many whole trials
  (``trial_resources``: actor + workers + one task of each Ray Data stage) fit in
  ``ray.cluster_resources()`` -- one on a 2-core machine, where two would starve each other.
- **Resume.** The sweep directory keeps Tune's experiment state; the same command again
  restores it (``Tuner.restore``): finished trials are kept, unfinished ones run again and
  resume from their run's last checkpoint. ``sweep.json`` holds what the sweep computes, and
  a sweep directory holding another sweep is refused (``--overwrite`` starts it again).
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, ValidationError

from hybridray import storage
from hybridray.config import (
    NAME_MAX_CHARS, Config, _describe, _Section as _CheckedSection, build_config, defining_values, read_yaml,
)
from hybridray.errors import UserError

_DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")
#: CPU the Tune actor of a trial holds (Tune rejects 0); its workers hold their own.
TRIAL_ACTOR_CPU = 0.1
#: Config keys that change what one trial holds on the cluster.
_RESOURCE_KEYS = ("scaling.", "data.task_cpus")
#: The longest suffix a trial adds to the sweep's name: ``-<5 hex>_<trial number>`` (Tune's trial id),
#: with room for a sixth digit; ``-sweep`` and ``-best`` are shorter.
_LONGEST_TRIAL_SUFFIX = "-0a1b2_000000"


class _Section(_CheckedSection):
    """Unknown keys, booleans for numbers and inf/NaN are refused, as in a run config."""


class SearchSection(_Section):
    """How trial values are proposed."""

    #: grid: every ``grid`` list enumerated (times num_samples; other distributions drawn per
    #: point); random: num_samples random draws; optuna: num_samples trials proposed by
    #: Optuna's TPE from the results so far (``grid`` is not allowed with random / optuna).
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    #: Seed of the random draws and of TPE: the same sweep file proposes the same trials.
    seed: int = 0


class EarlyStoppingSection(_Section):
    """ASHA (asynchronous successive halving) on the sweep metric, clocked in steps."""

    #: Steps every trial runs before it may be stopped (best a multiple of train.eval_every).
    grace_period: int = Field(ge=1)
    #: At each rung (grace_period x reduction_factor^k steps) only the best 1/reduction_factor
    #: of the trials seen there go on.
    reduction_factor: float = Field(2.0, gt=1.0)


class SweepConfig(_Section):
    """A sweep file."""

    #: The metric to optimise: any key a run reports (val_map, val_map_cross, loss, ...).
    metric: str = "val_map"
    mode: Literal["max", "min"] = "max"
    #: Repeats of the grid (grid), or number of trials (random, optuna).
    num_samples: int = Field(1, ge=1)
    #: Trials running at once; None = as many whole trials as the cluster holds.
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    search: SearchSection = Field(default_factory=SearchSection)
    #: ASHA; None = every trial runs train.max_steps (equal budgets).
    early_stopping: Optional[EarlyStoppingSection] = None
    #: KEY: VALUE config overrides applied to every trial (e.g. the budget: train.max_steps).
    overrides: dict[str, Any] = Field(default_factory=dict)
    #: KEY: {grid | choice: [values]} or {uniform | loguniform: [low, high]}.
    search_space: dict[str, dict[str, list]] = Field(min_length=1)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _domain(key: str, spec: Any):
    """The Ray Tune domain of one search-space entry (checked first: a UserError naming it)."""
    from ray import tune

    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in _DISTRIBUTIONS:
        raise UserError(f"search_space.{key}: expected one of {{{', '.join(_DISTRIBUTIONS)}: ...}}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise UserError(f"search_space.{key}.{kind}: expected a non-empty list")
    if kind in ("uniform", "loguniform"):
        numbers = len(values) == 2 and all(_number(v) for v in values)
        if not numbers or not values[0] < values[1] or (kind == "loguniform" and values[0] <= 0):
            raise UserError(f"search_space.{key}.{kind}: expected [low, high], two numbers with low < high, both finite"
                            + (" and low > 0" if kind == "loguniform" else "") + f"; got {values!r:.80}")
    try:
        return {"grid": tune.grid_search, "choice": tune.choice}.get(kind, lambda v: getattr(tune, kind)(*v))(values)
    except (ValueError, TypeError) as exc:
        raise UserError(f"search_space.{key}.{kind}: {exc}") from None


def override(key: str, value: Any) -> str:
    """``KEY=VALUE`` with the value written as JSON (a YAML subset), so that it reads back as
    exactly this value: ``str(value)`` would turn the string ``"a: b"`` into a mapping."""
    return f"{key}={_yaml_text(value)}"


def _yaml_text(value: Any) -> str:
    """JSON, except infinities and NaN in YAML's spelling (JSON's ``Infinity`` reads as text)."""
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_yaml_text, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_yaml_text(k)}: {_yaml_text(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, default=str)


def _overrides(sweep: SweepConfig) -> list[str]:
    return [override(k, v) for k, v in sweep.overrides.items()]


def load_sweep(path: str | Path, base: Config) -> SweepConfig:
    """Read and check a sweep file against the run config it sweeps: every key and every
    bound must make a valid run config, and the metric and early stopping must be reachable.
    Any problem is one UserError naming the file and the key."""
    path = Path(path)
    tree = read_yaml(path, "sweep file")
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise UserError(f"{path}: top level must be a mapping (metric, search_space, ...)")
    space = tree.get("search_space")
    if not space:
        raise UserError(f"{path}: search_space is empty")
    if not isinstance(space, dict):
        raise UserError(f"{path}: search_space: expected a mapping of config keys, got {space!r:.60}")
    for key, spec in space.items():
        try:
            _domain(key, spec)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None
    try:
        sweep = SweepConfig.model_validate(tree)
    except ValidationError as exc:
        raise UserError(f"{path}: {_describe(exc)}") from None
    try:
        trial = build_config(base.model_dump(), _overrides(sweep))
    except UserError as exc:
        raise UserError(f"{path}: overrides: {exc}") from None
    for key, spec in sweep.search_space.items():
        kind, values = next(iter(spec.items()))
        if kind == "grid" and sweep.search.algorithm != "grid":
            raise UserError(f"{path}: search_space.{key}: grid is for search.algorithm: grid; "
                            f"use choice: [...] with {sweep.search.algorithm}")
        if key == "train.max_steps":  # trials are judged complete (and compared) at one budget
            raise UserError(f"{path}: search_space.train.max_steps: trials are compared at one budget; "
                            "set train.max_steps in overrides and sweep other keys")
        continuous = kind in ("uniform", "loguniform")
        # a continuous domain samples fractional values between its bounds: try one
        for value in list(values) + ([(values[0] + values[1]) / 2 + 1e-3] if continuous else []):
            try:
                build_config(base.model_dump(), _overrides(sweep) + [override(key, value)])
            except UserError as exc:
                reason = str(exc).removeprefix(f"{key}: ")
                hint = (f" ({kind} samples fractional values between its bounds; use choice: [...] for a "
                        "whole-number key)") if continuous and value not in values else ""
                raise UserError(f"{path}: search_space.{key}: value {value!r:.60}: {reason}{hint}") from None
    from hybridray.train import REPORTED_METRICS

    if sweep.metric not in REPORTED_METRICS:
        raise UserError(f"{path}: metric: {sweep.metric!r} is not a metric a run reports; one of "
                        f"{', '.join(sorted(REPORTED_METRICS))}")
    if sweep.metric.startswith("val_") and not trial.data.heldout:
        raise UserError(f"{path}: metric {sweep.metric} needs held-out data, but data.heldout is empty")
    if sweep.early_stopping:
        if "train.max_steps" in sweep.search_space:
            raise UserError(f"{path}: early_stopping needs one train.max_steps for every trial; do not sweep it")
        if not trial.train.eval_every:
            raise UserError(f"{path}: early_stopping decides at held-out evaluations: set train.eval_every "
                            "(in overrides) to a number of steps")
        if sweep.early_stopping.grace_period >= trial.train.max_steps:
            raise UserError(f"{path}: early_stopping.grace_period ({sweep.early_stopping.grace_period}) must be "
                            f"below train.max_steps ({trial.train.max_steps})")
    room = NAME_MAX_CHARS - len(_LONGEST_TRIAL_SUFFIX)
    if len(base.name) > room:  # caught now, not by the last trial or after every trial has run
        raise UserError(f"name: {len(base.name)} characters; a sweep names its trials NAME-<trial id>, "
                        f"so its name can have at most {room}")
    return sweep


def trial_count(sweep: SweepConfig, num_samples: Optional[int] = None) -> int:
    """How many trials the sweep runs."""
    n = num_samples or sweep.num_samples
    grids = [len(spec["grid"]) for spec in sweep.search_space.values() if "grid" in spec]
    return n * math.prod(grids)


# ----------------------------------------------------------------------------- resources
def trial_resources(config: Config) -> dict[str, float]:
    """What one trial holds while it trains: its Tune actor, its Train workers, and one task of
    each of the two Ray Data stages (materialise, tokenise) that feed them."""
    s = config.scaling
    need = {"CPU": TRIAL_ACTOR_CPU + s.num_workers * s.cpus_per_worker + 2 * config.data.task_cpus}
    if s.use_gpu:
        need["GPU"] = s.num_workers * s.gpus_per_worker
    for key, value in s.resources_per_worker.items():
        need[key] = need.get(key, 0.0) + s.num_workers * value
    return need


def sweep_resources(base: Config, sweep: SweepConfig) -> dict[str, float]:
    """``trial_resources`` of the largest trial: swept keys that change a trial's footprint
    (scaling.*, data.task_cpus) are tried at each listed value (or bound)."""
    overrides = _overrides(sweep)
    need = trial_resources(build_config(base.model_dump(), overrides))
    for key, spec in sweep.search_space.items():
        if key.startswith(_RESOURCE_KEYS):
            for value in next(iter(spec.values())):
                other = trial_resources(build_config(base.model_dump(), overrides + [override(key, value)]))
                need = {k: max(need.get(k, 0.0), other.get(k, 0.0)) for k in need | other}
    return need


def concurrent_trials(need: dict[str, float], cluster: dict[str, float]) -> int:
    """How many whole trials fit in the cluster's resources (0 if not even one)."""
    return min(int(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items() if v > 0)


# ----------------------------------------------------------------------------- trials
def _trial_run_config(params: dict, base: dict, overrides: list[str], trials_root: str, trial_id: str) -> Config:
    """The run config of one trial: base + sweep overrides + its values, in its own directory."""
    config = build_config(base, overrides + [override(k, v) for k, v in params.items()])
    config.name = f"{base['name']}-{trial_id}"
    config.run.storage_path = trials_root
    return config


def _trial(params: dict, base: dict, overrides: list[str], trials_root: str, metric: str) -> None:
    """One Tune trial: the base run with this trial's values, trained by its own TorchTrainer.

    A trial that runs again (the sweep was resumed) continues from its run's last checkpoint;
    one whose run had finished reports that run's final metrics without training again."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from hybridray.console import quiet_process
    from hybridray.train import build_trainer
    from hybridray.runs import plan_run, run_identity

    class _TuneReports(TuneReportCallback):
        """Forward to Tune only the reports that carry the sweep metric (the held-out
        evaluations): Tune refuses a result without it, and ASHA decides on them."""

        def after_report(self, run_context, metrics, checkpoint):
            if metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    quiet_process()  # this trial's actor builds its own dataset
    config = _trial_run_config(params, base, overrides, trials_root, tune.get_context().get_trial_id())
    identity = run_identity(config)
    plan = plan_run(config, identity, overwrite=False)
    if plan.complete:
        tune.report(plan.metrics)
        return
    trainer, _ = build_trainer(config, callbacks=[_TuneReports()], start_step=plan.start_step, identity=identity)
    trainer.fit()


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _trial_line_callback(total: int, metric: str, max_steps: int):
    """A Tune callback printing one line per finished trial (Tune's own tables are off).
    Counts come from the trials' states, so a resumed sweep counts right."""
    from ray import tune

    class TrialLine(tune.Callback):
        def _line(self, trials, trial, what: str) -> None:
            # Tune calls this before it marks ``trial`` as ended
            done = sum(t is trial or t.status in ("TERMINATED", "ERROR") for t in trials)
            params = " ".join(f"{k}={_short(v)}" for k, v in (trial.config or {}).items())
            print(f"[hybridray] trial {done}/{max(total, len(trials))} {params}: {what}", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            value, step, wall = result.get(metric), result.get("step"), result.get("time_total_s")
            shown = f"{value:.4f}" if isinstance(value, float) else value
            ended = "" if step is None or step >= max_steps else f", stopped early at step {step}/{max_steps}"
            took = f" ({_duration(wall)})" if isinstance(wall, (int, float)) else ""
            self._line(trials, trial, f"{metric} {shown}{ended}{took}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trials, trial, f"FAILED (see {trial.error_file or trial.path})")

    return TrialLine()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    from hybridray.console import format_duration

    return format_duration(seconds)


# ----------------------------------------------------------------------------- the sweep
def sweep_dir(config: Config) -> str:
    return storage.join(config.run.storage_path, f"{config.name}-sweep")


def _identity(config: Config, sweep: SweepConfig, num_samples: int) -> dict:
    """What the sweep computes: the base run's defining values and the sweep (less how many
    trials run at once). A sweep directory with another identity is not resumed."""
    from hybridray.runs import run_identity

    values = sweep.model_dump(mode="json", exclude={"max_concurrent_trials"})
    values["num_samples"] = num_samples
    base = run_identity(config)  # the defining values and the training data's content
    return {"base": base.values, "data": base.data, "sweep": values}


def _searcher(sweep: SweepConfig, concurrent: int):
    """Optuna's TPE, or Tune's grid / random variant generator. The generator is given the
    concurrency limit itself: Tune ignores ``max_concurrent_trials`` for a generator passed in
    (it only wraps a ``Searcher``), and every trial would then start at once."""
    from ray import tune

    if sweep.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=sweep.search.seed)
    return tune.search.BasicVariantGenerator(random_state=sweep.search.seed, max_concurrent=concurrent)


def _scheduler(sweep: SweepConfig, max_steps: int):
    if sweep.early_stopping is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="step", max_t=max_steps, grace_period=sweep.early_stopping.grace_period,
                         reduction_factor=sweep.early_stopping.reduction_factor, brackets=1)


def _say(message: str) -> None:
    print(f"[hybridray] {message}", flush=True)


def run_sweep(config: Config, sweep_path: str | Path, num_samples: Optional[int] = None,
              *, overwrite: bool = False) -> dict:
    """Run (or resume) the sweep, write its results (``hybridray.sweep_report``) and print the
    table and where ``best.yaml`` is; returns the summary (``sweep_report.summarise``)."""
    import ray
    from ray import tune

    from hybridray.console import is_verbose, quiet_process
    from hybridray.models import resolve_model_path
    from hybridray.sweep_report import summarise, write_outputs
    from hybridray.train import init_ray, resolve_paths, use_s3_endpoint

    started = time.perf_counter()
    sweep = load_sweep(sweep_path, config)
    n_samples = num_samples or sweep.num_samples
    config = resolve_paths(config)
    runtime_env = use_s3_endpoint(config)
    directory = sweep_dir(config)
    fs, fs_path = storage.filesystem_for(directory)
    if overwrite:
        storage.delete_tree(directory)
    identity = _identity(config, sweep, n_samples)
    saved = storage.read_text(storage.join(directory, "sweep.json"))
    resume = tune.Tuner.can_restore(fs_path, storage_filesystem=fs)
    if resume and (saved is None or json.loads(saved).get("identity") != identity):
        raise UserError(f"{directory} holds another sweep (other base config, training data or sweep file): "
                        "pass --overwrite "
                        "to start it again, or choose another name=")
    resolve_model_path(config.model.name_or_path)  # build a builtin once, before the trials start
    storage.check_writable(directory)
    storage.write_text(storage.join(directory, "sweep.json"), json.dumps(
        {"identity": identity, "config": config.model_dump(mode="json"), "sweep_file": str(sweep_path)},
        indent=2, default=str) + "\n")
    if not is_verbose():  # Tune's new console output prints its banners even at verbose=0
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    init_ray(runtime_env=runtime_env)
    quiet_process()

    total = trial_count(sweep, n_samples)
    max_steps = build_config(config.model_dump(), _overrides(sweep)).train.max_steps
    need = sweep_resources(config, sweep)
    cluster = ray.cluster_resources()
    fits = concurrent_trials(need, cluster)
    concurrent = sweep.max_concurrent_trials or max(1, fits)
    shown_need = ", ".join(f"{v:g} {k}" for k, v in need.items())
    _say(f"sweep {config.name!r}: {total} trial(s) of up to {max_steps} steps, "
         f"{concurrent} at a time (one trial holds {shown_need}; the cluster has "
         f"{', '.join(f'{cluster.get(k, 0):g} {k}' for k in need)})")
    if fits < 1:
        _say("the cluster cannot hold one whole trial now: trials wait for resources (an autoscaler may add nodes)")
    elif sweep.max_concurrent_trials and sweep.max_concurrent_trials > fits:
        _say(f"max_concurrent_trials={sweep.max_concurrent_trials} is more than the {fits} trial(s) the cluster "
             "holds: the extra ones wait for resources")

    trials_root = storage.join(directory, "trials")
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=config.model_dump(), overrides=_overrides(sweep),
                             trials_root=trials_root, metric=sweep.metric),
        {"CPU": TRIAL_ACTOR_CPU},
    )
    if resume:
        _say(f"resuming the sweep in {directory}: finished trials are kept, unfinished ones continue")
        tuner = tune.Tuner.restore(fs_path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={k: _domain(k, v) for k, v in sweep.search_space.items()},
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, num_samples=n_samples,
                search_alg=_searcher(sweep, concurrent), scheduler=_scheduler(sweep, max_steps),
                max_concurrent_trials=concurrent if sweep.search.algorithm == "optuna" else None,  # see _searcher
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=f"{config.name}-sweep", storage_path=storage.filesystem_for(config.run.storage_path)[1],
                storage_filesystem=fs, verbose=2 if is_verbose() else 0,
                callbacks=[_trial_line_callback(total, sweep.metric, max_steps)],
            ),
        )
    results = tuner.fit()
    summary = summarise(results, sweep, max_steps=max_steps)
    best_config = None
    if summary["best"] is not None:
        best_config = build_config(config.model_dump(), _overrides(sweep) + [
            override(k, v) for k, v in summary["best"]["params"].items()])
        best_config.name = f"{config.name}-best"
    summary["wall_seconds"] = time.perf_counter() - started
    write_outputs(summary, directory, best_config, title=f"Sweep `{config.name}` ({sweep_path})")
    return summary
