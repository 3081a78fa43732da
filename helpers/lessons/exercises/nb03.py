"""Notebook 03's exercises (decode speed at depth). Each expected answer is computed below with the course's speed
model (``helpers.speed.model``); ``solution(id)`` prints the function."""
from __future__ import annotations

from helpers.lessons.exercises import Exercise, register
from helpers.memory.setup import LoadSetup
from helpers.speed import model

#: the seed's model on its card: FP16 cache, no flash-attn, a desktop host
SEED = LoadSetup("qwen2.5-14b", bpw=5.5, gpus="RTX 4080 Super")


def _w14b() -> int:
    return SEED.weights.vram


def tok_s_30k_no_flash() -> float:
    # the seed's model on its card, FP16 cache, no flash-attn, nothing spilled, 30,000 tokens deep
    return model.decode_estimate(SEED.with_(max_seq_len=32768), 30000).tok_s


def _depth_why() -> str:
    per_position = model.position_bytes("qwen2.5-14b", "fp16", flash_attn=False).total
    deep, weights = 30000 * per_position, SEED.weights.vram
    return (f"30,000 positions x {per_position / 1e6:.2f} MB (the cache, and the repeat_kv copy written and read) "
            f"is {deep / 1e9:.0f} GB a token, {deep / weights:.1f}x the {weights / 1e9:.1f} GB of weights: at that "
            "depth the cache, not the weights, sets the speed")


def tok_s_30k_first_principles() -> float:            # the bytes at the datasheet bandwidth, no host time
    return model.decode_estimate(SEED.with_(max_seq_len=32768), 30000, constants=model.first_principles()).tok_s


def tok_s_4090_16k() -> float:
    # an RTX 4090 (1,008 GB/s), the same model and path, 16,384 deep, the fitted constants
    return model.decode_estimate(SEED.with_(gpus="RTX 4090", max_seq_len=32768), 16384).tok_s


def tok_s_4090_16k_flash() -> float:                   # with flash-attn's bytes per position
    return model.decode_estimate(SEED.with_(gpus="RTX 4090", max_seq_len=32768, flash_attn=True), 16384).tok_s


def q4_over_fp16_no_flash() -> float:   # Llama-3.1-8B: the notebook counts Qwen2.5-14B's bytes, not these
    return model.position_bytes("llama-3.1-8b", "q4").total / model.position_bytes("llama-3.1-8b", "fp16").total


def q4_cache_bytes_only() -> float:                   # the cache's own bytes: what "Q4 reads a quarter" assumed
    return (model.position_bytes("llama-3.1-8b", "q4").cache_read
            / model.position_bytes("llama-3.1-8b", "fp16").cache_read)


EXERCISES = register(
    Exercise(
        "03.predict_tok_s_30k",
        "Predict before the next figure: the seed's RTX 4080 Super and Qwen2.5-14B at 5.5 bpw, FP16 cache, WITHOUT "
        "flash-attn, nothing spilled, 30,000 tokens deep. How many tokens/s does the speed model give?",
        tok_s_30k_no_flash, unit="tok/s", rel_tol=0.15, predict=True,
        hint="weights / (eta B) + 30,000 x 2.16 MB per position x k_torch / (eta B) + 48 layers x host time; "
             "its inverse",
        why=_depth_why,
        mistakes=((tok_s_30k_first_principles, "that is the roofline (all the bandwidth, no host time): the fitted "
                                               "constants give less"),)),
    Exercise(
        "03.q4_vs_fp16",
        "The notebook counted Qwen2.5-14B's bytes per position. For Llama-3.1-8B (32 layers, 32 query heads, 8 KV "
        "heads of 128), without flash-attn: how many times the bytes per position of an FP16 cache does a Q4 cache "
        "move per decoded token in exllamav2 0.3.2?",
        q4_over_fp16_no_flash, rel_tol=0.01,
        hint="the Q4 cache is dequantized into an FP16 temp layer every step, then repeat_kv copies that to 32 heads: "
             "compare model.position_bytes('llama-3.1-8b', 'q4').total with the FP16 total",
        mistakes=((q4_cache_bytes_only, "that compares the caches' own bytes; count the FP16 temp layer and the "
                                        "repeat_kv copy too"),)),
    Exercise(
        "03.tok_s_4090",
        "An RTX 4090 (1,008 GB/s) runs the same model, FP16 cache, no flash-attn, nothing spilled, on a desktop: "
        "what does the speed model give 16,384 tokens deep?",
        tok_s_4090_16k, unit="tok/s", rel_tol=0.02,
        hint="model.decode_estimate(SEED.with_(gpus='RTX 4090', max_seq_len=32768), 16384).tok_s: the same bytes, a "
             "faster memory",
        mistakes=((tok_s_4090_16k_flash, "that is with flash-attn: without it each position also pays the repeat_kv "
                                         "copy"),)),
)
