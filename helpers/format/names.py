"""Tensor names of a checkpoint: which linears a decoder has, which layer a name belongs to, and their order.

Hugging Face names (``model.layers.3.self_attn.q_proj``); a quantized linear stores ``<prefix>.q_weight`` and the
other ``Q_SUFFIXES``. Torch-free.
"""
from __future__ import annotations

import re

#: the quantized linears of one Llama/Mistral/Qwen2 decoder layer, in execution order
LINEAR_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: the tensors every EXL2-quantized linear stores (an optional fp16 ``bias`` comes on top)
Q_SUFFIXES = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")


def layer_of(name: str) -> int | None:
    """The decoder layer a tensor name belongs to ('model.layers.3.mlp.up_proj' -> 3), None outside the layers."""
    m = re.search(r"\.layers\.(\d+)\.", name + ".")
    return int(m.group(1)) if m else None


def natural_key(s: str):
    """Sort key that orders embedded numbers by value ('layers.2' before 'layers.10')."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def linear_order(name: str):
    """Execution order: layer by layer; q, k, v, o, gate, up, down inside a layer; the head last."""
    layer = layer_of(name)
    kind = name.rsplit(".", 1)[-1]
    rank = LINEAR_KINDS.index(kind) if kind in LINEAR_KINDS else len(LINEAR_KINDS)
    return (1 if layer is None else 0, layer or 0, rank, natural_key(name))
