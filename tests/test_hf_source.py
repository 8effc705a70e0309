"""Hugging Face ``datasets`` as a source (``data.train: hf:...``).

The datasets are built here from the prepared MLQA-R shards: a ``save_to_disk`` DatasetDict
whose columns have other names (a ClassLabel language, a list of hard negatives, an unmapped
column) and three malformed rows, and a directory of jsonl files read by ``load_dataset``.
The hub path cannot run here (no network); it is the same ``load_dataset`` call.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hybridray.config import HFSourceConfig, build_config
from hybridray.data import hf_source
from hybridray.data.pipeline import build_train_dataset, iter_worker_batches
from hybridray.data.shards import write_shards
from hybridray.errors import UserError

B, W, STEPS = 8, 2, 6
MAPPING = {
    "columns": {"group_id": "id", "lang": "language", "query": "question", "passage": "answer",
                "context": "paragraph", "article_id": "doc", "hard_negatives": "negs"},
    "constants": {"source": "mlqa-r"},
}
#: dataset row -> the start of its reject reason (rows inserted into the MLQA-R rows).
BAD_ROWS = {5: "missing field 'query'", 40: "unknown language code 'xx'",
            120: "duplicate (group_id, lang)"}


def read_rows(directory: Path) -> list[dict]:
    return pa.concat_tables([pq.read_table(f) for f in sorted(directory.glob("*.parquet"))]).to_pylist()


def with_negatives(rows: list[dict]) -> list[dict]:
    """Two hard negatives per row: passages of rows further down (other groups). They replace
    ``data prepare``'s in-context ones, and with them the groups those answer (the mapping
    below has no such column)."""
    n = len(rows)
    return [{**r, "hard_negatives": [rows[(i + 7) % n]["passage"], rows[(i + 13) % n]["passage"]],
             "hard_negative_group_ids": None} for i, r in enumerate(rows)]


def as_hf_rows(rows: list[dict]) -> list[dict]:
    """Shard rows under the dataset's own column names, three bad rows inserted."""
    out = [{"id": r["group_id"], "language": r["lang"], "question": r["query"], "answer": r["passage"],
            "paragraph": r["context"], "doc": r["article_id"], "negs": r["hard_negatives"],
            "title": "unused"} for r in rows]
    first = dict(out[0])
    out.insert(5, {**first, "id": "bad-missing", "question": None})
    out.insert(40, {**first, "id": "bad-language", "language": "xx"})
    out.insert(120, {**first, "question": "the same (group_id, lang) as row 0"})
    return out


@pytest.fixture(scope="module")
def sources(mlqa_prepared, tmp_path_factory) -> dict:
    import datasets

    root = tmp_path_factory.mktemp("hf")
    rows = with_negatives(read_rows(mlqa_prepared / "train"))
    write_shards(rows, root / "shards", source="mlqa-r")  # the reference: the same rows as shards
    hf_rows = as_hf_rows(rows)
    langs = sorted({r["language"] for r in hf_rows})
    features = datasets.Features({
        "id": datasets.Value("string"), "language": datasets.ClassLabel(names=langs),
        "question": datasets.Value("string"), "answer": datasets.Value("string"),
        "paragraph": datasets.Value("string"), "doc": datasets.Value("string"),
        "negs": datasets.List(datasets.Value("string")), "title": datasets.Value("string"),
    })
    train = datasets.Dataset.from_list(hf_rows, features=features)
    datasets.DatasetDict({"train": train, "validation": train.select(range(10))}).save_to_disk(root / "saved")
    datasets.Dataset.from_dict({k: [] for k in features}, features=features).save_to_disk(root / "empty", num_shards=1)
    english = [r for r in read_rows(mlqa_prepared / "heldout") if r["lang"] == "en"]
    (root / "jsonl").mkdir()
    for part in range(2):  # a directory of json files, as load_dataset reads it
        with open(root / "jsonl" / f"part-{part}.jsonl", "w") as f:
            for r in english[part::2]:
                f.write(json.dumps({"qid": r["group_id"], "q": r["query"], "a": r["passage"]}) + "\n")
    return {"root": root, "shards": root / "shards", "saved": root / "saved", "empty": root / "empty",
            "jsonl": root / "jsonl", "n_train": len(rows), "n_english": len(english), "langs": langs}


@pytest.fixture(scope="module")
def ray_cluster(ray_session):
    """The session's Ray (started once per test session, see conftest.py)."""


