"""Hybrid global batches: which (group, query language, passage language) goes in which step.

How batches are formed *is* the method (arXiv 2408.10536), and it must hold for the GLOBAL
batch: on W workers a "monolingual step" means all W slices are in one language, otherwise the
negatives gathered across devices undo it. So this module plans whole global batches; workers
only slice them (see ``pipeline.iter_worker_batches``).

Everything here is a pure function of (seed, config, data): no mutable step counter, so a run
restarted at step k replays exactly the tail of an uninterrupted run.

Step types
==========

=========  ===================================  =========================================
type       when                                 every item of the global batch
=========  ===================================  =========================================
``mono``   hybrid mode, with probability alpha  query and passage in one language L, the
                                                same L for the whole global batch
``cross``  hybrid mode, with probability        query in X, passage in Y != X, both drawn
           1 - alpha                            uniformly among the item's languages; items
                                                with one language are never used
``x-x``    ``sampler.mode: x-x`` (LAReQA's      query and passage in one language drawn
           X-X baseline), every step            per item: languages mixed in the batch
=========  ===================================  =========================================

``alpha=1`` is the paper's X-X-mono baseline, ``alpha=0`` its X-Y baseline.

The mono language L is drawn per step, uniformly (``sampler.mono_language: uniform``) or in
proportion to the rows of each language in the window (``proportional``), among the
languages with at least ``batch_size`` groups in the window.

Extra monolingual data (``data.extra_mono``)
============================================

A mono step in language L is taken *whole* from extra set k with probability ``weight_k``
(when set k has at least ``batch_size`` groups in L in its current window), otherwise from
the translated shards. With one English extra set of weight w and uniform languages over n
languages, a share ``alpha * w / n`` of all steps are extra-English steps. A whole step
(rather than a few items) keeps its in-batch negatives in one domain and one source.

By default an extra set only serves languages the translated shards have. With
``new_languages`` (``data.extra_mono[k].new_languages``) its other languages -- those with a
full batch in its current window -- join the languages a mono step is drawn from (uniformly
or in proportion to their rows, like the rest), and their steps come from the extra sets
that have them and allow it, chosen by weight (uniformly when the weights are all 0). This
is how native Swahili or Korean QA (TyDi) trains next to translated data that lacks them.

Windows (streaming at scale)
============================

The groups (all translations of one ``group_id``) are cut, in data order, into windows of
``sampler.window_groups`` groups (the last, if smaller than a batch, joins the one before).
A window yields ``len(window) // batch_size`` steps: one epoch is one pass over the groups,
each group used about once (a step that runs short of unused groups in its language reuses
groups of the window, never twice in one batch). Per epoch the window order is a seeded
permutation; inside a window the plan is a function of (seed, epoch, window index, window
content) only, so a window is planned -- and its texts read -- without looking at any other.

Example::

    from hybridray.config import SamplerConfig
    from hybridray.data.sampler import Group, plan_global_batches

    groups = [Group(f"g{i}", ("de", "en", "es"), ((0, 3 * i), (0, 3 * i + 1), (0, 3 * i + 2)))
              for i in range(64)]
    plans = plan_global_batches(groups, SamplerConfig(alpha=0.5, batch_size=8), seed=0, steps=20)
    plans[0].batch_type, plans[0].items[0]   # ('cross', Item(group=.., query_lang='de', ...))
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional, Sequence

import numpy as np

from hybridray.errors import UserError

#: ``GlobalBatchPlan.source`` of steps drawn from the translated shards.
MAIN = -1


@dataclass(frozen=True)
class Group:
    """One parallel item: its languages (sorted) and where each translation's row lives.

    ``rows[i]`` is the ``(file index, row)`` of the translation in ``langs[i]``.
    """

    group_id: str
    langs: tuple[str, ...]
    rows: tuple[tuple[int, int], ...] = ()

    def row_of(self, lang: str) -> tuple[int, int]:
        return self.rows[self.langs.index(lang)]


@dataclass(frozen=True)
class Item:
    """One query/passage pair of a global batch: ``group`` indexes its source's groups."""

    group: int
    query_lang: str
    passage_lang: str


@dataclass(frozen=True)
class GlobalBatchPlan:
    """Everything that decides one global step, without any text."""

    step: int
    epoch: int
    window: int
    batch_type: str  # "mono" | "cross" | "x-x"
    lang: Optional[str]  # the language of a mono step
    source: int  # MAIN or the index of the extra_mono set
    items: tuple[Item, ...]


@dataclass(frozen=True)
class ExtraSource:
    """An extra monolingual set: its groups (in data order), weight and windows."""

    groups: Sequence[Group]
    weight: float
    windows: tuple[tuple[int, int], ...] = ()  # [start, stop) into groups
    new_languages: bool = False  # also serve languages the main data lacks


