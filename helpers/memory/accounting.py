"""Where every byte goes when exllamav2 0.3.2 loads a model: weights, KV cache, scratch, context; and the planner.

Every term below was read off exllamav2's own sources (installed under ``site-packages/exllamav2``; each function
names the file and function it follows). Nothing here imports exllamav2: it compiles CUDA code on import, and this
module must run on any laptop. Sizes are bytes (``int``) in code and GiB (2**30) with the unit when shown.

What exllamav2 allocates on the GPU when ``model.load_autosplit(cache)`` returns (model.py, ``load_autosplit_gen``):

- **weights**: every decoder layer's linear layers in EXL2 form (``q_weight``, ``q_scale``, ``q_scale_max``,
  ``q_groups``, a row->group map it builds, and the act-order permutations as int16; ``down_proj`` drops its
  permutations because exllamav2 folds them into gate/up), the RMSNorm weights in fp16, and ``lm_head``
  (an EXL2 linear, by default at 6 bits). The input embedding stays in system RAM: ``load_autosplit_gen`` puts
  module 0 on the CPU.
- **KV cache**: K and V for every layer, ``(batch, max_seq_len, n_kv_heads, head_dim)``, allocated at full length
  whatever the prompt (cache.py). Quantized modes add fp16 scales (one per 32 values) and one full-length FP16 K/V
  "temp" layer per device. Sliding-window layers get the full length too: exllamav2 saves nothing there.
- **scratch**: one fp16 tensor per device, sized by the largest ``scratch_space_fixed()`` of any module (device.py,
  ``ExLlamaV2DeviceContext``): usually the lm_head's dequantization buffer, ``2 * min(hidden*vocab, 512 Mi)`` bytes,
  i.e. up to 1 GiB; and the RoPE sin/cos tables, fp16 ``(max_seq_len, head_dim)`` each.
- **forward transients** (not resident, but needed while a prompt runs): the attention matrix, bounded by
  ``max_attention_size``, and the hidden state and mask of a ``max_input_len`` chunk. These are the terms
  exllamav2's own ``set_device_map`` budgets for.
- Outside exllamav2: the **CUDA context** (driver, kernels; measured by ``GPU_RECORDINGS['memory_cuda_context']``,
  a documented default until then) and a **reserve** for the desktop/OS on a display GPU.

What is not modelled, said plainly: Multi-head Latent Attention (DeepSeek-V2/V3: exllamav2 0.3.2 cannot load
those models at all), tensor-parallel loading (``load_tp``), multi-GPU splits, LoRA buffers, vision towers, MoE
scratch (MoE weights are estimated as experts x MLP), and CUDA graphs captured later by the generators.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import struct
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from helpers.core.errors import CourseError, CourseWarning
from helpers.core.paths import CONFIGS_DIR, MODEL_ENV, RESULTS_DIR

GIB = 2**30
MIB = 2**20

#: torch's CUDA caching allocator hands out blocks in multiples of 512 bytes (the smallest block is 512 B), and
#: ``torch.cuda.memory_allocated`` counts those block sizes. Exact predictions round every tensor the same way.
TORCH_BLOCK_BYTES = 512

#: exllamav2 config.py, ``ExLlamaV2Config.__init__``: ``max_dq_size = 512*(1024**2)`` elements per dequant buffer.
MAX_DQ_SIZE = 512 * 1024**2

#: exllamav2 config.py defaults: ``max_input_len = 2048``, ``max_attention_size = 2048**2``.
DEFAULT_MAX_INPUT_LEN = 2048
DEFAULT_MAX_ATTENTION_SIZE = 2048**2

#: largest context the planner accepts: exllamav2 allocates the whole cache up front, so 16M tokens is already
#: terabytes for any real model. Anything larger is a typo.
MAX_SEQ_LEN_LIMIT = 2**24
#: the planner's longest-context search stops here (reported as "at least" when reached)
LONGEST_CONTEXT_CAP = 2**20
#: the dynamic generator pages the cache in 256-token pages; the planner reports lengths in these steps
PAGE = 256

#: exllamav2 model.py ``load_autosplit_gen`` holds two tensors on a device while it loads: ``reserve_vram`` (default
#: 192 MiB on the first device) and ``minimum_reserve_vram`` (256 MiB). They are freed when the load ends, so a plan
#: that fits once loaded by less than this runs out of VRAM during an autosplit load. ``model.load()`` holds neither.
LOAD_AUTOSPLIT_RESERVE_BYTES = 192 * MIB + 256 * MIB
#: how exllamav2 can load a model with its cache: ``load_autosplit(cache)`` with a lazy cache (each attention
#: module's cache layer is created just before the module loads) or ``load()`` then ``ExLlamaV2Cache(model)`` (all
#: weights first, the whole cache after them). Name -> what a reader calls.
LOAD_PATHS = {"autosplit": "model.load_autosplit(cache)", "load": "model.load(), then ExLlamaV2Cache(model)"}

DEFAULT_CUDA_CONTEXT_BYTES = 512 * MIB
DEFAULT_CUDA_CONTEXT_SOURCE = (
    "default, not measured here: 0.5 GiB, a typical CUDA context with PyTorch's kernels loaded lazily (the size "
    "depends on the GPU, driver and libraries). DOMAIN.md section 5 notes that the first NVML reading of a process "
    "includes such one-time costs but does not isolate them; GPU_RECORDINGS['memory_cuda_context'] measures it "
    "(NVML used after torch.cuda.init() and a tiny allocation, minus before)")
DEFAULT_RESERVE_BYTES = 512 * MIB
DEFAULT_RESERVE_SOURCE = (
    "assumption, not measured: 0.5 GiB for the desktop/OS on a GPU that drives a display (Windows DWM, browser, "
    "etc. typically hold a few hundred MiB to over 1 GiB); use --reserve-gib 0 for a headless GPU")


# ----------------------------------------------------------------------------------------------------------------
# units
# ----------------------------------------------------------------------------------------------------------------

def gib(n_bytes: float) -> float:
    """Bytes -> GiB (2**30) as a float."""
    return float(n_bytes) / GIB


def fmt_gib(n_bytes: float, digits: int = 2) -> str:
    """'12.34 GiB': a byte count shown in GiB with its unit."""
    return f"{gib(n_bytes):.{digits}f} GiB"


def alloc_bytes(n_bytes: int) -> int:
    """The bytes torch's caching allocator reports for one tensor of ``n_bytes`` (rounded up to 512 B)."""
    n = int(n_bytes)
    if n <= 0:
        return 0
    return -(-n // TORCH_BLOCK_BYTES) * TORCH_BLOCK_BYTES


def _pad32(n: int) -> int:
    """exllamav2 linear.py ``ExLlamaV2Linear.__init__``: ``out_features`` is padded to a multiple of 32."""
    return n + (-n % 32)


# ----------------------------------------------------------------------------------------------------------------
# cache modes (exllamav2 cache.py)
# ----------------------------------------------------------------------------------------------------------------

CACHE_MODES = ("fp16", "fp8", "q8", "q6", "q4")

#: the exllamav2 class each mode maps to (cache.py)
CACHE_CLASSES = {
    "fp16": "ExLlamaV2Cache",
    "fp8": "ExLlamaV2Cache_8bit",
    "q8": "ExLlamaV2Cache_Q8",
    "q6": "ExLlamaV2Cache_Q6",
    "q4": "ExLlamaV2Cache_Q4",
}


@dataclass(frozen=True)
class CacheRule:
    """How one exllamav2 cache class lays out a layer (cache.py, ``ExLlamaV2CacheBase.__init__``).

    K is stored as ``head_dim // wpe_k`` elements of ``elem_bytes`` per head and token (V likewise with ``wpe_v``);
    ``scales``: fp16 K and V scales of shape ``(..., head_dim // 32)``; ``temp``: one full-length FP16 K and V per
    device (``touch_device``) that quantized modes decode into.
    """

    mode: str
    cls: str
    elem_bytes: int
    wpe_k: int
    wpe_v: int
    scales: bool
    temp: bool
    note: str


CACHE_RULES = {
    "fp16": CacheRule("fp16", "ExLlamaV2Cache", 2, 1, 1, False, False, "K and V in fp16"),
    "fp8": CacheRule("fp8", "ExLlamaV2Cache_8bit", 1, 1, 1, False, True,
                     "K and V truncated to FP8 (e5m2), no scales; the dynamic generator rejects it"),
    "q8": CacheRule("q8", "ExLlamaV2Cache_Q8", 1, 1, 1, True, True, "8-bit K and V, fp16 scale per 32 values"),
    "q6": CacheRule("q6", "ExLlamaV2Cache_Q6", 1, 1, 2, True, True,
                    "K stored in 8 bits, V in 4 bits, fp16 scale per 32 values"),
    "q4": CacheRule("q4", "ExLlamaV2Cache_Q4", 1, 2, 2, True, True, "4-bit K and V, fp16 scale per 32 values"),
}

_MODE_ALIASES = {"fp16": "fp16", "f16": "fp16", "half": "fp16", "16": "fp16", "exllamav2cache": "fp16",
                 "fp8": "fp8", "8bit": "fp8", "exllamav2cache_8bit": "fp8",
                 "q8": "q8", "exllamav2cache_q8": "q8", "q6": "q6", "exllamav2cache_q6": "q6",
                 "q4": "q4", "exllamav2cache_q4": "q4"}


def check_load_path(path: str) -> str:
    """One of LOAD_PATHS, or a one-line error."""
    if path not in LOAD_PATHS:
        raise CourseError(f"unknown load path '{path}': use 'autosplit' (model.load_autosplit(cache) with a lazy "
                          "cache) or 'load' (model.load(), then the cache)")
    return path


def check_cache_mode(mode: str) -> str:
    """Normalise a cache mode ('FP16', 'Q4', 'ExLlamaV2Cache_Q8', ...) to one of CACHE_MODES."""
    key = str(mode).strip().lower()
    if key in _MODE_ALIASES:
        return _MODE_ALIASES[key]
    raise CourseError(f"unknown cache mode '{mode}': use one of {', '.join(CACHE_MODES)} "
                      f"({', '.join(CACHE_CLASSES[m] for m in CACHE_MODES)})")


# ----------------------------------------------------------------------------------------------------------------
# model shapes
# ----------------------------------------------------------------------------------------------------------------

#: architectures exllamav2 0.3.2 recognises (architecture.py); anything else it loads with Llama's rules
KNOWN_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "YiForCausalLM", "OrionForCausalLM",
    "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM",
    "Gemma3ForConditionalGeneration", "Starcoder2ForCausalLM", "GemmoeForCausalLM", "CohereForCausalLM",
    "Cohere2ForCausalLM", "DbrxForCausalLM", "Phi3ForCausalLM", "GPTBigCodeForCausalLM", "GPT2LMHeadModel",
    "MiniCPMForCausalLM", "InternLM2ForCausalLM", "IndexForCausalLM", "GraniteForCausalLM", "Glm4ForCausalLM",
    "LlavaForConditionalGeneration", "Mistral3ForConditionalGeneration", "Qwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration")
_ALTERNATING_SWA = {"Gemma2ForCausalLM": 1, "Gemma3ForConditionalGeneration": 6, "Cohere2ForCausalLM": 4}
_FOUR_NORMS = {"Gemma2ForCausalLM", "Gemma3ForConditionalGeneration"}
_QK_NORM = {"Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma3ForConditionalGeneration"}
_NO_ROPE = {"GPTBigCodeForCausalLM", "GPT2LMHeadModel"}
_MQA = {"GPTBigCodeForCausalLM"}
_NO_GATE = {"Starcoder2ForCausalLM", "GPTBigCodeForCausalLM", "GPT2LMHeadModel"}
_HEAD_IS_EMBEDDING = {"GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForConditionalGeneration",
                      "Starcoder2ForCausalLM", "GemmoeForCausalLM", "CohereForCausalLM", "Cohere2ForCausalLM",
                      "GPTBigCodeForCausalLM", "GPT2LMHeadModel", "Glm4ForCausalLM"}
_MLA_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "DeepseekV32ForCausalLM",
                      "KimiK2ForCausalLM")


