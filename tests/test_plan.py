"""``hybridray plan``: parameter counts against published model sizes, model-state memory
against DeepSpeed's own ZeRO estimators (tiny decoder, Mistral-7B and Yi-34B shapes), the
activation formula against the tensors PyTorch really saves for the backward pass, the CLI as a
user runs it, and the README's 7B/34B table as the command prints it today."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch

from hybridray.config import build_config
from hybridray.errors import UserError
from hybridray.plan import GiB, format_plan, model_shape, plan, plan_grid, stored_token_bytes

from conftest import REPO

HYBRIDRAY = shutil.which("hybridray", path=str(REPO / ".venv" / "bin")) or shutil.which("hybridray")
MISTRAL_7B, YI_34B = "intfloat/e5-mistral-7b-instruct", "01-ai/Yi-34B"
#: Published totals (with the LM head) and the head's size: vocab x hidden.
PUBLISHED_TOTALS = {
    MISTRAL_7B: (7_241_732_096, 32000 * 4096),  # Mistral-7B-v0.1
    YI_34B: (34_388_917_248, 64000 * 7168),
    "codellama/CodeLlama-34b-hf": (33_743_970_304, 32000 * 8192),
}


def config(name, world=8, stage=3, lora=None, freeze_embeddings=False, offload=(), **sections):
    tree = {
        "model": {"name_or_path": name, "pooling": "last", "lora": lora,
                  "freeze_embeddings": freeze_embeddings, **sections.pop("model", {})},
        "sampler": {"batch_size": 8 * world},
        "scaling": {"num_workers": world, "use_gpu": True},
        "deepspeed": {"zero_stage": stage, **{f"offload_{k}": "cpu" for k in offload}},
        **sections,
    }
    return build_config(tree)


def deepspeed_estimate(stage, total, largest, world, gpus_per_node, offload):
    """DeepSpeed's estimator called as its ``_all_cold`` entry points do."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    nodes = world // gpus_per_node
    if stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total, largest, gpus_per_node, nodes, cpu_offload="optimizer" in offload,
            cpu_offload_params="param" in offload, zero_init=True)
    else:
        cpu, gpu = estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes, cpu_offload="optimizer" in offload)
    return gpu, cpu


def model_state_bytes(p):
    return p.parameters + p.gathered_layer + p.gradients + p.optimizer


# ----------------------------------------------------------------------------- counts
@pytest.mark.parametrize("name", PUBLISHED_TOTALS)
def test_parameter_counts_are_the_published_ones(name):
    total, head = PUBLISHED_TOTALS[name]
    shape = model_shape(config(name).model)
    assert shape.total_params == total - head  # the embedder drops the LM head
    assert shape.trainable_params == shape.total_params
    assert shape.largest_layer_params == head  # the input embedding table, same size as the head


def test_lora_counts_only_the_adapters():
    shape = model_shape(config(MISTRAL_7B, lora={"r": 16, "target_modules": "all-linear"}).model)
    h, kv, inter = 4096, 1024, 14336
    per_block = 16 * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + inter) + (inter + h))  # q k v o gate up down
    assert shape.trainable_params == 32 * per_block == 41_943_040
    assert shape.total_params == 7_110_660_096 + shape.trainable_params
    assert shape.lora_modules_per_layer == 7 and not shape.norms_trainable
    frozen = model_shape(config(MISTRAL_7B, freeze_embeddings=True).model)
    assert frozen.trainable_params == 7_110_660_096 - 32000 * 4096


# ----------------------------------------------------------------------------- model states
STATE_CASES = [(3, ()), (3, ("optimizer",)), (3, ("optimizer", "param")), (2, ()), (2, ("optimizer",))]


