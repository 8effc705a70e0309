"""``hybridray train``: one ``train_func`` per Ray Train worker, and the TorchTrainer around it.

The worker loop is small on purpose: the batch plan (``data.pipeline``), the model and loss
(``engine.TrainingModel``), DeepSpeed (``engine.build_engine``), checkpoints
(``checkpointing``) and held-out evaluation (``evaluate.lareqa``) each live in their module.
All cluster shape is in ``ScalingConfig`` / ``RunConfig``; nothing here knows about nodes.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from dataclasses import asdict
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from hybridray.config import Config
from hybridray.errors import UserError

#: Batch keys that are model inputs (the rest is metadata for logging).
MODEL_INPUTS = (
    "query_input_ids", "query_attention_mask", "passage_input_ids", "passage_attention_mask",
    "negative_input_ids", "negative_attention_mask", "group_ids", "negative_group_ids",
)

#: What every step report of ``train_func`` holds that a sweep can optimise (``val_*`` only
#: after a held-out evaluation; ``before_val_*`` are the scores before training).
REPORTED_METRICS = frozenset({
    "val_map", "val_map_mono", "val_map_cross", "val_rank_distance",
    "loss", "lr", "temperature", "samples_per_s", "tokens_per_s",
})


# ----------------------------------------------------------------------------- worker side
def full_weights(engine, config: Config):
    """Collective context in which every rank holds the whole model (the student: a
    distillation teacher stays partitioned): ZeRO-3 gathers its partitioned parameters;
    stages 0-2 hold them already."""
    import contextlib

    if config.deepspeed.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    student = [p for name, p in engine.module.named_parameters() if not name.startswith("teacher.")]
    return deepspeed.zero.GatheredParameters(student, modifier_rank=None)


def heldout_evaluation(engine, tokenizer, heldout, config: Config, label: str) -> Optional[dict]:
    """LAReQA evaluation of the current weights (the same scoring as ``hybridray eval``); rank 0
    gets the report, the others None. Every rank must call this.

    The encoding is split over all ranks: each encodes a contiguous shard of the questions and
    of the candidates, the shards are gathered, and rank 0 scores while the others wait at a
    barrier (``evaluate.sharding``). Under ZeRO-3 every rank runs the same number of forward
    passes, because each layer's forward gathers its partitioned weights collectively -- a
    rank that ran one pass less would leave the others waiting forever (gathering the whole
    model first does not help: ZeRO-3 frees a layer's gathered weights again after its
    forward, and it would hold a 34B model on every GPU). The whole model is in eval mode (no
    dropout) while it runs, and every submodule is put back in exactly the mode it had.
    """
    import torch.distributed as dist

    from hybridray.data.tokenize import prefixes
    from hybridray.distributed import rank, world_size
    from hybridray.evaluate.encode import eval_mode
    from hybridray.evaluate.lareqa import lareqa_report, lareqa_texts
    from hybridray.evaluate.sharding import encode_sharded

    module = engine.module
    query_prefix, passage_prefix = prefixes(config.model)
    settings = {"query_prefix": query_prefix, "passage_prefix": passage_prefix, "pooling": config.model.pooling,
                "max_length": config.eval.max_length, "batch_size": config.eval.batch_size,
                "with_context": config.eval.with_context}
    encode = dict(pooling=config.model.pooling, max_length=config.eval.max_length,
                  batch_size=config.eval.batch_size, progress=False, lockstep=config.deepspeed.zero_stage == 3)
    questions, candidates = lareqa_texts(heldout, config.eval.with_context)
    started = time.perf_counter()
    with eval_mode(module):
        q_all = encode_sharded(module.encoder.model, tokenizer, questions, prefix=query_prefix, **encode)
        c_all = encode_sharded(module.encoder.model, tokenizer, candidates, prefix=passage_prefix, **encode)
    report = None
    if rank() == 0:
        report = lareqa_report(heldout, q_all, c_all, settings, encode_seconds=time.perf_counter() - started,
                               encode_workers=world_size())
        report = {"model": f"{config.model.name_or_path} ({label})", **report}
    if dist.is_initialized():
        dist.barrier()
    return report


def val_metrics(report: Optional[dict]) -> dict:
    """The flat ``val_*`` metrics of a LAReQA report (``val_map`` = pooled multilingual mAP)."""
    if report is None:
        return {}
    summary = report["summary"]
    return {
        "val_map": summary["map"]["multi"],
        "val_map_mono": summary["map"]["mono"],
        "val_map_cross": summary["map"]["cross"],
        "val_rank_distance": summary["rank_distance"],
    }


def worker_nodes() -> list[str]:
    """The Ray node id of every rank, in rank order (collective)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not dist.is_initialized():
        return [node]
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return nodes


