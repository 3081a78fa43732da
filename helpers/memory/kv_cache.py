"""KV cache bytes as exllamav2 0.3.2 allocates them (cache.py): per token, per layer, and every tensor of a cache.

K and V for every layer, ``(batch, max_seq_len, n_kv_heads, head_dim)``, allocated at full length whatever the
prompt. Quantized modes add fp16 scales (one per 32 values) and one full-length FP16 K/V "temp" layer per device.
Sliding-window layers get the full length too: exllamav2 saves nothing there.
"""
from __future__ import annotations

import math
from typing import Any

from helpers.memory.allocation import alloc_bytes
from helpers.memory.cache_modes import CACHE_RULES, check_cache_mode
from helpers.memory.setup import LoadSetup
from helpers.specs.shapes import model_shape


def kv_layer_bytes_per_token(shape: Any, cache_mode: str = "fp16") -> int:
    """Bytes one layer's K and V (with scales) take per token (cache.py shapes ``shape_wk``, ``shape_wv``,
    ``shape_s``)."""
    s = model_shape(shape)
    r = CACHE_RULES[check_cache_mode(cache_mode)]
    k = s.n_kv_heads * (s.head_dim // r.weights_per_element_k) * r.elem_bytes
    v = s.n_kv_heads * (s.head_dim // r.weights_per_element_v) * r.elem_bytes
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


def kv_cache_layout(setup: LoadSetup) -> list[dict]:
    """Every tensor exllamav2 allocates for the setup's cache: name, shape, dtype, bytes (cache.py)."""
    s, max_seq_len, batch = setup.shape, setup.max_seq_len, setup.batch
    r = CACHE_RULES[setup.cache_mode]
    dt = "float16" if r.elem_bytes == 2 else "uint8"
    out = []
    for i in range(s.n_layers):
        for kv, wpe in (("key", r.weights_per_element_k), ("value", r.weights_per_element_v)):
            shp = (batch, max_seq_len, s.n_kv_heads, s.head_dim // wpe)
            out.append({"name": f"{kv}_states[{i}]", "shape": shp, "dtype": dt,
                        "bytes": math.prod(shp) * r.elem_bytes})
        if r.scales:
            for kv in ("key", "value"):
                shp = (batch, max_seq_len, s.n_kv_heads, s.head_dim // 32)
                out.append({"name": f"{kv}_scales[{i}]", "shape": shp, "dtype": "float16", "bytes": math.prod(shp) * 2})
    if r.temp:
        for kv in ("temp_k", "temp_v"):
            shp = (batch, max_seq_len, s.n_kv_heads, s.head_dim)
            out.append({"name": kv, "shape": shp, "dtype": "float16", "bytes": math.prod(shp) * 2})
    return out


def kv_cache_per_layer(setup: LoadSetup) -> tuple[list[int], int]:
    """([bytes of layer 0's cache, layer 1's, ...], bytes of the FP16 temp K/V): ``kv_cache_layout`` per layer, each
    tensor rounded to torch's 512-byte blocks (``alloc_bytes``) as it lands on a device."""
    per_layer = [0] * setup.shape.n_layers
    temp = 0
    for r in kv_cache_layout(setup):
        if r["name"].startswith("temp_"):
            temp += alloc_bytes(r["bytes"])
        else:  # key_states[i], value_states[i], key_scales[i], value_scales[i]
            per_layer[int(r["name"].split("[")[1].rstrip("]"))] += alloc_bytes(r["bytes"])
    return per_layer, temp


def kv_cache_bytes(shape: Any, max_seq_len: int, cache_mode: str = "fp16", batch: int = 1, *,
                   torch_rounding: bool = False) -> int:
    """Bytes exllamav2 allocates for a cache of ``max_seq_len`` tokens (all layers, scales, FP16 temp layer): the
    formula notebook 01 computes by hand, so its settings stay plain arguments.

    ``torch_rounding=True`` rounds each tensor to torch's 512-byte blocks, as ``torch.cuda.memory_allocated``
    counts them (no difference for lengths that are multiples of 256).
    """
    rows = kv_cache_layout(LoadSetup(shape, max_seq_len=max_seq_len, cache_mode=cache_mode, batch=batch))
    f = alloc_bytes if torch_rounding else int
    return sum(f(r["bytes"]) for r in rows)