@dataclass(frozen=True)
class Segment:
    """The steps ``[first_step, first_step + n_steps)`` come from window ``window`` of ``epoch``.

    ``ordinal`` counts windows over the whole run (epoch * n_windows + position); it picks
    the extra sets' windows, so that pairing is also a pure function.
    """

    epoch: int
    window: int
    ordinal: int
    first_step: int
    n_steps: int


# ----------------------------------------------------------------------------- hashing
#: The group key of "no pair of the data" (a hard negative that answers nothing): the loss
#: never masks it, and ``stable_hash64`` never returns it.
NO_GROUP = 0


def stable_hash64(text: str) -> int:
    """A signed int64 of ``text`` that is the same in every process and run (unlike hash());
    never ``NO_GROUP``."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) or 1


def content_key(groups: Sequence[Group]) -> int:
    """A 32-bit fingerprint of a window's content (group ids and languages), for seeding."""
    h = hashlib.blake2b(digest_size=4)
    for g in groups:
        h.update(g.group_id.encode("utf-8"))
        h.update(b"\x00" + ",".join(g.langs).encode() + b"\x01")
    return int.from_bytes(h.digest(), "little")


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]))


# Distinct tags keep the random streams of different purposes independent.
_ORDER, _WINDOW, _EXTRA, _NEG = 1, 2, 3, 4


# ----------------------------------------------------------------------------- windows
def make_windows(n_groups: int, window_groups: int, batch_size: int) -> tuple[tuple[int, int], ...]:
    """Cut ``n_groups`` (in data order) into ``[start, stop)`` windows of ``window_groups``.

    A last window smaller than one batch joins the previous one, so every window yields at
    least one step (when there are at least ``batch_size`` groups at all).
    """
    if window_groups < batch_size:
        raise UserError(
            f"sampler.window_groups ({window_groups}) must be at least sampler.batch_size ({batch_size})"
        )
    if n_groups < batch_size:
        raise UserError(f"only {n_groups} groups, fewer than sampler.batch_size ({batch_size})")
    bounds = list(range(0, n_groups, window_groups)) + [n_groups]
    windows = [(a, b) for a, b in zip(bounds, bounds[1:])]
    if len(windows) > 1 and windows[-1][1] - windows[-1][0] < batch_size:
        last = windows.pop()
        windows[-1] = (windows[-1][0], last[1])
    return tuple(windows)


def window_order(seed: int, epoch: int, n_windows: int) -> np.ndarray:
    """The seeded order in which an epoch visits the windows."""
    return _rng(seed, _ORDER, epoch).permutation(n_windows)


