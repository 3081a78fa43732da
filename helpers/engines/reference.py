"""The reference decoder: Llama, Mistral and Qwen2 in plain PyTorch, with an exllamav2-shaped KV cache.

Every notebook's CPU path: it reads the same EXL2 files as exllamav2 (dequantized by ``helpers.format.reader``) or
a float Hugging Face directory and computes the same logits, one function per step of a layer (``rms_norm``,
``apply_rope``, ``attention``, ``mlp``). ``KVCache`` is allocated in full like ``ExLlamaV2Cache`` (docs/FACTS.md
§2), in the model's dtype: float32 on the CPU (twice exllamav2's FP16 bytes), float16 on CUDA.
``forward(..., causal=False)`` is exllamav2 0.3.2's unmasked SDPA prefill (docs/FACTS.md §3, "three traps").

Public names: ``SUPPORTED_ARCHITECTURES``, ``DecoderConfig``, ``KVCache``, ``ReferenceModel`` (``from_dir``,
``from_state_dict``, ``forward``, ``decode_step``, ``fill_cache``, ``generate``), ``Tokenizer``, ``TextStream``,
``sample_next``, ``generate_text``, ``load_state_dict``.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from helpers.core.errors import CourseError, CourseWarning
from helpers.format.config import is_exl2_dir, load_config, read_config_file, rope_theta_of
from helpers.format.reader import open_exl2  # dequantizes EXL2 tensors into floats, logical (file) order
from helpers.specs.shapes import ModelShape, shape_from_config

#: architectures (config.json "architectures"[0]) this decoder implements
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
#: RoPE variants implemented here ("default" = no scaling)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DecoderConfig:
    """The model's ``ModelShape`` (the shape every memory term uses, read as exllamav2 reads config.json) and the
    few numbers only the arithmetic needs beyond it: the norm epsilon, RoPE scaling's parameters, the stop tokens."""

    shape: ModelShape
    rms_norm_eps: float
    rope_scaling: dict | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def window(self) -> int | None:
        """The attention window of every layer, if the config gives one (Mistral v0.1; Qwen2 only with
        use_sliding_window)."""
        return self.shape.sliding_window if self.shape.config_sliding_layers else None

    @classmethod
    def from_hf(cls, cfg: dict) -> "DecoderConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else f"(none; model_type {cfg.get('model_type')!r})"
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CourseError(f"architecture {arch} is not supported by the reference decoder; it runs "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}: pick a model of one of these families")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        if "rope_theta" not in cfg:  # exllamav2 0.3.2 reads only the top-level key (docs/FACTS.md §3)
            warnings.warn(f"config.json has no top-level rope_theta (only rope_parameters: {rope_theta_of(cfg)}); "
                          "exllamav2 0.3.2 would fall back to 10000: write the top-level key", CourseWarning,
                          stacklevel=3)
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise CourseError(f"RoPE scaling '{rope_type}' is not implemented in the reference (it has "
                              f"{', '.join(SUPPORTED_ROPE_TYPES)}): use exllamav2 on a CUDA GPU, or remove the "
                              "scaling from config.json for contexts within the original length")
        eos = cfg.get("eos_token_id")
        return cls(shape=shape_from_config(cfg), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                   rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
                   bos_token_id=cfg.get("bos_token_id"),
                   eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),)))


# --------------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------------

def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [model_dir / n for n in names]
    # exllamav2_truth.safetensors is the test fixtures' answer file, never weights
    return sorted(p for p in model_dir.glob("*.safetensors") if p.name != "exllamav2_truth.safetensors")


def load_state_dict(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, float state dict with Hugging Face names) of an EXL2 or a float safetensors directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CourseError(f"model directory {model_dir} does not exist: pass an existing folder, or omit it to use "
                          "the course's embedded model")
    cfg = load_config(Path(model_dir))
    files = _safetensors_files(model_dir)
    if not files:
        raise CourseError(f"{model_dir} holds no *.safetensors weights: the reference reads safetensors only "
                          "(convert .bin/.gguf first)")
    if is_exl2_dir(model_dir):

        return cfg, open_exl2(model_dir).float_state_dict(dtype)
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in files:
        for name, tensor in load_file(str(path)).items():
            state[name] = tensor.to(dtype)
    return cfg, state


