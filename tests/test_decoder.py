"""Decoder LLM backbones in one process: the tokenizer recipe (EOS appended, pad token, padding
side) shared by the pipeline, evaluation and export; last-token pooling under left and right
padding; instruction prompts; bidirectional attention; LoRA export (merged model in
sentence-transformers, adapter alone in peft) -- all on ``builtin:tiny-decoder``, a random
2-layer Mistral built locally with the XLM-R tokenizer."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from hybridray.config import build_config
from hybridray.errors import UserError
from hybridray.models import (
    BUILTIN_TINY,
    BUILTIN_TINY_DECODER,
    default_pooling,
    default_prefixes,
    load_encoder,
    pool,
)
from hybridray.models.decoder import DEFAULT_DECODER_PROMPTS, PUBLISHED_PROMPTS, is_decoder
from hybridray.models.encoder import DualEncoder

TEXTS = [
    "Berlin is the capital and largest city of Germany.",
    "¿Cuántos habitantes tiene Berlín?",
    "猫吃什么？",
    "Mount Everest is Earth's highest mountain above sea level, at 8,849 metres, on the border.",
]


def model_config(**model):
    return build_config({"model": {"name_or_path": BUILTIN_TINY_DECODER, "pooling": "last", **model}}).model


def tokens(tokenizer, texts=TEXTS, **kwargs):
    return tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt", **kwargs)


@pytest.fixture(scope="module")
def loaded():
    """(tiny decoder, its tokenizer with the recipe applied), loaded once (~3 s a load)."""
    return load_encoder(BUILTIN_TINY_DECODER)


def encoder_from(loaded, **model):
    """A training encoder as ``DualEncoder.from_config`` builds it, on a copy of the loaded
    decoder (its own tokenizer copy too, so padding sides can differ)."""
    model_module, tokenizer = loaded
    encoder = DualEncoder.from_config(model_config(**model), copy.deepcopy(model_module))
    encoder.tokenizer = copy.deepcopy(tokenizer)
    return encoder


# ----------------------------------------------------------------------------- tokenizer
def test_decoder_tokenizer_appends_eos_and_keeps_it_under_truncation(loaded):
    _, tokenizer = loaded
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    plain = tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    assert tokenizer(TEXTS[0])["input_ids"] == [bos, *plain, eos]  # Llama's BOS kept, EOS added
    truncated = tokenizer(TEXTS[3], truncation=True, max_length=8)["input_ids"]
    assert len(truncated) == 8 and truncated[-1] == eos and truncated[0] == bos
    # the raw checkpoint does not append it (like a hub Mistral): the recipe did
    from transformers import AutoTokenizer

    from hybridray.models import resolve_model_path

    raw = AutoTokenizer.from_pretrained(resolve_model_path(BUILTIN_TINY_DECODER))
    assert raw(TEXTS[0])["input_ids"] == [bos, *plain]
    # opting out, and encoders untouched
    _, no_eos = load_encoder(BUILTIN_TINY_DECODER, append_eos=False)
    assert no_eos(TEXTS[0])["input_ids"] == [bos, *plain]
    _, encoder_tok = load_encoder(BUILTIN_TINY)
    assert encoder_tok(TEXTS[0])["input_ids"][0] == encoder_tok.cls_token_id


def test_pipeline_tokenises_like_the_model_tokenizer_on_both_padding_sides():
    """The Ray Data tasks tokenise with the raw ``tokenizers`` backend: same ids, EOS and
    padding side as the HF tokenizer the model and the export use."""
    from hybridray.data.tokenize import encode, load_tokenizer, tokenizer_spec

    for side in ("left", "right"):
        spec = tokenizer_spec(BUILTIN_TINY_DECODER, padding_side=side)
        assert spec.pad_left == (side == "left")
        ids, mask = encode(spec, TEXTS, "Query: ", 12)
        hf = load_tokenizer(BUILTIN_TINY_DECODER, None, side)(
            ["Query: " + t for t in TEXTS], truncation=True, max_length=12, padding="longest",
            return_tensors="np",
        )
        assert (ids == hf["input_ids"]).all() and (mask == hf["attention_mask"]).all()
        last = ids[:, -1] if side == "left" else ids[range(len(ids)), mask.sum(1) - 1]
        assert (last == 2).all()  # </s>


def test_is_decoder_tells_causal_lms_from_encoders():
    from transformers import AutoConfig

    assert is_decoder(AutoConfig.for_model("mistral")) and is_decoder(AutoConfig.for_model("qwen2"))
    assert is_decoder(AutoConfig.for_model("llama")) and is_decoder(AutoConfig.for_model("gemma2"))
    # BERT-family models have a causal-LM head class too; they are still encoders
    assert not is_decoder(AutoConfig.for_model("bert")) and not is_decoder(AutoConfig.for_model("xlm-roberta"))


def test_instruction_prompts_by_family():
    assert default_prefixes(BUILTIN_TINY_DECODER) == DEFAULT_DECODER_PROMPTS
    assert DEFAULT_DECODER_PROMPTS[0].startswith("Instruct: ") and DEFAULT_DECODER_PROMPTS[0].endswith("\nQuery: ")
    e5_mistral = default_prefixes("intfloat/e5-mistral-7b-instruct")  # not the E5 "query: " rule
    assert e5_mistral == PUBLISHED_PROMPTS["e5-mistral"] and e5_mistral[0].startswith("Instruct: ")
    assert default_prefixes("Qwen/Qwen3-Embedding-8B")[0].endswith("\nQuery:")
    assert default_prefixes("intfloat/multilingual-e5-small") == ("query: ", "passage: ")
    assert default_pooling(BUILTIN_TINY_DECODER) == "last" == default_pooling("01-ai/Yi-34B")
    assert default_pooling(BUILTIN_TINY) == "mean" == default_pooling("xlm-roberta-base")


# ----------------------------------------------------------------------------- pooling
def test_last_token_pooling_reads_the_mask_not_the_padding_side():
    hidden = torch.arange(2 * 5 * 3, dtype=torch.float).reshape(2, 5, 3)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert torch.equal(pool(hidden, right, "last"), hidden[[0, 1], [2, 4]])
    assert torch.equal(pool(hidden, left, "last"), hidden[[0, 1], [4, 4]])
    single = torch.tensor([[1, 0, 0, 0, 0], [0, 0, 0, 0, 1]])
    assert torch.equal(pool(hidden, single, "last"), hidden[[0, 1], [0, 4]])


def test_decoder_embeddings_identical_under_left_and_right_padding(loaded):
    """Same texts, left- vs right-padded batches, vs each text alone (no padding at all)."""
    embeddings = {}
    encoder = encoder_from(loaded).eval()
    for side in ("left", "right"):
        encoder.tokenizer.padding_side = side
        batch = tokens(encoder.tokenizer)
        assert (batch["attention_mask"][:, 0 if side == "left" else -1] == 0).any()  # really padded
        with torch.no_grad():
            embeddings[side] = encoder.encode(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        alone = torch.cat([
            encoder.encode(b["input_ids"], b["attention_mask"])
            for b in (tokens(encoder.tokenizer, [t]) for t in TEXTS)
        ])
    torch.testing.assert_close(embeddings["left"], embeddings["right"], rtol=0, atol=2e-6)
    torch.testing.assert_close(embeddings["right"], alone, rtol=0, atol=2e-6)
    assert embeddings["left"].shape == (len(TEXTS), 64)
    assert (embeddings["left"] @ embeddings["left"].T).fill_diagonal_(0).abs().max() < 0.999  # distinct


def test_evaluation_encoder_matches_the_training_encoder_for_decoders(loaded):
    """``evaluate.encode.encode_texts`` (held-out eval, ``hybridray eval``) pads per sorted batch;
    it must give the training encoder's embeddings."""
    from hybridray.evaluate.encode import encode_texts

    encoder = encoder_from(loaded).eval()
    encoder.tokenizer.padding_side = "left"
    got = encode_texts(encoder.model, encoder.tokenizer, TEXTS, prefix="q: ", pooling="last",
                       batch_size=3, progress=False)
    batch = tokens(encoder.tokenizer, ["q: " + t for t in TEXTS])
    with torch.no_grad():
        want = encoder.encode(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(torch.as_tensor(got), want, rtol=0, atol=2e-6)


# ----------------------------------------------------------------------------- attention
def test_bidirectional_attention_is_transformers_is_causal_switch(tmp_path, loaded):
    ids = torch.tensor([[0, 500, 600, 700, 2]])
    changed = ids.clone()
    changed[0, 3] = 900

    def first_token(model, x):
        with torch.no_grad():
            return model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state[0, 0]

    causal, _ = loaded
    assert torch.equal(first_token(causal, ids), first_token(causal, changed))  # cannot see ahead
    both, _ = load_encoder(BUILTIN_TINY_DECODER, bidirectional=True)
    assert not torch.allclose(first_token(both, ids), first_token(both, changed))  # sees ahead
    assert both.config.is_causal is False
    # exported and reloaded: the switch travels in config.json
    DualEncoder(both, "last").save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["is_causal"] is False
    from transformers import AutoModel

    reloaded = AutoModel.from_pretrained(tmp_path)
    torch.testing.assert_close(first_token(reloaded, changed), first_token(both, changed))
    with pytest.raises(UserError, match="model.bidirectional"):
        load_encoder(BUILTIN_TINY, bidirectional=True)


# ----------------------------------------------------------------------------- LoRA + export
def lora_encoder(loaded, **lora):
    torch.manual_seed(0)
    encoder = encoder_from(
        loaded, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], **lora},
        activation_checkpointing=True,
    )
    with torch.no_grad():  # B starts at zero: give the adapters something to merge
        for name, param in encoder.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return encoder.eval()


