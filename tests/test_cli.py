"""The installed ``hybridray`` command: help for every subcommand, exit code 2 for user errors."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import MLQA_R, REPO

HYBRIDRAY = shutil.which("hybridray", path=str(REPO / ".venv" / "bin")) or shutil.which("hybridray")


def run(*args, cwd=REPO):
    return subprocess.run([HYBRIDRAY, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "command", [["train"], ["eval"], ["tune"], ["plan"], ["data"], ["data", "prepare"], ["data", "from-squad"],
                ["data", "mine"], ["model"], ["model", "build"]]
)
def test_every_subcommand_has_help(command):
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: hybridray" in result.stdout


def test_bad_config_value_exits_2_naming_the_key():
    result = run("train", "configs/local.yaml", "sampler.alpha=1.5")
    assert result.returncode == 2
    assert "sampler.alpha" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_key_and_missing_config_exit_2():
    result = run("train", "configs/local.yaml", "loss.temprature=0.1")
    assert result.returncode == 2 and "loss.temprature" in result.stderr
    result = run("train", "configs/does-not-exist.yaml")
    assert result.returncode == 2 and "does-not-exist.yaml" in result.stderr


def test_usage_error_exits_2():
    assert run("train").returncode == 2
    assert run("frobnicate").returncode == 2


def test_print_config_applies_overrides():
    result = run("train", "configs/local.yaml", "sampler.alpha=0.25", "--print-config")
    assert result.returncode == 0, result.stderr
    assert "alpha: 0.25" in result.stdout


def test_data_prepare_refuses_to_overwrite(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    result = run("data", "prepare", "--source", str(MLQA_R), "--out", str(out))
    assert result.returncode == 2 and "already exists" in result.stderr
    result = run("data", "prepare", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "missing" in result.stderr


def test_module_entry_point_matches():
    result = subprocess.run([sys.executable, "-m", "hybridray.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "train" in result.stdout


def test_the_suite_runner_names_the_test_during_which_pytest_died(tmp_path):
    """A process that dies without pytest's summary is never silent (tests/run-suite.sh)."""
    (tmp_path / "test_dies.py").write_text(
        "import os\n\ndef test_fine():\n    pass\n\ndef test_dies():\n    os._exit(1)\n")
    (tmp_path / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    done = subprocess.run(
        ["bash", str(REPO / "tests" / "run-suite.sh"), "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, cwd=tmp_path,
    )
    assert done.returncode == 1
    assert "pytest died (exit 1) before finishing; the test running was: " in done.stderr
    assert "test_dies.py::test_dies" in done.stderr