def train_func(loop_config: dict) -> None:
    """The per-worker training loop (Ray Train calls it on every worker)."""
    import contextlib

    import ray.train
    import torch

    from hybridray.checkpointing import load_state, save_state, seal, upload_checkpoint
    from hybridray.data.pipeline import iter_worker_batches
    from hybridray.device import cpu_threads
    from hybridray.distributed import all_reduce_mean, groups_digest, rank, world_size
    from hybridray.engine import TrainingModel, build_engine, clamp_temperature
    from hybridray.evaluate.lareqa import load_lareqa, subset_lareqa

    from hybridray.console import quiet_process
    from hybridray.device import tell_deepspeed

    tell_deepspeed()  # before anything imports DeepSpeed
    quiet_process(loop_config.get("verbose"))
    config = Config.model_validate(loop_config["config"])
    run = loop_config["run"]
    board = loop_config.get("board") if rank() == 0 else None  # the driver's progress display
    # From the config, not only from init_ray's runtime env: a worker of a Ray session started
    # earlier (a Tune trial, a library user's ray.init()) never got that env.
    from hybridray import storage

    os.environ[storage.RETRY_ENV] = str(config.run.storage_retry_s)
    if config.run.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL_S3"] = config.run.s3_endpoint
    storage._s3.cache_clear()
    if not config.scaling.use_gpu:
        torch.set_num_threads(cpu_threads(config.scaling.cpus_per_worker))
    torch.manual_seed(config.seed)  # identical initial weights (e.g. a learned temperature) on every rank
    model = TrainingModel.from_config(config)
    tokenizer = model.encoder.tokenizer
    engine = build_engine(model, config, world_size())  # in train mode, dropout on
    device = engine.device
    nodes = worker_nodes()
    if board is not None:
        board.push.remote({"message": f"{world_size()} worker(s) on {len(set(nodes))} node(s): {', '.join(nodes)}"})

    start_step, saved = 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start_step, saved = load_state(engine, directory)
        if (saved.get("run") or {}).get("fingerprint") != run["fingerprint"]:
            # The driver refuses such a run before it starts; this guards the workers too.
            raise RuntimeError(f"checkpoint at step {start_step} belongs to another run")
    # every rank encodes a shard of it (see heldout_evaluation)
    heldout = load_lareqa(config.data.heldout, config.eval.langs) if config.data.heldout else None
    if heldout is not None and config.train.eval_max_queries:
        heldout = subset_lareqa(heldout, config.train.eval_max_queries)
    evaluate_now = heldout_evaluation if config.data.heldout else (lambda *a: None)

    reports = dict(saved.get("reports", {}))
    if start_step == 0 and config.train.eval_before:
        if board is not None and config.data.heldout:
            board.push.remote({"message": "held-out evaluation before training ..."})
        reports["before"] = evaluate_now(engine, tokenizer, heldout, config, "before training")

    window = {"loss": 0.0, "kl": 0.0, "n": 0, "samples": 0, "tokens": 0, "mono": 0, "cross": 0, "x-x": 0}
    distill = config.loss.distill_weight > 0
    window_start = time.perf_counter()
    last_step = config.train.max_steps - 1
    batches = iter_worker_batches(
        loop_config["stream"], rank=rank(), world_size=world_size(),
        start_step=start_step, stop_step=config.train.max_steps,
    )
    upload = upload_checkpoint(config.run.storage_path)
    with contextlib.closing(batches):
        for batch in batches:
            step = batch["step"]
            inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if batch.get(k) is not None}
            loss = engine(**inputs)
            engine.backward(loss)
            engine.step()
            clamp_temperature(engine)

            step_loss = float(all_reduce_mean(loss))
            step_kl = float(all_reduce_mean(engine.module.loss.last_distillation)) if distill else None
            # which pairs (groups, languages, hard negatives) this step trained, on all ranks
            trained = groups_digest(batch["group_ids"], batch.get("query_langs", ()), batch.get("passage_langs", ()),
                                    batch.get("negative_group_ids"))
            window["loss"] += step_loss
            window["kl"] += step_kl or 0.0
            window["n"] += 1
            window[batch["batch_type"]] += 1
            window["samples"] += config.sampler.batch_size
            window["tokens"] += int(all_reduce_mean(
                (batch["query_attention_mask"].sum() + batch["passage_attention_mask"].sum()).float()
            ) * world_size())
            done = step == last_step
            log_now = (step + 1) % config.train.log_every == 0 or done
            save_now = done or (config.train.checkpoint_every and (step + 1) % config.train.checkpoint_every == 0)
            eval_now = done or (config.train.eval_every and (step + 1) % config.train.eval_every == 0)
            record = {"step": step + 1, "time": time.time(), "loss": step_loss, "lr": engine.get_lr()[0],
                      "samples": config.sampler.batch_size, "batch_type": batch["batch_type"], "groups": trained}
            if distill:
                record["distill_kl"] = step_kl
            if not (log_now or save_now or eval_now):
                if board is not None:
                    board.push.remote(record)  # fire and forget: no wait, no barrier
                continue

            elapsed = time.perf_counter() - window_start
            metrics = {
                "step": step + 1,
                "worker_nodes": ",".join(nodes),
                "loss": window["loss"] / max(1, window["n"]),
                "lr": engine.get_lr()[0],
                "temperature": float(engine.module.loss.temperature),
                "samples_per_s": window["samples"] / elapsed,
                "tokens_per_s": window["tokens"] / elapsed,
                "mono_batches": window["mono"], "cross_batches": window["cross"], "xx_batches": window["x-x"],
            }
            if distill:  # KL(teacher || student) of the in-batch scores, before its weight
                metrics["distill_kl"] = window["kl"] / max(1, window["n"])
            if eval_now:
                if board is not None and config.data.heldout:
                    board.push.remote({"message": f"held-out evaluation at step {step + 1} ..."})
                report = evaluate_now(engine, tokenizer, heldout, config, f"step {step + 1}")
                metrics.update(val_metrics(report))
                if done:
                    reports["after"] = report
            metrics.update({f"before_{k}": v for k, v in val_metrics(reports.get("before")).items()})
            if board is not None:
                record.update({k: v for k, v in metrics.items() if k.startswith("val_") or k == "temperature"})
                board.push.remote(record)

            if save_now:
                with tempfile.TemporaryDirectory() as directory:
                    save_state(engine, directory, step=step + 1, reports=reports, run=run)
                    if done:
                        _export_final(engine, tokenizer, Path(directory), config, reports)
                    seal(directory)  # last: the checksums of everything this rank wrote
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                                     checkpoint_upload_fn=upload)
            else:
                ray.train.report(metrics)
            window = dict.fromkeys(window, 0)
            window["loss"] = window["kl"] = 0.0
            window_start = time.perf_counter()