@dataclass(frozen=True)
class ModelShape:
    """The facts of a decoder that memory depends on, as exllamav2 reads them from config.json (config.py)."""

    name: str
    architecture: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    max_position_embeddings: int
    sliding_window: int = 0
    #: layers exllamav2 builds with a sliding window (model.py ``ExLlamaV2.__init__``); their cache is full length
    sliding_layers: tuple = ()
    #: layers the config itself marks as sliding (transformers' reading), for comparison
    config_sliding_layers: tuple = ()
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    mlp_gate: bool = True
    norms_per_layer: int = 2
    qk_norm: bool = False
    rope: bool = True
    rope_tables: int = 1
    rotary_dim: int = 0
    rope_theta: float = 10000.0
    rope_scaling: str | None = None
    n_experts: int = 1
    model_type: str = ""
    source: str = ""
    exl2_dir: str | None = None

    # -- derived ------------------------------------------------------------------------------------------------
    @property
    def kv_dim(self) -> int:
        """K (or V) values per token and layer: n_kv_heads x head_dim."""
        return self.n_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def attention_kind(self) -> str:
        if self.n_kv_heads == 1 and self.n_heads > 1:
            return "MQA"
        return "MHA" if self.n_kv_heads == self.n_heads else "GQA"

    @property
    def gqa_group(self) -> int:
        """Query heads sharing one K/V head."""
        return self.n_heads // self.n_kv_heads

    def layer_linears(self) -> list[tuple[str, str, int, int, bool]]:
        """(module, linear, in_features, out_features, bias) of one decoder layer, in exllamav2's load order."""
        att = [("self_attn", "q_proj", self.hidden, self.q_dim, self.qkv_bias),
               ("self_attn", "k_proj", self.hidden, self.kv_dim, self.qkv_bias),
               ("self_attn", "v_proj", self.hidden, self.kv_dim, self.qkv_bias),
               ("self_attn", "o_proj", self.q_dim, self.hidden, self.o_bias)]
        mlp = []
        for _ in range(max(1, self.n_experts)):
            if self.mlp_gate:
                mlp.append(("mlp", "gate_proj", self.hidden, self.intermediate, self.mlp_bias))
            mlp.append(("mlp", "up_proj", self.hidden, self.intermediate, self.mlp_bias))
            mlp.append(("mlp", "down_proj", self.intermediate, self.hidden, self.mlp_bias))
        return att + mlp

    @property
    def n_params_embedding(self) -> int:
        return self.vocab * self.hidden

    @property
    def n_params_head(self) -> int:
        """lm_head parameters (0 when tied: the embedding serves as the head)."""
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def n_params_layers(self) -> int:
        """Decoder layers: linears, biases and norm weights."""
        per = sum(i * o + (o if b else 0) for _, _, i, o, b in self.layer_linears())
        per += self.norms_per_layer * self.hidden
        if self.qk_norm:
            per += 2 * self.head_dim
        return self.n_layers * per

    @property
    def n_params(self) -> int:
        """All parameters as the Hugging Face model counts them (embedding once when tied)."""
        return self.n_params_embedding + self.n_params_head + self.n_params_layers + self.hidden

    def describe(self) -> str:
        return (f"{self.name}: {self.architecture}, {self.n_layers} layers, hidden {self.hidden}, "
                f"{self.n_heads} heads / {self.n_kv_heads} KV heads ({self.attention_kind}), head_dim {self.head_dim}, "
                f"intermediate {self.intermediate}, vocab {self.vocab}, "
                f"{'tied' if self.tied_embeddings else 'untied'} embeddings, "
                f"max_position_embeddings {self.max_position_embeddings:,}, {self.n_params / 1e9:.2f} B params")


def bundled_models() -> list[str]:
    """Names of the bundled configs (helpers/configs/<name>.json)."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def _normalise_name(name: str) -> str:
    n = name.strip().lower().replace("_", "-").replace(" ", "-")
    n = n.split("/")[-1]
    n = re.sub(r"^(qwen2\.5)(\d)", r"\1-\2", n)
    n = re.sub(r"-(instruct|it|chat|base)(-\d+)?$", "", n)
    n = re.sub(r"^(meta-)", "", n)
    n = n.replace("mistral-nemo-instruct-2407", "mistral-nemo-12b").replace("mistral-nemo-2407", "mistral-nemo-12b")
    if n == "mistral-nemo":
        n = "mistral-nemo-12b"
    return n


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CourseError(f"{path} does not exist: give a bundled model name, a config.json, or an EXL2 folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CourseError(f"{path} is not valid JSON ({exc}); point --model at a model's config.json") from None
    if not isinstance(doc, dict):
        raise CourseError(f"{path} does not hold a JSON object; point --model at a model's config.json")
    return doc


_MISSING = object()


def _cfg_get(cfg: dict, keys: Iterable[str], default: Any = _MISSING) -> Any:
    """exllamav2 config.py ``read``: the first key present (top level, then ``text_config``) whose value is not None."""
    for key in keys:
        for d in (cfg, cfg.get("text_config") or {}):
            node: Any = d
            for part in key.split("->"):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                return node
    return default


def _as_int(value: Any, what: str, src: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < minimum:
        raise CourseError(f"{src}: '{what}' must be a whole number >= {minimum} (found {value!r}); fix the config.json")
    return int(value)


def shape_from_config(cfg: dict, name: str = "config", source: str = "", exl2_dir: str | None = None) -> ModelShape:
    """A ModelShape from a config.json dict, read the way exllamav2 0.3.2's ``ExLlamaV2Config.prepare`` reads it."""
    src = source or name
    archs = cfg.get("architectures")
    if cfg.get("kv_lora_rank") is not None or (isinstance(archs, list) and any(a in _MLA_ARCHITECTURES for a in archs)):
        raise CourseError(f"{src} uses Multi-head Latent Attention (MLA, DeepSeek-style): exllamav2 0.3.2 cannot load "
                          "it and this planner does not model its compressed KV cache; use an engine that supports MLA")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise CourseError(f"{src} is missing 'architectures' (exllamav2 needs it, e.g. [\"LlamaForCausalLM\"]); "
                          "use the model's original config.json")
    if len(archs) != 1:
        raise CourseError(f"{src} lists several architectures {archs}; exllamav2 accepts exactly one")
    arch = archs[0]
    fields = {"num_hidden_layers": ["num_hidden_layers", "n_layers", "n_layer"],
              "hidden_size": ["hidden_size", "d_model", "n_embd"],
              "num_attention_heads": ["num_attention_heads", "n_heads", "n_head"],
              "intermediate_size": ["intermediate_size", "ffn_config->ffn_hidden_size", "n_inner"],
              "vocab_size": ["vocab_size"]}
    got = {k: _cfg_get(cfg, keys) for k, keys in fields.items()}
    missing = [k for k, v in got.items() if v is _MISSING]
    if missing:
        raise CourseError(f"{src} is missing required field(s) {', '.join(missing)}: a decoder's config.json from "
                          "Hugging Face has them; copy the model's original config.json")
    n_layers = _as_int(got["num_hidden_layers"], "num_hidden_layers", src)
    hidden = _as_int(got["hidden_size"], "hidden_size", src)
    n_heads = _as_int(got["num_attention_heads"], "num_attention_heads", src)
    intermediate = _as_int(got["intermediate_size"], "intermediate_size", src)
    vocab = _as_int(got["vocab_size"], "vocab_size", src)
    default_hd = 256 if arch == "Gemma3ForConditionalGeneration" else hidden // n_heads
    head_dim = _as_int(_cfg_get(cfg, ["head_dim"], default_hd), "head_dim", src)
    if arch in _MQA:
        n_kv = 1
    else:
        n_kv = _as_int(_cfg_get(cfg, ["num_key_value_heads", "attn_config->kv_n_heads"], n_heads),
                       "num_key_value_heads", src)
    if n_kv > n_heads or n_heads % n_kv:
        raise CourseError(f"{src}: num_attention_heads ({n_heads}) must be a multiple of num_key_value_heads ({n_kv})")
    max_pos = _as_int(_cfg_get(cfg, ["max_sequence_length", "model_max_length", "max_position_embeddings",
                                     "max_seq_len", "n_positions"], 2048), "max_position_embeddings", src)
    n_experts = int(_cfg_get(cfg, ["num_local_experts", "ffn_config->moe_num_experts", "num_experts"], 1) or 1)
    if n_experts > 1:
        intermediate = int(_cfg_get(cfg, ["moe_intermediate_size"], intermediate))
        warnings.warn(f"{src} is a mixture-of-experts model: weights are estimated as {n_experts} experts x MLP; "
                      "its router and MoE scratch buffers are not modelled", CourseWarning, stacklevel=3)
    if arch not in KNOWN_ARCHITECTURES:
        warnings.warn(f"{src}: exllamav2 0.3.2 does not know '{arch}' and would load it with Llama's rules; "
                      "the memory figures assume the same", CourseWarning, stacklevel=3)
    # sliding windows: exllamav2 model.py ExLlamaV2.__init__ (only alternating-SWA architectures get a window)
    window = int(_cfg_get(cfg, ["sliding_window", "sliding_window_size"], 0) or 0)
    sliding: tuple = ()
    if arch in _ALTERNATING_SWA and window:
        pattern = int(_cfg_get(cfg, ["sliding_window_pattern"], _ALTERNATING_SWA[arch]) or 1)
        if pattern > 1:
            sliding = tuple(i for i in range(n_layers) if (i + 1) % pattern != 0)
        else:
            sliding = tuple(i for i in range(n_layers) if i % 2 == 0)
    # what the config itself says (transformers' reading), shown beside exllamav2's
    layer_types = _cfg_get(cfg, ["layer_types"], None)
    if isinstance(layer_types, list):
        cfg_sliding = tuple(i for i, t in enumerate(layer_types) if "sliding" in str(t))
    elif arch.startswith("Qwen2") or arch.startswith("Qwen3"):
        use = bool(cfg.get("use_sliding_window", False))
        mwl = int(cfg.get("max_window_layers", n_layers) or 0)
        cfg_sliding = tuple(i for i in range(n_layers) if use and window and i >= mwl)
    elif arch in _ALTERNATING_SWA:
        cfg_sliding = sliding
    else:
        cfg_sliding = tuple(range(n_layers)) if window else ()
    attention_bias = bool(cfg.get("attention_bias", False))
    qkv_bias = arch in ("Qwen2ForCausalLM", "Qwen2VLForConditionalGeneration",
                        "Qwen2_5_VLForConditionalGeneration") or attention_bias
    partial = float(_cfg_get(cfg, ["partial_rotary_factor"], 1.0))
    rs = _cfg_get(cfg, ["rope_scaling"], None)
    rope_scaling = None
    if isinstance(rs, dict):
        rope_scaling = str(rs.get("rope_type") or rs.get("type") or "yes")
    theta = _cfg_get(cfg, ["rope_theta", "attn_config->rope_theta"], None)
    if theta is None and isinstance(cfg.get("rope_parameters"), dict):
        theta = cfg["rope_parameters"].get("rope_theta")
    tied = bool(cfg.get("tie_word_embeddings", arch in _HEAD_IS_EMBEDDING))
    return ModelShape(
        name=name, architecture=arch, n_layers=n_layers, hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv,
        head_dim=head_dim, intermediate=intermediate, vocab=vocab, tied_embeddings=tied,
        max_position_embeddings=max_pos, sliding_window=window, sliding_layers=sliding,
        config_sliding_layers=cfg_sliding, qkv_bias=qkv_bias, o_bias=attention_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)), mlp_gate=arch not in _NO_GATE,
        norms_per_layer=4 if arch in _FOUR_NORMS else 2,
        qk_norm=arch in _QK_NORM or bool(cfg.get("use_qk_norm", False)),
        rope=arch not in _NO_ROPE, rope_tables=2 if arch == "Gemma3ForConditionalGeneration" else 1,
        rotary_dim=int(head_dim * partial), rope_theta=float(theta) if theta is not None else 10000.0,
        rope_scaling=rope_scaling, n_experts=n_experts, model_type=str(cfg.get("model_type", "")),
        source=str(cfg.get("_source", source)), exl2_dir=exl2_dir)


def _looks_like_path(text: str) -> bool:
    return any(c in text for c in "/\\") or text.endswith(".json") or text.startswith(("~", "."))


def model_shape(spec: Any) -> ModelShape:
    """A ModelShape from a bundled name, a config.json path, an EXL2 (or any model) folder, a dict, or a ModelShape.

    Unknown names raise a CourseError that suggests the closest bundled names.
    """
    if isinstance(spec, ModelShape):
        return spec
    if isinstance(spec, dict):
        return shape_from_config(spec, name=str(spec.get("_name", "config")), source="config dict")
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise CourseError(f"no model given: name a bundled model ({', '.join(bundled_models())}), a config.json or "
                          "an EXL2 folder")
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.exists():
            raise CourseError(f"{path} has no config.json: point --model at a model folder, a config.json, or a "
                              "bundled name")
        exl2 = str(path.resolve()) if _is_exl2_dir(path) else None
        return shape_from_config(_read_json(cfg_path), name=path.name, source=str(cfg_path), exl2_dir=exl2)
    if path.is_file():
        cfg = _read_json(path)
        name = path.parent.name if path.name == "config.json" else path.stem
        exl2 = str(path.parent.resolve()) if path.name == "config.json" and _is_exl2_dir(path.parent) else None
        return shape_from_config(cfg, name=name, source=str(path), exl2_dir=exl2)
    names = bundled_models()
    key = _normalise_name(text)
    if key in names:
        cfg = _read_json(CONFIGS_DIR / f"{key}.json")
        return shape_from_config(cfg, name=key, source=str(cfg.get("_source", key)))
    if _looks_like_path(text):
        raise CourseError(f"{text} does not exist: give a bundled model name, a config.json, or an EXL2 folder")
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise CourseError(f"unknown model '{text}'.{hint} Bundled: {', '.join(names)}; or pass a config.json or an "
                      "EXL2 folder")


