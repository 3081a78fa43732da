"""exllamav2's scratch: the per-device buffer, the RoPE sin/cos tables, and the transients of a forward pass.

One fp16 scratch tensor per device is sized by the largest ``scratch_space_fixed()`` of any module (device.py,
``ExLlamaV2DeviceContext``): usually the lm_head's dequantization buffer, ``2 * min(hidden*vocab, 512 Mi)`` bytes,
i.e. up to 1 GiB. The attention matrix (bounded by ``max_attention_size``) and the hidden state and mask of a
``max_input_len`` chunk are needed while a prompt runs: the terms exllamav2's own ``set_device_map`` budgets for.
"""
from __future__ import annotations

import math
from typing import Any

from helpers.core.errors import CourseError
from helpers.memory.allocation import alloc_bytes, pad32
from helpers.memory.limits import check_batch, check_len
from helpers.specs.shapes import model_shape

#: exllamav2 config.py, ``ExLlamaV2Config.__init__``: ``max_dq_size = 512*(1024**2)`` elements per dequant buffer.
MAX_DQ_SIZE = 512 * 1024**2

#: exllamav2 config.py defaults: ``max_input_len = 2048``, ``max_attention_size = 2048**2``.
DEFAULT_MAX_INPUT_LEN = 2048
DEFAULT_MAX_ATTENTION_SIZE = 2048**2


def _dq(in_f: int, out_f: int) -> int:
    """linear.py ``temp_dq_size``: 2 * min(in * out_padded, max_dq_size) bytes."""
    return 2 * min(in_f * pad32(out_f), MAX_DQ_SIZE)


def scratch_detail(shape: Any, max_seq_len: int, max_input_len: int = DEFAULT_MAX_INPUT_LEN,
                   batch: int = 1) -> dict:
    """Each module kind's ``scratch_space_fixed()`` in bytes; the device scratch is the largest of them.

    attn.py ``scratch_space_fixed`` = temp_state + temp_dq; mlp.py = temp_state + temp_a + temp_b + temp_dq;
    the head (linear.py, not a sub-module) = temp_dq only. ``max_input_len`` is first clipped to max_seq_len
    (model.py ``load_autosplit_gen``).
    """
    s = model_shape(shape)
    L = check_len(max_seq_len)
    n = min(check_len(max_input_len, "max_input_len"), L) * check_batch(batch)
    attn = (n * max(s.q_dim, s.hidden) * 2 + 128) + max(_dq(s.hidden, s.q_dim), _dq(s.hidden, s.kv_dim),
                                                        _dq(s.q_dim, s.hidden))
    width = max(s.hidden, s.intermediate)
    mlp_dq = max(_dq(s.hidden, s.intermediate), _dq(s.intermediate, s.hidden))
    mlp = (n * s.hidden * 2 + 128) + 2 * (n * width * 2 + 128) + mlp_dq
    head = _dq(s.hidden, s.vocab)
    return {"attention": attn, "mlp": mlp, "lm_head": head}


def repeat_kv_bytes(shape: Any, max_seq_len: int, batch: int = 1, flash_attn: bool = False) -> int:
    """The ``repeat_kv`` copy of one layer's K and V at every query head, made by each decode step without flash-attn.

    attn.py ``_attn_torch`` (SDPA and matmul paths) expands K and V from n_kv_heads to n_heads for every position so
    far; at a full cache that is ``2 x n_heads x max_seq_len x head_dim x 2`` bytes per batch row, which PyTorch's
    caching allocator keeps once made. exllamav2 budgets the same bytes as ``temp_kv_size()`` in
    ``ExLlamaV2Attention.scratch_space()`` (used by ``set_device_map`` for a manual ``gpu_split``), not in the
    ``scratch_space_fixed()`` that ``load_autosplit`` allocates. 0 with flash-attn, or without grouped-query heads.
    """
    s = model_shape(shape)
    L = check_len(max_seq_len)
    if flash_attn or s.n_heads == s.n_kv_heads:
        return 0
    return 2 * L * check_batch(batch) * s.n_heads * s.head_dim * 2 + 128


def attention_scratch_space(shape: Any, max_seq_len: int, max_input_len: int = DEFAULT_MAX_INPUT_LEN,
                            batch: int = 1) -> int:
    """attn.py ``scratch_space()``, what ``set_device_map`` reserves for an attention module: its fixed scratch plus
    ``temp_q``, ``temp_k``, ``temp_v`` (one ``max_input_len`` chunk) and ``temp_kv`` (``repeat_kv_bytes``)."""
    s = model_shape(shape)
    n = min(check_len(max_input_len, "max_input_len"), check_len(max_seq_len)) * check_batch(batch)
    qkv = (n * s.q_dim * 2 + 128) + 2 * (n * s.kv_dim * 2 + 128)
    return scratch_detail(s, max_seq_len, max_input_len, batch)["attention"] + qkv + repeat_kv_bytes(
        s, max_seq_len, batch)


def rope_table_bytes(shape: Any, max_seq_len: int) -> int:
    """RoPE sin and cos tables: fp16, ``(1, 1, max_seq_len, rotary_dim)`` each, one pair per RoPE base
    (device.py ``prepare_sincos``; Gemma 3 has two bases). Models without RoPE keep one 1-element tensor."""
    s = model_shape(shape)
    L = check_len(max_seq_len)
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
    - ``repeat_kv_transient``: without flash-attn, the copy of one layer's K and V at every query head that a decode
      step at a full cache makes (``repeat_kv_bytes``).
    - ``hidden_state_transient``, ``attn_mask_transient``: model.py ``set_device_map``'s ``state_size`` and
      ``mask_size`` for a max_input_len chunk.
    """
    s = model_shape(shape)
    L = check_len(max_seq_len)
    mil = min(check_len(max_input_len, "max_input_len"), L)
    B = check_batch(batch)
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
        "repeat_kv_transient": repeat_kv_bytes(s, L, B, flash_attn),
    }