def _export_final(engine, tokenizer, directory: Path, config: Config, reports: dict) -> None:
    """The final model (HF + sentence-transformers directory; LoRA merged, the adapter alone
    in ``adapter/``) and the held-out reports go into the last checkpoint, so they reach the
    run's storage (local or ``s3://``)."""
    from hybridray.data.tokenize import prefixes
    from hybridray.distributed import rank
    from hybridray.evaluate.report import write_report

    with full_weights(engine, config):
        if rank() == 0:
            query_prefix, passage_prefix = prefixes(config.model)
            lora = config.model.lora
            engine.module.encoder.save_pretrained(
                directory / "model", tokenizer,
                prompts={"query": query_prefix, "passage": passage_prefix},
                adapter_directory=directory / "adapter" if lora and lora.save_adapter else None,
            )
            for name, report in reports.items():
                if report is not None:
                    write_report(report, directory / "eval" / name)


# ----------------------------------------------------------------------------- driver side
def _absolute(path: str) -> str:
    """Local paths are made absolute on the driver: Ray workers run in other directories."""
    if path.startswith("hf:"):
        from hybridray.data.hf_source import absolute

        return absolute(path)
    if not path or "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def resolve_paths(config: Config) -> Config:
    """A copy of ``config`` with every local path absolute."""
    update = config.model_copy(deep=True)
    update.data.train = _absolute(config.data.train)
    update.data.heldout = _absolute(config.data.heldout)
    update.run.storage_path = _absolute(config.run.storage_path)
    for extra in update.data.extra_mono:
        extra.path = _absolute(extra.path)
    if config.train.final_eval_suite:
        from hybridray.config import load_suite

        update.train.final_eval_suite = _absolute(config.train.final_eval_suite)
        load_suite(update.train.final_eval_suite)  # a bad suite fails now, not after training
    if config.data.heldout and "://" not in config.data.heldout and not Path(update.data.heldout).is_dir():
        raise UserError(f"data.heldout: {config.data.heldout} is not a directory "
                        "(run `hybridray data prepare` first, or set data.heldout='' to skip)")
    return update


