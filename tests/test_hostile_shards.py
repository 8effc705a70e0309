"""Hostile shard datasets, generated with hypothesis: the reader (``hybridray.data.reader``)
must accept every row with exactly its content or reject it naming its file and row -- never
a traceback, never a silent drop -- and refuse a damaged file or a manifest that disagrees
with the files, naming it.

Each example is a dataset of up to three files, parquet and jsonl, written here byte by byte:
wrong types (int, binary, list columns; numbers, lists, null in jsonl), missing and extra
columns, empty, blank and over-long texts, invalid UTF-8, lines that are not JSON or not
objects, unknown and mis-cased language codes, duplicate ``(group_id, lang)``, truncated and
empty files, and a ``manifest.json`` that is right, absent, or wrong in one way. The expected
outcome comes from an oracle written here from the format's rules (not from the reader's own
``row_problem``). The index pass runs as ``reader.index_shards`` runs it, file by file
(``index_file``, ``merge_index``, ``check_manifest``), without Ray Data's scheduling around it.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridray.data import reader
from hybridray.errors import UserError
from reliability import Tally, record

MAX_CHARS = 40
REQUIRED = ("group_id", "lang", "query", "passage", "source")
GOOD_LANGS = ("en", "de", "sw", "zh-Hant", "pt-BR")
MISCASED = ("EN", "De", "ZH-Hant")
BAD_LANGS = MISCASED + ("xx", "english", "e", "", " en", "en-")
GIDS = ("g0", "g1", "g2", "g 3", "../../etc/passwd", "")

texts = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=MAX_CHARS + 6)
wrong_values = st.one_of(st.none(), st.integers(-5, 5), st.floats(allow_nan=True), st.booleans(),
                         st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.just("k"), st.integers(0, 3)))


# ----------------------------------------------------------------------------- the oracle
def acceptable(row: dict) -> bool:
    """The shard format's rules for one row (schema v1), written out independently."""
    if set(row) - set(REQUIRED) - {"hard_negatives", "hard_negative_group_ids", "context", "article_id"}:
        return False
    for column in REQUIRED:
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            return False
    if row["lang"] not in GOOD_LANGS:
        return False
    if len(row["query"]) > MAX_CHARS or len(row["passage"]) > MAX_CHARS:
        return False
    negatives = row.get("hard_negatives")
    if negatives is not None and not (isinstance(negatives, list) and all(
            isinstance(n, str) and n.strip() and len(n) <= MAX_CHARS for n in negatives)):
        return False
    return row.get("hard_negative_group_ids") is None


# ----------------------------------------------------------------------------- generated files
@st.composite
def good_row(draw) -> dict:
    return {"group_id": draw(st.sampled_from(GIDS)), "lang": draw(st.sampled_from(GOOD_LANGS + BAD_LANGS)),
            "query": draw(texts), "passage": draw(texts), "source": "generated"}


@st.composite
def jsonl_file(draw) -> dict:
    """``{"format": "jsonl", "bytes", "rows": [(line, row or None)]}``: row None = a line
    that is no row (expected rejected), blank lines are not listed."""
    lines, rows = [], []
    for line_no in range(1, draw(st.integers(0, 8)) + 1):
        kind = draw(st.sampled_from(["row"] * 5 + ["mutated", "not object", "not json", "bad utf8", "blank"]))
        row = draw(good_row())
        if kind == "mutated":
            mutation = draw(st.sampled_from(["missing", "wrong type", "extra", "negatives", "huge"]))
            column = draw(st.sampled_from(REQUIRED))
            if mutation == "missing":
                row.pop(column)
            elif mutation == "wrong type":
                row[column] = draw(wrong_values)
            elif mutation == "extra":
                row[draw(st.sampled_from(["comment", "Query", "lang "]))] = draw(texts)
            elif mutation == "negatives":
                row["hard_negatives"] = draw(st.one_of(texts, st.lists(st.one_of(texts, st.integers()), max_size=3)))
            else:
                row[draw(st.sampled_from(["query", "passage"]))] = "x" * draw(st.integers(MAX_CHARS, 20_000))
        if kind in ("row", "mutated"):
            data = json.dumps(row, ensure_ascii=draw(st.booleans())).encode()
            rows.append((line_no, row))
        elif kind == "not object":
            data = json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), texts, st.none()))).encode()
            rows.append((line_no, None))
        elif kind == "not json":
            data = draw(st.sampled_from([b"{", b'{"group_id": "g0",', b"nope", b"{'a': 1}", b"[" * 20_000]))
            rows.append((line_no, None))
        elif kind == "bad utf8":
            data = json.dumps(row).encode().replace(b'"query": "', b'"query": "\xff\xfe', 1)
            rows.append((line_no, None))
        else:
            data = draw(st.sampled_from([b"", b"   ", b"\t"]))
        lines.append(data)
    return {"format": "jsonl", "bytes": b"".join(line + b"\n" for line in lines), "rows": rows, "lines": lines}


