"""Notebook 03's exercises (decode speed at depth). Each expected answer is computed below with the course's speed
model (``helpers.speed.model``) or from the external H100 record; ``solution(id)`` prints the function."""
from __future__ import annotations

from helpers.lessons.exercises import Exercise, register
from helpers.memory.setup import LoadSetup
from helpers.speed import model

#: the seed's model on its card: FP16 cache, no flash-attn, a desktop host
SEED = LoadSetup("qwen2.5-14b", bpw=5.5, gpus="RTX 4080 Super")


def _w14b() -> int:
    return SEED.weights.vram


def depth_for_25_no_flash() -> int:
    # nothing spilled: the speed model with its fitted constants at the datasheet bandwidth
    return model.depth_for_speed(SEED, 25)


def depth_for_25_first_principles() -> int:           # forgot the constants: datasheet bandwidth, no host time
    return model.depth_for_speed(SEED, 25, constants=model.first_principles())


def q4_over_fp16_no_flash() -> float:
    return model.position_bytes("qwen2.5-14b", "q4").total / model.position_bytes("qwen2.5-14b", "fp16").total


def q4_cache_bytes_only() -> float:                   # the cache's own bytes: what "Q4 reads a quarter" assumed
    return (model.position_bytes("qwen2.5-14b", "q4").cache_read
            / model.position_bytes("qwen2.5-14b", "fp16").cache_read)


def h100_roofline_at_128() -> float:
    # the external H100 record: 2,857 GB/s measured, 128 deep, FP16 cache, no flash-attn
    per_pos = model.position_bytes("qwen2.5-14b", "fp16", flash_attn=False).total
    return 2857e9 / (_w14b() + 128 * per_pos)


EXERCISES = register(
    Exercise(
        "03.depth_for_25",
        "An RTX 4080 Super (736 GB/s) runs Qwen2.5-14B at 5.5 bpw with an FP16 cache, WITHOUT flash-attn, nothing "
        "spilled, on a desktop, with the speed model's fitted constants. How many tokens deep does decode fall to "
        "25 tok/s?",
        depth_for_25_no_flash, unit="tokens", rel_tol=0.03,
        hint="1/25 s = weights/(eta B) + layers x h_desktop + depth x k_torch x bytes per position/(eta B); solve "
             "for depth (model.depth_for_speed does it)",
        mistakes=((depth_for_25_first_principles, "that is first principles (full bandwidth, no host time): use the "
                                                   "fitted constants, model.CONSTANTS"),)),
    Exercise(
        "03.q4_vs_fp16",
        "Without flash-attn, how many times the bytes per position of an FP16 cache does a Q4 cache move per decoded "
        "token in exllamav2 0.3.2 (Qwen2.5-14B)?",
        q4_over_fp16_no_flash, rel_tol=0.01,
        hint="the Q4 cache is dequantized into an FP16 temp layer every step, then repeat_kv copies that: compare "
             "model.position_bytes(..., 'q4').total with the FP16 total",
        mistakes=((q4_cache_bytes_only, "that compares the caches' own bytes; count the FP16 temp layer and the "
                                        "repeat_kv copy too"),)),
    Exercise(
        "03.h100_roofline",
        "What is the roofline (tok/s) of the external H100 record's shallow row (depth 128, no flash-attn, FP16 "
        "cache) at its measured 2,857 GB/s? Compare it with the measured 59.4 tok/s.",
        h100_roofline_at_128, unit="tok/s", rel_tol=0.02,
        hint="bandwidth / (weight bytes + 128 x bytes per position); weight bytes from "
             "helpers.memory.weights.weight_bytes('qwen2.5-14b', bpw=5.5)['vram_bytes']"),
)
