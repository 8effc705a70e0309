"""Hostile SQuAD / LAReQA source files, generated with hypothesis, through both converters:
``hybridray data prepare`` (``prepare_lareqa``: question + gold sentence) and ``hybridray data
from-squad`` (``squad_to_shards``: question + paragraph).

Each example is a directory of ``{lang}.json`` files built as valid LAReQA (sentences and
sentence breaks that really cut the context), then damaged: any value anywhere replaced by a
wrong type, an empty or a huge string, any key deleted, ids repeated, a file truncated, emptied,
made invalid UTF-8, or named with a mis-cased language. Every question must end as exactly one
shard row with exactly its text, or as one reject naming its file, its ordinal and its place
(``data[a].paragraphs[p].qas[q]``); a file that cannot be read as a whole is one error naming
it. Nothing else: no traceback, no question dropped without a word, and an existing output
directory left exactly as it was by a run that fails.
"""
from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridray.data.prepare import prepare_lareqa
from hybridray.data.squad import squad_to_shards
from hybridray.errors import UserError
from reliability import Tally, record

IDS = ("q1", "q2", "q3", "q4", "q5", "q6")
words = st.text(alphabet=st.characters(exclude_categories=("Cs", "Zs", "Cc")), min_size=1, max_size=8)
sentences = st.lists(words, min_size=1, max_size=4).map(" ".join)
wrong = st.one_of(st.none(), st.integers(-3, 3), st.booleans(), st.just(""), st.just("   "), st.just([]),
                  st.just({}), st.just([[0, 1]]), st.just("x" * 5000), st.floats(allow_nan=False))


@st.composite
def lareqa_file(draw) -> dict:
    """A valid LAReQA/SQuAD v1.1 object: sentence breaks cut the context; each answer starts
    inside its gold sentence."""
    articles = []
    for _ in range(draw(st.integers(0, 3))):
        paragraphs = []
        for _ in range(draw(st.integers(1, 2))):
            sents = draw(st.lists(sentences, min_size=1, max_size=3))
            context, breaks = "", []
            for sentence in sents:
                start = len(context)
                context += sentence + " "
                breaks.append([start, len(context)])
            qas = []
            for _ in range(draw(st.integers(0, 3))):
                gold = draw(st.integers(0, len(sents) - 1))
                start = draw(st.integers(breaks[gold][0], breaks[gold][1] - 1))
                qas.append({"id": draw(st.sampled_from(IDS)), "question": draw(sentences) + "?",
                            "answers": [{"text": draw(words), "answer_start": start}]})
            paragraphs.append({"context": context, "sentences": sents, "sentence_breaks": breaks, "qas": qas})
        articles.append({"title": draw(words), "paragraphs": paragraphs})
    return {"version": "1.1", "data": articles}


