"""A run's identity, and what ``hybridray train`` does with a run directory that already exists.

``<run.storage_path>/<name>/`` (local or ``s3://``) holds Ray Train's state, the checkpoints
and hybridray's outputs (``model/``, ``eval/``, ``summary.json``, ``rejects.jsonl``). Ray Train
resumes from the latest checkpoint it finds there, whatever the new config says; so before
anything starts, the driver compares the identity of the run asked for with the identity saved
in that checkpoint (``RunIdentity``: the defining config values and a fingerprint of the
training shards):

====================  ========================================================================
latest checkpoint     what ``hybridray train`` does
====================  ========================================================================
none                  a new run (refused if the directory holds outputs of an earlier run)
another identity      refused, with one line naming the differing keys
same, step < max      resumed from that step; the dataset starts there (nothing skipped is
                      planned or tokenised)
same, step = max      nothing to train: says the run is complete and where its outputs are
====================  ========================================================================

``--overwrite`` deletes the directory first. Which config keys are merely operational (and so
may change across a resume) is decided in ``hybridray.config.OPERATIONAL_KEYS``.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import sys
from dataclasses import asdict, dataclass
from typing import Any, Optional

from hybridray import storage
from hybridray.checkpointing import STATE_FILE
from hybridray.config import Config, defining_values
from hybridray.errors import UserError

#: Outputs hybridray writes into a run directory (a directory holding them belongs to a run).
OUTPUTS = ("model", "eval", "summary.json")


@dataclass(frozen=True)
class RunIdentity:
    """What a run computes: its defining config values and the content of its training data."""

    values: dict[str, Any]
    data: dict[str, str]

    @property
    def fingerprint(self) -> str:
        text = json.dumps({"values": self.values, "data": self.data}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def as_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, **asdict(self)}

    def differences(self, saved: dict) -> list[str]:
        """``key: old -> new`` for every key whose value differs from a saved identity (a key
        missing on one side is at its default there)."""
        from hybridray.config import default_values

        defaults = default_values()
        out = []
        mine, theirs = self.values, saved.get("values") or {}
        for key in sorted(set(mine) | set(theirs)):
            old, new = theirs.get(key, defaults.get(key, "<unset>")), mine.get(key, defaults.get(key, "<unset>"))
            if old != new:
                out.append(f"{key}: {old!r} -> {new!r}")
        theirs = saved.get("data") or {}
        out += [f"{key} (the data changed)" for key in sorted(set(self.data) | set(theirs))
                if self.data.get(key) != theirs.get(key)]
        return out


def shards_fingerprint(path: str) -> str:
    """A cheap fingerprint of a shard dataset's content: every shard file's path relative to
    the dataset and its size (one listing), and the manifest's text. No shard file is read:
    moved shards keep their fingerprint, rewritten ones almost always change it (a same-size
    edit of a file is the blind spot)."""
    from hybridray.data.reader import list_shard_sizes

    files = list_shard_sizes(path)
    paths = [storage.filesystem_for(uri)[1] for uri, _ in files]  # bucket/key or /local/path
    root = posixpath.dirname(paths[0]) if len(paths) == 1 else posixpath.commonpath(paths)
    digest = hashlib.sha256()
    for fs_path, (_, size) in zip(paths, files):
        digest.update(f"{fs_path[len(root):]}\0{size}\n".encode())
    manifest = storage.read_text(storage.join(storage.uri_of(path, root), "manifest.json"))
    digest.update((manifest or "").encode())
    return digest.hexdigest()[:16]


def data_fingerprint(path: str, hf_options, key: str) -> str:
    """Shards: ``shards_fingerprint``; an ``hf:`` source: its dataset's own fingerprint."""
    from hybridray.data import hf_source

    if hf_source.is_hf(path):
        return hf_source.fingerprint(path, hf_options, key=key)
    return shards_fingerprint(path)


def run_identity(config: Config) -> RunIdentity:
    data = {"data.train": data_fingerprint(config.data.train, config.data.hf, "data.hf")}
    for i, extra in enumerate(config.data.extra_mono):
        data[f"data.extra_mono.{i}"] = data_fingerprint(extra.path, extra.hf, f"data.extra_mono.{i}.hf")
    return RunIdentity(defining_values(config), data)


#: Ray Train's run snapshot (``ray.train.v2`` CHECKPOINT_MANAGER_SNAPSHOT_FILENAME).
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def run_dir(config: Config) -> str:
    return storage.join(config.run.storage_path, config.name)


def latest_checkpoint(directory: str, *, checksums: bool = True) -> Optional[tuple[str, dict, dict]]:
    """``(checkpoint URI, its trainer state, the metrics reported with it)`` of the checkpoint
    a resume starts from, or None if the run has none. Writes nothing.

    That is the latest checkpoint of Ray Train's run snapshot when it is intact
    (``checkpointing.checkpoint_problem``: every rank's seal there, every file its size and
    checksum; ``checksums=False``: seals and sizes only). A damaged one (a truncated upload, a
    lost or corrupted file) is passed over for the newest intact one before it; only
    ``plan_run``, for a resume that goes ahead, warns about it and rewrites Ray Train's
    snapshot. No intact checkpoint at all is a UserError."""
    found = _find_checkpoint(directory, checksums=checksums)
    if found is None:
        return None
    checkpoint, state, result, _ = found
    return checkpoint, state, result.get("metrics") or {}


