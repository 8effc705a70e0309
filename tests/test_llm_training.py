"""A decoder LLM embedder trained the way a 7B-34B run is: LoRA on a frozen base, ZeRO-3
parameter partitioning (the model loaded straight into partitions), activation checkpointing,
gathered negatives with hard negatives, translation masking and the symmetric loss -- on
``builtin:tiny-decoder`` (random 2-layer Mistral, XLM-R tokenizer), 2 CPU processes against 1.

Per case, both runs train ``STEPS`` steps on the same global batch. Checked: the loss falls,
only adapter weights move, gradients and weights match the 1-process run (the equivalence of
``tests/test_distributed_equivalence.py``), CPU offload of optimizer state and parameters
changes nothing, and the exported model (adapter merged) loads in sentence-transformers with
the training-time encoder's embeddings.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from hybridray.config import build_config
from hybridray.distributed import all_reduce_mean, init_process_group

from conftest import spawn_one_and_two
from test_distributed_equivalence import assert_same_tensors

STEPS = 3
PAIRS = [
    ("Wie viele Einwohner hat Berlin?", "Berlin hat etwa 3,7 Millionen Einwohner."),
    ("How many people live in Berlin?", "Berlin has a population of about 3.7 million."),
    ("¿Cuál es la montaña más alta?", "El Everest es la montaña más alta de la Tierra."),
    ("Wer schrieb Faust?", "Faust ist ein Drama von Johann Wolfgang von Goethe."),
    ("¿Cuántos habitantes tiene Berlín?", "Berlín tiene unos 3,7 millones de habitantes."),
    ("What do cats eat?", "Cats are obligate carnivores and need meat."),
    ("Quand a été signé le traité de Versailles ?", "Le traité de Versailles fut signé en 1919."),
    ("What is photosynthesis?", "Photosynthesis turns light into chemical energy in plants."),
]
NEGATIVES = [  # one hard negative per query, query-major
    "Hamburg ist die zweitgrößte Stadt Deutschlands.", "Munich is the capital of Bavaria.",
    "El Aconcagua es la montaña más alta de América.", "Schiller schrieb Die Räuber.",
    "Madrid es la capital de España.", "Dogs are omnivores.",
    "Le traité de Rome fut signé en 1957.", "Respiration releases energy from sugar.",
]
GROUPS = [0, 0, 1, 2, 0, 3, 4, 5]  # pairs 0, 1, 4 are translations of one question (across ranks)
NEGATIVE_GROUPS = [10, 11, 12, 13, 14, 15, 16, 17]
PROBES = ["Berlin ist die Hauptstadt Deutschlands.", "Los gatos comen carne.", "Plants need light."]

CASES = {
    "zero3": {"deepspeed": {"zero_stage": 3}},
    "zero3_offload": {"deepspeed": {"zero_stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu"}},
    # bf16 as on GPU (DeepSpeed runs it on CPU too): weights loaded in bf16, fp32 master copy
    "zero3_bf16": {"deepspeed": {"zero_stage": 3, "bf16": True}},
}
FP32_CASES = ("zero3", "zero3_offload")


def run_config(world: int, sections: dict):
    tree = {
        "model": {
            "name_or_path": "builtin:tiny-decoder", "pooling": "last", "activation_checkpointing": True,
            "max_query_length": 32, "max_passage_length": 32,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"},
        },
        "sampler": {"batch_size": len(PAIRS)},
        "scaling": {"num_workers": world},
        "loss": {"temperature": 0.05, "symmetric": True, "mask_same_group": True, "hard_negatives": 1},
        "optim": {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant", "grad_clip": 1.0, "weight_decay": 0.01},
        "train": {"max_steps": STEPS},
        **sections,
    }
    return build_config(tree)


def global_batch(tokenizer):
    def tok(texts):
        out = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        return out["input_ids"], out["attention_mask"]

    q_ids, q_mask = tok([q for q, _ in PAIRS])
    p_ids, p_mask = tok([p for _, p in PAIRS])
    n_ids, n_mask = tok(NEGATIVES)
    return dict(
        query_input_ids=q_ids, query_attention_mask=q_mask,
        passage_input_ids=p_ids, passage_attention_mask=p_mask,
        negative_input_ids=n_ids, negative_attention_mask=n_mask,
        group_ids=torch.tensor(GROUPS), negative_group_ids=torch.tensor(NEGATIVE_GROUPS),
    )


def _full_state(engine) -> dict:
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().clone() for name, p in params.items()}


def _worker(index, ports, outputs):
    """Processes 0-1: the 2-process run; process 2: the 1-process reference."""
    from deepspeed.utils import safe_get_full_grad

    from hybridray.data.tokenize import prefixes
    from hybridray.engine import TrainingModel, build_engine
    from hybridray.train import full_weights

    torch.set_num_threads(1)
    world, rank = (2, index) if index < 2 else (1, 0)
    init_process_group(rank, world, ports[world], "gloo")
    results = {}
    for name, sections in CASES.items():
        config = run_config(world, sections)
        torch.manual_seed(config.seed)  # as train_func: LoRA's A matrices start equal everywhere
        model = TrainingModel.from_config(config)  # through zero3_loading: loaded as partitions
        tokenizer = model.encoder.tokenizer
        base = [p for n, p in model.named_parameters() if "lora_" not in n]
        partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in base)  # never materialised whole
        engine = build_engine(model, config, world)
        batch = global_batch(tokenizer)
        local = {k: v.chunk(world)[rank] for k, v in batch.items()}  # contiguous pairs, query-major negatives
        before, losses, grads = _full_state(engine), [], []
        trainable = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
        for step in range(STEPS):
            loss = engine(**local)
            engine.backward(loss)
            if step < 2:
                grads.append({n: safe_get_full_grad(p).detach().clone() for n, p in trainable.items()})
            engine.step()
            losses.append(all_reduce_mean(loss).item())
        after = _full_state(engine)

        engine.module.eval()
        probe = tokenizer(PROBES, padding=True, return_tensors="pt")
        with torch.no_grad():  # every rank: a ZeRO-3 forward gathers layer by layer, collectively
            embeddings = engine.module.encoder.encode(probe["input_ids"], probe["attention_mask"])
        export = outputs[world].parent / f"export-{world}-{name}"
        with full_weights(engine, config):  # as train._export_final does
            if rank == 0:
                query_prefix, passage_prefix = prefixes(config.model)
                engine.module.encoder.save_pretrained(
                    export / "model", tokenizer, prompts={"query": query_prefix, "passage": passage_prefix},
                    adapter_directory=export / "adapter",
                )
        results[name] = dict(losses=losses, grads=grads, before=before, after=after,
                             embeddings=embeddings, export=str(export), partitioned=partitioned,
                             dtype=next(engine.module.parameters()).dtype,
                             trainable=sorted(trainable))
        dist.barrier()
    if rank == 0:
        torch.save(results, outputs[world])
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(1-process results, 2-process results), each {case: ...}."""
    return spawn_one_and_two(_worker, tmp_path_factory.mktemp("llm"), ("single.pt", "double.pt"))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("world", [1, 2])
