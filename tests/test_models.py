"""Offline encoders: Q4_0 dequantisation, the rebuilt multilingual-e5-small, the tiny model."""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridray.errors import UserError
from hybridray.models import (
    BUILTIN_E5,
    BUILTIN_TINY,
    default_prefixes,
    load_encoder,
    pool,
    resolve_model_path,
)
from hybridray.models.offline_e5 import INSTALL_HINT, cached_build, dequantize_q4_0, package_file

# (query in another language, English passage on the same topic, unrelated English passage)
CROSS_LINGUAL_TRIPLES = [
    (
        "¿Cuántos habitantes tiene Berlín?",
        "Berlin, the capital of Germany, has a population of about 3.7 million people.",
        "Photosynthesis converts light energy into chemical energy stored in sugars.",
    ),
    (
        "¿Cuál es la capital de Alemania?",
        "Berlin is the capital and largest city of Germany.",
        "The stock market closed lower on Friday after weak quarterly earnings.",
    ),
    (
        "Wie hoch ist der Mount Everest?",
        "Mount Everest is Earth's highest mountain above sea level, at 8,849 metres.",
        "Berlin is the capital and largest city of Germany.",
    ),
    (
        "柏林是哪个国家的首都？",
        "Berlin is the capital and largest city of Germany.",
        "Cats are obligate carnivores and need a diet rich in meat.",
    ),
    (
        "猫吃什么？",
        "Cats are obligate carnivores and need a diet rich in meat.",
        "The Treaty of Versailles was signed in 1919 at the end of the First World War.",
    ),
]


def q4_block(scale: float, low: list[int], high: list[int]) -> bytes:
    """One Q4_0 block: fp16 scale, then byte j = low[j] | high[j] << 4."""
    return struct.pack("<e", scale) + bytes(lo | hi << 4 for lo, hi in zip(low, high))


def reference_dequantize(raw: bytes) -> list[float]:
    """Brute force, value by value: values 0-15 are low nibbles, 16-31 high nibbles."""
    values = []
    for start in range(0, len(raw), 18):
        (scale,) = struct.unpack_from("<e", raw, start)
        codes = raw[start + 2 : start + 18]
        values += [((codes[i] & 0x0F) - 8) * scale for i in range(16)]
        values += [((codes[i] >> 4) - 8) * scale for i in range(16)]
    return values


