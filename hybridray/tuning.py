"""``hybridray tune``: a Ray Tune search of the hybrid mix α and the temperature τ (or any
other config key) against held-out pooled mAP.

A sweep is a YAML file (``tune/alpha_temperature.yaml``)::

    metric: val_map            # any metric train reports; val_map = multi mAP on held-out
    mode: max
    num_samples: 1             # repeats of the grid (and draws of the random dimensions)
    max_concurrent_trials: 1
    overrides: {train.max_steps: 100}          # applied to every trial
    search_space:
      sampler.alpha: {grid: [0.0, 0.25, 0.5, 0.75, 1.0]}
      loss.temperature: {loguniform: [0.01, 0.1]}

Each trial is a function trainable that builds the run's ``TorchTrainer`` (Train V2 has no
``Tuner(TorchTrainer)``) and forwards rank 0's reports to Tune through
``TuneReportCallback``. The trial itself reserves almost no CPU: its Train workers do.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from hybridray.config import Config, build_config
from hybridray.errors import UserError

_DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform")


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
        if len(values) != 2 or not all(_number(v) for v in values) or not values[0] < values[1]:
            raise UserError(f"search_space.{key}.{kind}: expected [low, high], two numbers with low < high")
        if kind == "loguniform" and values[0] <= 0:
            raise UserError(f"search_space.{key}.loguniform: the bounds must be positive")
    return {"grid": tune.grid_search, "choice": tune.choice}.get(kind, lambda v: getattr(tune, kind)(*v))(values)


def override(key: str, value: Any) -> str:
    """``KEY=VALUE`` with the value written as JSON (a YAML subset), so that it reads back as
    exactly this value: ``str(value)`` would turn the string ``"a: b"`` into a mapping."""
    return f"{key}={json.dumps(value)}"


#: Keys of a sweep file, each with the check its value must pass.
_SWEEP_KEYS = {
    "metric": (lambda v: isinstance(v, str) and v.strip() != "", "a metric name"),
    "mode": (lambda v: v in ("max", "min"), "max or min"),
    "num_samples": (lambda v: type(v) is int and v >= 1, "a positive integer"),
    "max_concurrent_trials": (lambda v: type(v) is int and v >= 1, "a positive integer"),
    "overrides": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a mapping of config keys"),
    "search_space": (lambda v: isinstance(v, dict) and bool(v) and all(isinstance(k, str) for k in v),
                     "a non-empty mapping of config keys"),
}


def load_sweep(path: str | Path, base: Config) -> dict:
    """Read and check a sweep file: every key and every bound must make a valid run config.
    Any problem is one UserError naming the file and the key."""
    from hybridray.config import read_yaml

    path = Path(path)
    sweep = read_yaml(path, "sweep file")
    if not isinstance(sweep, dict):
        raise UserError(f"{path}: top level must be a mapping ({', '.join(_SWEEP_KEYS)})")
    unknown = sorted(map(str, set(sweep) - set(_SWEEP_KEYS)))
    if unknown:
        raise UserError(f"{path}: unknown key(s) {unknown}")
    for key, (check, what) in _SWEEP_KEYS.items():
        if key in sweep and not (key == "overrides" and sweep[key] is None) and not check(sweep[key]):
            raise UserError(f"{path}: {key}: expected {what}, got {sweep[key]!r:.60}")
    if "search_space" not in sweep:
        raise UserError(f"{path}: search_space: missing (the config keys to search)")
    overrides = [override(k, v) for k, v in (sweep.get("overrides") or {}).items()]
    try:
        build_config(base.model_dump(), overrides)
    except UserError as exc:
        raise UserError(f"{path}: overrides: {exc}") from None
    space = sweep["search_space"]
    for key, spec in space.items():
        try:
            _domain(key, spec)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None
        for value in next(iter(spec.values())):
            try:
                build_config(base.model_dump(), overrides + [override(key, value)])
            except UserError as exc:
                raise UserError(f"{path}: search_space.{key}: {exc}") from None
    return {
        "metric": sweep.get("metric", "val_map"),
        "mode": sweep.get("mode", "max"),
        "num_samples": sweep.get("num_samples", 1),
        "max_concurrent_trials": sweep.get("max_concurrent_trials", 1),
        "overrides": overrides,
        "search_space": space,
    }


def _trial_line_callback(total: int, metric: str):
    """A Tune callback printing one line per finished trial (Tune's own tables are off)."""
    from ray import tune

    class TrialLine(tune.Callback):
        def __init__(self):
            self.done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            params = " ".join(f"{k}={v}" for k, v in (trial.config or {}).items())
            value = (trial.last_result or {}).get(metric)
            shown = f"{value:.4f}" if isinstance(value, float) else value
            print(f"[hybridray] trial {self.done}/{total} {params}: {metric} {shown}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            params = " ".join(f"{k}={v}" for k, v in (trial.config or {}).items())
            print(f"[hybridray] trial {self.done}/{total} {params}: FAILED (see {trial.error_file})", flush=True)

    return TrialLine()


def _trial(params: dict, base: dict, overrides: list[str]) -> None:
    """One Tune trial: the base run with this trial's values, trained by its own TorchTrainer."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from hybridray.console import quiet_process
    from hybridray.train import build_trainer

    quiet_process()  # this trial's actor builds its own dataset
    config = build_config(base, overrides + [override(k, v) for k, v in params.items()])
    trial = tune.get_context().get_trial_id()
    trainer, _ = build_trainer(config, run_dir_name=f"{config.name}-{trial}", callbacks=[TuneReportCallback()])
    trainer.fit()


def run_sweep(config: Config, sweep_path: str | Path, num_samples: Optional[int] = None) -> dict:
    """Run the sweep; returns the best trial's parameters and final metrics."""
    from ray import tune

    from hybridray import storage
    from hybridray.console import is_verbose, quiet_process
    from hybridray.models import resolve_model_path
    from hybridray.train import init_ray, resolve_paths, use_s3_endpoint

    sweep = load_sweep(sweep_path, config)
    config = resolve_paths(config)
    runtime_env = use_s3_endpoint(config)
    resolve_model_path(config.model.name_or_path)
    storage.check_writable(storage.join(config.run.storage_path, f"{config.name}-sweep"))
    init_ray(runtime_env=runtime_env)
    quiet_process()
    trainable = tune.with_parameters(_trial, base=config.model_dump(), overrides=sweep["overrides"])
    n_samples = num_samples or sweep["num_samples"]
    n_trials = n_samples * math.prod(len(spec["grid"]) for spec in sweep["search_space"].values() if "grid" in spec)
    filesystem, storage_path = storage.filesystem_for(config.run.storage_path)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": 0.1}),
        param_space={k: _domain(k, v) for k, v in sweep["search_space"].items()},
        tune_config=tune.TuneConfig(
            metric=sweep["metric"], mode=sweep["mode"],
            num_samples=n_samples,
            max_concurrent_trials=sweep["max_concurrent_trials"],
        ),
        run_config=tune.RunConfig(name=f"{config.name}-sweep", storage_path=storage_path,
                                  storage_filesystem=filesystem, verbose=2 if is_verbose() else 0,
                                  callbacks=[_trial_line_callback(n_trials, sweep["metric"])]),
    )
    results = tuner.fit()
    best = results.get_best_result()
    table = results.get_dataframe()
    return {
        "best_params": best.config,
        "best_metrics": {k: v for k, v in (best.metrics or {}).items() if isinstance(v, (int, float, str))},
        "trials": table[[c for c in table.columns if c.startswith(("config/", sweep["metric"]))]].to_dict("records"),
    }