def segments(
    windows: Sequence[tuple[int, int]], batch_size: int, seed: int, start_step: int, stop_step: int
) -> Iterator[Segment]:
    """The windows that produce steps ``[start_step, stop_step)``, in step order.

    Step counts depend only on window sizes, so skipping to ``start_step`` plans nothing.
    """
    n_steps = [(b - a) // batch_size for a, b in windows]
    per_epoch = sum(n_steps)
    if per_epoch == 0:
        raise UserError(f"no window holds sampler.batch_size ({batch_size}) groups")
    epoch = start_step // per_epoch
    step = epoch * per_epoch
    while step < stop_step:
        for position, w in enumerate(window_order(seed, epoch, len(windows))):
            n = n_steps[w]
            if step + n > start_step and step < stop_step:
                yield Segment(int(epoch), int(w), int(epoch * len(windows) + position), step, n)
            step += n
            if step >= stop_step:
                return
        epoch += 1


def extra_window_for(source: ExtraSource, ordinal: int, seed: int, k: int) -> tuple[int, int]:
    """Which window of extra set ``k`` serves run-window ``ordinal``: (extra epoch, index).

    The extra set cycles through its own windows in a seeded order, one per main window.
    """
    n = len(source.windows)
    extra_epoch, position = divmod(ordinal, n)
    index = int(_rng(seed, _EXTRA, k, extra_epoch).permutation(n)[position])
    return extra_epoch, index


# ----------------------------------------------------------------------------- queues
class _Queue:
    """Groups in a seeded order, handed out once each, then reused (never twice per batch)."""

    def __init__(self, members: np.ndarray, rng: np.random.Generator, used: np.ndarray):
        self.order = members[rng.permutation(len(members))]
        self.pos = 0
        self.used = used

    def take(self, n: int, rng: np.random.Generator) -> list[int]:
        out: list[int] = []
        while len(out) < n and self.pos < len(self.order):
            g = int(self.order[self.pos])
            self.pos += 1
            if not self.used[g]:
                self.used[g] = True
                out.append(g)
        if len(out) < n:  # the window ran short in this category: reuse, no repeats per batch
            chosen = set(out)
            for g in self.order[rng.permutation(len(self.order))]:
                if int(g) not in chosen:
                    out.append(int(g))
                    chosen.add(int(g))
                    if len(out) == n:
                        break
        return out


@dataclass
class _Pool:
    """The per-language and cross queues of one window (or one extra window)."""

    groups: Sequence[Group]
    rng: np.random.Generator
    batch_size: int
    used: np.ndarray = field(init=False)
    by_lang: dict[str, np.ndarray] = field(init=False)
    multi: np.ndarray = field(init=False)
    _queues: dict = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.used = np.zeros(len(self.groups), dtype=bool)
        members: dict[str, list[int]] = {}
        for i, g in enumerate(self.groups):
            for lang in g.langs:
                members.setdefault(lang, []).append(i)
        self.by_lang = {lang: np.asarray(m) for lang, m in sorted(members.items())}
        self.multi = np.asarray([i for i, g in enumerate(self.groups) if len(g.langs) > 1], dtype=int)

    def mono_langs(self) -> list[str]:
        """Languages with enough groups for a whole batch."""
        return [lang for lang, m in self.by_lang.items() if len(m) >= self.batch_size]

    def take(self, key: str, n: int) -> list[int]:
        if key not in self._queues:
            members = self.multi if key == "*cross*" else (
                np.arange(len(self.groups)) if key == "*all*" else self.by_lang[key]
            )
            self._queues[key] = _Queue(members, self.rng, self.used)
        return self._queues[key].take(n, self.rng)


# ----------------------------------------------------------------------------- planning
def _check_sampler(cfg, pool: _Pool, window: int) -> None:
    if cfg.mode != "hybrid":
        return
    if cfg.alpha < 1.0 and len(pool.multi) < cfg.batch_size:
        raise UserError(
            f"window {window}: {len(pool.multi)} groups have two or more languages, fewer than "
            f"sampler.batch_size ({cfg.batch_size}); cross-lingual steps (sampler.alpha < 1) "
            "need translations: raise sampler.window_groups or set sampler.alpha=1"
        )
    if cfg.alpha > 0.0 and not pool.mono_langs():
        raise UserError(
            f"window {window}: no language has sampler.batch_size ({cfg.batch_size}) groups, "
            "so no monolingual step can be formed: raise sampler.window_groups"
        )


def short_languages(groups: Sequence[Group], batch_size: int) -> dict[str, int]:
    """Languages of a window with fewer than ``batch_size`` groups, and their group counts:
    they never get a monolingual step in this window (a mono batch needs distinct groups)."""
    counts: dict[str, int] = {}
    for g in groups:
        for lang in g.langs:
            counts[lang] = counts.get(lang, 0) + 1
    return {lang: n for lang, n in sorted(counts.items()) if n < batch_size}


def check_window(groups: Sequence[Group], cfg, window: int) -> None:
    """Raise UserError if the window cannot form the steps ``cfg`` asks for (driver-side)."""
    _check_sampler(cfg, _Pool(groups, np.random.default_rng(0), cfg.batch_size), window)


def plan_window(
    groups: Sequence[Group],
    cfg,
    *,
    seed: int,
    segment: Segment,
    extra: Sequence[ExtraSource] = (),
    extra_groups: Optional[Sequence[Sequence[Group]]] = None,
) -> list[GlobalBatchPlan]:
    """All steps of one window in one epoch (``cfg`` is a ``SamplerConfig``).

    ``groups`` are the window's groups; ``extra_groups[k]`` the groups of extra set k's window
    paired with this one (``extra_window_for``). Item ``group`` indexes refer to those lists.
    """
    B = cfg.batch_size
    rng = _rng(seed, _WINDOW, segment.epoch, segment.window, content_key(groups))
    pool = _Pool(groups, rng, B)
    _check_sampler(cfg, pool, segment.window)
    extra_pools = []
    for k, src in enumerate(extra):
        eg = extra_groups[k] if extra_groups is not None else ()
        e_epoch, e_index = extra_window_for(src, segment.ordinal, seed, k)
        extra_pools.append(_Pool(eg, _rng(seed, _EXTRA, k, e_epoch, e_index, content_key(eg)), B))

    n_steps = len(groups) // B
    mono_flags = rng.random(n_steps) < cfg.alpha
    main_langs = pool.mono_langs()
    # Languages only extra sets with new_languages have: which sets may serve each.
    servers: dict[str, list[int]] = {}
    for k, (src, ep) in enumerate(zip(extra, extra_pools)):
        if src.new_languages:
            for lang in ep.mono_langs():
                if lang not in main_langs:
                    servers.setdefault(lang, []).append(k)
    langs_all = main_langs + sorted(servers)
    lang_weights = np.asarray([len(pool.by_lang[lang]) for lang in main_langs] + [
        sum(len(extra_pools[k].by_lang[lang]) for k in servers[lang]) for lang in sorted(servers)
    ], dtype=float)
    plans = []
    for i in range(n_steps):
        step = segment.first_step + i
        if cfg.mode == "x-x":
            chosen = pool.take("*all*", B)
            items = []
            for g in chosen:
                lang = groups[g].langs[int(rng.integers(len(groups[g].langs)))]
                items.append(Item(g, lang, lang))
            plans.append(GlobalBatchPlan(step, segment.epoch, segment.window, "x-x", None, MAIN, tuple(items)))
        elif mono_flags[i]:
            if cfg.mono_language == "uniform":
                lang = langs_all[int(rng.integers(len(langs_all)))]
            else:
                lang = langs_all[int(rng.choice(len(langs_all), p=lang_weights / lang_weights.sum()))]
            source, u, acc = MAIN, rng.random(), 0.0
            if lang in servers:
                source = _pick_server(servers[lang], extra, u)
            else:
                for k, (src, ep) in enumerate(zip(extra, extra_pools)):
                    if lang in ep.mono_langs():
                        acc += src.weight
                        if u < acc:
                            source = k
                            break
            take_from = pool if source == MAIN else extra_pools[source]
            items = tuple(Item(g, lang, lang) for g in take_from.take(lang, B))
            plans.append(GlobalBatchPlan(step, segment.epoch, segment.window, "mono", lang, source, items))
        else:
            items = []
            for g in pool.take("*cross*", B):
                langs = groups[g].langs
                x = int(rng.integers(len(langs)))
                y = int(rng.integers(len(langs) - 1))
                y += y >= x
                items.append(Item(g, langs[x], langs[y]))
            plans.append(GlobalBatchPlan(step, segment.epoch, segment.window, "cross", None, MAIN, tuple(items)))
    return plans


def _pick_server(candidates: list[int], extra: Sequence[ExtraSource], u: float) -> int:
    """The extra set that serves a step in a language only extra sets have: by weight, with
    the same uniform draw ``u`` the main-language case uses (uniformly if all weights are 0)."""
    weights = np.asarray([extra[k].weight for k in candidates], dtype=float)
    if weights.sum() <= 0:
        weights = np.ones(len(candidates))
    position = int(np.searchsorted(np.cumsum(weights) / weights.sum(), u, side="right"))
    return candidates[min(position, len(candidates) - 1)]


def plan_global_batches(
    groups_index: Sequence[Group],
    sampler_cfg,
    seed: int,
    steps: int,
    *,
    start_step: int = 0,
    extra: Sequence[ExtraSource] = (),
) -> list[GlobalBatchPlan]:
    """The plans of steps ``[start_step, steps)``: the same function the Ray pipeline runs.

    ``groups_index`` is every group in data order; windows come from
    ``sampler_cfg.window_groups``. For extra sets without explicit ``windows``, one window of
    ``window_groups`` groups is cut the same way. Pure: no Ray, no text, no I/O.
    """
    B = sampler_cfg.batch_size
    windows = make_windows(len(groups_index), sampler_cfg.window_groups, B)
    extra = [
        src if src.windows else replace(src, windows=extra_windows(len(src.groups), sampler_cfg))
        for src in extra
    ]
    out: list[GlobalBatchPlan] = []
    for seg in segments(windows, B, seed, start_step, steps):
        a, b = windows[seg.window]
        extra_groups = []
        for k, src in enumerate(extra):
            _, e_index = extra_window_for(src, seg.ordinal, seed, k)
            ea, eb = src.windows[e_index]
            extra_groups.append(src.groups[ea:eb])
        plans = plan_window(groups_index[a:b], sampler_cfg, seed=seed, segment=seg, extra=extra, extra_groups=extra_groups)
        out.extend(p for p in plans if start_step <= p.step < steps)
    return out


def extra_windows(n_groups: int, cfg) -> tuple[tuple[int, int], ...]:
    """Windows of an extra set: cut like the main data's; a set smaller than a batch is one
    window (it then never serves a step, see ``plan_window``)."""
    if n_groups < cfg.batch_size:
        return ((0, n_groups),)
    return make_windows(n_groups, cfg.window_groups, cfg.batch_size)


def pick_negatives(n_available: int, k: int, *, seed: int, step: int, slot: int) -> list[int]:
    """Which ``k`` of a passage row's ``n_available`` hard negatives a step uses.

    Without replacement when there are enough, cycling a seeded order otherwise; a pure
    function of (seed, step, slot) so a resumed run picks the same ones.
    """
    order = _rng(seed, _NEG, step, slot).permutation(n_available)
    return [int(order[i % n_available]) for i in range(k)]
