"""The typed config: defaults, dotted overrides, and errors that name the key."""
from __future__ import annotations

import pytest

from hybridray.config import build_config, dump_config, load_config, parse_override
from hybridray.errors import UserError

from conftest import REPO


def test_demo_config_loads_with_paper_mix():
    config = load_config(REPO / "configs" / "local.yaml")
    assert config.sampler.alpha == 0.5
    assert config.model.name_or_path == "builtin:multilingual-e5-small"
    assert config.sampler.batch_size % config.scaling.num_workers == 0


def test_dotted_overrides_are_parsed_as_yaml():
    config = build_config({}, ["sampler.alpha=0.3", "loss.temperature=0.02",
                               "data.languages=[en, de]", "model.query_prefix='q: '"])
    assert config.sampler.alpha == 0.3
    assert config.loss.temperature == 0.02
    assert config.data.languages == ["en", "de"]
    assert config.model.query_prefix == "q: "


def test_dump_round_trips():
    import yaml

    config = build_config({}, ["sampler.alpha=0.7"])
    assert build_config(yaml.safe_load(dump_config(config))) == config


@pytest.mark.parametrize(
    "override, key",
    [
        ("sampler.alpha=1.5", "sampler.alpha"),
        ("sampler.alpha=-0.1", "sampler.alpha"),
        ("loss.temperature=0", "loss.temperature"),
        ("loss.temperature=-1", "loss.temperature"),
        ("sampler.batch_size=1", "sampler.batch_size"),
        ("sampler.alfa=0.5", "sampler.alfa"),
        ("nonsense.key=1", "nonsense"),
        ("model.pooling=max", "model.pooling"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("sampler.batch_size=33", "sampler.batch_size"),
        ("optim.lr=fast", "optim.lr"),
        ("sampler.alpha=yes", "sampler.alpha: expected a float, got a boolean"),
        ("train.eval_before=0", "train.eval_before: expected true or false, got 0"),
        ("train.eval_before=\"yes\"", "train.eval_before: expected true or false"),
        ("scaling.resources_per_worker={slot: true}", "scaling.resources_per_worker: expected a str or float, got a boolean inside"),
        ("eval.langs=[de, true]", "eval.langs: expected a str, got a boolean inside"),
        ("loss.cache_chunk_size=-1", "loss.cache_chunk_size"),
        ("loss.distill_weight=-0.5", "loss.distill_weight"),
        ("optim.grad_accum=4", "optim.grad_accum: values above 1 are not supported"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(UserError) as err:
        build_config({}, [override])
    assert key in str(err.value)


@pytest.mark.parametrize("text", ["sampler.alpha", "=3", "a..b=1"])
def test_malformed_override(text):
    with pytest.raises(UserError):
        parse_override(text)


def test_unknown_key_in_yaml_file_names_it(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sampler:\n  alpha: 0.5\n  windw: 3\n")
    with pytest.raises(UserError, match="sampler.windw: unknown key"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampler: [unclosed\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(bad)


@pytest.mark.parametrize("text, line, key", [
    ("sampler:\n  alpha: 0.9\noptim: {lr: 0.001}\nsampler:\n  batch_size: 16\n", 4, "sampler"),
    ("sampler: {alpha: 0.9, alpha: 0.1}\n", 1, "alpha"),
    ("name: ok\nseed: 1\nname: twice\n", 3, "name"),
])
def test_a_key_given_twice_is_refused_naming_file_line_and_key(tmp_path, text, line, key):
    """Plain YAML keeps the last copy of a repeated key: the user's first value would be dropped
    without a word (``sampler.alpha: 0.9`` above became the default 0.5)."""
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: line {line}: key {key!r} given twice"


def test_a_key_given_twice_in_an_override_value_is_refused_naming_the_override():
    with pytest.raises(UserError) as info:
        build_config({}, ["scaling.resources_per_worker={a: 1, a: 2}"])
    assert str(info.value) == "scaling.resources_per_worker: key 'a' given twice"


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("sampler:\n  <<: {alpha: 0.9, batch_size: 16}\n  alpha: 0.25\n")
    config = load_config(path)
    assert (config.sampler.alpha, config.sampler.batch_size) == (0.25, 16)


@pytest.mark.parametrize("hang, health", [(1800, 600), (10, 10), (600, 600)])
def test_hang_timeout_sets_the_collective_timeouts_never_a_longer_health_check(monkeypatch, hang, health):
    """``run.hang_timeout_s`` is the torch process-group timeout and Ray Train's report barrier;
    Ray's worker health check (600 s by default) is only ever shortened by it."""
    from hybridray.train import hang_timeouts

    monkeypatch.delenv("RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S", raising=False)
    monkeypatch.delenv("RAY_TRAIN_COLLECTIVE_TIMEOUT_S", raising=False)
    assert hang_timeouts(build_config({}, [f"run.hang_timeout_s={hang}"])) == hang
    import os

    assert os.environ["RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S"] == str(health)
    assert os.environ["RAY_TRAIN_COLLECTIVE_TIMEOUT_S"] == str(hang)


def test_gradient_accumulation_points_to_gradient_caching():
    with pytest.raises(UserError, match=r"optim.grad_accum: .* set loss.cache_chunk_size \(gradient caching"):
        build_config({}, ["optim.grad_accum=2"])
    config = build_config({}, ["loss.cache_chunk_size=8", "loss.distill_weight=0.5"])
    assert (config.loss.cache_chunk_size, config.loss.distill_weight) == (8, 0.5)
    assert (build_config({}).loss.cache_chunk_size, build_config({}).loss.distill_weight) == (0, 0.0)  # off