# ----------------------------------------------------------------------------------------------------------------
# reading an EXL2 folder's tensors (safetensors headers; no tensor data is loaded except tiny q_groups)
# ----------------------------------------------------------------------------------------------------------------

_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                   "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class _TensorInfo:
    dtype: str
    shape: tuple
    file: str
    begin: int  # absolute file offset of the data

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * _ST_DTYPE_BYTES.get(self.dtype, 4)


def _read_header(path: Path) -> tuple[dict, int]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("file too short")
            n = struct.unpack("<Q", raw)[0]
            if n <= 0 or n > 256 * MIB:
                raise ValueError(f"header length {n}")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        raise CourseError(f"{path} is not a readable safetensors file ({exc}); re-download or rebuild it") from None
    return header, 8 + n


def _exl2_tensors(folder: Path) -> dict[str, _TensorInfo]:
    out: dict[str, _TensorInfo] = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    for f in files:
        header, base = _read_header(f)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            out[name] = _TensorInfo(str(meta["dtype"]), tuple(int(s) for s in meta["shape"]), str(f),
                                    base + int(meta["data_offsets"][0]))
    return out


def _is_exl2_dir(folder: Path) -> bool:
    files = list(Path(folder).glob("*.safetensors"))
    if not files:
        return False
    for f in files:
        header, _ = _read_header(f)
        if any(k.endswith(".q_weight") for k in header):
            return True
    return False


def _read_i16(info: _TensorInfo) -> list[int]:
    with open(info.file, "rb") as fh:
        fh.seek(info.begin)
        raw = fh.read(info.nbytes)
    return list(struct.unpack(f"<{info.numel}h", raw))


def _group_map_rows(q_groups: list[int], packed_rows: int) -> int:
    """Rows of the row->group map exllamav2 builds (ext_qmatrix.cpp ``make_group_map``): sum of qrows*32//bits."""
    n = len(q_groups) // 2
    rows = 0
    for i in range(n):
        bits = q_groups[2 * i]
        qrows = (q_groups[2 * i + 3] - q_groups[2 * i + 1]) if i < n - 1 else packed_rows - q_groups[2 * i + 1]
        rows += (qrows * 32) // bits
    return rows


def _linear_from_file(tensors: dict[str, _TensorInfo], key: str, *, drop_perm: bool, out_features: int,
                      alt_key: str | None = None) -> tuple[int, str]:
    """GPU bytes (torch-rounded) of one linear as exllamav2 loads it; and how it is stored ('exl2' or 'fp16').

    Follows module.py ``load_weight`` (EXL2: q_weight, q_invperm, q_scale, q_scale_max, q_groups, bias; q_perm is
    rebuilt), ext.py ``make_q_matrix`` (perms cast to int16, ``q_group_map`` built), mlp.py ``load``
    (``down_proj`` loaded with ``unmap=True``: its q_perm/q_invperm are dropped) and linear.py ``load`` (an fp16
    weight is padded to a multiple of 32 output rows).
    """
    for k in [key] + ([alt_key] if alt_key else []):
        if f"{k}.q_weight" in tensors:
            t = lambda s: tensors[f"{k}.{s}"]  # noqa: E731
            need = ["q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups"]
            lost = [s for s in need if f"{k}.{s}" not in tensors]
            if lost:
                raise CourseError(f"EXL2 checkpoint is missing {', '.join(k + '.' + s for s in lost)}: the folder is "
                                  "incomplete; re-download or rebuild it")
            sizes = [t(s).nbytes for s in ("q_weight", "q_scale", "q_scale_max", "q_groups")]
            if f"{k}.bias" in tensors:
                sizes.append(t("bias").nbytes)
            K = t("q_invperm").numel
            if not drop_perm:
                sizes += [2 * K, 2 * K]  # q_perm and q_invperm as int16
            rows = _group_map_rows(_read_i16(t("q_groups")), t("q_weight").shape[0])
            sizes.append(2 * 2 * rows)  # q_group_map: (group, rows left) pairs, int16
            return sum(alloc_bytes(s) for s in sizes), "exl2"
        if f"{k}.weight" in tensors:
            w = tensors[f"{k}.weight"]
            rows = w.shape[0] if w.shape else 0
            cols = w.numel // max(rows, 1)
            pad = _pad32(out_features) - rows if rows == out_features else 0
            total = alloc_bytes((rows + pad) * cols * 2)
            if f"{k}.bias" in tensors:
                total += alloc_bytes((rows + pad) * 2)
            return total, "fp16"
    raise CourseError(f"EXL2 checkpoint has no tensors for '{key}' (neither .q_weight nor .weight): the folder is "
                      "incomplete or not an EXL2 model of this config")


def _norm_bytes(tensors: dict[str, _TensorInfo], key: str, default_numel: int) -> int:
    info = tensors.get(f"{key}.weight")
    numel = info.numel if info else default_numel
    extra = alloc_bytes(tensors[f"{key}.bias"].numel * 2) if f"{key}.bias" in tensors else 0
    return alloc_bytes(numel * 2) + extra


# ----------------------------------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------------------------------

#: exllamav2 conversion/qparams.py ``qparams_headoptions``: head bits -> (group size per bits, bits, proportions)
HEAD_OPTIONS = {
    2: ({4: 32, 2: 32}, (4, 2), (0.3, 0.7)),
    3: ({4: 32, 3: 32}, (4, 3), (0.15, 0.85)),
    4: ({6: 32, 4: 32}, (6, 4), (0.15, 0.85)),
    5: ({6: 128, 5: 128}, (6, 5), (0.15, 0.85)),
    6: ({8: 128, 6: 128}, (8, 6), (0.15, 0.85)),
    8: ({8: 128}, (8,), (1.0,)),
}


