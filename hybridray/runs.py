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


def run_dir(config: Config) -> str:
    return storage.join(config.run.storage_path, config.name)


def latest_checkpoint(directory: str) -> Optional[tuple[str, dict, dict]]:
    """``(checkpoint URI, its trainer state, the metrics reported with it)`` of the checkpoint
    Ray Train would resume from (the latest in its run snapshot), or None if there is none."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    path = storage.join(directory, CHECKPOINT_MANAGER_SNAPSHOT_FILENAME)
    snapshot = storage.read_text(path)
    if snapshot is None:
        return None
    result = (_json(path, snapshot).get("latest_checkpoint_result") or {})
    latest = result.get("checkpoint_dir_name")
    if not latest:
        return None
    checkpoint = storage.join(directory, latest)
    state = storage.join(checkpoint, STATE_FILE)
    text = storage.read_text(state)
    if text is None:
        raise UserError(
            f"{checkpoint}: the latest checkpoint of this run has no {STATE_FILE} (deleted, only "
            "partly written, or not written by hybridray): pass --overwrite to start the run again, "
            "or choose another name="
        )
    return checkpoint, _json(state, text), result.get("metrics") or {}


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
    found = latest_checkpoint(directory)
    if found is None:
        stale = [name for name in OUTPUTS if storage.exists(storage.join(directory, name))]
        if stale:
            raise UserError(
                f"{directory} holds outputs of an earlier run ({', '.join(stale)}) but no checkpoint "
                "to resume: pass --overwrite to replace them, or choose another name="
            )
        return Plan(0, False)
    checkpoint, state, metrics = found
    saved = state.get("run") or {}
    if saved.get("fingerprint") != identity.fingerprint:
        changed = identity.differences(saved) or ["the run's fingerprint"]
        raise UserError(
            f"{directory} was trained with a different config ({'; '.join(changed)}): "
            "pass --overwrite to start it again, or choose another name="
        )
    step = int(state["step"])
    return Plan(step, step >= config.train.max_steps, checkpoint, metrics)