# --------------------------------------------------------------------------------------------------------------------
# The KV cache
# --------------------------------------------------------------------------------------------------------------------

class KVCache:
    """Preallocated keys and values, laid out like exllamav2's ExLlamaV2Cache.

    ``key_states[layer]`` and ``value_states[layer]`` have shape (batch, max_seq_len, kv_heads, head_dim) and are
    allocated in full at creation, whatever the prompt length: that is why a long max_seq_len costs memory before a
    single token is generated. ``current_seq_len`` is how many positions hold real keys and values.
    """

    def __init__(self, num_layers: int, max_seq_len: int, num_kv_heads: int, head_dim: int, *,
                 batch_size: int = 1, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.max_seq_len = int(max_seq_len)
        self.batch_size = int(batch_size)
        self.shape = (self.batch_size, self.max_seq_len, int(num_kv_heads), int(head_dim))
        self.dtype = dtype
        self.key_states = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.value_states = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.current_seq_len = 0

    def reset(self) -> None:
        self.current_seq_len = 0

    def all_tensors(self) -> list[torch.Tensor]:
        return self.key_states + self.value_states

    def nbytes(self) -> int:
        """Bytes the cache tensors occupy (all of them, full length)."""
        return sum(t.numel() * t.element_size() for t in self.all_tensors())

    def bytes_per_token(self) -> int:
        """Bytes one position costs across all layers, K and V."""
        return self.nbytes() // self.max_seq_len

    def store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (batch, n, kv_heads, head_dim) at positions [start, start+n); return views of [0, start+n)."""
        end = start + k.shape[1]
        self.key_states[layer][:, start:end] = k
        self.value_states[layer][:, start:end] = v
        return self.key_states[layer][:, :end], self.value_states[layer][:, :end]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, start: int, causal: bool = True,
               window: int | None = None) -> torch.Tensor:
        """Attention over the slice ``store`` returned. This cache gives back exactly what was stored; a quantized
        one (``helpers.engines.kv_quant.QuantizedKVCache``) reads earlier positions back dequantized."""
        return attention(q, k, v, start=start, causal=causal, window=window)


# --------------------------------------------------------------------------------------------------------------------
# The decoder's building blocks
# --------------------------------------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 (what transformers and exllamav2 do)."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope_inv_freq(cfg: DecoderConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) of rotary position embedding, with linear or Llama-3 scaling if any."""
    d = cfg.shape.head_dim
    inv_freq = 1.0 / (cfg.shape.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = cfg.rope_scaling
    if sc is None:
        return inv_freq
    factor = float(sc.get("factor", 1.0))
    if sc["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between
    trained = float(sc.get("original_max_position_embeddings", cfg.shape.max_position_embeddings))
    low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > trained / low, inv_freq / factor, inv_freq)
    smooth = (trained / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= trained / high) & (wavelen <= trained / low)
    return torch.where(medium, blended, scaled)


def rope_tables(cfg: DecoderConfig, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, shape (max_seq_len, head_dim): one row per position, computed once at load."""
    pos = torch.arange(max_seq_len, dtype=torch.float64)
    angles = torch.outer(pos, rope_inv_freq(cfg))          # (positions, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)           # both halves of a head share the angles
    return angles.cos().float(), angles.sin().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the last dimension (the Hugging Face / exllamav2 'neox' RoPE layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys x (batch, n, heads, head_dim) by their positions' angles; cos/sin are (n, head_dim)."""
    cos, sin = cos[:, None, :], sin[:, None, :]             # broadcast over heads
    return x * cos + rotate_half(x) * sin


def causal_mask(start: int, n: int, end: int, window: int | None, device) -> torch.Tensor:
    """Boolean (n, end): query i (at position start+i) may see key j when j <= start+i (and within the window)."""
    q_pos = torch.arange(start, start + n, device=device)[:, None]
    k_pos = torch.arange(end, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, start: int, causal: bool = True,
              window: int | None = None) -> torch.Tensor:
    """Attention of q (batch, n, heads, d) at positions start..start+n-1 over the cache slice k, v
    (batch, start+n, kv_heads, d). Returns (batch, n, heads * d).

    Grouped-query attention: query head h reads KV head h // (heads // kv_heads) (``enable_gqa``). One fused
    ``scaled_dot_product_attention`` call does softmax(q k^T / sqrt(d)) v (three small ops per layer were up to 5x
    slower on a busy 2-core machine); ``attention_by_hand`` spells it out for one decoded token (a test compares).
    """
    b, n, heads, d = q.shape
    kv_heads, end = k.shape[2], k.shape[1]
    if n == 1 and causal and window is not None and end > window:
        k, v = k[:, end - window:], v[:, end - window:]    # a sliding-window layer reads only the last `window`
    if n == 1 or not causal:
        # decode: the one new query may see every cached position, so no mask at all. (causal=False on a
        # prefill is the exllamav2 0.3.2 SDPA-path trap: every query sees every key, the future included.)
        mask, is_causal = None, False
    elif start == 0 and (window is None or end <= window):
        mask, is_causal = None, True       # prefill of a new sequence: the lower-triangular mask, built in the kernel
    else:
        mask, is_causal = causal_mask(start, n, end, window, q.device), False  # appended chunk or sliding window
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)    # (b, heads, n | end, d)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=is_causal,
                                         enable_gqa=heads != kv_heads)
    return out.transpose(1, 2).reshape(b, n, heads * d)


def attention_by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One decoded token's attention written out: q (batch, 1, heads, d), k/v (batch, depth, kv_heads, d).

    The fused kernel in ``attention`` computes the same; this is the version to read. Each KV head serves a
    group of heads // kv_heads query heads, so the queries are viewed as (batch, kv_heads, group, d)."""
    b, _, heads, d = q.shape
    kv_heads = k.shape[2]
    qg = q.view(b, kv_heads, heads // kv_heads, d)                      # query heads grouped by their KV head
    scores = torch.matmul(qg, k.permute(0, 2, 3, 1)) / math.sqrt(d)     # (b, kv_heads, group, depth)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)           # how much each cached position counts
    out = torch.matmul(probs, v.transpose(1, 2))                        # (b, kv_heads, group, d)
    return out.reshape(b, 1, heads * d)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, weight in nn.Linear layout (out_features, in_features)."""
    return F.linear(x, weight, bias)


@dataclass
class LayerWeights:
    """One decoder layer's tensors (Hugging Face names: model.layers.<i>.<field path>)."""

    input_norm: torch.Tensor            # input_layernorm.weight
    q_proj: torch.Tensor                # self_attn.q_proj.weight (heads*d, hidden)
    k_proj: torch.Tensor                # self_attn.k_proj.weight (kv_heads*d, hidden)
    v_proj: torch.Tensor                # self_attn.v_proj.weight (kv_heads*d, hidden)
    o_proj: torch.Tensor                # self_attn.o_proj.weight (hidden, heads*d)
    post_norm: torch.Tensor             # post_attention_layernorm.weight
    gate_proj: torch.Tensor             # mlp.gate_proj.weight (intermediate, hidden)
    up_proj: torch.Tensor               # mlp.up_proj.weight (intermediate, hidden)
    down_proj: torch.Tensor             # mlp.down_proj.weight (hidden, intermediate)
    q_bias: torch.Tensor | None = None  # Qwen2 has q/k/v biases
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None


_LAYER_NAMES = {
    "input_norm": "input_layernorm.weight", "post_norm": "post_attention_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight", "k_proj": "self_attn.k_proj.weight", "v_proj": "self_attn.v_proj.weight",
    "o_proj": "self_attn.o_proj.weight", "gate_proj": "mlp.gate_proj.weight", "up_proj": "mlp.up_proj.weight",
    "down_proj": "mlp.down_proj.weight", "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias",
    "v_bias": "self_attn.v_proj.bias", "o_bias": "self_attn.o_proj.bias",
}


def mlp(x: torch.Tensor, w: LayerWeights) -> torch.Tensor:
    """SwiGLU feed-forward: down( silu(gate(x)) * up(x) )."""
    return linear(F.silu(linear(x, w.gate_proj)) * linear(x, w.up_proj), w.down_proj)


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer, sampling, streaming
# --------------------------------------------------------------------------------------------------------------------

class Tokenizer:
    """The model directory's Hugging Face tokenizer, with its chat template."""

    def __init__(self, model_dir: str | Path):
        try:
            from transformers import AutoTokenizer
        except ImportError:  # pragma: no cover - transformers is in requirements.txt
            raise CourseError("the tokenizer needs transformers: pip install -r requirements.txt") from None
        try:
            self.hf = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as exc:
            raise CourseError(f"could not load the tokenizer of {model_dir} ({type(exc).__name__}): the folder needs "
                              "tokenizer.json and tokenizer_config.json") from None
        self.model_dir = Path(model_dir)
        self.stop_ids = self._stop_ids()

    def _stop_ids(self) -> set[int]:
        ids = set()
        for source in (self.model_dir / "config.json", self.model_dir / "generation_config.json"):
            if source.is_file():
                eos = read_config_file(source).get("eos_token_id")
                ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.hf.eos_token_id is not None:
            ids.add(self.hf.eos_token_id)
        return {int(i) for i in ids}

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def chat_prompt(self, text: str) -> str:
        """The prompt text the model was trained to answer: one user turn plus the assistant's header."""
        return self.hf.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)

    def encode(self, text: str, *, chat: bool = False) -> torch.Tensor:
        """LongTensor (1, n). chat=True wraps the text in the chat template (a plain prompt if there is none)."""
        if chat and self.has_chat_template:
            ids = self.hf(self.chat_prompt(text), add_special_tokens=False)["input_ids"]
        else:
            if chat:
                warnings.warn(f"the tokenizer of {self.model_dir.name} has no chat template: the prompt is used as "
                              "plain text", CourseWarning, stacklevel=2)
            ids = self.hf(text)["input_ids"]
        return torch.tensor([ids], dtype=torch.long)

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.hf.decode(list(ids), skip_special_tokens=True)


class TextStream:
    """Turns token ids into text pieces as they come, never cutting a multi-byte character in half."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        piece, self.sent = text[self.sent:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.sent = text[self.sent:], len(text)
        return piece


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> int:
    """Pick the next token from logits (vocab,): greedy when temperature <= 0, else top-k/top-p sampling."""
    logits = logits.float().reshape(-1)
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(int(top_k), logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > top_p   # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate_text(*, prompt_ids: torch.Tensor, prefill: Callable[[torch.Tensor], torch.Tensor],
                  step: Callable[[int], torch.Tensor], tokenizer: Tokenizer, max_new_tokens: int = 64,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  stream: Callable[[str], None] | None = None) -> tuple[str, list[int]]:
    """The generation loop shared by every backend: prefill the prompt, then sample and step until a stop token.

    ``prefill(ids)`` returns the logits (vocab,) after the last prompt token; ``step(token)`` appends one token to
    the cache and returns the next logits. Returns (generated text, generated ids without the stop token).
    """
    generator = torch.Generator().manual_seed(int(seed))
    streamer = TextStream(tokenizer)
    out: list[int] = []
    logits = prefill(prompt_ids)
    for i in range(int(max_new_tokens)):
        token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if token in tokenizer.stop_ids:
            break
        out.append(token)
        piece = streamer.push(token)
        if stream and piece:
            stream(piece)
        if i + 1 < max_new_tokens:
            logits = step(token)
    piece = streamer.flush()
    if stream and piece:
        stream(piece)
    return tokenizer.decode(out), out


def check_context(prompt_tokens: int, max_new_tokens: int, max_seq_len: int) -> None:
    """CourseError when a prompt plus the tokens to generate would not fit in the cache."""
    need = int(prompt_tokens) + int(max_new_tokens)
    if need > max_seq_len:
        raise CourseError(f"the prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) needs {need} "
                          f"positions, beyond the cache's max_seq_len={max_seq_len}: load with max_seq_len >= {need} "
                          "or ask for fewer new tokens")


# --------------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------------

class ReferenceModel:
    """A Llama/Mistral/Qwen2 decoder over float weights, with a preallocated exllamav2-shaped KV cache."""

    def __init__(self, config: DecoderConfig, state_dict: dict[str, torch.Tensor], *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, max_seq_len: int = 2048, model_dir: str | Path | None = None):
        device = str(device)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise CourseError("device='cuda' was asked for, but torch finds no CUDA GPU here: use device='cpu' "
                              "(or install a CUDA build of torch on a machine with an NVIDIA GPU)")
        if int(max_seq_len) < 1:
            raise CourseError(f"max_seq_len must be a positive number of tokens, not {max_seq_len}")
        shape = config.shape
        if max_seq_len > shape.max_position_embeddings:
            warnings.warn(f"max_seq_len {max_seq_len} is beyond the {shape.max_position_embeddings} positions this "
                          "model was trained for: quality may drop past that", CourseWarning, stacklevel=3)
        self.config, self.device, self.dtype = config, device, dtype
        self.max_seq_len = int(max_seq_len)
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self._tokenizer: Tokenizer | None = None

        def get(name: str, required: bool = True) -> torch.Tensor | None:
            if name not in state_dict:
                if required:
                    raise CourseError(f"the weights have no tensor '{name}': the checkpoint is incomplete or not a "
                                      f"{shape.architecture}; rebuild or re-download it")
                return None
            return state_dict[name].to(device=device, dtype=dtype).contiguous()

        self.embed_tokens = get("model.embed_tokens.weight")             # (vocab, hidden)
        self.norm = get("model.norm.weight")
        head = get("lm_head.weight", required=not shape.tied_embeddings and "lm_head.weight" in state_dict)
        self.lm_head = head if head is not None else self.embed_tokens   # tied: the embedding is the head
        self.layers: list[LayerWeights] = []
        for i in range(shape.n_layers):
            fields = {f: get(f"model.layers.{i}.{n}", required=not f.endswith("_bias"))
                      for f, n in _LAYER_NAMES.items()}
            self.layers.append(LayerWeights(**fields))
        cos, sin = rope_tables(config, self.max_seq_len)
        self.rope_cos, self.rope_sin = cos.to(device, dtype), sin.to(device, dtype)
        self.cache = KVCache(shape.n_layers, self.max_seq_len, shape.n_kv_heads, shape.head_dim,
                             dtype=dtype, device=device)

    # -- construction ------------------------------------------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, hf_config: dict, state_dict: dict[str, torch.Tensor], **kwargs) -> "ReferenceModel":
        return cls(DecoderConfig.from_hf(hf_config), state_dict, **kwargs)

    @classmethod
    def from_dir(cls, model_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 max_seq_len: int = 2048) -> "ReferenceModel":
        """Load an EXL2 (dequantized to ``dtype``) or a float safetensors Hugging Face directory."""
        cfg = load_config(Path(model_dir))
        config = DecoderConfig.from_hf(cfg)  # checks the architecture before reading any weights
        _, state = load_state_dict(model_dir, dtype=dtype)
        return cls(config, state, device=device, dtype=dtype, max_seq_len=max_seq_len, model_dir=model_dir)

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            if self.model_dir is None:
                raise CourseError("this model was built from a state dict without a directory: it has no tokenizer; "
                                  "load it with ReferenceModel.from_dir")
            self._tokenizer = Tokenizer(self.model_dir)
        return self._tokenizer

    @property
    def depth(self) -> int:
        """Tokens currently held in the cache."""
        return self.cache.current_seq_len

    # -- the forward pass --------------------------------------------------------------------------------------------

    def _check_room(self, start: int, n: int) -> None:
        if start + n > self.max_seq_len:
            raise CourseError(f"{n} new tokens at cache depth {start} need {start + n} positions but the cache holds "
                              f"max_seq_len={self.max_seq_len}: load the model with a larger max_seq_len")

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, *, reset: bool = True, causal: bool = True,
                last_only: bool = False) -> torch.Tensor:
        """Logits (batch, n, vocab) in float32 for ids (batch, n), written into the cache.

        reset=True starts at position 0 (a new sequence); reset=False appends at the current depth.
        causal=False removes the causal mask (to show exllamav2 0.3.2's SDPA-path trap); last_only=True returns
        only the last position's logits (batch, 1, vocab), which is all generation needs.
        """
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.shape[0] > self.cache.batch_size:
            raise CourseError(f"batch of {ids.shape[0]} sequences, but the cache holds {self.cache.batch_size}")
        if reset:
            self.cache.reset()
        start, n = self.cache.current_seq_len, ids.shape[1]
        if n == 0:
            raise CourseError("forward() got no tokens: pass at least one token id")
        self._check_room(start, n)
        if int(ids.max()) >= self.config.shape.vocab or int(ids.min()) < 0:
            raise CourseError(f"token ids must be in [0, {self.config.shape.vocab}): "
                              "the ids do not belong to this model")
        cfg, shape = self.config, self.config.shape
        cos, sin = self.rope_cos[start:start + n], self.rope_sin[start:start + n]
        x = F.embedding(ids.to(self.device), self.embed_tokens)            # (b, n, hidden)
        b = x.shape[0]
        for i, w in enumerate(self.layers):
            # attention block
            h = rms_norm(x, w.input_norm, cfg.rms_norm_eps)
            q = linear(h, w.q_proj, w.q_bias).view(b, n, shape.n_heads, shape.head_dim)
            k = linear(h, w.k_proj, w.k_bias).view(b, n, shape.n_kv_heads, shape.head_dim)
            v = linear(h, w.v_proj, w.v_bias).view(b, n, shape.n_kv_heads, shape.head_dim)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            keys, values = self.cache.store(i, start, k, v)                 # this layer's cache slice [0, start+n)
            if b < self.cache.batch_size:
                keys, values = keys[:b], values[:b]
            a = self.cache.attend(q, keys, values, start=start, causal=causal, window=cfg.window)
            x = x + linear(a, w.o_proj, w.o_bias)
            # feed-forward block
            x = x + mlp(rms_norm(x, w.post_norm, cfg.rms_norm_eps), w)
        self.cache.current_seq_len = start + n
        if last_only:
            x = x[:, -1:]
        x = rms_norm(x, self.norm, cfg.rms_norm_eps)
        return linear(x, self.lm_head).float()

    def decode_step(self, token_id: int) -> torch.Tensor:
        """Append one token at the current depth; logits (vocab,) for the next one."""
        ids = torch.tensor([[int(token_id)]], dtype=torch.long)
        return self.forward(ids, reset=False)[0, -1]

    @torch.inference_mode()
    def fill_cache(self, depth: int, *, seed: int = 0) -> None:
        """Put the cache at ``depth`` tokens directly: random K/V values of unit scale written in place.

        Decoding at depth d reads d cached positions per layer, whatever their values; this reaches that state
        without running d tokens through the model (which would take minutes on a CPU at 30k).
        """
        depth = int(depth)
        if depth < 0 or depth >= self.max_seq_len:
            raise CourseError(f"fill_cache depth {depth} must be in [0, max_seq_len={self.max_seq_len}) to leave room "
                              "for at least one more token: load with a larger max_seq_len")
        gen = torch.Generator().manual_seed(int(seed))
        shape = (self.cache.batch_size, depth) + self.cache.shape[2:]
        for k, v in zip(self.cache.key_states, self.cache.value_states):
            k[:, :depth] = torch.randn(shape, generator=gen).to(k.dtype)
            v[:, :depth] = torch.randn(shape, generator=gen).to(v.dtype)
        self.cache.current_seq_len = depth

    # -- text ----------------------------------------------------------------------------------------------------------

    def generate(self, prompt: str, *, max_new_tokens: int = 64, chat: bool = True, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stream: Callable[[str], None] | None = None) -> str:
        """Text continuing ``prompt`` (in the chat template when chat=True). temperature 0 = greedy."""
        ids = self.tokenizer.encode(prompt, chat=chat)
        check_context(ids.shape[1], max_new_tokens, self.max_seq_len)
        text, _ = generate_text(prompt_ids=ids, prefill=lambda p: self.forward(p, last_only=True)[0, -1],
                                step=self.decode_step, tokenizer=self.tokenizer, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stream=stream)
        return text

    def cache_bytes(self) -> int:
        return self.cache.nbytes()