@pytest.mark.parametrize("stage,offload", STATE_CASES)
def test_tiny_decoder_model_states_are_deepspeeds_estimate(stage, offload):
    """DeepSpeed counts the real (materialised) tiny decoder itself: ``model_to_params``."""
    from deepspeed.runtime.zero.stage3 import model_to_params

    from hybridray.models.encoder import DualEncoder

    cfg = config("builtin:tiny-decoder", world=2, stage=stage, offload=offload)
    total, largest = model_to_params(DualEncoder.from_config(cfg.model))
    p = plan(cfg, gpus_per_node=2)
    assert (p.shape.total_params, p.shape.largest_layer_params) == (total, largest)
    gpu, cpu = deepspeed_estimate(stage, total, largest, 2, 2, offload)
    assert model_state_bytes(p) == pytest.approx(gpu, abs=2)  # DeepSpeed truncates to int
    assert p.cpu_per_node == pytest.approx(cpu if offload else 0, abs=2)


@pytest.mark.parametrize("stage,offload", STATE_CASES)
@pytest.mark.parametrize("name,world,gpus_per_node", [(MISTRAL_7B, 8, 8), (YI_34B, 8, 8), (YI_34B, 16, 8)])
def test_7b_and_34b_model_states_are_deepspeeds_estimate(name, world, gpus_per_node, stage, offload):
    total, head = PUBLISHED_TOTALS[name]
    p = plan(config(name, world=world, stage=stage, offload=offload), gpus_per_node=gpus_per_node)
    gpu, cpu = deepspeed_estimate(stage, total - head, head, world, gpus_per_node, offload)
    assert model_state_bytes(p) == pytest.approx(gpu, abs=2)
    assert p.cpu_per_node == pytest.approx(cpu if offload else 0, abs=2)
    assert p.deepspeed_gpu == pytest.approx(gpu, abs=2)


def test_frozen_weights_add_only_their_16_bit_copy():
    """LoRA: DeepSpeed's estimate for the adapters + 2 bytes per frozen weight, partitioned."""
    p = plan(config(YI_34B, lora={"r": 16}))
    s = p.shape
    gpu, _ = deepspeed_estimate(3, s.trainable_params, s.largest_layer_params, 8, 8, ())
    frozen = s.total_params - s.trainable_params
    assert model_state_bytes(p) == pytest.approx(gpu + 2 * frozen / 8, abs=2)
    full = plan(config(YI_34B))
    assert model_state_bytes(full) / GiB > 70 > model_state_bytes(p) / GiB  # full fine-tuning needs offload


# ----------------------------------------------------------------------------- activations
def saved_tensor_bytes(model, ids) -> int:
    """Bytes of the distinct tensors autograd saves for backward (parameters excluded), in a
    forward as ``DualEncoder.encode`` runs it (positions from the mask)."""
    from hybridray.models.decoder import position_inputs

    mask = torch.ones_like(ids)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask, **position_inputs(model, mask)).last_hidden_state.sum()
    return sum(seen.values())


@pytest.fixture(scope="module")
def wider_decoder(tmp_path_factory):
    """A second decoder shape (config only): other widths, head counts and depth."""
    from transformers import MistralConfig

    directory = tmp_path_factory.mktemp("wider-decoder")
    MistralConfig(vocab_size=1000, hidden_size=96, intermediate_size=320, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=3, sliding_window=None).save_pretrained(directory)
    return str(directory)


def measured_and_planned(name, checkpointing=False, batch=3, length=20, **model):
    """(bytes autograd saves in a bf16 forward of ``name`` built as training builds it,
    the plan's ``stored_token_bytes`` for the same tokens) -- unpadded, so k/v keep their
    grouped width; the whole model in bf16 as DeepSpeed runs it, adapters included."""
    from transformers import AutoModel

    from hybridray.models.encoder import DualEncoder
    from hybridray.plan import plan_model_config

    cfg = config(name, model={"activation_checkpointing": checkpointing, **model.pop("model", {})}, **model)
    shape = model_shape(cfg.model)
    torch.manual_seed(0)
    encoder = DualEncoder.from_config(cfg.model, AutoModel.from_config(plan_model_config(name)))
    measured = saved_tensor_bytes(encoder.model.to(torch.bfloat16).train(), torch.randint(5, 1000, (batch, length)))
    kv_width = shape.kv_heads * shape.head_dim
    return measured, batch * length * stored_token_bytes(shape, 2, checkpointing, kv_width), shape


