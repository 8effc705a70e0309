"""Hostile BEIR-layout datasets, generated with hypothesis: ``load_beir`` reads a dataset with
exactly its documents, queries and judgments, or names the first bad line as ``file:line``
(corpus.jsonl, then queries.jsonl, then qrels) -- never a traceback, never a line dropped.

Lines are valid records, blank lines, non-objects, invalid JSON, invalid UTF-8, missing, empty,
boolean or list ``_id``s, ``1`` next to ``"1"`` (the same id), non-string texts, queries without
text; judgments with too few columns, non-integer scores, unknown queries or documents, and the
same pair twice. ``scan_beir`` (the streaming path: no corpus text kept, the corpus read again
in chunks) accepts and refuses exactly the same datasets, with the same message, and its
chunks read back exactly the loaded texts.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridray.errors import UserError
from hybridray.evaluate.beir import load_beir, read_corpus_chunk, scan_beir
from reliability import Tally, record

texts = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=12)
ids = st.one_of(st.sampled_from(["d1", "d2", "d3", "d4", "d5", "q1", "q2", "q3", "1"]), st.integers(1, 2))
bad_ids = st.one_of(st.none(), st.just(""), st.booleans(), st.just([1]), st.floats(allow_nan=False))


@st.composite
def jsonl_line(draw, query: bool, hostile: bool) -> tuple[bytes, dict | None]:
    """``(line, record)``: record None = a line that must be refused."""
    kind = draw(st.sampled_from(["ok"] * 6 + ["blank"] + (["not object", "not json", "not utf-8", "bad id", "bad text"]
                                                          + (["no text"] if query else []) if hostile else [])))
    rec = {"_id": draw(ids), "text": draw(texts) + ("?" if query else "")}
    if not query and draw(st.booleans()):
        rec["title"] = draw(st.one_of(st.none(), texts))
    if draw(st.booleans()):
        rec["metadata"] = {"url": draw(texts)}
    if kind == "ok":
        return json.dumps(rec, ensure_ascii=draw(st.booleans())).encode(), rec
    if kind == "blank":
        return b"  ", "blank"
    if kind == "not object":
        return json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=2), st.integers(), texts))).encode(), None
    if kind == "not json":
        return draw(st.sampled_from([b"{", b"{'_id': 1}", b"[" * 5000])), None
    if kind == "not utf-8":
        return json.dumps(rec).encode().replace(b'"text": "', b'"text": "\xc3\x28', 1), None
    if kind == "bad id":
        rec["_id"] = draw(bad_ids)
    elif kind == "bad text":
        rec[draw(st.sampled_from(["text", "title"]))] = draw(st.one_of(st.integers(), st.lists(texts, max_size=1)))
    else:
        rec["text"] = draw(st.sampled_from([None, "", "   "]))
    return json.dumps(rec).encode(), None


@st.composite
def qrels_line(draw, hostile: bool, queries: list[str], docs: list[str]) -> tuple[bytes, str]:
    kind = draw(st.sampled_from(["ok"] * 6 + ["blank"] + (["short", "score"] if hostile else [])))
    query = draw(st.sampled_from(queries + ["x"] * hostile or ["x"]))
    doc = draw(st.sampled_from(docs + ["zz"] * hostile or ["zz"]))
    if kind == "short":
        return f"{query}\t{doc}".encode(), "bad"
    if kind == "score":
        return f"{query}\t{doc}\t{draw(st.sampled_from(['1.5', 'high', '']))}".encode(), "bad"
    if kind == "blank":
        return b"", "blank"
    return f"{query}\t{doc}\t{draw(st.sampled_from([1, 2, 1, 0, -1]))}".encode(), "ok"


def text_id(value) -> str:
    return str(value)


def expect_records(path: Path, lines, query: bool):
    """The oracle: ``(records by id, first error prefix or None)``."""
    out = {}
    for n, (_, rec) in enumerate(lines, 1):
        if rec == "blank":
            continue
        if rec is None or text_id(rec["_id"]) in out:
            return out, f"{path}:{n}: "
        out[text_id(rec["_id"])] = rec
    return out, None


TALLY = Tally()


@settings(max_examples=150)
@given(hostile=st.booleans(), data=st.data())
def test_beir_loader_reads_exactly_or_names_the_line(hostile, data):
    unique = None if hostile else (lambda line: str(line[1]["_id"]) if isinstance(line[1], dict) else id(line))
    corpus = data.draw(st.lists(jsonl_line(False, hostile), min_size=not hostile, max_size=5, unique_by=unique), label="corpus")
    queries = data.draw(st.lists(jsonl_line(True, hostile), min_size=not hostile, max_size=4, unique_by=unique), label="queries")
    ids_of = lambda lines: sorted({str(r["_id"]) for _, r in lines if isinstance(r, dict)})  # noqa: E731
    qrels = data.draw(st.lists(qrels_line(hostile, ids_of(queries), ids_of(corpus)), min_size=not hostile, max_size=5,
                               unique_by=None if hostile else (lambda line: tuple(line[0].split(b"\t")[:2]) if line[0] else id(line))),
                      label="qrels")
    header = data.draw(st.sampled_from(["query-id\tcorpus-id\tscore"] * 5 + (["q\td\ts", ""] if hostile else [])),
                       label="header")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "set"
        (root / "qrels").mkdir(parents=True)
        files = {"corpus": root / "corpus.jsonl", "queries": root / "queries.jsonl", "qrels": root / "qrels" / "test.tsv"}
        files["corpus"].write_bytes(b"".join(line + b"\n" for line, _ in corpus))
        files["queries"].write_bytes(b"".join(line + b"\n" for line, _ in queries))
        files["qrels"].write_bytes((header + "\n").encode() + b"".join(line + b"\n" for line, _ in qrels))

        docs, error = expect_records(files["corpus"], corpus, False)
        if error is None:
            asked, error = expect_records(files["queries"], queries, True)
        judged: dict = {}
        if error is None:
            if header != "query-id\tcorpus-id\tscore":
                error = f"{files['qrels']}: expected the header"
            for n, (line, kind) in enumerate(qrels, 2):
                if error is not None:
                    break
                if kind == "blank":
                    continue
                query, doc, *score = line.decode().split("\t")
                if kind == "bad" or query not in asked or doc not in docs or doc in judged.get(query, {}):
                    error = f"{files['qrels']}:{n}: "
                else:
                    judged.setdefault(query, {})[doc] = int(score[0])
        relevant = {q: d for q, d in judged.items() if any(s > 0 for s in d.values())}
        if error is None and not relevant:
            error = f"{root}: no query"

        try:
            scanned = scan_beir(root)  # the streaming path checks the same lines the same way
        except UserError as exc:
            scanned = exc
        try:
            loaded = load_beir(root)
        except UserError as exc:
            assert isinstance(scanned, UserError) and str(scanned) == str(exc), (scanned, exc)
            assert error is not None, f"refused a good dataset: {exc}"
            assert str(exc).startswith(error) and "\n" not in str(exc), (str(exc), error)
            TALLY.add("rejected: " + ("qrels" if "test.tsv" in error else "corpus" if "corpus" in error
                                      else "queries" if "queries" in error else "no relevant judgment"))
            return
        assert error is None, f"not refused: {error}"
        assert loaded.corpus_ids == list(docs)
        assert loaded.corpus_texts == [f"{d.get('title') or ''} {d.get('text') or ''}".strip() for d in docs.values()]
        assert loaded.query_ids == sorted(relevant)
        assert loaded.query_texts == [asked[q]["text"] for q in sorted(relevant)]
        assert loaded.qrels == relevant
        assert not isinstance(scanned, UserError), scanned
        assert (scanned.corpus_ids, scanned.query_ids, scanned.query_texts, scanned.qrels) == (
            loaded.corpus_ids, loaded.query_ids, loaded.query_texts, loaded.qrels)
        size = data.draw(st.integers(1, 4), label="chunk size")
        assert [t for _, source in scanned.chunks(size) for t in read_corpus_chunk(source)] == loaded.corpus_texts
        TALLY.add("accepted")


@pytest.fixture(scope="module", autouse=True)
def record_figures():
    """The table row, written once the module's tests ran (whatever their order or -k)."""
    yield
    if TALLY.cases:
        record("test_hostile_beir.py::test_beir_loader_reads_exactly_or_names_the_line",
               kind="BEIR loader: corpus, queries, qrels lines", cases=TALLY.cases, outcome=TALLY.summary())

def test_a_corpus_changed_or_gone_after_the_scan_is_a_user_error(tmp_path):
    """An actor reads its chunk by byte offsets of the scan: a corpus rewritten since, or not
    there (another machine without a shared filesystem), is one line naming the path."""
    root = tmp_path / "ds"
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text('{"_id": "d1", "text": "one"}\n{"_id": "d2", "text": "two"}\n')
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "which"}\n')
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\t1\n")
    scanned = scan_beir(root)
    [(_, source)] = scanned.chunks(10)
    assert read_corpus_chunk(source) == ["one", "two"]
    (root / "corpus.jsonl").write_text('{"_id": "d1", "text": "one, longer"}\n{"_id": "d2", "text": "two"}\n')
    with pytest.raises(UserError, match=r"corpus.jsonl: changed while it was evaluated \(58 bytes when checked, 66 now\)"):
        read_corpus_chunk(source)
    (root / "corpus.jsonl").unlink()
    with pytest.raises(UserError, match=r"corpus.jsonl: not readable on .*: an encoding actor on another machine"):
        read_corpus_chunk(source)
