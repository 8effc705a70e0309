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
