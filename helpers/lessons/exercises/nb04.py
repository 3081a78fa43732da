"""Notebook 04's exercises (the Windows sysmem fallback as a test of rival explanations). Each expected answer is
computed below with the course's speed model (``helpers.speed.model``) and datasheet figures; ``solution(id)``
prints the function that computes it."""
from __future__ import annotations

from helpers.fallback.pcie import pcie_practical_bandwidth
from helpers.lessons.exercises import Exercise, register
from helpers.memory.setup import LoadSetup
from helpers.memory.weights import weight_bytes
from helpers.speed import model as speed

#: the seed's model on its card (FP16 cache, a desktop host)
SEED = LoadSetup("qwen2.5-14b", bpw=5.5, gpus="RTX 4080 Super")


def _seed():
    return weight_bytes("qwen2.5-14b", bpw=5.5), SEED.gpu["bandwidth_gbs"]


def lm_head_only_tok_s() -> float:
    w, _ = _seed()
    spill = speed.Spill(w["lm_head_bytes"], 0, pcie_practical_bandwidth(4, 16) / 1e9)
    est = speed.decode_estimate(SEED.with_(flash_attn=True), 256, spill=spill)
    return est.tok_s                            # the central estimate, the fitted constants


def lm_head_read_twice() -> float:              # a slip: the lm_head counted in VRAM as well as over PCIe
    w, bw = _seed()
    eta = speed.CONSTANTS["bandwidth_fraction"]
    return 1 / (1 / lm_head_only_tok_s() + w["lm_head_bytes"] / (eta * bw * 1e9))


def reported_over_roofline() -> float:
    w, bw = _seed()
    per_token = w["vram_bytes"] + 256 * speed.position_bytes("qwen2.5-14b", flash_attn=True).cache_read
    return 80 / (bw * 1e9 / per_token)


def reported_over_roofline_gib() -> float:     # a slip: GiB per token against a bandwidth in GB/s
    w, bw = _seed()
    per_token = w["vram_bytes"] + 256 * speed.position_bytes("qwen2.5-14b", flash_attn=True).cache_read
    return 80 / (bw * 1e9 / (per_token * 2**30 / 1e9))


def depth_for_25_without_flash_attn() -> int:
    return speed.depth_for_speed(SEED, 25.0)


def depth_for_25_cache_only() -> int:          # a slip: flash-attn's bytes per position, no repeat_kv copy
    return speed.depth_for_speed(SEED.with_(flash_attn=True), 25.0)


EXERCISES = register(
    Exercise(
        "04.lm_head_only",
        "Suppose only the lm_head landed in system RAM (flash-attn, FP16 cache, 256 tokens deep, PCIe 23.85 GB/s). How "
        "many tok/s does the speed model give for the seed case?",
        lm_head_only_tok_s, unit="tok/s", rel_tol=0.01,
        hint="speed.decode_estimate(setup, 256, spill=speed.Spill(the lm_head's bytes, 0, 23.85)): the weights still "
             "in VRAM at eta x 736 GB/s, the host time, and the lm_head over PCIe",
        mistakes=((lm_head_read_twice, "the lm_head is read over PCIe instead of from VRAM, not as well: take its "
                                       "bytes out of the VRAM term"),)),
    Exercise(
        "04.roofline_ratio",
        "The user reported 80 tok/s at a 4k cache. How many times the datasheet roofline is that (every GPU weight "
        "and 256 positions of the FP16 cache per token, 736 GB/s)?",
        reported_over_roofline, rel_tol=0.005,
        hint="roofline = 736e9 / (weight bytes + 256 x 48 layers x 4096 B); ratio = 80 / roofline",
        mistakes=((reported_over_roofline_gib, "bytes and GB/s: do not convert the bytes to GiB"),)),
    Exercise(
        "04.depth_no_flash",
        "Nothing spilled and no flash-attn: at what depth does the seed case fall to 25 tok/s (the speed model, "
        "its fitted constants)?",
        depth_for_25_without_flash_attn, unit="tokens", rel_tol=0.02,
        hint="speed.depth_for_speed(setup, 25) without flash-attn: the bytes per position of torch attention "
             "(repeat_kv writes and reads K and V for 40 heads) at the torch path's fitted cost",
        mistakes=((depth_for_25_cache_only, "that is flash-attn's cost per position: without it, repeat_kv copies "
                                            "K and V to 40 heads and reads them again"),)),
)
