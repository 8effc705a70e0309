"""The hybrid batch plan as a pure function: the method's invariants, without Ray."""
from __future__ import annotations

import math
from collections import Counter

import pytest

from hybridray.config import SamplerConfig
from hybridray.data.sampler import (
    MAIN,
    ExtraSource,
    Group,
    make_windows,
    pick_negatives,
    plan_global_batches,
    segments,
    stable_hash64,
)
from hybridray.errors import UserError

LANGS = ("ar", "de", "en", "es", "hi", "vi", "zh")


def make_groups(n: int, *, prefix: str = "g", single_every: int = 5) -> list[Group]:
    """n groups; each has 2-7 languages (en always), every ``single_every``-th only English."""
    groups = []
    for i in range(n):
        if single_every and i % single_every == 0:
            langs = ("en",)
        else:
            langs = tuple(sorted({"en", *(LANGS[(i + j) % 7] for j in range(1 + i % 6))}))
        groups.append(Group(f"{prefix}{i}", langs, tuple((0, 10 * i + j) for j in range(len(langs)))))
    return groups


GROUPS = make_groups(600)


def cfg(**kw) -> SamplerConfig:
    base = dict(alpha=0.5, batch_size=16, window_groups=100_000)
    return SamplerConfig(**{**base, **kw})


def check_batch_invariants(plans, groups, windows=None):
    """Items index their window's groups: ``windows`` maps a plan's window to its range."""
    for p in plans:
        a, b = windows[p.window] if windows else (0, len(groups))
        ids = [it.group for it in p.items]
        assert len(set(ids)) == len(ids), f"step {p.step}: a group twice in one global batch"
        for it in p.items:
            g = groups[a:b][it.group]
            assert it.query_lang in g.langs and it.passage_lang in g.langs
            if p.batch_type == "mono":
                assert it.query_lang == it.passage_lang == p.lang
            elif p.batch_type == "cross":
                assert it.query_lang != it.passage_lang
                assert len(g.langs) >= 2
            else:
                assert it.query_lang == it.passage_lang


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
def test_mono_share_matches_alpha(alpha):
    n = 1500
    plans = plan_global_batches(GROUPS, cfg(alpha=alpha), seed=1, steps=n)
    assert [p.step for p in plans] == list(range(n))
    mono = sum(p.batch_type == "mono" for p in plans)
    sigma = math.sqrt(n * alpha * (1 - alpha))
    assert abs(mono - n * alpha) < 4 * sigma, (mono, n * alpha, sigma)
    check_batch_invariants(plans, GROUPS)


def test_alpha_extremes_are_the_baselines():
    mono = plan_global_batches(GROUPS, cfg(alpha=1.0), seed=0, steps=100)
    cross = plan_global_batches(GROUPS, cfg(alpha=0.0), seed=0, steps=100)
    assert {p.batch_type for p in mono} == {"mono"}
    assert {p.batch_type for p in cross} == {"cross"}
    # single-language groups never appear in cross batches
    assert all(len(GROUPS[it.group].langs) > 1 for p in cross for it in p.items)
    # uniform mono language: every language is drawn
    assert {p.lang for p in mono} == set(LANGS)


def test_proportional_mono_language():
    plans = plan_global_batches(GROUPS, cfg(alpha=1.0, mono_language="proportional"), seed=0, steps=2000)
    rows = Counter(lang for g in GROUPS for lang in g.langs)
    share = Counter(p.lang for p in plans)
    for lang in LANGS:
        expected = 2000 * rows[lang] / sum(rows.values())
        assert abs(share[lang] - expected) < 4 * math.sqrt(expected), (lang, share[lang], expected)


def test_xx_mode_mixes_languages_within_a_batch():
    plans = plan_global_batches(GROUPS, cfg(mode="x-x"), seed=0, steps=50)
    assert {p.batch_type for p in plans} == {"x-x"}
    check_batch_invariants(plans, GROUPS)
    assert all(len({it.query_lang for it in p.items}) > 1 for p in plans)


def test_same_seed_same_sequence_other_seed_differs():
    a = plan_global_batches(GROUPS, cfg(), seed=7, steps=120)
    b = plan_global_batches(GROUPS, cfg(), seed=7, steps=120)
    c = plan_global_batches(GROUPS, cfg(), seed=8, steps=120)
    assert a == b
    assert a != c


@pytest.mark.parametrize("window_groups", [100_000, 64, 50])
def test_resume_replays_the_tail(window_groups):
    c = cfg(window_groups=window_groups)
    full = plan_global_batches(GROUPS, c, seed=3, steps=200)
    for k in (1, 37, 150, 199):
        assert plan_global_batches(GROUPS, c, seed=3, steps=200, start_step=k) == full[k:]


def test_epoch_uses_each_group_about_once_and_reshuffles():
    c = cfg(alpha=0.0, window_groups=100_000)
    multi = [g for g in GROUPS if len(g.langs) > 1]
    n = len(multi) // 16  # steps per epoch
    plans = plan_global_batches(multi, c, seed=0, steps=2 * n)
    first = Counter(it.group for p in plans[:n] for it in p.items)
    assert len(first) == n * 16 and set(first.values()) == {1}  # no reuse within an epoch
    second_order = [it.group for p in plans[n:] for it in p.items]
    assert second_order != [it.group for p in plans[:n] for it in p.items]


