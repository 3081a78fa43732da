"""A decoder's shape as exllamav2 0.3.2 reads it from config.json: layers, heads, widths, vocabulary, windows.

``model_shape`` takes a bundled name (``helpers/specs/configs``), a config.json, a model folder, a dict or a
ModelShape, and returns the facts every memory term depends on. Reading follows exllamav2's config.py
(``ExLlamaV2Config.prepare``) and model.py, not transformers.
"""
from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from helpers.core.errors import CourseError, CourseWarning
from helpers.core.paths import CONFIGS_DIR
from helpers.format.config import is_exl2_dir, read_config_file, rope_theta_of

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
HEAD_IS_EMBEDDING = {"GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForConditionalGeneration",
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
    #: config.json ``rope_scaling``'s ``factor`` and ``original_max_position_embeddings`` (1.0 and 0 when absent)
    rope_scaling_factor: float = 1.0
    original_max_position_embeddings: int = 0
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
    """Names of the bundled configs (helpers/specs/configs/<name>.json)."""
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
    rope_scaling, rope_factor, rope_orig = None, 1.0, 0
    if isinstance(rs, dict):
        rope_scaling = str(rs.get("rope_type") or rs.get("type") or "yes")
        if isinstance(rs.get("factor"), (int, float)) and not isinstance(rs.get("factor"), bool):
            rope_factor = float(rs["factor"])
        if isinstance(rs.get("original_max_position_embeddings"), int):
            rope_orig = int(rs["original_max_position_embeddings"])
    theta = _cfg_get(cfg, ["rope_theta", "attn_config->rope_theta"], None)
    if theta is None:
        theta = rope_theta_of(cfg)
    tied = bool(cfg.get("tie_word_embeddings", arch in HEAD_IS_EMBEDDING))
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
        rope_scaling=rope_scaling, rope_scaling_factor=rope_factor, original_max_position_embeddings=rope_orig,
        n_experts=n_experts, model_type=str(cfg.get("model_type", "")),
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
        exl2 = str(path.resolve()) if is_exl2_dir(path) else None
        return shape_from_config(read_config_file(cfg_path), name=path.name, source=str(cfg_path), exl2_dir=exl2)
    if path.is_file():
        cfg = read_config_file(path)
        name = path.parent.name if path.name == "config.json" else path.stem
        exl2 = str(path.parent.resolve()) if path.name == "config.json" and is_exl2_dir(path.parent) else None
        return shape_from_config(cfg, name=name, source=str(path), exl2_dir=exl2)
    names = bundled_models()
    key = _normalise_name(text)
    if key in names:
        cfg = read_config_file(CONFIGS_DIR / f"{key}.json")
        return shape_from_config(cfg, name=key, source=str(cfg.get("_source", key)))
    if _looks_like_path(text):
        raise CourseError(f"{text} does not exist: give a bundled model name, a config.json, or an EXL2 folder")
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise CourseError(f"unknown model '{text}'.{hint} Bundled: {', '.join(names)}; or pass a config.json or an "
                      "EXL2 folder")


def trained_positions(shape: ModelShape) -> int:
    """Positions the model was trained (or RoPE-scaled) for, from config.json: ``max_position_embeddings``, or with
    ``rope_scaling`` (YaRN, linear, Llama 3) up to ``original_max_position_embeddings`` (else
    max_position_embeddings) x ``factor``. Qwen2.5: 32,768 without YaRN, 131,072 with its YaRN factor 4."""
    limit = shape.max_position_embeddings
    if shape.rope_scaling and shape.rope_scaling_factor > 1:
        base = shape.original_max_position_embeddings or shape.max_position_embeddings
        limit = max(limit, int(base * shape.rope_scaling_factor))
    return limit


def long_context_tip(shape: ModelShape) -> str:
    """One sentence on going past the trained positions, right for this model: Qwen2.5's documented YaRN recipe
    (its model cards, "Processing Long Texts"), Llama 3's longer-trained successor, or the general answer."""
    if shape.rope_scaling:
        return (f"its config.json already scales RoPE ({shape.rope_scaling} x{shape.rope_scaling_factor:g}): choose a "
                "model trained for a longer context")
    if shape.model_type == "qwen2" and shape.max_position_embeddings == 32768:
        return ("Qwen2.5's model card documents YaRN up to 131,072 tokens: add \"rope_scaling\": {\"type\": \"yarn\", "
                "\"factor\": 4.0, \"original_max_position_embeddings\": 32768} to config.json (exllamav2 reads it)")
    if shape.model_type == "llama" and shape.vocab == 128256 and shape.max_position_embeddings == 8192:
        return "Llama 3 has no published recipe past 8,192: Llama 3.1, the same shape, was trained for 131,072"
    return ("choose a model trained for that length (exllamav2 can stretch RoPE with scale_alpha_value, at a cost in "
            "quality)")