def config(sources, **overrides):
    tree = {
        "model": {"name_or_path": "builtin:tiny", "max_query_length": 16, "max_passage_length": 24},
        "data": {"train": str(sources["shards"]), "heldout": ""},
        "sampler": {"batch_size": B},
        "loss": {"hard_negatives": 1},
        "train": {"max_steps": STEPS},
        "scaling": {"num_workers": W},
        "run": {"storage_path": str(sources["root"] / "runs")},
    }
    return build_config(tree, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def steps(dataset) -> list[list[dict]]:
    return [list(iter_worker_batches(dataset, rank=r, world_size=W)) for r in range(W)]


# ----------------------------------------------------------------------------- through Ray
@pytest.fixture(scope="module")
def both(ray_cluster, sources):
    """The same rows read as shards and as ``hf:`` (3 extra bad rows): datasets + infos."""
    root = sources["root"]
    ds_shards, info_shards = build_train_dataset(config(sources), rejects_path=str(root / "shards-rejects.jsonl"))
    hf = config(sources, **{"data.train": f"hf:{sources['saved']}", "data.hf": MAPPING})
    ds_hf, info_hf = build_train_dataset(hf, rejects_path=str(root / "hf-rejects.jsonl"))
    return (ds_shards, info_shards), (ds_hf, info_hf)


def test_hf_source_gives_the_batches_of_the_same_shards(both, sources):
    (ds_shards, info_shards), (ds_hf, info_hf) = both
    assert info_hf.n_groups == info_shards.n_groups
    assert info_hf.rows_per_language == info_shards.rows_per_language
    assert sum(info_hf.rows_per_language.values()) == sources["n_train"]
    reference, got = steps(ds_shards), steps(ds_hf)
    assert [len(r) for r in got] == [STEPS] * W
    for rank_ref, rank_got in zip(reference, got):
        for a, b in zip(rank_ref, rank_got):
            assert a.keys() == b.keys()
            for k in a:
                if isinstance(a[k], torch.Tensor):
                    assert torch.equal(a[k], b[k]), k
                else:
                    assert a[k] == b[k], k
    assert got[0][0]["negative_input_ids"].shape[0] == B // W  # the mapped list column is used


def test_rejects_name_the_dataset_and_its_row(both, sources):
    (_, info_shards), (_, info_hf) = both
    assert info_shards.n_rejects == 0 and info_hf.n_rejects == len(BAD_ROWS)
    lines = [json.loads(x) for x in (sources["root"] / "hf-rejects.jsonl").read_text().splitlines()]
    label = f"hf:{sources['saved']}[train]"
    assert [(x["file"], x["row"]) for x in lines] == [(label, row) for row in BAD_ROWS]
    for x, reason in zip(lines, BAD_ROWS.values()):
        assert x["reason"].startswith(reason), x
    assert lines[2]["reason"].endswith(f"first at {label}:0")


def test_materialised_once_and_reused(both, sources):
    cache = sources["root"] / "runs" / "hf-cache"
    (entry,) = cache.iterdir()  # one source, one key
    marker = json.loads((entry / hf_source.MARKER).read_text())
    attempts = [p for p in entry.iterdir() if p.is_dir()]
    assert [p.name for p in attempts] == [marker["attempt"]]
    assert sum(f["rows"] for f in marker["files"]) == sources["n_train"] + len(BAD_ROWS)
    again = hf_source.prepare(f"hf:{sources['saved']}", HFSourceConfig(**MAPPING), key="data.hf", cache_root=str(cache))
    assert again.reused and again.directory == str(attempts[0])
    other = hf_source.prepare(  # another mapping is another cache entry; small files, several tasks
        f"hf:{sources['saved']}", HFSourceConfig(**{**MAPPING, "constants": {"source": "other"}}),
        key="data.hf", cache_root=str(cache), rows_per_file=1000,
    )
    assert not other.reused and other.directory != again.directory
    assert sorted(other.first_rows.values()) == list(range(0, other.rows, 1000))
    first = pq.read_table(Path(other.directory) / hf_source.file_name(1000)).to_pylist()[0]
    assert first["source"] == "other" and first["lang"] in sources["langs"]


def test_strict_mode_names_the_dataset_row(ray_cluster, sources):
    cfg = config(sources, **{"data.train": f"hf:{sources['saved']}", "data.hf": MAPPING, "data.strict": True})
    with pytest.raises(UserError, match=rf"hf:{sources['saved']}\[train\]:5: missing field 'query'"):
        build_train_dataset(cfg, rejects_path=None)


def test_load_dataset_directory_as_extra_mono(ray_cluster, sources):
    extra = {"path": f"hf:{sources['jsonl']}", "weight": 1.0,
             "hf": {"columns": {"group_id": "qid", "query": "q", "passage": "a"}, "constants": {"lang": "en"}}}
    cfg = config(sources, **{"data.extra_mono": [extra], "sampler.alpha": 1.0, "loss.hard_negatives": 0})
    ds, info = build_train_dataset(cfg, rejects_path=None)
    assert info.extra[0]["rows_per_language"] == {"en": sources["n_english"]}
    assert info.extra[0]["n_rejects"] == 0
    english = [s for s in steps(ds)[0] if s["lang"] == "en"]
    assert english and all(s["source"] == "extra:0" for s in english)


def test_hub_ids_go_through_load_dataset(ray_cluster, sources, monkeypatch):
    """No hub here: ``load_dataset`` is replaced by a recorder that returns a local split. What
    is checked is the call a hub id makes (id, configuration, split, revision) and the name its
    rejects carry; the rest of the path is the one the tests above run."""
    import datasets

    calls, local = [], datasets.load_from_disk(str(sources["saved"]))["validation"]
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append((args, kwargs)) or local)
    options = HFSourceConfig(**{**MAPPING, "name": "mlqa.de.de", "split": "validation", "revision": "abc123"})
    source = hf_source.prepare("hf:org/mlqa-like", options, key="data.hf", cache_root=str(sources["root"] / "hub"))
    assert calls == [(("org/mlqa-like", "mlqa.de.de"), {"split": "validation", "revision": "abc123"})]
    assert source.label == "hf:org/mlqa-like[mlqa.de.de/validation]" and source.rows == 10
    assert source.locate(f"{source.directory}/{hf_source.file_name(0)}", 7) == (source.label, 7)


