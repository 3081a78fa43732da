"""Small float models for tests and GPU checks: a tiny Llama/Qwen2 config.json and random weights with its names.

Not for text: the weights are random. ``write_exl2(dir, tiny_config(), random_float_state_dict(cfg), bits=...)``
makes an EXL2 checkpoint in well under a second.
"""
from __future__ import annotations

from typing import Mapping

import torch

from helpers.format.config import config_get, expected_linear_shapes
from helpers.format.names import LINEAR_KINDS


def tiny_config(*, arch: str = "LlamaForCausalLM", hidden: int = 256, intermediate: int = 768, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, vocab: int = 1000, tied: bool = False,
                rope_theta: float = 100000.0) -> dict:
    """A small Llama/Qwen2 config.json (transformers 5 style: rope_theta nested in rope_parameters). Keep the
    intermediate size a multiple of 128 for exllamav2's fused MLP (docs/FACTS.md §3)."""
    cfg = {"architectures": [arch], "model_type": "qwen2" if arch.startswith("Qwen2") else "llama",
           "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
           "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "hidden_act": "silu",
           "tie_word_embeddings": tied, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float16",
           "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"}}
    return cfg


def random_float_state_dict(config: Mapping, *, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random float32 weights with a model's Hugging Face names and shapes (Llama/Mistral/Qwen2 layout; Qwen2 gets
    q/k/v biases). For tests and exllamav2 checks, not for text."""
    gen = torch.Generator().manual_seed(seed)
    shapes = expected_linear_shapes(config)
    h, vocab = config_get(config, "hidden_size"), config_get(config, "vocab_size")
    qwen = str(config_get(config, "model_type", "")).startswith("qwen2") or \
        any(str(a).startswith("Qwen2") for a in config.get("architectures", []))
    sd = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=gen) * std * 25,
          "model.norm.weight": 1 + 0.1 * torch.randn(h, generator=gen)}
    for i in range(config_get(config, "num_hidden_layers")):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=gen)
        sd[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=gen)
        for kind in LINEAR_KINDS:
            k, n = shapes[kind]
            sub = "self_attn" if kind.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            sd[f"{p}{sub}.{kind}.weight"] = torch.randn(n, k, generator=gen) * std
            if qwen and kind in ("q_proj", "k_proj", "v_proj"):
                sd[f"{p}{sub}.{kind}.bias"] = torch.randn(n, generator=gen) * std
    if not config.get("tie_word_embeddings"):
        sd["lm_head.weight"] = torch.randn(vocab, h, generator=gen) * std
    return sd
