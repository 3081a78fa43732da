"""exllamav2's scratch: the per-device buffer, the RoPE sin/cos tables, and the transients of a forward pass, for
one ``LoadSetup`` (derivations: docs/FACTS.md §2).
"""
from __future__ import annotations

import math

from helpers.memory.allocation import alloc_bytes, pad32
from helpers.memory.limits import DEFAULT_MAX_ATTENTION_SIZE, DEFAULT_MAX_INPUT_LEN  # noqa: F401 (their old home)
from helpers.memory.setup import LoadSetup

#: exllamav2 config.py, ``ExLlamaV2Config.__init__``: ``max_dq_size = 512*(1024**2)`` elements per dequant buffer.
MAX_DQ_SIZE = 512 * 1024**2


def _dq(in_f: int, out_f: int) -> int:
    """linear.py ``temp_dq_size``: 2 * min(in * out_padded, max_dq_size) bytes."""
    return 2 * min(in_f * pad32(out_f), MAX_DQ_SIZE)


def _chunk(setup: LoadSetup) -> int:
    """Rows of one prompt chunk: max_input_len, clipped to max_seq_len (model.py ``load_autosplit_gen``), x batch."""
    return min(setup.max_input_len, setup.max_seq_len) * setup.batch


def scratch_detail(setup: LoadSetup) -> dict:
    """Each module kind's ``scratch_space_fixed()`` in bytes (the device scratch is the largest): attn.py
    temp_state + temp_dq; mlp.py temp_state + temp_a + temp_b + temp_dq; the head (linear.py) temp_dq."""
    s, n = setup.shape, _chunk(setup)
    attn = (n * max(s.q_dim, s.hidden) * 2 + 128) + max(_dq(s.hidden, s.q_dim), _dq(s.hidden, s.kv_dim),
                                                        _dq(s.q_dim, s.hidden))
    width = max(s.hidden, s.intermediate)
    mlp_dq = max(_dq(s.hidden, s.intermediate), _dq(s.intermediate, s.hidden))
    mlp = (n * s.hidden * 2 + 128) + 2 * (n * width * 2 + 128) + mlp_dq
    return {"attention": attn, "mlp": mlp, "lm_head": _dq(s.hidden, s.vocab)}


def repeat_kv_bytes(setup: LoadSetup) -> int:
    """Without flash-attn, the ``repeat_kv`` copy of one layer's K and V at every query head a decode step at a full
    cache makes (attn.py ``_attn_torch``; exllamav2 budgets it as ``temp_kv_size()``): 0 with flash-attn or without
    grouped-query heads."""
    s = setup.shape
    if setup.flash_attn or s.n_heads == s.n_kv_heads:
        return 0
    return 2 * setup.max_seq_len * setup.batch * s.n_heads * s.head_dim * 2 + 128


def attention_scratch_space(setup: LoadSetup) -> int:
    """attn.py ``scratch_space()``, what ``set_device_map`` reserves for an attention module: its fixed scratch plus
    ``temp_q``, ``temp_k``, ``temp_v`` (one chunk) and ``temp_kv`` (counted whatever the attention path)."""
    s, n = setup.shape, _chunk(setup)
    qkv = (n * s.q_dim * 2 + 128) + 2 * (n * s.kv_dim * 2 + 128)
    return scratch_detail(setup)["attention"] + qkv + repeat_kv_bytes(setup.with_(flash_attn=False))


def rope_table_bytes(setup: LoadSetup) -> int:
    """RoPE sin and cos tables: fp16, ``(1, 1, max_seq_len, rotary_dim)`` each, one pair per RoPE base (device.py
    ``prepare_sincos``; Gemma 3 has two). Models without RoPE keep one 1-element tensor."""
    s = setup.shape
    if not s.rope:
        return alloc_bytes(2)
    return s.rope_tables * 2 * alloc_bytes(setup.max_seq_len * 2 * math.ceil(s.rotary_dim / 2) * 2)


def scratch_bytes(setup: LoadSetup) -> dict:
    """Named scratch terms in bytes, all additive: the device scratch (the largest module's), the RoPE tables, the
    prompt chunk's attention matrix (attn.py ``temp_attn_size``, smaller with flash-attn), hidden state and mask
    (model.py ``set_device_map``), and the repeat_kv copy."""
    s, max_seq_len, batch = setup.shape, setup.max_seq_len, setup.batch
    mil = min(setup.max_input_len, max_seq_len)
    att = min(setup.max_attention_size, max_seq_len**2)
    if setup.flash_attn:
        att = int(att // (setup.max_attention_size ** 0.5 / 190))
    return {
        "device_scratch": alloc_bytes((max(scratch_detail(setup).values()) // 2) * 2),
        "rope_tables": rope_table_bytes(setup),
        "attention_transient": 2 * att * s.n_heads * 2 + 128,
        "hidden_state_transient": s.hidden * mil * batch * 2,
        "attn_mask_transient": mil**2 * batch * 2,
        "repeat_kv_transient": repeat_kv_bytes(setup),
    }