def use_s3_endpoint(config: Config) -> dict:
    """Apply ``run.s3_endpoint`` and ``run.storage_retry_s`` to this process, and return the
    runtime env that gives them to every Ray worker of the job (Ray Data tasks included)."""
    from hybridray import storage

    env = {storage.RETRY_ENV: str(config.run.storage_retry_s)}
    if config.run.s3_endpoint:
        env["AWS_ENDPOINT_URL_S3"] = config.run.s3_endpoint
    os.environ.update(env)
    storage._s3.cache_clear()
    return {"env_vars": env}


def init_ray(**kwargs) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), else start a
    private local one on loopback (``address="local"`` never joins a stale cluster by
    accident; the dashboard stays up because Ray Train's state queries go through it)."""
    import ray

    from hybridray.console import ray_logging_config

    if ray.is_initialized():
        return
    kwargs.setdefault("logging_config", ray_logging_config())
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    else:
        ray.init(
            address="local", _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
            include_dashboard=True, configure_logging=False, **kwargs,
        )


def build_trainer(
    config: Config,
    run_dir_name: Optional[str] = None,
    callbacks: Optional[list] = None,
    start_step: int = 0,
    identity=None,
    board=None,
):
    """The ``TorchTrainer`` of a run: workers, resources, storage, retention and failures
    from the config; the hybrid-batch stream from ``start_step`` on, given whole to every
    worker (a ``StepStream`` in the loop config: each worker runs it chunk by chunk); the
    run's identity (``hybridray.runs.run_identity``, computed if not given) saved with every
    checkpoint.

    ``board`` (``hybridray.console.new_board``) receives rank 0's per-step progress records.
    A worker that makes no progress for ``run.hang_timeout_s`` fails (``hang_timeouts``)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from hybridray import storage
    from hybridray.console import is_verbose, train_logging_config
    from hybridray.data.pipeline import build_train_dataset
    from hybridray.device import dist_backend
    from hybridray.runs import run_identity

    name = run_dir_name or config.name
    identity = identity or run_identity(config)
    rejects = storage.join(config.run.storage_path, name, "rejects.jsonl")
    stream, info = build_train_dataset(config, rejects_path=rejects, start_step=start_step)
    # Ray Train reads and writes the run's storage through the same filesystem as hybridray
    # (S3 endpoint, retries); for a local path it is the local filesystem.
    filesystem, storage_path = storage.train_filesystem(config.run.storage_path, config.run.storage_retry_s)
    scaling = config.scaling
    resources = {"CPU": scaling.cpus_per_worker, **scaling.resources_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"config": config.model_dump(), "run": identity.as_dict(),
                           "board": board, "verbose": is_verbose(), "stream": stream},
        torch_config=TorchConfig(backend=dist_backend("cuda" if scaling.use_gpu else "cpu"),
                                 timeout_s=hang_timeouts(config)),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=config.run.checkpoints_to_keep),
            failure_config=FailureConfig(max_failures=config.run.max_failures),
            callbacks=callbacks,
            logging_config=train_logging_config(),
        ),
    )
    return trainer, info


@contextlib.contextmanager
def _stop_signal_unwinds():
    """`ray job stop` (and `kill`) send SIGTERM, whose default ends the driver at once; as a
    ``SystemExit`` it unwinds instead, so the run's records are written before it exits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _say(message: str) -> None:
    print(f"hybridray: {message}", file=sys.stderr, flush=True)


#: Ray Train's default worker health-check timeout (ray.train.v2 constants), in seconds.
RAY_HEALTH_CHECK_TIMEOUT_S = 600


def hang_timeouts(config: Config) -> int:
    """Apply ``run.hang_timeout_s`` to the two places a stuck worker is noticed, and return it
    for ``TorchConfig(timeout_s=...)``:

    - a collective (all-reduce, all-gather, barrier) that a peer never joins -- a worker
      frozen, deadlocked or lost -- fails after it on the waiting ranks (torch.distributed's
      process-group timeout, gloo and NCCL alike);
    - Ray Train's own barrier in ``ray.train.report`` (``RAY_TRAIN_COLLECTIVE_TIMEOUT_S``,
      no timeout by default) fails after it too;
    - a worker process that stops answering at all (frozen by the OS, swapped out, stuck in
      native code holding the GIL) is marked dead by Ray Train's controller when its health
      check has hung for ``min(run.hang_timeout_s, 600)`` s
      (``RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S``; 600 s is Ray's default, which a long
      collective timeout must not raise).

    Ray Train reads both variables from the driver's environment when the run starts.

    Either way the run restarts from its last checkpoint while ``run.max_failures`` allows."""
    hang = int(config.run.hang_timeout_s)
    # The health check is an actor call, answered even while rank 0 evaluates: never raise it
    # above Ray's own default, so a frozen worker is still noticed within 10 minutes.
    os.environ["RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S"] = str(min(hang, RAY_HEALTH_CHECK_TIMEOUT_S))
    # Ray Train's barrier inside ``ray.train.report`` waits forever by default: a rank stuck
    # between its last torch collective and its report (sealing, exporting) would hold it.
    os.environ["RAY_TRAIN_COLLECTIVE_TIMEOUT_S"] = str(hang)
    return hang


def run_training(config: Config, *, overwrite: bool = False) -> dict:
    """Train (or resume, or recognise a finished run: ``hybridray.runs``) with a live progress
    display, then collect the final model and before/after reports from the last checkpoint
    into ``<storage_path>/<name>/`` (``model/``, ``eval/before``, ``eval/after``,
    ``summary.json``; plus ``metrics.jsonl``, ``plots/`` and ``tensorboard/``, see
    ``hybridray.run_report``) and print the closing summary.

    ``overwrite`` deletes an existing run directory first; without it a directory that holds
    another run is refused."""
    from hybridray import storage
    from hybridray.console import ProgressDisplay, failure_callback, new_board, quiet_process
    from hybridray.device import tell_deepspeed
    from hybridray.models import resolve_model_path
    from hybridray.run_report import RunLog, closing_summary
    from hybridray.runs import plan_run, run_dir, run_identity

    started = time.perf_counter()
    tell_deepspeed()  # before anything imports DeepSpeed
    quiet_process()
    config = resolve_paths(config)
    runtime_env = use_s3_endpoint(config)
    identity = run_identity(config)
    plan = plan_run(config, identity, overwrite=overwrite)
    directory = run_dir(config)
    if plan.complete:
        _say(f"run {config.name!r} is already complete ({plan.start_step}/{config.train.max_steps} steps); "
             f"its outputs are in {directory}: model/, eval/, summary.json (pass --overwrite to train it again)")
        written = storage.read_text(storage.join(directory, "summary.json"))
        if written is not None:
            return _final_suite(config, json.loads(written))  # a suite added to a finished run runs now
        # the driver died after training but before collecting: collect now
        summary = {"name": config.name, "metrics": plan.metrics, "checkpoint": plan.checkpoint, "data": None}
        summary = _collect_outputs(config, plan.checkpoint, summary)
        RunLog(directory, plan.start_step).close()  # the plots, from what the run logged
        print("\n" + closing_summary(directory, summary), flush=True)
        return summary
    if plan.start_step:
        _say(f"resuming run {config.name!r} from step {plan.start_step}/{config.train.max_steps} "
             f"({plan.checkpoint})")
    resolve_model_path(config.model.name_or_path)  # build a builtin once, before the workers start
    storage.check_writable(directory)  # a missing bucket or denied access: one line, now
    from ray.train.v2.api.exceptions import TrainingFailedError

    init_ray(runtime_env=runtime_env)
    board = new_board()
    trainer, info = build_trainer(config, start_step=plan.start_step,
                                  identity=identity, board=board, callbacks=[failure_callback(board)])
    for note in info.notes:
        _say(f"note: {note}")
    # metrics.jsonl and TensorBoard, written as they come (on s3:// with every checkpoint too)
    log = RunLog(directory, plan.start_step, sync_every=config.train.checkpoint_every)
    try:
        with _stop_signal_unwinds(), ProgressDisplay(
                board, config.train.max_steps, plan.start_step, every=config.train.log_every,
                on_record=log.add) as display:
            result = trainer.fit()
    except BaseException as exc:
        _flush_log(log.sync)  # a stopped or failed driver: what was logged reaches the run directory
        if isinstance(exc, TrainingFailedError):  # failed for good (fit raises it): one line
            raise UserError(failure_line(config, exc, directory)) from None
        raise
    if result.error is not None:
        _flush_log(log.close)
        raise UserError(failure_line(config, result.error, directory))
    summary = {
        "name": config.name,
        "metrics": result.metrics,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "data": asdict(info),
        "start_step": plan.start_step,
        "wall_seconds": time.perf_counter() - started,
        "samples_per_s": display.samples_per_s(),
        "restarts": [{"from_step": a, "reached_step": b} for a, b in display.restarts],
    }
    summary = _collect_outputs(config, summary["checkpoint"], summary)
    log.close()
    print("\n" + closing_summary(directory, summary), flush=True)
    return _final_suite(config, summary)


def _final_suite(config: Config, summary: dict) -> dict:
    """Run ``train.final_eval_suite`` on a finished run's model if it has not run yet. Its
    failure (a task's data missing on this machine, say) is one line and a note in
    ``summary.json``, never the loss of the trained run."""
    from hybridray import storage
    from hybridray.runs import run_dir

    directory = run_dir(config)
    if not (config.train.final_eval_suite and summary.get("model")):
        return summary
    if storage.exists(storage.join(directory, "eval", "suite", "report.json")):
        return summary
    try:
        summary["final_eval_suite"] = run_final_suite(config, summary["model"])
        summary.pop("final_eval_suite_error", None)
    except UserError as exc:
        summary["final_eval_suite_error"] = str(exc)
        _say(f"the final evaluation suite failed: {exc}; the trained model is in {summary['model']} "
             f"(run `hybridray eval --suite {config.train.final_eval_suite} --model {summary['model']}` to retry)")
    storage.write_text(storage.join(directory, "summary.json"), json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _flush_log(write: Callable[[], None]) -> None:
    """Write the run log on the way out of a failed run; storage that is down too is a warning,
    never a second error that hides the run's own."""
    try:
        write()
    except UserError as exc:
        _say(f"warning: the run log was not written: {exc}")


def failure_line(config: Config, error: BaseException, directory: str) -> str:
    """One line for a run that failed for good: the first worker's error (or the controller's),
    and where it can resume from (``latest_checkpoint`` on seals and sizes, which downloads and
    writes nothing: the same command run again checks the checksums too and repairs Ray Train's
    snapshot if need be)."""
    from hybridray.runs import latest_checkpoint

    failures = getattr(error, "worker_failures", None) or {}
    rank, cause = next(iter(sorted(failures.items())), (None, error))
    while True:  # Ray's wrappers (RayTaskError, Ray Train's exception-with-traceback) -> the user's exception
        inner = getattr(cause, "cause", None) or getattr(cause, "_base_exc", None)
        if not isinstance(inner, BaseException):
            break
        cause = inner
    text = " ".join(str(cause).split()) or type(cause).__name__
    who = f"worker rank {rank}" if rank is not None else "the run"
    try:
        found = latest_checkpoint(directory, checksums=False)
    except UserError as exc:
        found, where = None, f"its last checkpoint could not be checked ({exc})"
    else:
        where = "no checkpoint yet" if found is None else f"its last complete checkpoint is {found[0]} (step {found[1]['step']})"
    again = "start it again" if where == "no checkpoint yet" else "resume"
    return (f"run {config.name!r} failed ({who}: {type(cause).__name__}: {text[:400]}); {where}; "
            f"run the same command again to {again}")


def _collect_outputs(config: Config, checkpoint: Optional[str], summary: dict) -> dict:
    """Copy ``model/`` and ``eval/`` out of the final checkpoint into the run directory (local
    or ``s3://``) and write ``summary.json`` there."""
    from hybridray import storage
    from hybridray.runs import run_dir

    if checkpoint is None:
        return summary
    directory = run_dir(config)
    checkpoint = storage.uri_of(config.run.storage_path, checkpoint)  # Ray gives paths inside its filesystem
    summary["checkpoint"] = checkpoint
    for part in ("model", "adapter", "eval"):
        if storage.exists(storage.join(checkpoint, part)):
            storage.copy_tree(storage.join(checkpoint, part), storage.join(directory, part))
    summary["model"] = storage.join(directory, "model")
    storage.write_text(storage.join(directory, "summary.json"), json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def run_final_suite(config: Config, model: str) -> str:
    """``train.final_eval_suite`` on the exported model (``<run>/model``, local or ``s3://``),
    on the driver after training; the report goes to ``<run>/eval/suite/``. Returns its URI."""

    from hybridray import storage
    from hybridray.config import load_suite
    from hybridray.evaluate.suite import run_suite
    from hybridray.runs import run_dir

    out = storage.join(run_dir(config), "eval", "suite")
    suite = load_suite(config.train.final_eval_suite)
    with tempfile.TemporaryDirectory(prefix="hybridray-suite-") as tmp:
        local_out = Path(tmp) if storage.is_remote(out) else Path(out)
        run_suite(suite, model, local_out, suite_path=config.train.final_eval_suite,
                  overrides={"pooling": config.model.pooling},
                  label=f"Run `{config.name}` after {config.train.max_steps} steps")
        if storage.is_remote(out):
            storage.copy_tree(str(local_out), out)
        print("\n" + (local_out / "report.md").read_text(encoding="utf-8").split("\n---\n")[0])
    return out
