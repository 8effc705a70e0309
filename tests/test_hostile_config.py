"""Hostile run configs and sweep files, generated with hypothesis: any key (real, misspelt,
nested too far, not a string), any value (booleans where numbers go, infinities, NaN, dates,
lists, mappings, huge strings), any override text, YAML that is not YAML or not UTF-8.
``load_config`` and ``load_sweep`` either return a config holding exactly the values given, or
raise one UserError line that names the file or the key -- never a traceback.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridray.config import Config, flatten, load_config
from hybridray.errors import UserError
from hybridray.tuning import load_sweep, override
from reliability import Tally, record

KEYS = sorted(flatten(Config().model_dump()))
SECTIONS = sorted({k.split(".")[0] for k in KEYS if "." in k})
junk_keys = st.sampled_from(["smapler.alpha", "train.max_step", "alpha", "model.name", "run.storage_path.x",
                             "data.extra_mono.0.path", "Sampler.alpha", "train"])
keys = st.one_of(st.sampled_from(KEYS), junk_keys)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "0.5", "yes", "builtin:tiny", "mean", "cpu", "x" * 1000, "../../etc", "/abs/path",
                     "s3://bucket/p", "hf:", "2024-01-01"]),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.sampled_from(["a", "path", "r"]),
                                                                           scalars, max_size=2))


def nest(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node, parts = tree, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[parts[-1]] = value
    return tree


def names_a_key(message: str, given: set[str], path: Path) -> bool:
    """The message names the file, or a key that was given (a section or parent of one, or a
    key inside a mapping given as a value)."""
    if message.startswith(str(path)):
        return True
    named = {part for key in given for i in range(1, key.count(".") + 2) for part in [".".join(key.split(".")[:i])]}
    return any(message.startswith((name + ":", name + ".")) for name in named)


def same_value(got, want) -> bool:
    """The config holds exactly the value given (numbers equal as numbers, text as text)."""
    if isinstance(want, bool) or isinstance(got, bool):
        return got is want
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        return got == want
    if isinstance(want, str) and isinstance(got, (int, float)):  # "0.5" -> 0.5, as YAML would read it
        return float(want) == got
    return got == want


DEFAULTS = flatten(Config().model_dump())
#: Keys whose value of the right type may still be refused on its own: gradient accumulation
#: above 1 is refused with its reason (its negatives would come from one micro-batch).
REFUSED_WHEN_CHANGED = {"optim.grad_accum"}


@st.composite
def fitting(draw, key: str):
    """A value of the right type for ``key`` (its default, doubled, or flipped)."""
    default = DEFAULTS.get(key)
    if isinstance(default, bool):
        return draw(st.booleans())
    if isinstance(default, (int, float)):
        return draw(st.sampled_from([default, default * 2, str(default)]))
    return default


@st.composite
def config_items(draw, hostile: bool):
    key = draw(keys if hostile else st.sampled_from(KEYS))
    return key, draw(values if hostile else fitting(key))


TALLY = {"config": Tally(), "sweep": Tally()}
TESTS = {"config": "test_config_holds_exactly_the_values_or_names_the_key",
         "sweep": "test_sweep_is_checked_whole_or_names_the_key"}


@pytest.fixture(scope="module", autouse=True)
def record_figures():
    """The table rows, written once the module's tests ran (whatever their order or -k)."""
    yield
    for name, tally in TALLY.items():
        if tally.cases:
            # each loader accepted some cases and refused others (a loader refusing everything
            # would otherwise pass); an error here is this module's teardown
            assert tally.counts.get("accepted", 0) > 0, (name, tally.counts)
            assert sum(n for k, n in tally.counts.items() if k.startswith("rejected")) > 0, (name, tally.counts)
            record(f"test_hostile_config.py::{TESTS[name]}", kind=f"{name} loader: any key, any value, any YAML",
                   cases=tally.cases, outcome=tally.summary())


def expected_tree(tree: dict, overrides: list) -> dict:
    """The flat config values the file and then the overrides ask for."""
    nested = nest(tree)
    for key, value in overrides:
        node, parts = nested, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return flatten(nested)


def holds(got: dict, key: str, want) -> bool:
    """``got`` (a flat config) holds ``want`` at ``key``: lists element by element."""
    if isinstance(want, list):
        return isinstance(got.get(key), list) and len(got[key]) == len(want) and all(
            same_value(g, w) for g, w in zip(got[key], want))
    if want == {}:  # an empty mapping flattens to nothing on both sides
        return not any(k.startswith(key + ".") for k in got) and got.get(key, {}) == {}
    return key in got and same_value(got[key], want)


#: Whole files that are not a config: each refused naming the file (and why, where checked).
RAW = {b"sampler: [1, 2": "invalid YAML", b"\xff\xfe": "not UTF-8", b"- a\n- b": "top level must be a mapping",
       b"x: *anchor": "invalid YAML", b"[" * 1000: "invalid YAML", b"sampler:\n\talpha: 1": "invalid YAML",
       b"0": "top level must be a mapping", b"name: ok\nname: twice": "line 2: key 'name' given twice",
       b"sampler:\n  alpha: 0.9\noptim: {lr: 0.001}\nsampler:\n  batch_size: 16": "line 4: key 'sampler' given twice"}