def _find_checkpoint(directory: str, checksums: bool = True):
    """``(checkpoint, state, snapshot result, [(damaged checkpoint, problem), ...])`` or None."""
    from hybridray.checkpointing import checkpoint_problem

    path = storage.join(directory, SNAPSHOT_FILE)
    text = storage.read_text(path)
    if text is None:
        return None
    try:
        snapshot = _json(path, text)
    except UserError as exc:  # never advise --overwrite: it would delete intact checkpoints too
        kept = [name for name in storage.child_dirs(directory) if name.startswith("checkpoint_")]
        raise UserError(f"{str(exc).split(': the run directory')[0]}: Ray Train's run snapshot is damaged, so "
                        f"this run cannot be resumed; its {len(kept)} checkpoint(s) are untouched"
                        f"{f' (newest: {kept[-1]})' if kept else ''}. Keep them and start a new run with another "
                        "name=, or pass --overwrite to delete the run and start it again") from None
    latest = snapshot.get("latest_checkpoint_result") or {}
    if not latest.get("checkpoint_dir_name"):
        return None
    older = [r for r in reversed(snapshot.get("checkpoint_results") or [])
             if r.get("checkpoint_dir_name") not in (None, latest["checkpoint_dir_name"])]
    damaged: list[tuple[str, str]] = []
    for result in [latest, *older]:
        checkpoint = storage.join(directory, result["checkpoint_dir_name"])
        problem = checkpoint_problem(checkpoint, checksums=checksums)
        if problem is None:
            break
        damaged.append((checkpoint, problem))
    else:
        found = "; ".join(f"{c}: {p}" for c, p in damaged)
        raise UserError(f"{directory}: no intact checkpoint to resume from ({found}): pass --overwrite to start "
                        "the run again, or choose another name=")
    state = _json(storage.join(checkpoint, STATE_FILE), storage.read_text(storage.join(checkpoint, STATE_FILE)))
    return checkpoint, state, result, damaged


def _repair_snapshot(directory: str, checkpoint: str, state: dict, result: dict, damaged: list) -> None:
    """Warn about each damaged checkpoint and write Ray Train's snapshot without them."""
    path = storage.join(directory, SNAPSHOT_FILE)
    snapshot = _json(path, storage.read_text(path))
    for bad, problem in damaged:
        print(f"hybridray: warning: checkpoint {bad} is damaged ({problem}); resuming from the previous "
              f"checkpoint {checkpoint} (step {state.get('step')}) instead. The damaged one is left in place "
              "and no longer used.", file=sys.stderr, flush=True)
    storage.write_text(path, json.dumps(_without(snapshot, {posixpath.basename(c.rstrip('/')) for c, _ in damaged},
                                                 result)))


def _without(snapshot: dict, names: set[str], latest: dict) -> dict:
    """Ray Train's run snapshot with the checkpoints ``names`` forgotten and ``latest`` the
    checkpoint to resume from."""
    snapshot = dict(snapshot)
    pairs = [(r, i) for r, i in zip(snapshot.get("checkpoint_results") or [],
                                    snapshot.get("checkpoint_report_indices") or [])
             if r.get("checkpoint_dir_name") not in names]
    snapshot["checkpoint_results"] = [r for r, _ in pairs]
    snapshot["checkpoint_report_indices"] = [i for _, i in pairs]
    snapshot["latest_checkpoint_result"] = latest
    pending = [(r, v) for r, v in zip(snapshot.get("pending_training_results") or [],
                                      snapshot.get("pending_validation_specs") or [])
               if r.get("checkpoint_dir_name") not in names]
    snapshot["pending_training_results"] = [r for r, _ in pending]
    snapshot["pending_validation_specs"] = [v for _, v in pending]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):
        if key in snapshot:
            snapshot[key] = [n for n in snapshot[key] if n not in names]
    return snapshot


def _json(uri: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{uri}: not valid JSON ({exc}): the run directory is damaged; pass "
                        "--overwrite to start the run again, or choose another name=") from None
    if not isinstance(value, dict):
        raise UserError(f"{uri}: not a JSON object: the run directory is damaged")
    return value


@dataclass(frozen=True)
class Plan:
    """What to do with a run: start it at ``start_step`` (0 = new), or nothing (complete)."""

    start_step: int
    complete: bool
    checkpoint: Optional[str] = None
    metrics: Optional[dict] = None  # reported with ``checkpoint``


def plan_run(config: Config, identity: RunIdentity, *, overwrite: bool) -> Plan:
    """Decide new / resume / complete for ``config`` (see the module docstring); refuses with
    a UserError when the directory holds another run."""
    directory = run_dir(config)
    if overwrite:
        storage.delete_tree(directory)
        return Plan(0, False)
    found = _find_checkpoint(directory)
    if found is None:
        stale = [name for name in OUTPUTS if storage.exists(storage.join(directory, name))]
        if stale:
            raise UserError(
                f"{directory} holds outputs of an earlier run ({', '.join(stale)}) but no checkpoint "
                "to resume: pass --overwrite to replace them, or choose another name="
            )
        return Plan(0, False)
    checkpoint, state, result, damaged = found
    saved = state.get("run") or {}
    if saved.get("fingerprint") != identity.fingerprint:
        changed = identity.differences(saved) or ["the run's fingerprint"]
        raise UserError(
            f"{directory} was trained with a different config ({'; '.join(changed)}): "
            "pass --overwrite to start it again, or choose another name="
        )
    if damaged:  # only now that it resumes: the snapshot of another config's run is left alone
        _repair_snapshot(directory, checkpoint, state, result, damaged)
    metrics = result.get("metrics") or {}
    step = int(state["step"])
    return Plan(step, step >= config.train.max_steps, checkpoint, metrics)