@st.composite
def parquet_file(draw) -> dict:
    """A parquet file whose columns may be missing, extra or of the wrong type; rows may hold
    nulls, empty or over-long texts and bad language codes."""
    rows = []
    for _ in range(draw(st.integers(0, 8))):
        row = draw(good_row())
        if draw(st.integers(0, 5)) == 0:
            row[draw(st.sampled_from(["query", "passage", "lang"]))] = None
        if draw(st.integers(0, 6)) == 0:
            row["passage"] = "y" * draw(st.integers(MAX_CHARS - 1, 5000))
        rows.append(row)
    columns = {name: pa.array([r[name] for r in rows], pa.string()) for name in REQUIRED}
    defect = draw(st.sampled_from([None, None, None, "missing", "extra", "int", "binary", "list"]))
    target = draw(st.sampled_from(REQUIRED))
    if defect == "missing":
        columns.pop(target)
        for r in rows:
            r.pop(target)
    elif defect == "extra":
        columns["comment"] = pa.array(["extra"] * len(rows), pa.string())
        for r in rows:
            r["comment"] = "extra"
    elif defect == "int":
        columns[target] = pa.array(list(range(len(rows))), pa.int64())
        for i, r in enumerate(rows):
            r[target] = i
    elif defect == "binary":  # bytes, often not UTF-8: never a string
        values = [draw(st.binary(max_size=6)) for _ in rows]
        columns[target] = pa.array(values, pa.binary())
        for r, v in zip(rows, values):
            r[target] = v
    elif defect == "list":
        columns[target] = pa.array([["a", "b"]] * len(rows), pa.list_(pa.string()))
        for r in rows:
            r[target] = ["a", "b"]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink, row_group_size=max(1, draw(st.integers(1, 4))))
    return {"format": "parquet", "bytes": sink.getvalue().to_pybytes(), "rows": list(enumerate(rows))}


@st.composite
def damaged(draw, file: dict) -> dict:
    """The file as it is, truncated at a random byte, or emptied."""
    damage = draw(st.sampled_from([None] * 6 + ["truncated", "empty"]))
    if damage is None or not file["bytes"]:
        return {**file, "damage": None}
    if damage == "empty":
        return {**file, "bytes": b"", "rows": [], "damage": "empty"}
    if file["format"] == "parquet":
        return {**file, "bytes": file["bytes"][: draw(st.integers(0, len(file["bytes"]) - 1))], "damage": "truncated"}
    # jsonl: lines before k whole, line k cut short, nothing after it
    k = draw(st.integers(0, len(file["lines"]) - 1))
    cut = file["lines"][k][: draw(st.integers(0, max(0, len(file["lines"][k]) - 1)))]
    data = b"".join(line + b"\n" for line in file["lines"][:k]) + cut
    rows = [(n, r) for n, r in file["rows"] if n <= k]
    if cut.strip():  # the cut line is still a line: never a whole row any more
        rows.append((k + 1, None))
    return {**file, "bytes": data, "rows": rows, "damage": "truncated"}


datasets = st.lists(st.one_of(jsonl_file(), parquet_file()).flatmap(damaged), min_size=1, max_size=3)
#: A manifest field given a value of the wrong type (a JSON bool is not the number 1).
TYPED = ["typed: version true", "typed: rows true", "typed: rows 1.0", "typed: rows text",
         "typed: per-language list", "typed: per-language text", "typed: per-language bool count"]
manifests = st.sampled_from([None, "right", "right", "lost file", "extra file", "rows", "total", "language",
                             "version", "not json", "not object", *TYPED])