@settings(max_examples=200)
@given(hostile=st.booleans(), data=st.data(), raw=st.sampled_from([None] * 24 + list(RAW)))
def test_config_holds_exactly_the_values_or_names_the_key(hostile, data, raw):
    tree = dict(data.draw(st.lists(config_items(hostile), max_size=4), label="tree"))
    overrides = data.draw(st.lists(config_items(hostile), max_size=3), label="overrides")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_bytes(raw if raw is not None else yaml.safe_dump(nest(tree)).encode())
        texts = [override(k, v) for k, v in overrides]
        # well-typed values must be accepted unless one of them is known to be refusable
        must_accept = not hostile and not any(
            k in REFUSED_WHEN_CHANGED and not same_value(DEFAULTS[k], v) for k, v in list(tree.items()) + overrides)
        try:
            config = load_config(path, texts)
        except UserError as exc:
            message = str(exc)
            assert "\n" not in message
            if raw is not None:  # the file itself is refused, saying why
                assert message.startswith(f"{path}: ") and RAW[raw] in message, message
                TALLY["config"].add("rejected: file")
                return
            assert not must_accept, f"values of the right type, refused: {message}"
            assert names_a_key(message, set(tree) | {k for k, _ in overrides}, path), message
            TALLY["config"].add("rejected: key")
            return
        assert raw is None, f"{raw!r} was accepted"
        got = flatten(config.model_dump())
        for key, want in expected_tree(tree, overrides).items():
            assert holds(got, key, want), (key, got.get(key), want)
        TALLY["config"].add("accepted")


specs = st.one_of(
    st.fixed_dictionaries({"grid": st.lists(scalars, max_size=3)}),
    st.fixed_dictionaries({"choice": st.lists(scalars, max_size=3)}),
    st.dictionaries(st.sampled_from(["uniform", "loguniform"]), st.lists(
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-1, 3), st.booleans()), max_size=3),
        min_size=1, max_size=1),
    values,
)
sweep_keys = st.sampled_from(["metric", "mode", "num_samples", "max_concurrent_trials", "overrides", "search_space",
                              "searchspace", 3])


good_sweeps = st.fixed_dictionaries({}, optional={
    "metric": st.sampled_from(["val_map", "val_map_cross", "loss"]), "mode": st.sampled_from(["max", "min"]),
    "num_samples": st.integers(1, 3), "max_concurrent_trials": st.integers(1, 2)})
good_spaces = st.fixed_dictionaries({}, optional={
    "sampler.alpha": st.sampled_from([{"grid": [0.0, 0.5, 1.0]}, {"choice": [0.25]}, {"uniform": [0.0, 1.0]}]),
    "loss.temperature": st.sampled_from([{"loguniform": [0.01, 0.1]}, {"grid": [0.05, "0.02"]}]),
    "sampler.mode": st.just({"choice": ["hybrid", "x-x"]})}).filter(bool)
good_overrides = st.one_of(st.none(), st.fixed_dictionaries({}, optional={
    "train.max_steps": st.integers(1, 50), "train.eval_before": st.booleans(), "name": st.just("sweep-run")}))


@settings(max_examples=120)
@given(hostile=st.booleans(), data=st.data())
def test_sweep_is_checked_whole_or_names_the_key(hostile, data):
    if hostile:
        sweep = data.draw(st.dictionaries(sweep_keys, values, max_size=4), label="sweep")
        space = data.draw(st.one_of(st.none(), st.dictionaries(st.one_of(st.sampled_from(
            ["sampler.alpha", "loss.temperature", "optim.lr", "sampler.batch_size"]), keys), specs, max_size=3)),
            label="space")
        overrides = data.draw(st.one_of(st.none(), st.dictionaries(keys, scalars, max_size=2)), label="overrides")
    else:
        sweep, space, overrides = data.draw(good_sweeps), data.draw(good_spaces), data.draw(good_overrides)
    # held-out data, so that the default metric (val_map) is one these runs report
    base = Config.model_validate({"data": {"heldout": "heldout.jsonl"}})
    tree = dict(sweep)
    if space is not None:
        tree["search_space"] = space
    if overrides is not None:
        tree["overrides"] = overrides
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sweep.yaml"
        path.write_text(yaml.safe_dump(tree))
        try:
            loaded = load_sweep(path, base)
        except UserError as exc:
            message = str(exc)
            assert "\n" not in message and message.startswith(f"{path}: "), message
            assert hostile, f"a valid sweep was refused: {message}"
            TALLY["sweep"].add("rejected")
            return
    from hybridray.config import build_config
    from hybridray.tuning import _overrides

    # accepted with exactly the content given
    assert loaded.metric == tree.get("metric", "val_map") and loaded.mode == tree.get("mode", "max")
    assert same_value(loaded.num_samples, tree.get("num_samples", 1))
    assert loaded.max_concurrent_trials is None if "max_concurrent_trials" not in tree else \
        same_value(loaded.max_concurrent_trials, tree["max_concurrent_trials"])
    assert loaded.overrides == (tree.get("overrides") or {})
    assert loaded.search_space == tree["search_space"]
    for key, spec in loaded.search_space.items():  # every value of the space makes a valid run
        ((kind, choices),) = spec.items()
        if kind in ("uniform", "loguniform"):
            assert all(math.isfinite(v) and not isinstance(v, bool) for v in choices) and choices[0] < choices[1]
        for value in choices:  # both bounds of a continuous domain, every listed value
            config = build_config(base.model_dump(), _overrides(loaded) + [override(key, value)])
            assert same_value(flatten(config.model_dump())[key], value)
    TALLY["sweep"].add("accepted")

