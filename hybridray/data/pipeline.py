"""The training data pipeline on Ray Data: shards -> planned global batches -> ready tensors.

Lockstep across ranks
=====================

The pipeline is ONE ordered stream whose rows are whole global steps (``step`` = 0, 1, ...).
Every worker runs that stream unsplit -- the driver hands each worker the same small
``StepStream`` (``data.stream``) and the worker runs it as Ray Data datasets, one per chunk
of steps, order preserved -- and keeps its slice ``[rank*B/W, (rank+1)*B/W)``. So at every
step all slices come from one global batch (one batch type, one language for mono steps),
and every worker runs exactly ``train.max_steps - start_step`` steps: no rank can wait for a
batch that never comes. ``iter_worker_batches`` checks the step numbers it sees are
consecutive.

Why not ``streaming_split``: it hands rows to whichever worker asks first, so which worker
gets which step is not deterministic, and global batches would need W rows each with an
exact routing that Ray Data does not offer. The price of the unsplit stream is that every
worker's iterator runs the (cheap) pipeline for the whole global batch: W times the
tokenisation of one global batch, against a model step on B/W items per worker.

Stages
======

==========  ===================  ============================================================
stage       where                what
==========  ===================  ============================================================
index       Ray Data, per file   validate rows, compact index to the driver (``reader``)
plan        driver               windows, their step counts, the segments of this run
materialise Ray Data, per piece  plan the piece's window (``sampler.plan_window``), read the
                                 texts of the piece's steps (a window split across chunks is
                                 planned once per piece)
tokenise    Ray Data, per step   prefixes, truncation, padding to the global batch's longest
drain       worker               a chunk of steps at a time, one chunk ahead (``stream``)
slice       worker               this rank's rows, trimmed to its longest, as torch tensors
==========  ===================  ============================================================

Resuming at ``start_step`` skips whole windows by their step counts (no planning, no reading)
and plans -- without tokenising -- only the skipped part of the first window. Pass
``start_step`` to ``build_train_dataset`` when the driver knows it (nothing skipped is ever
tokenised); ``iter_worker_batches(start_step=...)`` skips the same way, so a worker that
learns its step from a checkpoint after the stream was built resumes correctly too.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa

from hybridray.data import hf_source, reader, sampler
from hybridray.data.sampler import MAIN, NO_GROUP, ExtraSource, Group, Segment
from hybridray.data.stream import StepStream, drained
from hybridray.data.tokenize import TokenizerSpec, encode, load_tokenizer, prefixes, tokenizer_spec
from hybridray.errors import UserError

#: Steps per block out of the materialise stage (small: the stream starts flowing at once).
_STEPS_PER_BLOCK = 8

_STEP_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("epoch", pa.int64()),
        ("batch_type", pa.string()),
        ("lang", pa.string()),
        ("source", pa.string()),
        ("queries", pa.list_(pa.string())),
        ("passages", pa.list_(pa.string())),
        ("negatives", pa.list_(pa.string())),
        ("group_ids", pa.list_(pa.int64())),
        ("negative_group_ids", pa.list_(pa.int64())),
        ("query_langs", pa.list_(pa.string())),
        ("passage_langs", pa.list_(pa.string())),
    ]
)


@dataclass
class PipelineInfo:
    """What the driver learnt while building the dataset (log it with the run's metrics)."""

    languages: list[str]
    rows_per_language: dict[str, int]
    n_groups: int
    n_rows: int
    rejects: dict[str, int]  # reason kind -> count (see reader.reason_kind)
    n_rejects: int
    rejects_path: Optional[str]
    filtered_rows: int
    scattered_groups: int
    n_windows: int
    steps_per_epoch: int
    start_step: int
    max_steps: int
    batch_size: int
    world_size: int
    extra: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for the run's metrics (``data/...``)."""
        out = {
            "data/rows": self.n_rows, "data/groups": self.n_groups, "data/rejects": self.n_rejects,
            "data/filtered_rows": self.filtered_rows, "data/windows": self.n_windows,
            "data/steps_per_epoch": self.steps_per_epoch,
        }
        out.update({f"data/rows/{k}": v for k, v in self.rows_per_language.items()})
        out.update({f"data/rejects/{k}": v for k, v in self.rejects.items()})
        return out


# ----------------------------------------------------------------------------- driver side
def _index(path: str, config, strict: bool, hf=None, key: str = "data.hf"):
    kwargs = dict(max_text_chars=config.data.max_text_chars, languages=config.data.languages,
                  strict=strict, task_cpus=config.data.task_cpus, need_negatives=config.loss.hard_negatives > 0)
    if hf_source.is_hf(path):  # materialised once into the run's storage, then read as shards
        cache_root = config.run.storage_path.rstrip("/") + "/hf-cache"
        return hf_source.index_hf(path, hf, key=key, cache_root=cache_root, **kwargs)
    return reader.index_shards(path, **kwargs)


def check_lengths(model_cfg) -> None:
    """UserError when a configured length exceeds what the model can take (its position
    table): caught on the driver, not as a tensor-size error on every worker."""
    # the arguments of ``tokenizer_spec``'s call: one cached load of the tokenizer per driver, not two
    limit = load_tokenizer(model_cfg.name_or_path, model_cfg.append_eos, model_cfg.padding_side).model_max_length
    for key in ("max_query_length", "max_passage_length"):
        value = getattr(model_cfg, key)
        if value > limit:
            raise UserError(f"model.{key} ({value}) is more than {model_cfg.name_or_path} takes ({limit} tokens)")


def build_train_dataset(config, *, rejects_path: Optional[str], start_step: int = 0):
    """``(StepStream, PipelineInfo)``: the ordered stream of global steps ``[start_step, max_steps)``.

    Runs the index pass now (so bad data fails here, on the driver, with its file:row); the
    rest runs lazily when workers iterate. Hand the stream to every worker (it is small and
    picklable; the driver keeps its windows in the object store while it holds it) and read
    it there with ``iter_worker_batches``.
    """
    import ray

    cfg, scfg = config, config.sampler
    if not 0 <= start_step <= cfg.train.max_steps:
        raise UserError(f"start_step {start_step} is outside [0, train.max_steps={cfg.train.max_steps}]")
    check_lengths(cfg.model)
    main = _index(cfg.data.train, cfg, cfg.data.strict, cfg.data.hf, "data.hf")
    extras = [_index(e.path, cfg, cfg.data.strict, e.hf, f"data.extra_mono.{i}.hf")
              for i, e in enumerate(cfg.data.extra_mono)]
    all_rejects = main.rejects + [r for e in extras for r in e.rejects]
    if rejects_path:
        reader.write_rejects(rejects_path, all_rejects)
    k = cfg.loss.hard_negatives
    for label, index in [(cfg.data.train, main),
                         *((f"data.extra_mono[{i}] ({e.path})", x) for i, (e, x) in enumerate(zip(cfg.data.extra_mono,
                                                                                                  extras)))]:
        if not index.groups:  # a configured source that would give nothing: never dropped silently
            why = (f"; {index.rows_without_negatives} of them have no hard_negatives (first: "
                   f"{index.first_without_negatives}) and loss.hard_negatives={k} draws from them"
                   if k and index.rows_without_negatives else "")
            raise UserError(f"{label}: no valid rows ({len(index.rejects)} rejected{why})")
    if sum(e.weight for e in cfg.data.extra_mono) > 1.0:
        raise UserError("data.extra_mono: the weights must sum to at most 1")

    windows = sampler.make_windows(len(main.groups), scfg.window_groups, scfg.batch_size)
    for w, (a, b) in enumerate(windows):
        sampler.check_window(main.groups[a:b], scfg, w)
    extra_meta = [
        ExtraSource((), e.weight, sampler.extra_windows(len(x.groups), scfg), e.new_languages)
        for e, x in zip(cfg.data.extra_mono, extras)
    ]
    notes = []
    reject_counts = _merged_counts(main, extras)
    if all_rejects:  # never silent: how many rows were left out, why, and where each is named
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(reject_counts.items()))
        notes.append(f"{len(all_rejects)} row(s) rejected and left out ({kinds})"
                     + (f"; each is named in {rejects_path}" if rejects_path else ""))
    if extras and (scfg.mode == "x-x" or scfg.alpha == 0.0):
        notes.append("data.extra_mono is only used by monolingual steps; this run has none")
    notes.extend(unused_extra_languages(cfg.data.extra_mono, extras, main.rows_per_language, scfg.batch_size))
    if main.scattered_groups:
        notes.append(f"{main.scattered_groups} group(s) have rows that are not adjacent; they were gathered")
    if scfg.mode == "hybrid" and scfg.alpha > 0:
        notes.extend(_no_mono_notes(main.groups, windows, scfg.batch_size))
    segs = list(sampler.segments(windows, scfg.batch_size, cfg.seed, start_step, cfg.train.max_steps))

    main_refs = [ray.put(main.groups[a:b]) for a, b in windows]
    extra_refs = [[ray.put(x.groups[a:b]) for a, b in m.windows] for x, m in zip(extras, extra_meta)]
    q_prefix, p_prefix = prefixes(cfg.model)
    materialise = functools.partial(
        _materialise, sampler_cfg=scfg, seed=cfg.seed, start_step=start_step,
        stop_step=cfg.train.max_steps, files=[main.files, *[x.files for x in extras]],
        main_refs=main_refs, extra_refs=extra_refs, extra_meta=extra_meta, k_negatives=k,
    )
    tokenise = functools.partial(
        _tokenise, tokenizer=tokenizer_spec(
            cfg.model.name_or_path, put=True,
            append_eos=cfg.model.append_eos, padding_side=cfg.model.padding_side,
        ), q_prefix=q_prefix, p_prefix=p_prefix,
        max_query=cfg.model.max_query_length, max_passage=cfg.model.max_passage_length, k_negatives=k,
    )
    stream = StepStream(
        segments=tuple(segs), start_step=start_step, stop_step=cfg.train.max_steps,
        chunk_steps=cfg.data.stream_chunk_steps, materialise=materialise, tokenise=tokenise,
        task_cpus=cfg.data.task_cpus,
    )

    info = PipelineInfo(
        languages=sorted(main.rows_per_language), rows_per_language=main.rows_per_language,
        n_groups=len(main.groups), n_rows=main.n_rows, rejects=reject_counts,
        n_rejects=len(all_rejects), rejects_path=rejects_path, filtered_rows=main.filtered_rows,
        scattered_groups=main.scattered_groups, n_windows=len(windows),
        steps_per_epoch=sum((b - a) // scfg.batch_size for a, b in windows),
        start_step=start_step, max_steps=cfg.train.max_steps, batch_size=scfg.batch_size,
        world_size=cfg.scaling.num_workers,
        extra=[
            {"path": e.path, "weight": e.weight, "n_groups": len(x.groups),
             "rows_per_language": x.rows_per_language, "n_rejects": len(x.rejects)}
            for e, x in zip(cfg.data.extra_mono, extras)
        ],
        notes=notes,
    )
    return stream, info


def unused_extra_languages(extra_configs, extras, main_rows: dict[str, int], batch_size: int) -> list[str]:
    """Notes on extra-set languages no mono step will ever use; UserError when that is all of
    a set's languages (it would be read, indexed and never trained on)."""
    notes = []
    for k, (e, x) in enumerate(zip(extra_configs, extras)):
        usable = {lang for lang, n in x.rows_per_language.items() if n >= batch_size}
        if not e.new_languages:
            usable &= set(main_rows)
        unused = sorted(set(x.rows_per_language) - usable)
        if not unused:
            continue
        why = ("has fewer than sampler.batch_size rows" if e.new_languages else
               "is not in data.train (set new_languages: true to train on it)")
        if not usable:
            raise UserError(f"data.extra_mono[{k}] ({e.path}): no language a mono step can use: "
                            f"each of {unused} {why}")
        notes.append(f"data.extra_mono[{k}] ({e.path}): {', '.join(unused)} never used: each {why}")
    return notes


def _no_mono_notes(groups, windows, batch_size: int) -> list[str]:
    """One line per language that some window leaves without monolingual steps."""
    short: dict[str, list[int]] = {}
    for a, b in windows:
        for lang, n in sampler.short_languages(groups[a:b], batch_size).items():
            short.setdefault(lang, []).append(n)
    notes = []
    for lang, counts in short.items():
        lo, hi = min(counts), max(counts)
        notes.append(
            f"no monolingual steps in {lang!r} in {len(counts)} of {len(windows)} window(s): it has "
            f"{lo if lo == hi else f'{lo}-{hi}'} group(s) there, fewer than sampler.batch_size ({batch_size})"
        )
    return notes


def _merged_counts(main, extras) -> dict[str, int]:
    total: dict[str, int] = {}
    for index in [main, *extras]:
        for kind, n in index.reject_counts().items():
            total[kind] = total.get(kind, 0) + n
    return total


# ----------------------------------------------------------------------------- Ray Data stages
def _materialise(
    batch: pa.Table, *, sampler_cfg, seed: int, start_step: int, stop_step: int,
    files: list[list[str]], main_refs, extra_refs, extra_meta: Sequence[ExtraSource], k_negatives: int,
) -> Iterator[pa.Table]:
    """One piece of a window (``stream.Piece.row``: a segment and its step range ``[lo, hi)``):
    plan the whole window, read the texts of the piece's steps, emit their step rows."""
    import ray

    for d in batch.to_pylist():
        lo, hi = d.pop("lo"), d.pop("hi")
        seg = Segment(**d)
        groups = ray.get(main_refs[seg.window])
        extra_groups = [
            ray.get(extra_refs[k][sampler.extra_window_for(m, seg.ordinal, seed, k)[1]])
            for k, m in enumerate(extra_meta)
        ]
        plans = [
            p for p in sampler.plan_window(groups, sampler_cfg, seed=seed, segment=seg,
                                           extra=extra_meta, extra_groups=extra_groups)
            if max(start_step, lo) <= p.step < min(stop_step, hi)
        ]
        sources = [groups, *extra_groups]
        texts = _read_texts(plans, sources, files, k_negatives)
        for i in range(0, len(plans), _STEPS_PER_BLOCK):
            yield pa.Table.from_pylist(
                [_step_record(p, sources, texts, seed, k_negatives) for p in plans[i : i + _STEPS_PER_BLOCK]],
                schema=_STEP_SCHEMA,
            )


def _refs(plan, sources: Sequence[Sequence[Group]]) -> list[tuple[Group, tuple[int, int], tuple[int, int]]]:
    groups = sources[0 if plan.source == MAIN else plan.source + 1]
    out = []
    for it in plan.items:
        g = groups[it.group]
        out.append((g, g.row_of(it.query_lang), g.row_of(it.passage_lang)))
    return out


def _read_texts(plans, sources, files, k_negatives) -> dict[tuple[int, int, int], dict]:
    """``(source, file, row) -> record`` for every row the plans use, one read per file."""
    need: dict[tuple[int, int], set[int]] = {}
    for p in plans:
        s = 0 if p.source == MAIN else p.source + 1
        for _, q, ps in _refs(p, sources):
            need.setdefault((s, q[0]), set()).add(q[1])
            need.setdefault((s, ps[0]), set()).add(ps[1])
    columns = ["query", "passage"] + (["hard_negatives", "hard_negative_group_ids"] if k_negatives else [])
    texts = {}
    for (s, fi), rows in sorted(need.items()):
        for row, rec in reader.read_rows(files[s][fi], rows, columns).items():
            texts[(s, fi, row)] = rec
    return texts


def _step_record(plan, sources, texts, seed: int, k: int) -> dict:
    s = 0 if plan.source == MAIN else plan.source + 1
    queries, passages, negatives, gids, negative_gids = [], [], [], [], []
    for slot, (g, q, p) in enumerate(_refs(plan, sources)):
        queries.append(texts[(s, *q)]["query"])
        prow = texts[(s, *p)]
        passages.append(prow["passage"])
        if k:
            pool = prow["hard_negatives"]
            answers = prow.get("hard_negative_group_ids") or [None] * len(pool)
            for j in sampler.pick_negatives(len(pool), k, seed=seed, step=plan.step, slot=slot):
                negatives.append(pool[j])
                negative_gids.append(sampler.stable_hash64(answers[j]) if answers[j] else NO_GROUP)
        gids.append(sampler.stable_hash64(g.group_id))
    return {
        "step": plan.step, "epoch": plan.epoch, "batch_type": plan.batch_type, "lang": plan.lang or "",
        "source": "train" if plan.source == MAIN else f"extra:{plan.source}",
        "queries": queries, "passages": passages, "negatives": negatives, "group_ids": gids,
        "negative_group_ids": negative_gids,
        "query_langs": [it.query_lang for it in plan.items],
        "passage_langs": [it.passage_lang for it in plan.items],
    }


def _tokenise(
    batch: pa.Table, *, tokenizer: TokenizerSpec, q_prefix: str, p_prefix: str,
    max_query: int, max_passage: int, k_negatives: int,
) -> dict[str, np.ndarray]:
    """One step's texts -> padded int32 ids / int8 masks of the global batch."""
    (row,) = batch.to_pylist()
    out = {
        "step": np.array([row["step"]], dtype=np.int64),
        "epoch": np.array([row["epoch"]], dtype=np.int64),
        "batch_type": np.array([row["batch_type"]]),
        "lang": np.array([row["lang"]]),
        "source": np.array([row["source"]]),
        "group_ids": np.array([row["group_ids"]], dtype=np.int64),
        # language codes never contain spaces: one string column instead of a pickled list
        "query_langs": np.array([" ".join(row["query_langs"])]),
        "passage_langs": np.array([" ".join(row["passage_langs"])]),
    }
    sides = [("query", row["queries"], q_prefix, max_query), ("passage", row["passages"], p_prefix, max_passage)]
    if k_negatives:
        sides.append(("negative", row["negatives"], p_prefix, max_passage))
    if k_negatives:
        out["negative_group_ids"] = np.array([row["negative_group_ids"]], dtype=np.int64)
    for name, texts, prefix, max_len in sides:
        ids, mask = encode(tokenizer, texts, prefix, max_len)
        out[f"{name}_input_ids"], out[f"{name}_attention_mask"] = ids[None], mask[None]
    return out


# ----------------------------------------------------------------------------- worker side
def _trim(ids: np.ndarray, mask: np.ndarray):
    """Drop the padding columns no row of this slice uses (either padding side)."""
    import torch

    cols = np.flatnonzero(mask.any(axis=0))
    lo, hi = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 0)
    return (torch.from_numpy(np.ascontiguousarray(ids[:, lo:hi], dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(mask[:, lo:hi], dtype=np.int64)))


def slice_step(row: dict[str, Any], *, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's slice of one global step row, as torch tensors (a pure function)."""
    import torch

    gids = np.asarray(row["group_ids"], dtype=np.int64)
    B = len(gids)
    if not 0 <= rank < world_size or B % world_size:
        raise ValueError(f"cannot slice a global batch of {B} for rank {rank} of {world_size}")
    b = B // world_size
    lo, hi = rank * b, (rank + 1) * b
    out: dict[str, Any] = {
        "step": int(row["step"]),
        "batch_type": str(row["batch_type"]),
        "lang": str(row["lang"]) or None,
        "source": str(row["source"]),
        "group_ids": torch.from_numpy(gids[lo:hi].copy()),
        "query_langs": str(row["query_langs"]).split()[lo:hi],
        "passage_langs": str(row["passage_langs"]).split()[lo:hi],
    }
    for side in ("query", "passage"):
        ids, mask = np.asarray(row[f"{side}_input_ids"]), np.asarray(row[f"{side}_attention_mask"])
        out[f"{side}_input_ids"], out[f"{side}_attention_mask"] = _trim(ids[lo:hi], mask[lo:hi])
    if "negative_input_ids" in row:
        ids, mask = np.asarray(row["negative_input_ids"]), np.asarray(row["negative_attention_mask"])
        k = len(ids) // B
        out["negative_input_ids"], out["negative_attention_mask"] = _trim(ids[lo * k : hi * k], mask[lo * k : hi * k])
        answers = np.asarray(row["negative_group_ids"], dtype=np.int64)
        out["negative_group_ids"] = torch.from_numpy(answers[lo * k : hi * k].copy())
    return out


def _drained(source) -> Iterator[dict[str, Any]]:
    """All rows of one Ray Data dataset or DataIterator, drained as one chunk (``stream.drained``)."""
    return drained([lambda: source])


def _step_rows(source, start_step: int) -> Iterator[dict[str, Any]]:
    if isinstance(source, StepStream):  # a chunk at a time, from the chunk that holds start_step
        yield from drained(source.chunk_datasets(start_step))
    elif hasattr(source, "iter_batches"):  # ray.data.Dataset or a Ray Train DataIterator
        yield from _drained(source)
    else:
        yield from source


def iter_worker_batches(
    dataset_or_iterable, *, rank: int, world_size: int, start_step: int = 0,
    stop_step: Optional[int] = None,
) -> Iterator[dict[str, Any]]:
    """This worker's slice of every global step from ``start_step`` on, in step order, read
    from a ``StepStream`` (chunk after chunk, from the chunk that holds ``start_step``), a
    Ray Data dataset or iterator, or any iterable of step rows.

    Yields dicts of torch tensors: ``query_input_ids`` / ``query_attention_mask`` ``[B/W, Lq]``,
    ``passage_*`` ``[B/W, Lp]``, optional ``negative_*`` ``[B/W*k, Ln]``, ``group_ids`` int64
    ``[B/W]``, optional ``negative_group_ids`` int64 ``[B/W*k]``, ``query_langs`` /
    ``passage_langs`` (lists of str), ``batch_type``, ``lang`` (mono steps), ``source`` and
    ``step``. Raises if the stream skips or reorders a step (a rank that silently fell out of
    step would hang the others at the next collective), and, given ``stop_step``, if the
    stream ends before it (a run must never end short of ``train.max_steps`` as if complete).
    """
    expected = start_step
    rows = _step_rows(dataset_or_iterable, start_step)
    try:
        for row in rows:
            step = int(row["step"])
            if step < start_step:
                continue
            if step != expected:
                raise RuntimeError(
                    f"rank {rank}: expected step {expected}, the stream gave step {step} "
                    "(is preserve_order off, or was the dataset built for another start_step?)"
                )
            expected += 1
            yield slice_step(row, rank=rank, world_size=world_size)
    finally:
        rows.close()  # stops the reader thread now, not whenever the generator is collected
    if stop_step is not None and expected < stop_step:
        raise RuntimeError(
            f"rank {rank}: the batch stream ended after step {expected - 1}, before step "
            f"{stop_step - 1} (train.max_steps={stop_step}); no final checkpoint was written"
        )