def test_windows_keep_groups_local_and_cover_the_data():
    c = cfg(window_groups=64)
    windows = make_windows(len(GROUPS), 64, 16)
    assert windows[0] == (0, 64) and windows[-1][1] == len(GROUPS)
    assert all(b - a >= 16 for a, b in windows)
    steps_per_epoch = sum((b - a) // 16 for a, b in windows)
    plans = plan_global_batches(GROUPS, c, seed=0, steps=2 * steps_per_epoch)
    check_batch_invariants(plans, GROUPS, windows)
    for p in plans:  # items index the window's groups: all inside it
        a, b = windows[p.window]
        assert all(0 <= it.group < b - a for it in p.items)
    epoch0 = [p.window for p in plans if p.epoch == 0]
    epoch1 = [p.window for p in plans if p.epoch == 1]
    assert sorted(set(epoch0)) == list(range(len(windows)))
    assert epoch0 != epoch1  # a new window order per epoch


def test_segments_skip_without_planning():
    windows = make_windows(600, 64, 16)
    segs = list(segments(windows, 16, seed=0, start_step=100, stop_step=130))
    assert segs[0].first_step <= 100 < segs[0].first_step + segs[0].n_steps
    assert segs[-1].first_step < 130 <= segs[-1].first_step + segs[-1].n_steps


def test_extra_mono_share_in_mono_batches():
    extra = [Group(f"x{i}", ("en",), ((0, i),)) for i in range(200)]
    weight = 0.3
    c = cfg(alpha=1.0)
    plans = plan_global_batches(GROUPS, c, seed=0, steps=3000, extra=[ExtraSource(extra, weight)])
    en = [p for p in plans if p.lang == "en"]
    from_extra = sum(p.source == 0 for p in en)
    sigma = math.sqrt(len(en) * weight * (1 - weight))
    assert abs(from_extra - weight * len(en)) < 4 * sigma, (from_extra, len(en))
    # extra steps only in their language, never in others
    assert all(p.source == MAIN for p in plans if p.lang != "en")
    for p in plans:
        pool = extra if p.source == 0 else GROUPS
        assert len({it.group for it in p.items}) == len(p.items)
        assert all(pool[it.group].langs == ("en",) or p.source == MAIN for it in p.items)


def test_extra_mono_new_languages():
    """TyDi-style extra data: sw and ko are nowhere in the main groups, en is."""
    extra = [Group(f"t{lang}{i}", (lang,), ((0, i),)) for lang in ("en", "ko", "sw") for i in range(150)]
    c = cfg(alpha=1.0)
    without = plan_global_batches(GROUPS, c, seed=0, steps=400, extra=[ExtraSource(extra, 0.5)])
    assert {p.lang for p in without} == set(LANGS)  # default: an extra set never adds a language
    plans = plan_global_batches(GROUPS, c, seed=0, steps=3000, extra=[ExtraSource(extra, 0.5, new_languages=True)])
    by_lang = Counter(p.lang for p in plans)
    assert set(by_lang) == {*LANGS, "ko", "sw"}
    sigma = math.sqrt(3000 * (1 / 9) * (8 / 9))  # uniform over 9 languages
    assert all(abs(n - 3000 / 9) < 4 * sigma for n in by_lang.values()), by_lang
    for p in plans:
        if p.lang in ("ko", "sw"):  # only the extra set can serve them
            assert p.source == 0 and all(extra[it.group].langs == (p.lang,) for it in p.items)
    en = [p for p in plans if p.lang == "en"]  # a main language keeps its weighted mix
    assert abs(sum(p.source == 0 for p in en) - 0.5 * len(en)) < 4 * math.sqrt(len(en) * 0.25)
    # two extra sets with the new language: by weight (3:1); a later run replays the same plan
    other = [Group(f"o{i}", ("sw",), ((0, i),)) for i in range(100)]
    sources = [ExtraSource(extra, 0.3, new_languages=True), ExtraSource(other, 0.1, new_languages=True)]
    two = plan_global_batches(GROUPS, c, seed=1, steps=3000, extra=sources)
    sw = [p.source for p in two if p.lang == "sw"]
    assert abs(sw.count(0) - 0.75 * len(sw)) < 4 * math.sqrt(len(sw) * 0.75 * 0.25)
    assert plan_global_batches(GROUPS, c, seed=1, steps=3000, start_step=2990, extra=sources) == two[2990:]


def test_impossible_batches_fail_with_a_clear_error():
    only_en = [Group(f"e{i}", ("en",)) for i in range(64)]
    with pytest.raises(UserError, match="cross-lingual"):
        plan_global_batches(only_en, cfg(alpha=0.5), seed=0, steps=4)
    assert len(plan_global_batches(only_en, cfg(alpha=1.0), seed=0, steps=4)) == 4
    with pytest.raises(UserError, match="window_groups"):
        plan_global_batches(GROUPS, cfg(window_groups=8), seed=0, steps=4)
    with pytest.raises(UserError, match="fewer than sampler.batch_size"):
        plan_global_batches(GROUPS[:10], cfg(), seed=0, steps=4)


def test_helpers_are_stable():
    assert stable_hash64("group-1") == stable_hash64("group-1") != stable_hash64("group-2")
    assert pick_negatives(5, 3, seed=0, step=4, slot=2) == pick_negatives(5, 3, seed=0, step=4, slot=2)
    assert len(set(pick_negatives(5, 5, seed=0, step=1, slot=0))) == 5
    assert pick_negatives(2, 5, seed=0, step=1, slot=0)[:2] == pick_negatives(2, 5, seed=0, step=1, slot=0)[2:4]
