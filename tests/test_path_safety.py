"""A run's ``name`` cannot point outside ``run.storage_path``: ``../``, an absolute path, a
nested path or a hidden name is refused with one line naming the key, before anything is
written; every accepted name is one plain directory directly under the storage path (local
and ``s3://``), for the run and for each sweep trial."""
from __future__ import annotations

import os
import posixpath
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import REPO
from hybridray.config import build_config
from hybridray.errors import UserError
from hybridray.runs import run_dir
from reliability import Tally, record

HOSTILE = ["../escape", "..", ".", "/etc", "/tmp/abs", "a/b", "a/../../b", "x\\..\\y", ".hidden", "~", "~/x", "",
           " ", "name\n", "run\x00", "s3://bucket/x", "C:\\runs", "-" * 200]

names = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(st.sampled_from("ab.-_/\\~ \x00:Z9"), max_size=12),
    st.text(max_size=8),
)
TALLY = Tally()


@settings(max_examples=200)
@given(name=names, storage=st.sampled_from(["/srv/runs", "runs", "s3://bucket/runs"]))
def test_a_run_name_never_reaches_outside_the_storage_path(name, storage):
    try:
        config = build_config({"name": name, "run": {"storage_path": storage}}, [])
    except UserError as exc:
        assert str(exc).startswith("name: "), exc
        assert "\n" not in str(exc)  # one line: the name is quoted with repr
        TALLY.add("rejected")
        return
    TALLY.add("accepted")
    directory = run_dir(config)
    parent, leaf = (posixpath if storage.startswith("s3://") else os.path).split(directory)
    assert parent == storage and leaf == name and leaf not in ("", ".", "..")
    assert os.path.normpath(directory) == os.path.join(os.path.normpath(storage), name) or storage.startswith("s3://")


@pytest.fixture(scope="module", autouse=True)
def record_figures():
    """The table row, written once the module's tests ran (whatever their order or -k)."""
    yield
    if TALLY.cases:
        # the generated names reached both outcomes (an error here is this module's teardown)
        assert TALLY.counts.get("rejected") and TALLY.counts.get("accepted"), TALLY.counts
        record("test_path_safety.py::test_a_run_name_never_reaches_outside_the_storage_path", kind="run `name` (../, "
               "absolute, nested, hidden, control characters)", cases=TALLY.cases, outcome=TALLY.summary() +
               "; every accepted name is one directory directly under run.storage_path")



@pytest.mark.parametrize("name", ["../escape", "/tmp/elsewhere"])
def test_the_cli_refuses_an_escaping_name_before_writing_anything(name, tmp_path, mlqa_prepared):
    runs = tmp_path / "area" / "runs"
    done = subprocess.run(
        [str(REPO / ".venv" / "bin" / "hybridray"), "train", "configs/local.yaml", f"name={name}",
         f"run.storage_path={runs}", f"data.train={mlqa_prepared / 'train'}", "data.heldout=''",
         "model.name_or_path=builtin:tiny"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridray: error: name: "), done.stderr
    assert not (tmp_path / "area").exists() and not (tmp_path / "escape").exists()
    assert not os.path.exists("/tmp/elsewhere")




def test_a_sweep_refuses_up_front_a_name_its_trials_could_not_carry(tmp_path):
    """The longest accepted run name, swept: refused when the sweep is read (naming the key),
    not by a trial or after every trial has run; a name with room for the suffixes passes."""
    from hybridray.config import NAME_MAX_CHARS, load_config
    from hybridray.tuning import _LONGEST_TRIAL_SUFFIX, load_sweep

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("metric: loss\nmode: min\nsearch_space:\n  sampler.alpha: {grid: [0.0, 1.0]}\n")
    room = NAME_MAX_CHARS - len(_LONGEST_TRIAL_SUFFIX)
    for name in ("a" * NAME_MAX_CHARS, "a" * (room + 1)):
        with pytest.raises(UserError, match=rf"^name: {len(name)} characters; .* at most {room}$"):
            load_sweep(sweep, load_config(REPO / "configs" / "local.yaml", [f"name={name}"]))
    base = load_config(REPO / "configs" / "local.yaml", [f"name={'a' * room}"])
    load_sweep(sweep, base)
    for suffix in ("-sweep", "-best", _LONGEST_TRIAL_SUFFIX):
        base.name = "a" * room + suffix  # validated on assignment, as tuning names them