# ----------------------------------------------------------------------------- no Ray
@pytest.mark.parametrize(("options", "message"), [
    ({**MAPPING, "columns": {**MAPPING["columns"], "query": "nope"}},
     r"data.hf.columns.query: hf:.*\[train\] has no column 'nope' \(its columns: id, language"),
    ({"columns": {"query": "question", "passage": "answer"}},
     r"data.hf.columns: hf:.*\[train\] has no column for 'group_id'"),
    ({**MAPPING, "columns": {**MAPPING["columns"], "passage": "negs"}},
     r"data.hf.columns.passage: column 'negs' of hf:.*\[train\] is list<item: string>, .* needs strings"),
    ({**MAPPING, "split": "test"}, r"data.hf.split: hf:.* has no split 'test' \(it has 'train', 'validation'\)"),
    ({**MAPPING, "name": "mlqa.de.de"}, r"data.hf: name / revision select a load_dataset configuration"),
])
def test_mapping_errors_name_the_key(sources, options, message):
    with pytest.raises(UserError, match=message):
        hf_source.prepare(f"hf:{sources['saved']}", HFSourceConfig(**options), key="data.hf",
                          cache_root=str(sources["root"] / "never-written"))
    assert not (sources["root"] / "never-written").exists()


def test_unloadable_sources_are_one_line_errors(sources, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no hub here: fail at once
    cases = [(f"hf:{sources['root'] / 'missing'}", "datasets.load_dataset failed: FileNotFoundError"),
             ("hf:no-such-org/no-such-dataset", "datasets.load_dataset failed: ConnectionError"),
             (f"hf:{sources['empty']}", "the split has no rows")]
    for path, message in cases:
        with pytest.raises(UserError, match=message) as error:
            hf_source.prepare(path, None, key="data.hf", cache_root=str(sources["root"] / "never-written"))
        assert "\n" not in str(error.value) and path in str(error.value)


def test_config_checks_the_hf_options():
    for overrides, message in [
        (["data.hf.split=validation"], "data.hf: set, but data.train"),
        (["data.train=hf:x", "data.hf.columns.qury=question"], r"data.hf: columns: \['qury'\] are not shard columns"),
        (["data.train=hf:x", "data.hf.constants.query=same"], r"constants: \['query'\] differ from row to row"),
        (["data.train=hf:x", "data.hf.columns.lang=l", "data.hf.constants.lang=de"], "both columns and constants"),
        (['data.extra_mono=[{"path": "x", "hf": {}}]'], "data.extra_mono.0.hf: set, but data.extra_mono.0.path"),
    ]:
        with pytest.raises(UserError, match=message):
            build_config({}, overrides)
    ok = build_config({}, ["data.train=hf:org/name", "data.hf.name=de", "data.hf.columns.query=question"])
    assert ok.data.hf.columns == {"query": "question"} and ok.data.hf.split == "train"


def test_local_hf_paths_become_absolute(tmp_path, monkeypatch):
    from hybridray.train import resolve_paths

    (tmp_path / "my-dataset").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = build_config({}, ["data.train=hf:my-dataset", "data.heldout=''",
                            'data.extra_mono=[{"path": "hf:org/name"}]'])
    resolved = resolve_paths(cfg)
    assert resolved.data.train == f"hf:{tmp_path / 'my-dataset'}"
    assert resolved.data.extra_mono[0].path == "hf:org/name"  # a hub id stays as it is