def exl2_head_bytes(in_features: int, out_features: int, head_bits: int = 6) -> int:
    """GPU bytes of an lm_head quantized with exllamav2's head options (torch-rounded), or fp16 when head_bits=16.

    Group layout as conversion/qparams.py ``QParams.total_bits`` assigns it (rows per bit width in whole groups,
    the last group taking what remains); tensors as ext.py ``make_q_matrix`` keeps them on the GPU.
    """
    N = _pad32(out_features)
    K = in_features
    if head_bits == 16:
        return alloc_bytes(K * N * 2)
    if head_bits not in HEAD_OPTIONS:
        raise CourseError(f"head bits {head_bits} is not an exllamav2 head option: use one of "
                          f"{', '.join(map(str, sorted(HEAD_OPTIONS)))} or 16 (fp16)")
    gsz, bits, props = HEAD_OPTIONS[head_bits]
    remaining, groups, packed_rows = K, 0, 0
    for b, p in zip(bits, props):
        g = math.ceil(min(K * p, remaining) / gsz[b])
        rows = min(g * gsz[b], max(remaining, 0))
        remaining -= g * gsz[b]
        groups += g
        packed_rows += math.ceil(rows * b / 32)
    sizes = [packed_rows * N * 4,  # q_weight int32
             groups * (N // 8) * 4,  # q_scale: 4-bit codes, 8 per int32
             groups * 2,  # q_scale_max fp16
             groups * 2 * 2,  # q_groups int16 pairs
             2 * K, 2 * K,  # q_perm, q_invperm int16
             2 * 2 * K]  # q_group_map int16 pairs
    return sum(alloc_bytes(s) for s in sizes)


def _check_bpw(bpw: Any) -> float:
    if isinstance(bpw, bool) or not isinstance(bpw, (int, float)) or not math.isfinite(bpw):
        raise CourseError(f"bits per weight must be a number (got {bpw!r}), e.g. --bpw 5.5")
    if bpw <= 0:
        raise CourseError(f"bits per weight must be positive (got {bpw}); EXL2 models are made at 2.0 to 8.0 bpw")
    if bpw < 2.0 or bpw > 8.0:
        raise CourseError(f"{bpw} bits per weight is outside what exllamav2's converter makes (2.0 to 8.0 bpw)")
    return float(bpw)


def _estimated_modules(shape: ModelShape, bpw: float, head_bits: int) -> list[dict]:
    """Per-module GPU bytes estimated from the config and an average bpw.

    exllamav2's converter spends ``numel x bpw`` bits per layer, counting q_weight, scales, q_groups and the int32
    q_invperm it writes (conversion/qparams.py ``total_bits``; conversion/optimize.py budget). On the GPU the
    permutations become two int16 vectors (the same 4 bytes per input row) and a row->group map adds 4 bytes per
    input row; ``down_proj`` drops its permutations. So: file bytes + 4 x in_features, except down_proj.
    The head is computed exactly from head_bits; norms are fp16.
    """
    mods: list[dict] = [{"module": "model.embed_tokens", "kind": "embedding", "layer": None,
                         "weight_bytes": shape.vocab * shape.hidden * 2, "device_hint": "cpu"}]
    norm = shape.hidden * 2
    for i in range(shape.n_layers):
        att = (shape.norms_per_layer // 2) * norm + (2 * shape.q_dim * 2 + 2 * shape.kv_dim * 2 if shape.qk_norm else 0)
        mlp = (shape.norms_per_layer // 2) * norm
        for mod, lin, fin, fout, _bias in shape.layer_linears():
            b = math.ceil(fin * fout * bpw / 8) + (0 if lin == "down_proj" else 4 * fin)
            if mod == "self_attn":
                att += b
            else:
                mlp += b
        mods.append({"module": f"model.layers.{i}.self_attn", "kind": "attention", "layer": i, "weight_bytes": att,
                     "device_hint": "gpu"})
        mods.append({"module": f"model.layers.{i}.mlp", "kind": "mlp", "layer": i, "weight_bytes": mlp,
                     "device_hint": "gpu"})
    mods.append({"module": "model.norm", "kind": "norm", "layer": None, "weight_bytes": norm, "device_hint": "gpu"})
    mods.append({"module": "lm_head", "kind": "head", "layer": None,
                 "weight_bytes": exl2_head_bytes(shape.hidden, shape.vocab, head_bits), "device_hint": "gpu"})
    return mods


def _file_modules(shape: ModelShape) -> list[dict]:
    """Per-module GPU bytes of a real EXL2 folder, torch-rounded, following exllamav2's loaders (see
    ``_linear_from_file``)."""
    folder = Path(shape.exl2_dir)
    tensors = _exl2_tensors(folder)
    emb = tensors.get("model.embed_tokens.weight")
    if emb is None:
        raise CourseError(f"{folder} has no model.embed_tokens.weight: not a complete EXL2 checkpoint")
    mods: list[dict] = [{"module": "model.embed_tokens", "kind": "embedding", "layer": None,
                         "weight_bytes": emb.numel * 2, "device_hint": "cpu"}]
    names_att = (["input_layernorm", "post_attention_layernorm"] if shape.norms_per_layer == 4
                 else ["input_layernorm"])
    names_mlp = (["pre_feedforward_layernorm", "post_feedforward_layernorm"] if shape.norms_per_layer == 4
                 else ["post_attention_layernorm"])
    for i in range(shape.n_layers):
        p = f"model.layers.{i}"
        att = sum(_norm_bytes(tensors, f"{p}.{n}", shape.hidden) for n in names_att)
        if shape.qk_norm:
            att += alloc_bytes(shape.q_dim * 2) + alloc_bytes(shape.kv_dim * 2)
        mlp = sum(_norm_bytes(tensors, f"{p}.{n}", shape.hidden) for n in names_mlp)
        seen = set()
        for mod, lin, _fin, fout, _b in shape.layer_linears():
            if (mod, lin) in seen:
                continue
            seen.add((mod, lin))
            if mod == "self_attn":
                att += _linear_from_file(tensors, f"{p}.self_attn.{lin}", drop_perm=False, out_features=fout)[0]
            else:
                mlp += _linear_from_file(tensors, f"{p}.mlp.{lin}", drop_perm=(lin == "down_proj"),
                                         out_features=fout)[0]
        mods.append({"module": f"{p}.self_attn", "kind": "attention", "layer": i, "weight_bytes": att,
                     "device_hint": "gpu"})
        mods.append({"module": f"{p}.mlp", "kind": "mlp", "layer": i, "weight_bytes": mlp, "device_hint": "gpu"})
    mods.append({"module": "model.norm", "kind": "norm", "layer": None,
                 "weight_bytes": _norm_bytes(tensors, "model.norm", shape.hidden), "device_hint": "gpu"})
    alt = "model.embed_tokens" if (shape.tied_embeddings or shape.architecture in _HEAD_IS_EMBEDDING) else None
    head, _ = _linear_from_file(tensors, "lm_head", drop_perm=False, out_features=shape.vocab, alt_key=alt)
    mods.append({"module": "lm_head", "kind": "head", "layer": None, "weight_bytes": head, "device_hint": "gpu"})
    return mods


def _weight_modules(shape: ModelShape, bpw: float | None, head_bits: int) -> tuple[list[dict], str]:
    if shape.exl2_dir:
        if bpw is not None:
            warnings.warn(f"{shape.name} is a real EXL2 folder: its tensors decide the weight bytes and bpw={bpw} is "
                          "ignored", CourseWarning, stacklevel=3)
        return _file_modules(shape), f"read from the EXL2 tensors in {shape.exl2_dir}"
    if bpw is None:
        raise CourseError(f"{shape.name} is a config without EXL2 tensors: give the bits per weight (e.g. --bpw 5.5)")
    bpw = _check_bpw(bpw)
    head = "fp16" if head_bits == 16 else f"{head_bits}-bit"
    return (_estimated_modules(shape, bpw, head_bits),
            f"estimated from the config at {bpw:g} bpw (decoder layers), {head} lm_head")


def weight_bytes(spec: Any, bpw: float | None = None, head_bits: int = 6) -> dict:
    """``{'vram_bytes', 'system_ram_bytes', 'source', ...}``: GPU weights and the CPU-resident embedding.

    From a real EXL2 folder: every tensor as exllamav2 keeps it on the GPU (torch-rounded). From a config: an
    estimate from ``bpw`` (decoder layers) and ``head_bits`` (lm_head, exact for that option). The embedding
    (fp16, ``vocab x hidden``) stays in system RAM: model.py ``load_autosplit_gen`` loads module 0 on the CPU.
    """
    shape = model_shape(spec)
    mods, source = _weight_modules(shape, bpw, head_bits)
    vram = sum(m["weight_bytes"] for m in mods if m["device_hint"] == "gpu")
    ram = sum(m["weight_bytes"] for m in mods if m["device_hint"] == "cpu")
    head = next(m["weight_bytes"] for m in mods if m["kind"] == "head")
    out = {"vram_bytes": vram, "system_ram_bytes": ram, "lm_head_bytes": head, "layers_bytes": vram - head,
           "source": source}
    if shape.exl2_dir:
        out.update(_exl2_cross_check(shape.exl2_dir))
    return out


def _exl2_cross_check(folder: str) -> dict:
    """The format module's own byte count, when ``helpers.format.exl2`` is there (it is another engineer's module)."""
    try:
        from helpers.format import exl2  # noqa: WPS433 (memory may import exl2
        ckpt = exl2.open_exl2(folder)
        bb = ckpt.byte_breakdown()
        return {"exl2_breakdown": {k: bb[k] for k in ("vram_bytes", "system_ram_bytes") if k in bb}}
    except Exception:  # not written yet, or a different API: the figures above stand on their own
        return {}


# ----------------------------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------------------------

def _check_len(max_seq_len: Any, what: str = "max_seq_len") -> int:
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, (int, float)) or max_seq_len != max_seq_len:
        raise CourseError(f"{what} must be a whole number of tokens (got {max_seq_len!r})")
    if max_seq_len != int(max_seq_len) or max_seq_len <= 0:
        raise CourseError(f"{what} must be a positive whole number of tokens (got {max_seq_len})")
    if max_seq_len > MAX_SEQ_LEN_LIMIT:
        raise CourseError(f"{what} {int(max_seq_len):,} is absurd: exllamav2 allocates the whole cache up front; "
                          f"use at most {MAX_SEQ_LEN_LIMIT:,} tokens")
    return int(max_seq_len)


def _check_batch(batch: Any) -> int:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1 or batch > 4096:
        raise CourseError(f"batch must be a whole number from 1 to 4096 (got {batch!r})")
    return batch


def kv_layer_bytes_per_token(shape: Any, cache_mode: str = "fp16") -> int:
    """Bytes one layer's K and V (with scales) take per token (cache.py shapes ``shape_wk``, ``shape_wv``,
    ``shape_s``)."""
    s = model_shape(shape)
    r = CACHE_RULES[check_cache_mode(cache_mode)]
    k = s.n_kv_heads * (s.head_dim // r.wpe_k) * r.elem_bytes
    v = s.n_kv_heads * (s.head_dim // r.wpe_v) * r.elem_bytes
    sc = 2 * s.n_kv_heads * (s.head_dim // 32) * 2 if r.scales else 0
    return k + v + sc


def kv_temp_bytes_per_token(shape: Any, cache_mode: str = "fp16") -> int:
    """The FP16 temp K/V per token that quantized and FP8 modes keep once per device (cache.py ``touch_device``)."""
    s = model_shape(shape)
    return 2 * s.kv_dim * 2 if CACHE_RULES[check_cache_mode(cache_mode)].temp else 0


def kv_bytes_per_token(shape: Any, cache_mode: str = "fp16") -> float:
    """Bytes of KV cache per token of max_seq_len, all layers, including scales and the FP16 temp layer.

    Qwen2.5-14B, FP16: 48 layers x 2 (K, V) x 8 KV heads x 128 x 2 bytes = 196,608 B/token.
    """
    s = model_shape(shape)
    return float(s.n_layers * kv_layer_bytes_per_token(s, cache_mode) + kv_temp_bytes_per_token(s, cache_mode))


def kv_cache_layout(shape: Any, max_seq_len: int, cache_mode: str = "fp16", batch: int = 1) -> list[dict]:
    """Every tensor exllamav2 allocates for the cache: name, shape, dtype, bytes (cache.py)."""
    s = model_shape(shape)
    mode = check_cache_mode(cache_mode)
    L, B = _check_len(max_seq_len), _check_batch(batch)
    r = CACHE_RULES[mode]
    dt = "float16" if r.elem_bytes == 2 else "uint8"
    out = []
    for i in range(s.n_layers):
        for kv, wpe in (("key", r.wpe_k), ("value", r.wpe_v)):
            shp = (B, L, s.n_kv_heads, s.head_dim // wpe)
            out.append({"name": f"{kv}_states[{i}]", "shape": shp, "dtype": dt,
                        "bytes": math.prod(shp) * r.elem_bytes})
        if r.scales:
            for kv in ("key", "value"):
                shp = (B, L, s.n_kv_heads, s.head_dim // 32)
                out.append({"name": f"{kv}_scales[{i}]", "shape": shp, "dtype": "float16", "bytes": math.prod(shp) * 2})
    if r.temp:
        for kv in ("temp_k", "temp_v"):
            shp = (B, L, s.n_kv_heads, s.head_dim)
            out.append({"name": kv, "shape": shp, "dtype": "float16", "bytes": math.prod(shp) * 2})
    return out


def kv_cache_bytes(shape: Any, max_seq_len: int, cache_mode: str = "fp16", batch: int = 1, *,
                   torch_rounding: bool = False) -> int:
    """Bytes exllamav2 allocates for a cache of ``max_seq_len`` tokens (all layers, scales, FP16 temp layer).

    ``torch_rounding=True`` rounds each tensor to torch's 512-byte blocks, as ``torch.cuda.memory_allocated``
    counts them (no difference for lengths that are multiples of 256). The Q caches round ``max_seq_len`` up to a
    quantization block after the tensors are made (cache.py ``ExLlamaV2Cache_Q.__init__``): that adds no bytes.
    """
    rows = kv_cache_layout(shape, max_seq_len, cache_mode, batch)
    f = alloc_bytes if torch_rounding else int
    return sum(f(r["bytes"]) for r in rows)


# ----------------------------------------------------------------------------------------------------------------
# scratch
# ----------------------------------------------------------------------------------------------------------------

def _dq(in_f: int, out_f: int) -> int:
    """linear.py ``temp_dq_size``: 2 * min(in * out_padded, max_dq_size) bytes."""
    return 2 * min(in_f * _pad32(out_f), MAX_DQ_SIZE)


def scratch_detail(shape: Any, max_seq_len: int, max_input_len: int = DEFAULT_MAX_INPUT_LEN,
                   batch: int = 1) -> dict:
    """Each module kind's ``scratch_space_fixed()`` in bytes; the device scratch is the largest of them.

    attn.py ``scratch_space_fixed`` = temp_state + temp_dq; mlp.py = temp_state + temp_a + temp_b + temp_dq;
    the head (linear.py, not a sub-module) = temp_dq only. ``max_input_len`` is first clipped to max_seq_len
    (model.py ``load_autosplit_gen``).
    """
    s = model_shape(shape)
    L = _check_len(max_seq_len)
    n = min(_check_len(max_input_len, "max_input_len"), L) * _check_batch(batch)
    attn = (n * max(s.q_dim, s.hidden) * 2 + 128) + max(_dq(s.hidden, s.q_dim), _dq(s.hidden, s.kv_dim),
                                                        _dq(s.q_dim, s.hidden))
    width = max(s.hidden, s.intermediate)
    mlp_dq = max(_dq(s.hidden, s.intermediate), _dq(s.intermediate, s.hidden))
    mlp = (n * s.hidden * 2 + 128) + 2 * (n * width * 2 + 128) + mlp_dq
    head = _dq(s.hidden, s.vocab)
    return {"attention": attn, "mlp": mlp, "lm_head": head}


def rope_table_bytes(shape: Any, max_seq_len: int) -> int:
    """RoPE sin and cos tables: fp16, ``(1, 1, max_seq_len, rotary_dim)`` each, one pair per RoPE base
    (device.py ``prepare_sincos``; Gemma 3 has two bases). Models without RoPE keep one 1-element tensor."""
    s = model_shape(shape)
    L = _check_len(max_seq_len)
    if not s.rope:
        return alloc_bytes(2)
    width = 2 * math.ceil(s.rotary_dim / 2)
    return s.rope_tables * 2 * alloc_bytes(L * width * 2)


def scratch_bytes(shape: Any, max_seq_len: int, max_input_len: int = DEFAULT_MAX_INPUT_LEN,
                  max_attention_size: int = DEFAULT_MAX_ATTENTION_SIZE, batch: int = 1,
                  flash_attn: bool = False) -> dict:
    """Named scratch terms in bytes (all additive).

    - ``device_scratch``: the one fp16 scratch tensor per device (device.py ``prepare``: ``scratch_bytes // 2``
      halfs), sized by the largest module; for most real models the lm_head dequant buffer (up to 1 GiB).
    - ``rope_tables``: sin/cos, scale with max_seq_len.
    - ``attention_transient``: attn.py ``temp_attn_size``: ``2 * min(max_attention_size, max_seq_len**2) *
      n_heads * 2 + 128`` (divided by sqrt(max_attention_size)/190 with flash-attn); model.py ``forward`` chunks
      prompts to keep the attention matrix within max_attention_size.
    - ``hidden_state_transient``, ``attn_mask_transient``: model.py ``set_device_map``'s ``state_size`` and
      ``mask_size`` for a max_input_len chunk.
    """
    s = model_shape(shape)
    L = _check_len(max_seq_len)
    mil = min(_check_len(max_input_len, "max_input_len"), L)
    B = _check_batch(batch)
    if isinstance(max_attention_size, bool) or not isinstance(max_attention_size, int) or max_attention_size < 1:
        raise CourseError(f"max_attention_size must be a positive whole number (got {max_attention_size!r})")
    detail = scratch_detail(s, L, mil, B)
    fixed = max(detail.values())
    att = min(max_attention_size, L**2)
    if flash_attn:
        att = int(att // (max_attention_size ** 0.5 / 190))
    return {
        "device_scratch": alloc_bytes((fixed // 2) * 2),
        "rope_tables": rope_table_bytes(s, L),
        "attention_transient": 2 * att * s.n_heads * 2 + 128,
        "hidden_state_transient": s.hidden * mil * B * 2,
        "attn_mask_transient": mil**2 * B * 2,
    }


# ----------------------------------------------------------------------------------------------------------------
# CUDA context and reserve
# ----------------------------------------------------------------------------------------------------------------

def cuda_context_default(results_dir: Path | None = None) -> tuple[int, str]:
    """(bytes, where it comes from): the median CUDA context measured by GPU_RECORDINGS if recorded, else the
    documented default."""
    folder = Path(results_dir or RESULTS_DIR) / "memory"
    vals, where = [], None
    try:
        for path in sorted(folder.glob("*.json")):
            doc = json.loads(path.read_text(encoding="utf-8"))
            for row in doc.get("rows", []):
                if row.get("kind") == "cuda_context" and isinstance(row.get("cuda_context_bytes"), int):
                    vals.append(row["cuda_context_bytes"] + int(row.get("cuda_libraries_bytes") or 0))
                    prov = doc.get("provenance", {})
                    where = f"{prov.get('gpu') or prov.get('device')}, {str(prov.get('date', '?'))[:10]}"
    except (OSError, ValueError):
        vals = []
    if vals:
        vals.sort()
        med = vals[len(vals) // 2]
        return med, (f"measured: median of {len(vals)} fresh processes (NVML used after torch.cuda.init(), a tiny "
                     f"allocation and a first cuBLAS matmul, minus before), recorded on {where}; another GPU or "
                     "driver differs")
    return DEFAULT_CUDA_CONTEXT_BYTES, DEFAULT_CUDA_CONTEXT_SOURCE


# ----------------------------------------------------------------------------------------------------------------
# the breakdown
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Breakdown:
    """Every byte of one configuration, by term. ``vram_total_bytes`` is what the GPU must hold."""

    model: str
    weights_source: str
    bpw: float | None
    head_bits: int
    max_seq_len: int
    cache_mode: str
    batch: int
    max_input_len: int
    max_attention_size: int
    flash_attn: bool
    weights_bytes: int
    lm_head_bytes: int
    embedding_ram_bytes: int
    kv_layers_bytes: int
    kv_temp_bytes: int
    device_scratch_bytes: int
    rope_bytes: int
    attention_transient_bytes: int
    hidden_state_transient_bytes: int
    cuda_context_bytes: int
    reserve_bytes: int
    cuda_context_source: str
    reserve_source: str
    n_layers: int = 0
    max_position_embeddings: int = 0
    warnings: list = field(default_factory=list)

    @property
    def kv_cache_bytes(self) -> int:
        """The whole cache: layers (with scales) plus the FP16 temp layer of quantized modes."""
        return self.kv_layers_bytes + self.kv_temp_bytes

    @property
    def scratch_bytes(self) -> int:
        return self.device_scratch_bytes + self.rope_bytes

    @property
    def exllamav2_resident_bytes(self) -> int:
        """What torch has allocated for exllamav2 after ``load_autosplit`` returns: weights, cache, scratch, RoPE."""
        return self.weights_bytes + self.kv_cache_bytes + self.scratch_bytes

    @property
    def transient_bytes(self) -> int:
        """Freed after each forward, needed while a prompt chunk runs."""
        return self.attention_transient_bytes + self.hidden_state_transient_bytes

    @property
    def vram_total_bytes(self) -> int:
        return self.exllamav2_resident_bytes + self.transient_bytes + self.cuda_context_bytes + self.reserve_bytes

    def terms(self) -> list[tuple[str, int, str]]:
        """(label, bytes, note) rows of the table, in order."""
        r = CACHE_RULES[self.cache_mode]
        return [
            ("weights on the GPU (layers + norms)", self.weights_bytes - self.lm_head_bytes, self.weights_source),
            ("lm_head", self.lm_head_bytes, "as stored in the EXL2 folder" if self.bpw is None else
             (f"{self.head_bits}-bit EXL2" if self.head_bits != 16 else "fp16")),
            (f"KV cache, {self.n_layers} layers x {self.max_seq_len:,} tokens", self.kv_layers_bytes,
             f"{r.cls}: {r.note}"),
            ("KV cache FP16 temp layer", self.kv_temp_bytes, "quantized/FP8 modes decode into it" if r.temp else "n/a"),
            ("device scratch (largest module buffer)", self.device_scratch_bytes,
             f"max_input_len {self.max_input_len:,}; lm_head dequant buffer is usually the largest"),
            ("RoPE sin/cos tables", self.rope_bytes, "fp16, scale with max_seq_len"),
            ("attention matrix (transient)", self.attention_transient_bytes,
             f"max_attention_size {self.max_attention_size:,}" + (", flash-attn" if self.flash_attn else "")),
            ("hidden state + mask (transient)", self.hidden_state_transient_bytes, "one max_input_len chunk"),
            ("CUDA context", self.cuda_context_bytes, self.cuda_context_source.split(":")[0]),
            ("desktop/OS reserve", self.reserve_bytes, self.reserve_source.split(":")[0]),
        ]

    def table(self) -> str:
        """A text table, every figure in GiB with its unit."""
        bpw = f"{self.bpw:g} bpw" if self.bpw is not None else "EXL2 tensors"
        head = (f"{self.model}, {bpw}, max_seq_len {self.max_seq_len:,}, cache {self.cache_mode} "
                f"({CACHE_CLASSES[self.cache_mode]}), batch {self.batch}")
        lines = [head, f"{'term':<44}{'GiB':>9}  note"]
        for label, b, note in self.terms():
            lines.append(f"{label:<44}{gib(b):>9.3f}  {note}")
        lines.append(f"{'total the GPU must hold':<44}{gib(self.vram_total_bytes):>9.3f}  GiB (2^30 bytes)")
        lines.append(f"{'system RAM: input embedding (fp16)':<44}{gib(self.embedding_ram_bytes):>9.3f}  "
                     "exllamav2 keeps it on the CPU")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(kv_cache_bytes=self.kv_cache_bytes, scratch_bytes=self.scratch_bytes,
                 exllamav2_resident_bytes=self.exllamav2_resident_bytes, transient_bytes=self.transient_bytes,
                 vram_total_bytes=self.vram_total_bytes, cache_class=CACHE_CLASSES[self.cache_mode])
        return d


def _context_warning(shape: ModelShape, L: int) -> str | None:
    if L <= shape.max_position_embeddings:
        return None
    tip = ("its config already applies RoPE scaling" if shape.rope_scaling else
           "unless its config.json enables RoPE scaling (for Qwen2.5: rope_scaling {\"type\": \"yarn\", \"factor\": 4.0, "
           "\"original_max_position_embeddings\": 32768}; exllamav2 reads it)")
    return (f"max_seq_len {L:,} is beyond {shape.name}'s max_position_embeddings ({shape.max_position_embeddings:,}): "
            f"the memory figures hold, but the model was not trained that long and quality degrades {tip}")


class _Static:
    """Terms that do not depend on the context length (computed once per model and bpw)."""

    def __init__(self, spec: Any, bpw: float | None, head_bits: int):
        self.shape = model_shape(spec)
        if isinstance(head_bits, bool) or head_bits not in list(HEAD_OPTIONS) + [16]:
            raise CourseError(f"head bits {head_bits!r} is not an exllamav2 head option: use one of "
                              f"{', '.join(map(str, sorted(HEAD_OPTIONS)))} or 16 (fp16)")
        self.modules, self.source = _weight_modules(self.shape, bpw, head_bits)
        self.bpw = None if self.shape.exl2_dir else bpw
        self.head_bits = head_bits
        self.vram = sum(m["weight_bytes"] for m in self.modules if m["device_hint"] == "gpu")
        self.ram = sum(m["weight_bytes"] for m in self.modules if m["device_hint"] == "cpu")
        self.head = next(m["weight_bytes"] for m in self.modules if m["kind"] == "head")


def _check_bytes(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CourseError(f"{what} must be zero or a positive size (got {value!r})")
    if value > 4096 * GIB:
        raise CourseError(f"{what} of {gib(value):,.0f} GiB is absurd; give it in GiB, e.g. 0.5")
    return int(value)


def _breakdown_from(st: _Static, L: int, mode: str, batch: int, max_input_len: int, max_attention_size: int,
                    flash_attn: bool, ctx: tuple[int, str], reserve: tuple[int, str]) -> Breakdown:
    s = st.shape
    layout = kv_cache_layout(s, L, mode, batch)
    temp = sum(alloc_bytes(r["bytes"]) for r in layout if r["name"].startswith("temp_"))
    layers = sum(alloc_bytes(r["bytes"]) for r in layout) - temp
    sc = scratch_bytes(s, L, max_input_len, max_attention_size, batch, flash_attn)
    w = [_context_warning(s, L)]
    return Breakdown(
        model=s.name, weights_source=st.source, bpw=st.bpw, head_bits=st.head_bits, max_seq_len=L, cache_mode=mode,
        batch=batch, max_input_len=min(max_input_len, L), max_attention_size=max_attention_size,
        flash_attn=bool(flash_attn), weights_bytes=st.vram, lm_head_bytes=st.head, embedding_ram_bytes=st.ram,
        kv_layers_bytes=layers, kv_temp_bytes=temp, device_scratch_bytes=sc["device_scratch"],
        rope_bytes=sc["rope_tables"], attention_transient_bytes=sc["attention_transient"],
        hidden_state_transient_bytes=sc["hidden_state_transient"] + sc["attn_mask_transient"],
        cuda_context_bytes=ctx[0], reserve_bytes=reserve[0], cuda_context_source=ctx[1], reserve_source=reserve[1],
        n_layers=s.n_layers, max_position_embeddings=s.max_position_embeddings, warnings=[x for x in w if x])


def _resolve_ctx(cuda_context_bytes: Any) -> tuple[int, str]:
    if cuda_context_bytes is None:
        return cuda_context_default()
    return _check_bytes(cuda_context_bytes, "CUDA context"), "given by the caller"


def _resolve_reserve(reserve_bytes: Any) -> tuple[int, str]:
    if reserve_bytes is None:
        return DEFAULT_RESERVE_BYTES, DEFAULT_RESERVE_SOURCE
    return _check_bytes(reserve_bytes, "reserve"), "given by the caller"


def breakdown(spec: Any, *, bpw: float | None = None, head_bits: int = 6, max_seq_len: int,
              cache_mode: str = "fp16", batch: int = 1, max_input_len: int = DEFAULT_MAX_INPUT_LEN,
              max_attention_size: int = DEFAULT_MAX_ATTENTION_SIZE, flash_attn: bool = False,
              cuda_context_bytes: int | None = None, reserve_bytes: int | None = None) -> Breakdown:
    """Every term for one model, bpw, context and cache mode. A context beyond the model's trained length warns."""
    mode = check_cache_mode(cache_mode)
    L = _check_len(max_seq_len)
    _check_len(max_input_len, "max_input_len")
    st = _Static(spec, bpw, head_bits)
    bd = _breakdown_from(st, L, mode, _check_batch(batch), max_input_len, max_attention_size, flash_attn,
                         _resolve_ctx(cuda_context_bytes), _resolve_reserve(reserve_bytes))
    for w in bd.warnings:
        warnings.warn(w, CourseWarning, stacklevel=2)
    return bd


def load_order(spec: Any, *, bpw: float | None = None, head_bits: int = 6, max_seq_len: int,
               cache_mode: str = "fp16", batch: int = 1, max_input_len: int = DEFAULT_MAX_INPUT_LEN,
               path: str = "autosplit") -> list[dict]:
    """exllamav2's allocations in the order it makes them, module by module, for the spill model.

    Each entry: {'module', 'kind', 'layer', 'weight_bytes', 'cache_bytes', 'scratch_bytes', 'bytes',
    'device_hint'}. The embedding comes first on the CPU. Then, when the first module lands on the GPU, the device
    context (scratch buffer + RoPE tables). ``path='autosplit'`` (model.py ``load_autosplit_gen`` with a lazy cache):
    for quantized/FP8 caches the FP16 temp K/V layer, then per layer the attention module (its weights and its cache
    layer: ``cache.update_cache_tensors()`` runs just before each attention module loads) and the MLP, then the final
    norm and lm_head. ``path='load'`` (``model.load()``, then ``ExLlamaV2Cache(model)``): every module's weights
    first, then the cache, layer by layer (``create_state_tensors``), the temp layer last. Sums equal
    ``breakdown()``'s weights, cache and scratch terms either way.
    """
    interleave = check_load_path(path) == "autosplit"
    mode = check_cache_mode(cache_mode)
    L = _check_len(max_seq_len)
    st = _Static(spec, bpw, head_bits)
    s = st.shape
    layout = kv_cache_layout(s, L, mode, batch)
    per_layer = [0] * s.n_layers
    temp = 0
    for r in layout:
        m = re.search(r"\[(\d+)\]", r["name"])
        if m:
            per_layer[int(m.group(1))] += alloc_bytes(r["bytes"])
        else:
            temp += alloc_bytes(r["bytes"])
    sc = scratch_bytes(s, L, max_input_len, DEFAULT_MAX_ATTENTION_SIZE, batch)
    out: list[dict] = []

    def add(module, kind, layer, w=0, c=0, x=0, hint="gpu", **extra):
        out.append({"module": module, "kind": kind, "layer": layer, "weight_bytes": w, "cache_bytes": c,
                    "scratch_bytes": x, "bytes": w + c + x, "device_hint": hint, **extra})

    emb = st.modules[0]
    add(emb["module"], "embedding", None, w=emb["weight_bytes"], hint="cpu")
    add("device context (scratch + RoPE sin/cos)", "device_context", None,
        x=sc["device_scratch"] + sc["rope_tables"])
    if temp and interleave:
        add(f"cache FP16 temp K/V ({CACHE_CLASSES[mode]})", "cache_temp", None, c=temp)
    for m in st.modules[1:]:
        if m["kind"] == "attention":
            i = m["layer"]
            add(m["module"], "attention", i, w=m["weight_bytes"], c=per_layer[i] if interleave else 0,
                sliding_window=s.sliding_window if i in s.sliding_layers else 0)
        else:
            add(m["module"], m["kind"], m["layer"], w=m["weight_bytes"])
    if not interleave:
        for i, c in enumerate(per_layer):
            add(f"cache layer {i}", "cache", i, c=c)
        if temp:
            add(f"cache FP16 temp K/V ({CACHE_CLASSES[mode]})", "cache_temp", None, c=temp)
    return out


# ----------------------------------------------------------------------------------------------------------------
# GPUs
# ----------------------------------------------------------------------------------------------------------------

_NV = "NVIDIA datasheet / product page"
#: known cards: memory (GiB as marketed: GDDR/HBM capacities are binary), datasheet bandwidth, PCIe link.
#: NVML reports a total slightly below (the driver keeps some); the reserve term covers that.
GPUS: dict[str, dict] = {
    "RTX 4080 Super": {"vram_gib": 16, "bandwidth_gbs": 736, "pcie_gen": 4, "pcie_lanes": 16,
                       "_source": f"{_NV}: GeForce RTX 4080 family specs (16 GB GDDR6X, 256-bit, 23 Gbps)"},
    "RTX 4080": {"vram_gib": 16, "bandwidth_gbs": 717, "pcie_gen": 4, "pcie_lanes": 16,
                 "_source": f"{_NV}: GeForce RTX 4080 family specs (16 GB GDDR6X, 256-bit, 22.4 Gbps)"},
    "RTX 4090": {"vram_gib": 24, "bandwidth_gbs": 1008, "pcie_gen": 4, "pcie_lanes": 16,
                 "_source": f"{_NV}: GeForce RTX 4090 specs (24 GB GDDR6X, 384-bit, 21 Gbps)"},
    "RTX 4070 Ti Super": {"vram_gib": 16, "bandwidth_gbs": 672, "pcie_gen": 4, "pcie_lanes": 16,
                          "_source": f"{_NV}: GeForce RTX 4070 family specs (16 GB GDDR6X, 256-bit, 21 Gbps)"},
    "RTX 4070 Ti": {"vram_gib": 12, "bandwidth_gbs": 504, "pcie_gen": 4, "pcie_lanes": 16,
                    "_source": f"{_NV}: GeForce RTX 4070 family specs (12 GB GDDR6X, 192-bit, 21 Gbps)"},
    "RTX 4070": {"vram_gib": 12, "bandwidth_gbs": 504, "pcie_gen": 4, "pcie_lanes": 16,
                 "_source": f"{_NV}: GeForce RTX 4070 family specs (12 GB GDDR6X, 192-bit, 21 Gbps)"},
    "RTX 4060 Ti 16GB": {"vram_gib": 16, "bandwidth_gbs": 288, "pcie_gen": 4, "pcie_lanes": 8,
                         "_source": f"{_NV}: GeForce RTX 4060 family specs (16 GB GDDR6, 128-bit, 18 Gbps, PCIe 4.0 x8)"},
    "RTX 3090": {"vram_gib": 24, "bandwidth_gbs": 936, "pcie_gen": 4, "pcie_lanes": 16,
                 "_source": f"{_NV}: GeForce RTX 3090 specs (24 GB GDDR6X, 384-bit, 19.5 Gbps)"},
    "RTX 3090 Ti": {"vram_gib": 24, "bandwidth_gbs": 1008, "pcie_gen": 4, "pcie_lanes": 16,
                    "_source": f"{_NV}: GeForce RTX 3090 Ti specs (24 GB GDDR6X, 384-bit, 21 Gbps)"},
    "RTX 3060 12GB": {"vram_gib": 12, "bandwidth_gbs": 360, "pcie_gen": 4, "pcie_lanes": 16,
                      "_source": f"{_NV}: GeForce RTX 3060 family specs (12 GB GDDR6, 192-bit, 15 Gbps)"},
    "RTX 5090": {"vram_gib": 32, "bandwidth_gbs": 1792, "pcie_gen": 5, "pcie_lanes": 16,
                 "_source": f"{_NV}: GeForce RTX 5090 specs (32 GB GDDR7, 512-bit, 28 Gbps)"},
    "RTX 5080": {"vram_gib": 16, "bandwidth_gbs": 960, "pcie_gen": 5, "pcie_lanes": 16,
                 "_source": f"{_NV}: GeForce RTX 5080 specs (16 GB GDDR7, 256-bit, 30 Gbps)"},
    "RTX A6000": {"vram_gib": 48, "bandwidth_gbs": 768, "pcie_gen": 4, "pcie_lanes": 16,
                  "_source": f"{_NV}: NVIDIA RTX A6000 datasheet (48 GB GDDR6)"},
    "RTX 6000 Ada": {"vram_gib": 48, "bandwidth_gbs": 960, "pcie_gen": 4, "pcie_lanes": 16,
                     "_source": f"{_NV}: NVIDIA RTX 6000 Ada Generation datasheet (48 GB GDDR6)"},
    "L4": {"vram_gib": 24, "bandwidth_gbs": 300, "pcie_gen": 4, "pcie_lanes": 16,
           "_source": f"{_NV}: NVIDIA L4 datasheet (24 GB GDDR6)"},
    "L40S": {"vram_gib": 48, "bandwidth_gbs": 864, "pcie_gen": 4, "pcie_lanes": 16,
             "_source": f"{_NV}: NVIDIA L40S datasheet (48 GB GDDR6 with ECC)"},
    "A100 80GB SXM": {"vram_gib": 80, "bandwidth_gbs": 2039, "pcie_gen": 4, "pcie_lanes": 16,
                      "_source": f"{_NV}: NVIDIA A100 datasheet (80 GB HBM2e, SXM)"},
    "A100 80GB PCIe": {"vram_gib": 80, "bandwidth_gbs": 1935, "pcie_gen": 4, "pcie_lanes": 16,
                       "_source": f"{_NV}: NVIDIA A100 datasheet (80 GB HBM2e, PCIe)"},
    "H100 80GB SXM": {"vram_gib": 80, "bandwidth_gbs": 3350, "pcie_gen": 5, "pcie_lanes": 16,
                      "_source": f"{_NV}: NVIDIA H100 datasheet (H100 SXM: 80 GB HBM3, 3.35 TB/s)"},
    "H100 80GB PCIe": {"vram_gib": 80, "bandwidth_gbs": 2000, "pcie_gen": 5, "pcie_lanes": 16,
                       "_source": f"{_NV}: NVIDIA H100 datasheet (H100 PCIe/NVL: 80 GB HBM2e, 2 TB/s)"},
    "H200": {"vram_gib": 141, "bandwidth_gbs": 4800, "pcie_gen": 5, "pcie_lanes": 16,
             "_source": f"{_NV}: NVIDIA H200 datasheet (141 GB HBM3e, 4.8 TB/s)"},
}
_GPU_ALIASES = {"4080s": "RTX 4080 Super", "4070tis": "RTX 4070 Ti Super", "3060": "RTX 3060 12GB",
                "4060ti": "RTX 4060 Ti 16GB", "a100": "A100 80GB SXM", "h100": "H100 80GB SXM",
                "h100sxm": "H100 80GB SXM", "h100pcie": "H100 80GB PCIe", "a1006": "RTX A6000",
                # names the driver (NVML, torch) reports that differ from the datasheet's
                "NVIDIA H100 80GB HBM3": "H100 80GB SXM", "NVIDIA A100-SXM4-80GB": "A100 80GB SXM"}
#: PCIe usable GB/s per lane, by generation (after 128b/130b encoding): gen3 0.985, gen4 1.969, gen5 3.938
PCIE_GBS_PER_LANE = {3: 0.985, 4: 1.969, 5: 3.938}


def _gpu_key(name: str) -> str:
    k = re.sub(r"(nvidia|geforce|\s|-|_)", "", str(name).lower())
    return k.replace("super", "super").replace("gb", "gb")


def gpu_spec(name_or_gib: Any, bandwidth_gbs: float | None = None, pcie_gbs: float | None = None) -> dict:
    """A card's facts: a known name ('RTX 4080 Super', '4090', 'H100') or its memory in GiB (a number).

    Returns {'name', 'vram_gib', 'vram_bytes', 'bandwidth_gbs', 'pcie_gbs', 'pcie_gen', 'pcie_lanes', '_source'};
    bandwidths given here override the datasheet's.
    """
    if isinstance(name_or_gib, dict):
        spec = dict(name_or_gib)
        spec.setdefault("name", "custom")
    elif isinstance(name_or_gib, (int, float)) and not isinstance(name_or_gib, bool):
        v = float(name_or_gib)
        if not math.isfinite(v) or v <= 0:
            raise CourseError(f"GPU memory must be a positive number of GiB (got {name_or_gib})")
        if v > 2048:
            raise CourseError(f"{v:g} GiB of GPU memory is absurd (no single GPU has that); give it in GiB, e.g. 16")
        spec = {"name": f"{v:g} GiB GPU", "vram_gib": v, "bandwidth_gbs": None, "pcie_gen": None,
                "pcie_lanes": None, "_source": "memory size given by the user"}
    else:
        text = str(name_or_gib).strip()
        key = _gpu_key(text)
        table = {_gpu_key(n): n for n in GPUS}
        table.update({_gpu_key(a): n for a, n in _GPU_ALIASES.items()})
        hit = table.get(key) or table.get("rtx" + key) or table.get(key.replace("rtx", ""))
        if hit is None:
            number = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(gib|gb)?", text.lower())
            if number:
                return gpu_spec(float(number.group(1)), bandwidth_gbs, pcie_gbs)
            close = difflib.get_close_matches(key, list(table), n=3, cutoff=0.5)
            names = sorted({table[c] for c in close})
            hint = f" Did you mean {', '.join(repr(n) for n in names)}?" if names else ""
            raise CourseError(f"unknown GPU '{text}'.{hint} Known: {', '.join(GPUS)}; or give its memory, "
                              "e.g. --gpu-gib 16")
        spec = {"name": hit, **GPUS[hit]}
    spec["vram_bytes"] = int(round(float(spec["vram_gib"]) * GIB))
    for what, val in (("bandwidth", bandwidth_gbs), ("PCIe bandwidth", pcie_gbs)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float)) or val <= 0 or val > 1e5):
            raise CourseError(f"{what} must be a positive number of GB/s (got {val!r})")
    if bandwidth_gbs is not None:
        spec["bandwidth_gbs"] = float(bandwidth_gbs)
    if pcie_gbs is not None:
        spec["pcie_gbs"] = float(pcie_gbs)
    elif spec.get("pcie_gen") and spec.get("pcie_lanes"):
        spec["pcie_gbs"] = round(PCIE_GBS_PER_LANE[spec["pcie_gen"]] * spec["pcie_lanes"], 1)
    else:
        spec.setdefault("pcie_gbs", None)
    return spec


# ----------------------------------------------------------------------------------------------------------------
# the planner
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """Will it fit? ``fits``, ``margin_bytes`` (negative: short by), the cache, the longest contexts, advice."""

    model: str
    gpu: dict
    breakdown: Breakdown
    fits: bool
    margin_bytes: int
    longest_context: dict
    longest_context_capped: dict
    recommendation: str
    max_bpw_that_fits: float | None = None
    decode_roofline_tok_s: dict | None = None
    warnings: list = field(default_factory=list)

    @property
    def kv_cache_bytes(self) -> int:
        return self.breakdown.kv_cache_bytes

    @property
    def autosplit_margin_bytes(self) -> int:
        """The margin while ``load_autosplit`` loads: it holds ``LOAD_AUTOSPLIT_RESERVE_BYTES`` more until it ends."""
        return self.margin_bytes - LOAD_AUTOSPLIT_RESERVE_BYTES

    def to_dict(self) -> dict:
        return {"model": self.model, "gpu": self.gpu, "units": "bytes (GiB = 2**30 bytes)",
                "fits": self.fits, "margin_bytes": self.margin_bytes, "kv_cache_bytes": self.kv_cache_bytes,
                "autosplit_margin_bytes": self.autosplit_margin_bytes,
                "vram_total_bytes": self.breakdown.vram_total_bytes, "breakdown": self.breakdown.to_dict(),
                "longest_context": self.longest_context, "longest_context_capped": self.longest_context_capped,
                "max_bpw_that_fits": self.max_bpw_that_fits, "decode_roofline_tok_s": self.decode_roofline_tok_s,
                "recommendation": self.recommendation, "warnings": self.warnings}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def summary(self) -> str:
        g = self.gpu
        verdict = (f"FITS with {fmt_gib(self.margin_bytes)} to spare" if self.fits
                   else f"DOES NOT FIT: {fmt_gib(-self.margin_bytes)} short")
        lines = [self.breakdown.table(), "",
                 f"GPU: {g['name']}, {g['vram_gib']:g} GiB -> {verdict}",
                 "longest context that fits (multiples of 256 tokens): " + ", ".join(
                     f"{m} {'>=' if self.longest_context_capped[m] else ''}{n:,}" for m, n in
                     self.longest_context.items())]
        if self.decode_roofline_tok_s:
            r = self.decode_roofline_tok_s
            lines.append(f"decode upper bound from {g['bandwidth_gbs']:g} GB/s (bandwidth roofline, not a prediction): "
                         f"{r['empty_cache']:.0f} tok/s at an empty cache, {r['full_cache']:.0f} tok/s at a full one")
        lines += ["", self.recommendation]
        return "\n".join(lines)


def _fits_at(st: _Static, L: int, mode: str, gpu_bytes: int, kw: dict) -> int:
    bd = _breakdown_from(st, L, mode, **kw)
    return gpu_bytes - bd.vram_total_bytes


def _longest(st: _Static, mode: str, gpu_bytes: int, kw: dict) -> tuple[int, bool]:
    """Largest multiple of 256 tokens that fits (0 if none), and whether the search cap was reached."""
    if _fits_at(st, PAGE, mode, gpu_bytes, kw) < 0:
        return 0, False
    hi_pages = LONGEST_CONTEXT_CAP // PAGE
    if _fits_at(st, hi_pages * PAGE, mode, gpu_bytes, kw) >= 0:
        return hi_pages * PAGE, True
    lo, hi = 1, hi_pages  # lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _fits_at(st, mid * PAGE, mode, gpu_bytes, kw) >= 0:
            lo = mid
        else:
            hi = mid
    return lo * PAGE, False


def _max_bpw(spec: Any, head_bits: int, L: int, mode: str, gpu_bytes: int, kw: dict) -> float | None:
    """Highest bpw in 0.05 steps (2.0..8.0) whose estimate fits, for configs (None for a real EXL2 folder)."""
    shape = model_shape(spec)
    if shape.exl2_dir:
        return None
    steps = [round(2.0 + 0.05 * i, 2) for i in range(121)]
    best = None
    lo, hi = 0, len(steps) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        st = _Static(shape, steps[mid], head_bits)
        if _fits_at(st, L, mode, gpu_bytes, kw) >= 0:
            best, lo = steps[mid], mid + 1
        else:
            hi = mid - 1
    return best


def _recommend(p_model: str, gpu: dict, bd: Breakdown, fits: bool, margin: int, longest: dict, capped: dict,
               max_bpw: float | None, shape: ModelShape) -> str:
    L, mode = bd.max_seq_len, bd.cache_mode

    def ctx(m):
        return f"{'at least ' if capped[m] else ''}{longest[m]:,} tokens"

    if fits:
        text = (f"Fits: {fmt_gib(margin)} to spare on {gpu['name']} at max_seq_len {L:,} with a {mode} cache. "
                f"The longest context this {mode} cache allows is {ctx(mode)}.")
        better = [m for m in CACHE_MODES if m != mode and m != "fp8" and longest[m] > longest[mode] * 1.2]
        if better:
            text += (" A quantized cache stretches it further: " +
                     ", ".join(f"{m} {ctx(m)}" for m in better) + " (Q4/Q6/Q8 caches cost little quality; FP8 "
                     "is rejected by the dynamic generator).")
        if margin < LOAD_AUTOSPLIT_RESERVE_BYTES:
            text += (f" Tight: model.load_autosplit(cache) holds {fmt_gib(LOAD_AUTOSPLIT_RESERVE_BYTES)} more while it "
                     f"loads, {fmt_gib(LOAD_AUTOSPLIT_RESERVE_BYTES - margin)} more than this margin: it fails with "
                     "'Insufficient VRAM' on Linux and spills into system RAM on Windows. Leave that much free, or "
                     "load with model.load() and create the cache afterwards.")
    else:
        opts = []
        if longest[mode] >= PAGE:
            opts.append(f"lower max_seq_len to {ctx(mode)} or less with the {mode} cache")
        for m in ("q8", "q6", "q4"):
            if m != mode and longest[m] >= L:
                opts.append(f"keep {L:,} tokens with a {m} cache ({CACHE_CLASSES[m]}; fits up to {ctx(m)})")
                break
        if max_bpw is not None and bd.bpw is not None and max_bpw < bd.bpw:
            opts.append(f"use a quant of at most {max_bpw:g} bpw at {L:,} tokens with the {mode} cache")
        elif shape.exl2_dir:
            opts.append("use a lower-bpw EXL2 quant of this model")
        if not opts:
            opts.append("use a smaller model or a bigger GPU: even the weights and scratch do not fit")
        text = (f"Does not fit: {p_model} at max_seq_len {L:,} with a {mode} cache needs {fmt_gib(bd.vram_total_bytes)}"
                f", {fmt_gib(-margin)} more than {gpu['name']}'s {gpu['vram_gib']:g} GiB. Options: "
                + "; ".join(f"({i + 1}) {o}" for i, o in enumerate(opts)) + ". On Windows the driver's sysmem "
                "fallback will not fail here: it spills into system RAM over PCIe and decoding slows several-fold "
                "(notebook 04); on Linux exllamav2 stops with CUDA out of memory.")
    if L > shape.max_position_embeddings:
        text += (f" Note: {L:,} tokens is beyond the {shape.max_position_embeddings:,} the model was trained for "
                 "(see the warning on RoPE scaling).")
    return text


def plan(spec: Any, gpu: Any, *, bpw: float | None = None, head_bits: int = 6, max_seq_len: int,
         cache_mode: str = "fp16", reserve_gib: float | None = None, cuda_context_gib: float | None = None,
         batch: int = 1, max_input_len: int = DEFAULT_MAX_INPUT_LEN,
         max_attention_size: int = DEFAULT_MAX_ATTENTION_SIZE, flash_attn: bool = False,
         bandwidth_gbs: float | None = None) -> Plan:
    """Plan one model on one GPU: the breakdown, fits or not and by how much, the longest context per cache mode,
    the highest bpw that fits (configs only), a decode roofline if the bandwidth is known, and a recommendation."""
    g = gpu_spec(gpu, bandwidth_gbs) if not isinstance(gpu, dict) or "vram_bytes" not in gpu else gpu
    mode = check_cache_mode(cache_mode)
    L = _check_len(max_seq_len)
    _check_len(max_input_len, "max_input_len")
    ctx = _resolve_ctx(None if cuda_context_gib is None
                       else int(round(_check_gib(cuda_context_gib, "CUDA context") * GIB)))
    res = _resolve_reserve(None if reserve_gib is None else int(round(_check_gib(reserve_gib, "reserve") * GIB)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        st = _Static(spec, bpw, head_bits)
    kw = dict(batch=_check_batch(batch), max_input_len=max_input_len, max_attention_size=max_attention_size,
              flash_attn=flash_attn, ctx=ctx, reserve=res)
    bd = _breakdown_from(st, L, mode, **kw)
    gpu_bytes = g["vram_bytes"]
    margin = gpu_bytes - bd.vram_total_bytes
    longest, capped = {}, {}
    for m in CACHE_MODES:
        longest[m], capped[m] = _longest(st, m, gpu_bytes, kw)
    max_bpw = _max_bpw(st.shape, head_bits, L, mode, gpu_bytes, kw) if bpw is not None else None
    roof = None
    if g.get("bandwidth_gbs"):
        per_tok = bd.kv_layers_bytes / L
        bw = float(g["bandwidth_gbs"]) * 1e9
        roof = {"empty_cache": bw / bd.weights_bytes, "full_cache": bw / (bd.weights_bytes + per_tok * L),
                "note": "GPU weights (+ the cache as stored) read once per token at datasheet bandwidth; an upper "
                        "bound, not a prediction"}
    msgs = [str(w.message) for w in caught] + bd.warnings
    for msg in msgs:
        warnings.warn(msg, CourseWarning, stacklevel=2)
    rec = _recommend(st.shape.name, g, bd, margin >= 0, margin, longest, capped, max_bpw, st.shape)
    return Plan(model=st.shape.name, gpu=g, breakdown=bd, fits=margin >= 0, margin_bytes=margin,
                longest_context=longest, longest_context_capped=capped, recommendation=rec,
                max_bpw_that_fits=max_bpw, decode_roofline_tok_s=roof, warnings=msgs)


def _check_gib(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise CourseError(f"{what} must be zero or a positive number of GiB (got {v!r})")
    if v > 4096:
        raise CourseError(f"{what} of {v:g} GiB is absurd; give it in GiB, e.g. 0.5")
    return float(v)


# ----------------------------------------------------------------------------------------------------------------
# the popular formula (notebook 05)
# ----------------------------------------------------------------------------------------------------------------

def simple_calculator_bytes(shape: Any, bpw: float, ctx: int, kv_bits: int = 16) -> int:
    """What popular VRAM calculators compute: params x bpw / 8 + 2 x layers x kv_dim x ctx x kv_bits / 8.

    No lm_head at its own bits, embedding counted on the GPU, no cache scales or temp layer, no scratch, no CUDA
    context: notebook 05 shows by how much this errs against ``breakdown``.
    """
    s = model_shape(shape)
    L = _check_len(ctx, "ctx")
    if isinstance(bpw, bool) or not isinstance(bpw, (int, float)) or bpw <= 0 or bpw > 32:
        raise CourseError(f"bits per weight must be a positive number up to 32 (got {bpw!r})")
    if kv_bits not in (4, 6, 8, 16, 32):
        raise CourseError(f"kv_bits must be one of 4, 6, 8, 16, 32 (got {kv_bits!r})")
    return int(s.n_params * bpw / 8 + 2 * s.n_layers * s.kv_dim * L * kv_bits / 8)


#: the cache bits a simple calculator would use for each exllamav2 mode
SIMPLE_KV_BITS = {"fp16": 16, "fp8": 8, "q8": 8, "q6": 6, "q4": 4}


# ----------------------------------------------------------------------------------------------------------------
# CLI: python -m helpers plan
# ----------------------------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m helpers plan",
        description="Will a model, context and cache mode fit on a GPU? Every byte of exllamav2's allocation, in GiB.")
    ap.add_argument("--model", default=None,
                    help=f"bundled name ({', '.join(bundled_models())}), a config.json, or an EXL2 folder "
                         f"(default: ${MODEL_ENV} if set)")
    ap.add_argument("--bpw", type=float, default=None, help="bits per weight (needed unless --model is an EXL2 folder)")
    ap.add_argument("--head-bits", type=int, default=6, help="lm_head bits (exllamav2 default 6; 16 = fp16)")
    ap.add_argument("--ctx", "--max-seq-len", dest="ctx", type=int, default=4096, help="max_seq_len in tokens")
    ap.add_argument("--cache", default="fp16", help=f"cache mode: {', '.join(CACHE_MODES)}")
    ap.add_argument("--gpu", default=None, help=f"a known card ({', '.join(GPUS)})")
    ap.add_argument("--gpu-gib", type=float, default=None, help="the GPU's memory in GiB instead of a card name")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth, GB/s (overrides datasheet)")
    ap.add_argument("--pcie-gbs", type=float, default=None, help="PCIe bandwidth, GB/s")
    ap.add_argument("--reserve-gib", type=float, default=None, help="desktop/OS reserve in GiB (default 0.5)")
    ap.add_argument("--cuda-context-gib", type=float, default=None, help="CUDA context in GiB (default: measured or 0.5)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-input-len", type=int, default=DEFAULT_MAX_INPUT_LEN)
    ap.add_argument("--flash-attn", action="store_true", help="flash-attn installed (smaller attention transient)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (bytes)")
    ap.add_argument("--list", action="store_true", help="list bundled models and known GPUs")
    return ap


def main_plan(argv: list[str]) -> int:
    """`python -m helpers plan --model qwen2.5-14b --bpw 5.5 --ctx 32768 --cache fp16 --gpu-gib 16 [--json]`"""
    args = _parser().parse_args(argv)
    if args.list:
        print("bundled models: " + ", ".join(bundled_models()))
        for n, g in GPUS.items():
            print(f"  {n:<18} {g['vram_gib']:>4g} GiB  {g['bandwidth_gbs']:>5g} GB/s  PCIe {g['pcie_gen']}.0 x{g['pcie_lanes']}")
        return 0
    model = args.model or os.environ.get(MODEL_ENV)
    if not model:
        raise CourseError(f"give --model (a bundled name: {', '.join(bundled_models())}; a config.json; or an EXL2 "
                          f"folder), or set {MODEL_ENV}")
    if args.gpu is None and args.gpu_gib is None:
        raise CourseError("give --gpu NAME (e.g. 'RTX 4080 Super') or --gpu-gib N (its memory in GiB)")
    gpu = gpu_spec(args.gpu if args.gpu is not None else args.gpu_gib, args.bandwidth_gbs, args.pcie_gbs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = plan(model, gpu, bpw=args.bpw, head_bits=args.head_bits, max_seq_len=args.ctx, cache_mode=args.cache,
                 reserve_gib=args.reserve_gib, cuda_context_gib=args.cuda_context_gib, batch=args.batch,
                 max_input_len=args.max_input_len, flash_attn=args.flash_attn)
    for msg in dict.fromkeys(str(w.message) for w in caught):
        print(f"warning: {msg}", file=sys.stderr)
    print(p.to_json() if args.json else p.summary())
    return 0


# ----------------------------------------------------------------------------------------------------------------
# GPU recordings: predicted vs measured (run on a CUDA machine, each configuration in a fresh process)
# ----------------------------------------------------------------------------------------------------------------

_JSON_TAG = "@@MEMORY_JSON@@"


def _nvml_used() -> int | None:
    from helpers.core import devices as gpu

    return gpu.nvml_used_bytes(int(os.environ.get("EXL2_COURSE_GPU_INDEX", "0")))


def _child_cuda_context() -> dict:
    """(child process) NVML used before CUDA starts, after torch.cuda.init() + a tiny allocation; minus the
    allocator's segment for that tiny tensor."""
    before = _nvml_used()
    import torch

    torch.cuda.init()
    x = torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    after = _nvml_used()
    reserved = int(torch.cuda.memory_reserved())
    # libraries: the first fp16 matmul creates the cuBLAS handle and loads its kernels (one-time, per process)
    a = torch.ones((64, 64), dtype=torch.float16, device="cuda")
    (a @ a).sum().item()
    torch.cuda.synchronize()
    after_lib = _nvml_used()
    reserved_lib = int(torch.cuda.memory_reserved())
    del x, a
    out = {"nvml_before_bytes": before, "nvml_after_init_bytes": after, "nvml_after_matmul_bytes": after_lib,
           "torch_reserved_bytes": reserved, "torch_reserved_after_matmul_bytes": reserved_lib}
    if before is not None and after is not None:
        out["cuda_context_bytes"] = int(after - before - reserved)
        out["cuda_context_raw_bytes"] = int(after - before)
        if after_lib is not None:
            out["cuda_libraries_bytes"] = int((after_lib - after) - (reserved_lib - reserved))
    return out


_CACHE_IMPORT = {"fp16": "ExLlamaV2Cache", "fp8": "ExLlamaV2Cache_8bit", "q8": "ExLlamaV2Cache_Q8",
                 "q6": "ExLlamaV2Cache_Q6", "q4": "ExLlamaV2Cache_Q4"}


def _child_measure(model_dir: str, mode: str, max_seq_len: int) -> dict:
    """(child process) Load one EXL2 model with load_autosplit and one cache; report torch and NVML readings."""
    out = _child_cuda_context()
    import torch
    import exllamav2  # noqa: F401  (only here, on a CUDA machine, after require_cuda in the parent)
    from exllamav2 import ExLlamaV2, ExLlamaV2Config

    cls = getattr(exllamav2, _CACHE_IMPORT[mode])
    config = ExLlamaV2Config(model_dir)
    config.max_seq_len = max_seq_len
    config.no_sdpa = True  # DOMAIN.md trap: 0.3.2's SDPA prefill is not causal
    model = ExLlamaV2(config)
    cache = cls(model, max_seq_len=max_seq_len, lazy=True)
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()  # the matmul above left a cuBLAS workspace: count from a clean baseline
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    alloc0 = int(torch.cuda.memory_allocated())
    model.load_autosplit(cache)
    torch.cuda.synchronize()
    out["torch_allocated_bytes"] = int(torch.cuda.memory_allocated()) - alloc0
    out["torch_peak_bytes"] = int(torch.cuda.max_memory_allocated()) - alloc0
    if clear is not None:
        clear()
    out["torch_allocated_no_cublas_bytes"] = int(torch.cuda.memory_allocated()) - alloc0
    out["cublas_workspace_bytes"] = out["torch_allocated_bytes"] - out["torch_allocated_no_cublas_bytes"]
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    out["torch_reserved_after_bytes"] = int(torch.cuda.memory_reserved())
    after = _nvml_used()
    if after is not None and out.get("nvml_before_bytes") is not None:
        out["nvml_used_delta_bytes"] = int(after - out["nvml_before_bytes"])
    return out


def _run_child(call: str, timeout: int = 1800) -> dict:
    code = (f"import json; from helpers.memory.accounting import _JSON_TAG, {call.split('(')[0]}; "
            f"print(_JSON_TAG + json.dumps({call}))")
    env = dict(os.environ, EXL2_COURSE_NO_PROGRESS="1")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(_JSON_TAG):
            return json.loads(line[len(_JSON_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}


def record_cuda_context(repeats: int = 3) -> Path:
    """Measure the CUDA context in ``repeats`` fresh processes; saves results/memory/cuda-context-<gpu>-<date>.json."""
    from helpers.core import devices as gpu
    from helpers.core import results

    gpu.require_cuda("measuring the CUDA context")
    rows = []
    for i in range(repeats):
        r = _run_child("_child_cuda_context()")
        r.update(kind="cuda_context", run=i)
        if "cuda_context_bytes" in r:
            r["cuda_context_gib"] = round(gib(r["cuda_context_bytes"]), 4)
        rows.append(r)
    prov = results.provenance()
    name = f"cuda-context-{results.slug(prov.get('gpu') or 'gpu')}-{prov['date'][:10]}"
    return results.save_result("memory", name, rows, prov=prov)


def _synthetic_14b_dir() -> Path:
    """A Qwen2.5-14B-shaped 5.5 bpw EXL2 checkpoint with random weights (helpers.format.synthetic, another room)."""
    from helpers.core import paths
    from helpers.format import synthetic  # noqa: WPS433 (GPU recording only; memory's own math never needs it

    out = paths.cache_dir() / "synthetic" / "qwen2.5-14b-5.5bpw"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    return Path(synthetic.write_synthetic(str(CONFIGS_DIR / "qwen2.5-14b.json"), 5.5, out) or out)


def record_predicted_vs_measured(modes: Iterable[str] = ("fp16", "q8", "q4"),
                                 lengths: Iterable[int] = (4096, 32768), models: Iterable[str] = ("embedded", "qwen2.5-14b")) -> Path:
    """Predicted vs measured for the embedded model and a synthetic Qwen2.5-14B 5.5 bpw checkpoint, each cache mode
    and length in a fresh process. Rows say whether torch's allocation is within 2% and NVML within 3%."""
    from helpers.core import devices as gpu
    from helpers.core import results
    from helpers.core.progress import progress

    gpu.require_cuda("recording predicted vs measured memory")
    dirs = {}
    for m in models:
        if m == "embedded":
            from helpers.models import embedded as course_models  # noqa: WPS433 (GPU recording only
            dirs[m] = Path(course_models.embedded_model_dir())
        elif m == "qwen2.5-14b":
            dirs["qwen2.5-14b-synthetic-5.5bpw"] = _synthetic_14b_dir()
        else:
            dirs[Path(m).name] = Path(m)
    rows = []
    jobs = [(name, d, mode, L) for name, d in dirs.items() for mode in modes for L in lengths]
    for name, d, mode, L in progress(jobs, desc="memory: fresh process per configuration"):
        meas = _run_child(f"_child_measure({str(d)!r}, {mode!r}, {int(L)})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bd = breakdown(str(d), max_seq_len=L, cache_mode=mode, cuda_context_bytes=0, reserve_bytes=0)
        row = {"kind": "predicted_vs_measured", "model": name, "model_dir": str(d), "cache_mode": mode,
               "max_seq_len": int(L), "predicted_torch_bytes": bd.exllamav2_resident_bytes,
               "predicted_weights_bytes": bd.weights_bytes, "predicted_kv_cache_bytes": bd.kv_cache_bytes,
               "predicted_scratch_bytes": bd.scratch_bytes, **meas}
        if "torch_allocated_no_cublas_bytes" in meas:
            m = meas["torch_allocated_no_cublas_bytes"]
            row["torch_error_pct"] = round(100.0 * (bd.exllamav2_resident_bytes - m) / m, 3)
            row["within_2pct_torch"] = abs(row["torch_error_pct"]) <= 2.0
        if "nvml_used_delta_bytes" in meas and "cuda_context_bytes" in meas:
            # one-time process costs measured in the same fresh process before the model loaded (not fitted)
            one_time = meas["cuda_context_bytes"] + int(meas.get("cuda_libraries_bytes") or 0)
            row["one_time_process_bytes"] = one_time
            pred = bd.exllamav2_resident_bytes + one_time
            row["predicted_nvml_bytes"] = pred
            row["nvml_error_pct"] = round(100.0 * (pred - meas["nvml_used_delta_bytes"]) / meas["nvml_used_delta_bytes"], 3)
            row["within_3pct_nvml"] = abs(row["nvml_error_pct"]) <= 3.0
        for k in [k for k in row if k.endswith("_bytes") and isinstance(row[k], int)]:
            row[k[:-6] + "_gib"] = round(gib(row[k]), 4)
        rows.append(row)
    prov = results.provenance()
    name = f"predicted-vs-measured-{results.slug(prov.get('gpu') or 'gpu')}-{prov['date'][:10]}"
    return results.save_result("memory", name, rows, prov=prov)


GPU_RECORDINGS = {
    "memory_cuda_context": record_cuda_context,
    "memory_predicted_vs_measured": record_predicted_vs_measured,
}


def recorded_rows(kind: str | None = None) -> list[tuple[dict, dict]]:
    """(row, provenance) of every recorded memory result (optionally of one kind), oldest first."""
    from helpers.core import results

    out = []
    for doc in results.load_results("memory"):
        for row in doc["rows"]:
            if kind is None or row.get("kind") == kind:
                out.append((row, doc["provenance"]))
    return out


NOT_RECORDED = "not recorded yet: run `make gpu-results` on a CUDA machine"


def recorded_report() -> str:
    """Recorded predicted-vs-measured rows and CUDA-context measurements as text, each labelled with where and when;
    or one line saying nothing is recorded yet."""
    from helpers.core import results

    lines = []
    ctx = recorded_rows("cuda_context")
    if ctx:
        prov = ctx[-1][1]
        vals = [r.get("cuda_context_bytes") for r, _ in ctx if isinstance(r.get("cuda_context_bytes"), int)]
        libs = [r.get("cuda_libraries_bytes") for r, _ in ctx if isinstance(r.get("cuda_libraries_bytes"), int)]
        lines.append(f"CUDA context ({results.label(prov)}): "
                     + ", ".join(fmt_gib(v, 3) for v in vals)
                     + (f"; + cuBLAS init {', '.join(fmt_gib(v, 3) for v in libs)}" if libs else ""))
    rows = recorded_rows("predicted_vs_measured")
    if rows:
        lines.append(f"predicted vs measured ({results.label(rows[-1][1])}), each configuration in a fresh process:")
        lines.append(f"{'model':<30}{'cache':>6}{'ctx':>7}{'pred GiB':>10}{'torch GiB':>10}{'err %':>7}"
                     f"{'NVML GiB':>10}{'err %':>7}")
        for r, _ in rows:
            if "error" in r:
                lines.append(f"{r['model']:<30}{r['cache_mode']:>6}{r['max_seq_len']:>7}  failed: {r['error']}")
                continue
            lines.append(f"{r['model']:<30}{r['cache_mode']:>6}{r['max_seq_len']:>7}"
                         f"{gib(r['predicted_torch_bytes']):>10.3f}{gib(r['torch_allocated_no_cublas_bytes']):>10.3f}"
                         f"{r.get('torch_error_pct', float('nan')):>7.2f}"
                         f"{gib(r.get('nvml_used_delta_bytes', 0)):>10.3f}{r.get('nvml_error_pct', float('nan')):>7.2f}")
    return "\n".join(lines) if lines else NOT_RECORDED


def calculator_rows(cases: Iterable[tuple], **plan_kw) -> list[dict]:
    """For (model, bpw, ctx, cache_mode) cases: exllamav2's total (this module) beside the simple formula, in GiB,
    and the formula's error in percent of exllamav2's total."""
    out = []
    for spec, bpw, ctx, mode in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bd = breakdown(spec, bpw=bpw, max_seq_len=ctx, cache_mode=mode, **plan_kw)
        shape = model_shape(spec)
        simple = simple_calculator_bytes(shape, bpw if bpw is not None else 5.0, ctx, SIMPLE_KV_BITS[bd.cache_mode])
        out.append({"case": f"{shape.name} {bpw if bpw is not None else ''}bpw {ctx // 1024}k {bd.cache_mode}",
                    "exllamav2_gib": round(gib(bd.vram_total_bytes), 2),
                    "resident_gib": round(gib(bd.exllamav2_resident_bytes), 2),
                    "simple_gib": round(gib(simple), 2),
                    "error_pct": round(100.0 * (simple - bd.vram_total_bytes) / bd.vram_total_bytes, 1)})
    return out