TRAINING_MODES = {
    "full": {},
    "full_frozen_embeddings": {"freeze_embeddings": True},
    "lora": {"lora": {"r": 8, "target_modules": "all-linear"}},
    "lora_attention_only": {"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
}


@pytest.mark.parametrize("mode", TRAINING_MODES)
@pytest.mark.parametrize("decoder", ["builtin:tiny-decoder", "wider"])
def test_activation_bytes_are_what_autograd_saves(decoder, mode, wider_decoder):
    measured, planned, _ = measured_and_planned(wider_decoder if decoder == "wider" else decoder,
                                                **TRAINING_MODES[mode])
    assert measured == pytest.approx(planned, rel=0.01)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_activation_checkpointing_keeps_only_block_inputs(mode):
    """Checkpointed, autograd saves nothing inside the blocks: only each block's input (saved by
    the checkpoint itself) and the tensors outside them. The rotary cos/sin are held by the
    checkpoint's closure instead, which saved-tensor hooks cannot see: added back here."""
    measured, planned, shape = measured_and_planned("builtin:tiny-decoder", checkpointing=True,
                                                    **TRAINING_MODES[mode])
    rotary = 60 * 2 * 2 * shape.head_dim
    assert measured + rotary == pytest.approx(planned, rel=0.01)
    plain, _, _ = measured_and_planned("builtin:tiny-decoder", **TRAINING_MODES[mode])
    assert measured < plain / 3


def test_activations_scale_with_batch_lengths_and_negatives():
    base = plan(config(MISTRAL_7B, lora={"r": 16}, model={"activation_checkpointing": True}))
    longer = plan(config(MISTRAL_7B, lora={"r": 16}, model={"activation_checkpointing": True,
                                                            "max_passage_length": 192}))
    bigger = plan(build_config({**_tree(MISTRAL_7B), "sampler": {"batch_size": 128}}))
    negatives = plan(config(MISTRAL_7B, lora={"r": 16}, model={"activation_checkpointing": True},
                            loss={"hard_negatives": 1}))
    assert base.micro_batch == 8 and bigger.micro_batch == 16
    assert longer.activations > base.activations and negatives.activations > base.activations
    assert bigger.activations == pytest.approx(2 * base.activations, rel=0.01)
    assert model_state_bytes(bigger) == model_state_bytes(base)


def test_gradient_caching_plans_one_chunk_and_the_teacher_adds_its_weights():
    """Gradient caching: activations of one chunk, whatever the batch (bounded memory); the
    distillation teacher: the weights of a second, frozen model (ZeRO-3 partitions them)."""
    levers = {"activation_checkpointing": True}
    base = plan(config(MISTRAL_7B, lora={"r": 16}, model=levers))
    cached = plan(config(MISTRAL_7B, lora={"r": 16}, model=levers, loss={"cache_chunk_size": 2}))
    tree = _tree(MISTRAL_7B)
    bigger = plan(build_config({**tree, "sampler": {"batch_size": 512}, "loss": {"cache_chunk_size": 2}}))
    assert cached.activations < base.activations / 3
    assert bigger.micro_batch == 64 and bigger.activations < base.activations  # 8x the batch, less memory
    assert model_state_bytes(cached) == model_state_bytes(base)
    teacher = plan(config(MISTRAL_7B, lora={"r": 16}, model=levers, loss={"distill_weight": 0.5}))
    frozen_copy = 2 * (base.shape.total_params - base.shape.trainable_params) / base.world_size
    assert teacher.parameters - base.parameters == pytest.approx(frozen_copy, rel=1e-6)
    assert "gradient caching (2 texts per pass)" in format_plan(cached, config(MISTRAL_7B, loss={"cache_chunk_size": 2}))


def _tree(name):
    return {"model": {"name_or_path": name, "pooling": "last", "lora": {"r": 16},
                      "activation_checkpointing": True},
            "scaling": {"num_workers": 8, "use_gpu": True}, "deepspeed": {"zero_stage": 3}}


# ----------------------------------------------------------------------------- CLI
def run(*args):
    """``hybridray`` as a user runs it (a fresh process: its stdout must be the plan alone)."""
    return subprocess.run([HYBRIDRAY, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def plan_cli(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """``hybridray plan ARGS`` in this process (the imports are already paid for)."""
    from hybridray.cli import main

    monkeypatch.chdir(REPO)
    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_cli_says_whether_it_fits(capsys, monkeypatch):
    code, fits, _ = plan_cli(capsys, monkeypatch, "configs/e5-mistral-7b-lora.yaml")
    assert code == 0 and "FITS" in fits and "DOES NOT FIT" not in fits
    assert "DeepSpeed ZeRO-3 estimator" in fits
    # change one thing: a much bigger batch no longer fits, and the activation line grew
    _, huge, _ = plan_cli(capsys, monkeypatch, "configs/e5-mistral-7b-lora.yaml", "sampler.batch_size=8192")
    assert "DOES NOT FIT" in huge

    def activation_gib(out):
        return float(re.search(r"activations\s+([\d.]+)", out).group(1))

    assert activation_gib(huge) > 10 * activation_gib(fits)
    _, small_gpu, _ = plan_cli(capsys, monkeypatch, "configs/e5-mistral-7b-lora.yaml", "--gpu-memory", "10")
    assert "DOES NOT FIT" in small_gpu


def test_plan_json_is_the_whole_stdout():
    result = run("plan", "configs/yi-34b-lora.yaml", "--json")
    assert result.returncode == 0, result.stderr
    as_json = json.loads(result.stdout)  # DeepSpeed's start-up log line went to stderr
    assert as_json["shape"]["total_params"] > 33e9 and as_json["zero_stage"] == 3
    assert as_json["fits"] is True and as_json["total"] < as_json["usable"]


def test_plan_cli_errors_name_the_problem(capsys, monkeypatch):
    code, _, err = plan_cli(capsys, monkeypatch, "configs/e5-mistral-7b-lora.yaml",
                            "deepspeed.offload_param=cpu", "deepspeed.zero_stage=2")
    assert code == 2 and "deepspeed.offload_param" in err
    code, _, err = plan_cli(capsys, monkeypatch, "configs/e5-mistral-7b-lora.yaml", "--grid", "sampler.batch_size")
    assert code == 2 and "--grid" in err
    with pytest.raises(UserError, match="gpu-memory"):
        plan(config(MISTRAL_7B), gpu_memory_gib=0)


# ----------------------------------------------------------------------------- README table
def readme_plan_tables():
    """(arguments, table) for every ``hybridray plan`` command block followed by its table."""
    text = (REPO / "README.md").read_text()
    pattern = re.compile(r"```console\n\$ hybridray plan ([^\n]+)\n```\n\n((?:\|[^\n]*\n)+)")
    return [(m.group(1).split(), m.group(2).strip()) for m in pattern.finditer(text)]


def test_readme_tables_are_what_the_command_prints(capsys, monkeypatch):
    tables = readme_plan_tables()
    assert len(tables) >= 2  # 7B and 34B
    models = set()
    for args, table in tables:
        code, out, err = plan_cli(capsys, monkeypatch, *args)
        assert code == 0, err
        assert out.strip() == table, f"README table for `hybridray plan {' '.join(args)}` is stale"
        models.add(args[0])
    assert {"configs/e5-mistral-7b-lora.yaml", "configs/yi-34b-lora.yaml"} <= models


def test_grid_builds_each_model_once_and_plans_every_point():
    rows = plan_grid(_tree(MISTRAL_7B), [], [("sampler.batch_size", ["256", "512"]),
                                              ("model.max_passage_length", ["128", "256"])])
    assert [r[0] for r in rows] == [
        {"sampler.batch_size": "256", "model.max_passage_length": "128"},
        {"sampler.batch_size": "256", "model.max_passage_length": "256"},
        {"sampler.batch_size": "512", "model.max_passage_length": "128"},
        {"sampler.batch_size": "512", "model.max_passage_length": "256"},
    ]
    assert rows[0][1].shape is rows[3][1].shape  # the model was built once
    assert rows[3][1].activations > rows[1][1].activations > rows[0][1].activations