def test_lora_freezes_the_base_and_adapts_only_the_named_modules(loaded):
    encoder = lora_encoder(loaded)
    trainable = {n for n, p in encoder.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert adapted == {"q_proj", "v_proj", "down_proj"}
    assert sum(p.numel() for n, p in encoder.named_parameters() if n in trainable) == 2 * 4 * (
        (64 + 64) + (64 + 32) + (128 + 64)  # per layer: q 64->64, v 64->32 (GQA), down 128->64
    )
    with pytest.raises(UserError, match="model.lora.target_modules.*q_proj"):
        encoder_from(loaded, lora={"target_modules": ["query"]})


def test_lora_export_merges_into_a_sentence_transformers_model(tmp_path, loaded):
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    encoder = lora_encoder(loaded)
    query_prompt = DEFAULT_DECODER_PROMPTS[0]
    encoder.save_pretrained(tmp_path / "model", prompts={"query": query_prompt, "passage": ""},
                            adapter_directory=tmp_path / "adapter")
    batch = tokens(encoder.tokenizer, [query_prompt + t for t in TEXTS])
    with torch.no_grad():
        want = encoder.encode(batch["input_ids"], batch["attention_mask"])

    # merged: plain transformers weights, no adapter keys, loaded by sentence-transformers
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "mistral"
    from safetensors import safe_open

    with safe_open(tmp_path / "model" / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora" in k or "base_layer" in k]
    st = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    assert st.tokenizer(TEXTS[0])["input_ids"][-1] == encoder.tokenizer.eos_token_id
    got = torch.as_tensor(st.encode(TEXTS, prompt_name="query", convert_to_numpy=True))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert default_prefixes(str(tmp_path / "model")) == (query_prompt, "")
    assert default_pooling(str(tmp_path / "model")) == "last"  # what `hybridray eval` will use

    # the adapter alone, on the untouched base
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and set(adapter_config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    from hybridray.models import resolve_model_path

    base = AutoModel.from_pretrained(resolve_model_path(BUILTIN_TINY_DECODER))
    reloaded = DualEncoder(PeftModel.from_pretrained(base, str(tmp_path / "adapter")), "last").eval()
    with torch.no_grad():
        again = reloaded.encode(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(again, want, rtol=0, atol=1e-5)
    # the training encoder is still a LoRA model (export worked on a copy)
    assert any("lora_A" in n for n, _ in encoder.named_parameters())


def test_activation_checkpointing_gives_the_same_gradients(loaded):
    def grads(checkpointing):
        torch.manual_seed(0)
        encoder = encoder_from(
            loaded, activation_checkpointing=checkpointing, lora={"r": 4, "target_modules": "all-linear"})
        with torch.no_grad():
            for name, param in encoder.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
        encoder.train()
        batch = tokens(encoder.tokenizer)
        encoder.encode(batch["input_ids"], batch["attention_mask"]).pow(3).sum().backward()
        return {n: p.grad for n, p in encoder.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and all(g.abs().max() > 0 for g in plain.values())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)
    with pytest.raises(UserError, match="activation_checkpointing"):
        from torch import nn

        DualEncoder.from_config(model_config(activation_checkpointing=True), nn.Linear(2, 2))