def paths_of(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths_of(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from paths_of(value, prefix + (i,))


@st.composite
def mutated(draw, tree: dict) -> tuple[dict, list[tuple]]:
    """``tree`` with 0-2 values replaced or keys deleted; returns it and the places touched."""
    tree = json.loads(json.dumps(tree))
    touched = []
    for _ in range(draw(st.integers(0, 2))):
        places = [p for p in paths_of(tree) if p]
        if not places:
            break
        place = draw(st.sampled_from(places))
        parent = tree
        for key in place[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[place[-1]]
        else:
            parent[place[-1]] = draw(wrong)
        touched.append(place)
    return tree, touched


@st.composite
def source_dirs(draw) -> list[dict]:
    files = []
    for lang in draw(st.lists(st.sampled_from(["de", "en", "sw"]), min_size=1, max_size=3, unique=True)):
        tree, touched = draw(mutated(draw(lareqa_file())))
        data = json.dumps(tree, ensure_ascii=draw(st.booleans())).encode()
        damage = draw(st.sampled_from([None] * 8 + ["truncated", "empty", "not utf-8", "mis-cased name"]))
        if damage == "truncated":
            data = data[: draw(st.integers(0, len(data) - 1))]
        elif damage == "empty":
            data = b""
        elif damage == "not utf-8":
            data = data[:1] + b"\xff\xfe" + data[1:]
        name = f"{lang.upper()}.json" if damage == "mis-cased name" else f"{lang}.json"
        files.append({"lang": lang, "name": name, "tree": tree, "bytes": data, "touched": touched, "damage": damage})
    return files


def questions(tree) -> list[tuple[str, dict, dict, int]]:
    """``(place, paragraph, qa, article)`` of every question, for a tree whose structure holds
    (the converters refuse the others)."""
    out = []
    for a, article in enumerate(tree.get("data") or []):
        for p, paragraph in enumerate(article.get("paragraphs") or []):
            for q, qa in enumerate(paragraph.get("qas") or []):
                out.append((f"data[{a}].paragraphs[{p}].qas[{q}]", paragraph, qa, a))
    return out


def untouched(place: str, touched: list[tuple]) -> bool:
    """No mutation at, above, inside or beside (same paragraph) this question. Keys outside
    ``data`` (``version``) are not read by the converters: touching them changes nothing."""
    a, p, q = (int(x) for x in place.replace("data[", "").replace("].paragraphs[", " ").replace("].qas[", " ")
               .rstrip("]").split())
    mine = ("data", a, "paragraphs", p)
    for t in touched:
        common = min(len(t), len(mine))
        if t[:common] == mine[:common] and not (len(t) > 5 and t[4] == "qas" and t[5] != q):
            return False
    return True


def place_of(message: str, path: str) -> tuple:
    """``{path}: data[0].paragraphs[1]: ...`` -> ``("data", 0, "paragraphs", 1)`` (``()`` for
    a message about the file as a whole)."""
    head = message[len(path):].removeprefix(": ").split(": ")[0].split(" ")[0]
    parts: list = []
    for token in re.findall(r"[A-Za-z_]+|\[\d+\]", head):
        parts.append(int(token[1:-1]) if token.startswith("[") else token)
    return tuple(parts) if parts and parts[0] == "data" else ()


def refused_where_touched(message: str, path: str, touched: list[tuple]) -> bool:
    """A structural refusal names a place a mutation touched, or one above or inside it; a
    message about the whole file is right only when its ``data`` list itself was touched."""
    where = place_of(message, path)
    if not where:
        return ("data",) in touched
    return any(t[: len(where)] == where or where[: len(t)] == t for t in touched)


def sound_questions(f: dict) -> list[str]:
    """Places of the questions of an undamaged file that no mutation touched."""
    if f["damage"] is not None:
        return []
    try:
        return [place for place, *_ in questions(f["tree"]) if untouched(place, f["touched"])]
    except (AttributeError, TypeError):  # a structure the mutations broke
        return []


def tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def read_rows(shard_dir: Path) -> list[dict]:
    return [r for f in sorted(shard_dir.glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def check_conversion(files, source: Path, out: Path, rows: list[dict], rejects: list[dict], passage_of,
                     id_of) -> str:
    """Every question of every file is one row with exactly its text, or one reject naming it."""
    by_lang = {f["lang"]: f for f in files}
    got = {(r["lang"], r["group_id"]): r for r in rows}
    assert len(got) == len(rows), "a (group_id, lang) twice"
    rejected = {(r["file"], r["row"]): r["reason"] for r in rejects}
    assert len(rejected) == len(rejects)
    accepted_ids = {lang: {} for lang in by_lang}
    accepted_passages = {lang: {} for lang in by_lang}  # passage -> the question that has it
    for lang, f in sorted(by_lang.items()):
        path = str(source / f["name"])
        for ordinal, (place, paragraph, qa, article) in enumerate(questions(f["tree"]), 1):
            qid = id_of(qa.get("id"))
            row = got.pop((lang, qid), None) if qid is not None else None
            if row is not None and (path, ordinal) not in rejected and row["query"] == qa["question"].strip():
                assert row["passage"] == passage_of(paragraph, qa)  # exactly the right content
                assert qid not in accepted_ids[lang]
                accepted_ids[lang][qid] = ordinal
                accepted_passages[lang].setdefault(row["passage"], qid)
                continue
            if row is not None:  # not this question's row: put it back for the one it belongs to
                got[(lang, qid)] = row
            reason = rejected.pop((path, ordinal), None)
            assert reason is not None, f"{path} question {ordinal} ({place}) neither converted nor rejected"
            assert reason.startswith(place + ": "), reason
            if untouched(place, f["touched"]):  # a sound question: only a repeat of an accepted one is refused
                first = accepted_passages[lang].get(passage_of(paragraph, qa))
                assert ((reason.startswith(f"{place}: duplicate question id") and qid in accepted_ids[lang])
                        or (first is not None and reason == f"{place}: passage already used by question {first!r}")), reason
    assert not got, f"rows that are no question: {list(got)[:3]}"
    assert not rejected, f"rejects that are no question: {list(rejected)[:3]}"
    return "accepted"


def gold_sentence(paragraph, qa) -> str:
    start = qa["answers"][0]["answer_start"]
    index = next(i for i, (a, b) in enumerate(paragraph["sentence_breaks"]) if a <= start < b)
    return paragraph["sentences"][index].strip()


def run_converter(convert, files, check) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source = tmp / "source"
        source.mkdir()
        for f in files:
            (source / f["name"]).write_bytes(f["bytes"])
        out = tmp / "out"
        out.mkdir()
        (out / "keep.txt").write_text("written by an earlier run")
        before = tree_digest(tmp)
        try:
            convert(source, out, overwrite=False)
            raise AssertionError("an existing output was replaced without overwrite")
        except UserError as exc:
            assert str(exc).startswith((f"{out}: already exists", str(source))), exc
        assert tree_digest(tmp) == before
        try:
            convert(source, out, overwrite=True)
        except UserError as exc:
            message = str(exc)
            assert "\n" not in message
            assert message.startswith(str(source)), message  # names the directory, or the file first
            assert tree_digest(tmp) == before, "a failed conversion changed what was there"
            named = next((f for f in files if message.startswith(str(source / f["name"]))), None)
            if named is None:  # the directory as a whole: only right when no file had a sound question
                assert not any(sound_questions(f) for f in files), message
                return "rejected: nothing usable"
            assert named["damage"] or refused_where_touched(message, str(source / named["name"]), named["touched"]), \
                f"a file refused for a place no mutation touched: {message} (touched: {named['touched']})"
            return f"rejected: {named['damage'] or 'bad structure'}"
        assert not (out / "keep.txt").exists()
        assert all(f["damage"] is None for f in files), "a damaged file was not noticed"
        return check(files, source, out)


def check_prepare(files, source, out):
    rows = read_rows(out / "train") + read_rows(out / "heldout")
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    return check_conversion(files, source, out, rows, rejects, gold_sentence,
                            lambda qid: qid if isinstance(qid, str) else None)


def check_squad(files, source, out):
    rows = read_rows(out)
    rejects = [json.loads(x) for x in (out / "_rejects.jsonl").read_text().splitlines()]
    return check_conversion(files, source, out, rows, rejects, lambda paragraph, qa: paragraph["context"].strip(),
                            lambda qid: str(qid) if isinstance(qid, (str, int)) and not isinstance(qid, bool) else None)


TALLY = {"prepare": Tally(), "from-squad": Tally()}
TESTS = {"prepare": "test_lareqa_prepare_converts_or_names_every_question",
         "from-squad": "test_from_squad_converts_or_names_every_question"}


@settings(max_examples=100)
@given(files=source_dirs())
def test_lareqa_prepare_converts_or_names_every_question(files):
    TALLY["prepare"].add(run_converter(
        lambda s, o, overwrite: prepare_lareqa(s, o, heldout_fraction=0.3, seed=0, overwrite=overwrite), files,
        check_prepare))


@settings(max_examples=100)
@given(files=source_dirs())
def test_from_squad_converts_or_names_every_question(files):
    TALLY["from-squad"].add(run_converter(
        lambda s, o, overwrite: squad_to_shards(s, o, max_text_chars=4000, overwrite=overwrite), files,
        check_squad))


@pytest.fixture(scope="module", autouse=True)
def record_figures():
    """The table rows, written once the module's tests ran (whatever their order or -k)."""
    yield
    for name, tally in TALLY.items():
        if not tally.cases:
            continue
        record(f"test_hostile_converters.py::{TESTS[name]}", kind=f"LAReQA / SQuAD converter ({name}): damaged "
               "values, keys, files, names", cases=tally.cases, outcome=tally.summary())