def test_loss_falls_and_only_adapters_move(runs, case, world):
    result = runs[world - 1][case]
    assert result["partitioned"]  # ZeRO-3 partitioned the base at load (zero.Init)
    losses = result["losses"]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    before, after = result["before"], result["after"]
    adapters = {n for n in before if "lora_" in n}
    assert adapters and set(result["trainable"]) == adapters  # base frozen, nothing else trains
    for name in before:
        if name in adapters:
            assert not torch.equal(before[name], after[name]), f"{name} did not train"
        else:
            assert torch.equal(before[name], after[name]), f"frozen {name} moved"


@pytest.mark.parametrize("case", FP32_CASES)
def test_two_processes_match_one(runs, case):
    single, double = runs[0][case], runs[1][case]
    assert double["losses"] == pytest.approx(single["losses"], rel=1e-5)
    for step in range(2):
        assert_same_tensors(double["grads"][step], single["grads"][step], 1e-5)
    # teeth: after one update (B no longer zero) every adapter matrix receives gradient
    assert all(g.abs().max() > 0 for g in single["grads"][1].values())
    assert_same_tensors(double["after"], single["after"], 1e-5)


def test_cpu_offload_changes_nothing(runs):
    """Optimizer state and parameters offloaded to CPU: the same trajectory as without."""
    for world in (1, 2):
        on, off = runs[world - 1]["zero3_offload"], runs[world - 1]["zero3"]
        assert on["losses"] == pytest.approx(off["losses"], rel=1e-5)
        assert_same_tensors(on["after"], off["after"], 1e-5)


def test_bf16_follows_the_fp32_trajectory(runs):
    for world in (1, 2):
        bf16, fp32 = runs[world - 1]["zero3_bf16"], runs[world - 1]["zero3"]
        assert bf16["dtype"] == torch.bfloat16 and fp32["dtype"] == torch.float32
        assert bf16["losses"] == pytest.approx(fp32["losses"], rel=0.05)


@pytest.mark.parametrize("case", FP32_CASES)
def test_export_loads_in_sentence_transformers_with_training_embeddings(runs, case):
    from pathlib import Path

    from sentence_transformers import SentenceTransformer

    result = runs[1][case]
    export = Path(result["export"])
    st = SentenceTransformer(str(export / "model"), device="cpu")
    got = torch.as_tensor(st.encode(PROBES, convert_to_numpy=True))
    torch.testing.assert_close(got, result["embeddings"], rtol=0, atol=1e-5)
    prompts = json.loads((export / "model" / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts["query"].startswith("Instruct: ") and prompts["passage"] == ""
    assert json.loads((export / "adapter" / "adapter_config.json").read_text())["r"] == 4
    # the merged export is the trained model, not the base
    assert not torch.allclose(got, _base_embeddings(), atol=1e-3)


def _base_embeddings() -> torch.Tensor:
    from hybridray.models import BUILTIN_TINY_DECODER
    from hybridray.models.encoder import DualEncoder

    encoder = DualEncoder.from_pretrained(BUILTIN_TINY_DECODER, pooling="last").eval()
    probe = encoder.tokenizer(PROBES, padding=True, return_tensors="pt")
    with torch.no_grad():
        return encoder.encode(probe["input_ids"], probe["attention_mask"])