def write_dataset(root: Path, files: list[dict], manifest: str | None) -> list[Path]:
    paths = []
    for i, f in enumerate(files):
        path = root / f"part-{i:02d}.{f['format']}"
        path.write_bytes(f["bytes"])
        paths.append(path)
    if manifest is None:
        return paths
    counts = Counter(r.get("lang") for f in files for _, r in f["rows"] if r is not None and isinstance(r.get("lang"), str))
    body = {"schema_version": 1, "source": "generated", "rows_per_language": dict(counts),
            "rows": sum(len(f["rows"]) for f in files),
            "files": [{"path": p.name, "rows": len(f["rows"])} for p, f in zip(paths, files)]}
    if manifest == "lost file":
        body["files"].append({"path": "part-99.parquet", "rows": 3})
    elif manifest == "extra file":
        body["files"].pop()
    elif manifest == "rows":
        body["files"][-1]["rows"] += 1
    elif manifest == "total":
        body["rows"] -= 1
    elif manifest == "language":
        body["rows_per_language"]["sw"] = body["rows_per_language"].get("sw", 0) + 2
    elif manifest == "version":
        body["schema_version"] = 2
    elif manifest == "typed: version true":
        body["schema_version"] = True
    elif manifest == "typed: rows true":
        body["rows"] = True if body["rows"] == 1 else str(body["rows"])
    elif manifest == "typed: rows 1.0":
        body["rows"] = float(body["rows"])
    elif manifest == "typed: rows text":
        body["rows"] = str(body["rows"])
    elif manifest == "typed: per-language list":
        body["rows_per_language"] = list(body["rows_per_language"].values())
    elif manifest == "typed: per-language text":
        body["rows_per_language"] = "en"
    elif manifest == "typed: per-language bool count":
        body["rows_per_language"] = {**body["rows_per_language"], "en": True}
    text = json.dumps(body)
    if manifest == "not json":
        text = text[:-1]
    elif manifest == "not object":
        text = "[1, 2]"
    (root / "manifest.json").write_text(text)
    return paths


def file_errors(files: list[dict]) -> list[int]:
    """Indices of files the reader cannot read at all (an empty or truncated parquet)."""
    return [i for i, f in enumerate(files) if f["format"] == "parquet" and f["damage"]]


def index_of(root: Path, strict: bool):
    files = reader.list_shard_files(str(root))
    tables = [reader.index_file(f, i, max_text_chars=MAX_CHARS) for i, f in enumerate(files)]
    index = reader.merge_index(str(root), files, tables, strict=strict)
    reader.check_manifest(index)
    return index


TALLY = Tally()


@settings(max_examples=150)
@given(files=datasets, manifest=manifests, strict=st.booleans())
def test_every_row_is_accepted_exactly_or_rejected_by_file_and_row(files, manifest, strict):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = write_dataset(root, files, manifest)
        before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()}

        # the oracle: data order is file order, then row order
        accepted, rejected, first_bad, broken = {}, set(), None, None
        for i, f in enumerate(files):
            if i in file_errors(files):
                broken = f"{paths[i]}: "
                first_bad = first_bad or broken
                break
            for row_no, row in f["rows"]:
                key = (row.get("group_id"), row.get("lang")) if row is not None else None
                if row is not None and acceptable(row) and key not in accepted:
                    accepted[key] = (i, row_no, row)
                else:
                    rejected.add((str(paths[i]), row_no))
                    first_bad = first_bad or f"{paths[i]}:{row_no}: "
        expected_error = first_bad if strict else broken
        manifest_bad = manifest not in (None, "right")

        try:
            index = index_of(root, strict)
        except UserError as exc:
            message = str(exc)
            assert "\n" not in message
            if expected_error:
                assert message.startswith(expected_error), (message, expected_error)
                TALLY.add("rejected: damaged file" if expected_error == broken else "rejected: first bad row (strict)")
            else:
                assert manifest_bad, f"refused a good dataset: {message}"
                assert message.startswith(str(root / "manifest.json")), message
                TALLY.add("rejected: manifest disagrees")
        else:
            assert not manifest_bad, "a manifest that disagrees with the files was not noticed"
            assert not expected_error, f"not refused: {expected_error}"
            got_rejects = {(r.file, r.row) for r in index.rejects}
            assert got_rejects == rejected  # every bad row named by file and row, no good one
            for r in index.rejects:
                assert r.reason and str(r).startswith(f"{r.file}:{r.row}: ")
                lang = dict(files[paths.index(Path(r.file))]["rows"]).get(r.row) or {}
                if lang.get("lang") in MISCASED and "unknown language" in r.reason:
                    assert "lower case" in r.reason
            where = {(g.group_id, lang): loc for g in index.groups for lang, loc in zip(g.langs, g.rows)}
            assert where == {key: (i, row_no) for key, (i, row_no, _) in accepted.items()}  # nothing dropped
            for (i, row_no, row) in accepted.values():  # exactly the right content
                got = reader.read_rows(str(paths[i]), [row_no], ["group_id", "lang", "query", "passage"])[row_no]
                assert got == {k: row[k] for k in ("group_id", "lang", "query", "passage")}
            assert index.rows_per_language == dict(sorted(Counter(k[1] for k in accepted).items()))
            TALLY.add("accepted")
        after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()}
        assert after == before  # reading never changes a file


@pytest.fixture(scope="module", autouse=True)
def record_figures():
    """The table row, written once the module's tests ran (whatever their order or -k)."""
    yield
    if TALLY.cases:
        record("test_hostile_shards.py::test_every_row_is_accepted_exactly_or_rejected_by_file_and_row",
               kind="shard reader: parquet + jsonl, hostile rows, damaged files, manifests", cases=TALLY.cases,
               outcome=TALLY.summary())