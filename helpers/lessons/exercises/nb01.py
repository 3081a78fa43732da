"""Notebook 01's exercises (KV-cache math). Each expected answer is computed below, from the bundled config.json
files (first principles) or the course's helpers; ``solution(id)`` prints the function that computes it."""
from __future__ import annotations

import json

from helpers.core.paths import CONFIGS_DIR
from helpers.core.units import GIB
from helpers.lessons.exercises import Exercise, register
from helpers.memory import kv_cache
from helpers.specs import shapes


def _config(name: str) -> dict:
    return json.loads((CONFIGS_DIR / f"{name}.json").read_text(encoding="utf-8"))


def kv_nemo() -> int:
    cfg = _config("mistral-nemo-12b")
    layers, kv_heads = cfg["num_hidden_layers"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]   # Nemo states 128
    return 2 * layers * kv_heads * head_dim * 2            # K and V, every layer, 2 bytes per fp16 value


def kv_nemo_forgot_v() -> int:                           # a typical slip: K only
    return kv_nemo() // 2


def kv_nemo_head_dim_from_hidden() -> int:               # hidden / heads = 160, not the stated head_dim 128
    cfg = _config("mistral-nemo-12b")
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["hidden_size"] // cfg[
        "num_attention_heads"] * 2


def q4_cache_8b_32k() -> float:
    shape = shapes.model_shape("llama-3.1-8b")
    return kv_cache.kv_cache_bytes(shape, 32768, "q4") / GIB


def q4_cache_8b_32k_no_temp() -> float:                  # forgot the FP16 temp layer
    shape = shapes.model_shape("llama-3.1-8b")
    return kv_cache.kv_layer_bytes_per_token(shape, "q4") * shape.n_layers * 32768 / GIB


def gqa_saving_gemma() -> float:
    cfg = _config("gemma-2-9b")
    return cfg["num_attention_heads"] / cfg["num_key_value_heads"]   # MHA would store one KV head per query head


def fp16_tokens_in_4gib() -> int:
    per_token = kv_cache.kv_bytes_per_token("qwen2.5-7b", "fp16")
    return int(4 * GIB // per_token)


EXERCISES = register(
    Exercise(
        "01.predict_kv_nemo",
        "Predict before the next cell works it out: how many bytes does one token cost in an FP16 cache of "
        "Mistral-Nemo-12B (all layers, K and V)? Its config: helpers/specs/configs/mistral-nemo-12b.json.",
        kv_nemo, unit="B", predict=True,
        hint="2 (K and V) x num_hidden_layers x num_key_value_heads x head_dim x 2 bytes",
        why="the cache stores K and V of every KV head in every layer; Nemo states head_dim 128 in its config, "
            "smaller than hidden_size / num_attention_heads (160)",
        mistakes=((kv_nemo_forgot_v, "that is K alone: the cache stores V too"),
                  (kv_nemo_head_dim_from_hidden, "Nemo's config states head_dim 128: use it, not hidden / heads"))),
    Exercise(
        "01.q4_8b_32k",
        "How many GiB does a Q4 cache of Llama-3.1-8B take at max_seq_len 32768, its FP16 temp layer included?",
        q4_cache_8b_32k, unit="GiB", rel_tol=0.01,
        hint="per token: 32 layers x (K and V) x 8 KV heads x (128 x 0.5 B of codes + 128/32 x 2 B of scales), plus "
             "one FP16 layer (2 x 8 x 128 x 2 B) to decode into; times 32768, divided by 2^30",
        mistakes=((q4_cache_8b_32k_no_temp, "you left out the one full-length FP16 temp layer (K and V) that "
                                            "quantized caches decode into"),)),
    Exercise(
        "01.gqa_gemma",
        "Gemma-2-9B uses GQA. How many times larger would its KV cache be if every query head had its own KV head?",
        gqa_saving_gemma, unit="x",
        hint="the cache scales with num_key_value_heads; plain multi-head attention has num_attention_heads of them"),
    Exercise(
        "01.fp16_tokens_4gib",
        "How many tokens of FP16 cache of Qwen2.5-7B fit in 4 GiB (round down)?",
        fp16_tokens_in_4gib, unit="tokens",
        hint="4 x 2^30 bytes divided by the bytes per token (2 x layers x KV heads x head_dim x 2) of qwen2.5-7b"),
)