def embed(model, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return F.normalize(pool(hidden, batch["attention_mask"], "mean"), dim=-1)


@pytest.fixture(scope="module")
def tmp_cache(tmp_path_factory):
    """A private cache for the cheap builds (the tiny model); e5 uses the user's cache."""
    return tmp_path_factory.mktemp("hybridray-cache")


@pytest.fixture
def use_tmp_cache(tmp_cache, monkeypatch):
    monkeypatch.setenv("HYBRIDRAY_CACHE", str(tmp_cache))
    return tmp_cache


@pytest.fixture(scope="module")
def tiny(tmp_cache):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HYBRIDRAY_CACHE", str(tmp_cache))
        return load_encoder(BUILTIN_TINY)


@pytest.fixture(scope="module")
def e5():
    """The real default encoder, from the user's cache (built there on first use)."""
    return load_encoder(BUILTIN_E5)


# ----------------------------------------------------------------------------- Q4_0
def test_dequantize_q4_0_matches_per_value_reference():
    raw = q4_block(0.5, list(range(16)), [15 - j for j in range(16)])
    raw += q4_block(-0.125, [8] * 8 + [0] * 8, [j % 3 + 7 for j in range(16)])
    expected = reference_dequantize(raw)
    got = dequantize_q4_0(raw, 64)
    assert got.dtype == np.float32
    assert got.tolist() == expected
    assert got[:3].tolist() == [-4.0, -3.5, -3.0]  # low nibbles 0, 1, 2 at scale 0.5
    assert got[16:18].tolist() == [3.5, 3.0]  # high nibbles 15, 14 come after all 16 lows


def test_dequantize_q4_0_rejects_wrong_count():
    with pytest.raises(ValueError):
        dequantize_q4_0(q4_block(1.0, [0] * 16, [0] * 16), 64)


def test_missing_package_names_the_install_command():
    with pytest.raises(UserError, match=INSTALL_HINT.replace(".", r"\.")):
        package_file("hybridray_no_such_package", "weights.bin")


# ----------------------------------------------------------------------------- e5
@pytest.mark.encoder
@pytest.mark.parametrize(
    "query, positive, negative",
    CROSS_LINGUAL_TRIPLES,
    ids=["es-berlin", "es-capital", "de", "zh-berlin", "zh-cats"],
)
def test_e5_matches_across_languages(e5, query, positive, negative):
    query_prefix, passage_prefix = default_prefixes(BUILTIN_E5)
    texts = [query_prefix + query, passage_prefix + positive, passage_prefix + negative]
    q, pos, neg = embed(*e5, texts)
    assert q @ pos > q @ neg + 0.05


@pytest.mark.encoder
def test_e5_shape_and_no_pooler(e5):
    model, _ = e5
    assert model.config.hidden_size == 384 and model.config.num_hidden_layers == 12
    assert model.config.vocab_size == 250_037 and model.config.layer_norm_eps == 1e-12
    assert model.pooler is None


@pytest.mark.encoder
def test_sentence_transformers_loads_the_same_model(e5):
    from sentence_transformers import SentenceTransformer

    texts = ["¿Cuál es la capital de Alemania?", "德国的首都是哪里？"]
    ours = embed(*e5, ["query: " + t for t in texts])
    st_model = SentenceTransformer(resolve_model_path(BUILTIN_E5), device="cpu")
    theirs = st_model.encode(texts, prompt_name="query", convert_to_tensor=True)
    assert F.cosine_similarity(ours, theirs).min() > 0.9999


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_knows_words_and_pads_with_1(tiny):
    _, tokenizer = tiny
    assert tokenizer.pad_token_id == 1
    assert tokenizer.model_max_length == 128
    for word in ["Berlin", "capital", "Hauptstadt", "首都"]:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert ids and tokenizer.unk_token_id not in ids, word
    batch = tokenizer(["a", "a longer sentence"], padding=True)
    assert batch["input_ids"][0][-1] == 1


# ----------------------------------------------------------------------------- tiny
def test_tiny_model_pools_to_64_dims(tiny):
    model, tokenizer = tiny
    assert model.config.vocab_size == 250_037 and model.pooler is None
    vectors = embed(model, tokenizer, ["hola", "a somewhat longer English sentence", "你好"])
    assert vectors.shape == (3, 64)
    assert torch.isfinite(vectors).all()


def test_tiny_model_is_deterministic_and_keeps_rng():
    from hybridray.models.tiny import tiny_model

    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = tiny_model().embeddings.word_embeddings.weight
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(first, tiny_model().embeddings.word_embeddings.weight)


# ----------------------------------------------------------------------------- cache
def test_builtin_is_built_once(use_tmp_cache, tiny):
    path = resolve_model_path(BUILTIN_TINY)
    assert path == str(use_tmp_cache / "models" / "tiny-random")
    weights = use_tmp_cache / "models" / "tiny-random" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert resolve_model_path(BUILTIN_TINY) == path
    assert weights.stat().st_mtime_ns == mtime


def test_interrupted_build_leaves_nothing(use_tmp_cache):
    def failing_build(directory):
        (directory / "half-written").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_build("interrupted", failing_build)
    leftovers = [p.name for p in (use_tmp_cache / "models").iterdir() if "interrupted" in p.name]
    assert leftovers == [".interrupted.lock"]


def test_other_names_pass_through_unchanged(tmp_path):
    assert resolve_model_path("intfloat/multilingual-e5-small") == "intfloat/multilingual-e5-small"
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(UserError, match="builtin:tiny"):
        resolve_model_path("builtin:nope")


@pytest.mark.parametrize(
    "name, expected",
    [
        (BUILTIN_E5, ("query: ", "passage: ")),
        ("intfloat/multilingual-e5-small", ("query: ", "passage: ")),
        ("intfloat/E5-base-v2", ("query: ", "passage: ")),
        (BUILTIN_TINY, ("", "")),
        ("sentence-transformers/LaBSE", ("", "")),
    ],
)
def test_default_prefixes(name, expected):
    assert default_prefixes(name) == expected
