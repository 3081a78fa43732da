"""Notebook 05's exercises (plan your GPU). Each expected answer is computed below with the course's planner;
``solution(id)`` prints the function that computes it."""
from __future__ import annotations

import warnings

from helpers.lessons.exercises import Exercise, register
from helpers.memory.setup import LoadSetup
from helpers.planning.multi import plan_multi
from helpers.planning.planner import longest_for, plan


def longest_fp16_seed() -> int:
    # the seed's model at 5.5 bpw on its 16 GiB card, FP16 cache: the longest max_seq_len that fits (multiple of 256)
    return longest_for(LoadSetup("qwen2.5-14b", bpw=5.5, gpus="RTX 4080 Super"), modes=("fp16",), safe=False)["fp16"]


def _longest_why() -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bd = plan(LoadSetup("qwen2.5-14b", bpw=5.5, gpus="RTX 4080 Super", max_seq_len=longest_fp16_seed())).breakdown
    rest = bd.vram_total_bytes - bd.weights_bytes - bd.kv_cache_bytes
    return (f"{bd.weights_bytes / 2**30:.1f} GiB of weights and {rest / 2**30:.1f} GiB of scratch, transients (the "
            f"repeat_kv copy grows with the context too), CUDA context and reserve leave "
            f"{bd.kv_cache_bytes / 2**30:.1f} GiB for the cache, at 196,608 B a token")


def longest_fp16_seed_cache_only() -> int:  # a slip: the whole card for the cache, nothing for weights or scratch
    return 16 * 2 ** 30 // (2 * 48 * 8 * 128 * 2) // 256 * 256


def q6_8b_16gb() -> int:
    # the longest Q6 context (multiple of 256) for Llama-3.1-8B at 6.0 bpw on a 16 GiB card, as plan() finds it:
    # everything the GPU holds (weights, cache, scratch, transients, CUDA context, 0.5 GiB reserve) within 16 GiB
    return longest_for(LoadSetup("llama-3.1-8b", bpw=6.0, gpus=16), modes=("q6",), safe=False)["q6"]


def q6_8b_16gb_safe() -> int:  # the length that also leaves load_autosplit's load-time reserve free
    return longest_for(LoadSetup("llama-3.1-8b", bpw=6.0, gpus=16), modes=("q6",), safe=True)["q6"]


def flash_gain_14b() -> float:
    # decode estimate at depth 16,384, Qwen2.5-14B 5.5 bpw, FP16 cache, RTX 3090: with flash-attn / without (the
    # notebook shows the RTX 4080 Super at 30,000, not this)
    setup = LoadSetup("qwen2.5-14b", bpw=5.5, max_seq_len=32768, gpus="RTX 3090")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = plan(setup.with_(flash_attn=True), 16384).decode.tok_s
        slow = plan(setup, 16384).decode.tok_s
    return fast / slow


def flash_gain_inverted() -> float:  # the ratio the other way round
    return 1 / flash_gain_14b()


def gpu0_layers_70b() -> int:
    # Llama-3.3-70B 4.0 bpw, 32k, Q8 cache on two RTX 3090s with load_autosplit: decoder layers whose attention
    # lands on GPU 0 (the first device fills up before exllamav2 moves on; the notebook shows the Q4 cache's split)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = plan_multi(LoadSetup("llama-3.3-70b", bpw=4.0, max_seq_len=32768, cache_mode="q8",
                                 gpus=("RTX 3090", "RTX 3090")))
    return sum(1 for name in m.devices[0].modules if name.endswith("self_attn"))


EXERCISES = register(
    Exercise(
        "05.predict_longest_fp16",
        "Predict before the next cell works it out: Qwen2.5-14B at 5.5 bpw on the seed's 16 GiB RTX 4080 Super "
        "(0.5 GiB reserve, the default CUDA context), FP16 cache: the longest max_seq_len that fits?",
        longest_fp16_seed, unit="tokens", rel_tol=0.10, predict=True,
        hint="(16 GiB - weights - scratch - CUDA context - reserve) / (196,608 B of cache + 512 B of RoPE tables + "
             "20,480 B of repeat_kv copy per token), rounded down to 256",
        why=_longest_why,
        mistakes=((longest_fp16_seed_cache_only, "that gives the whole card to the cache: the weights, scratch, "
                                                 "CUDA context and reserve come first"),)),
    Exercise(
        "05.q6_8b_16gb",
        "What is the longest Q6 context (a multiple of 256 tokens) that fits Llama-3.1-8B at 6.0 bpw on a 16 GiB card "
        "(default CUDA context and 0.5 GiB reserve)? Use the planner, or longest_for(LoadSetup(...)).",
        q6_8b_16gb, unit="tokens", rel_tol=0.0, abs_tol=0.0,
        hint="plan(LoadSetup('llama-3.1-8b', bpw=6.0, cache_mode='q6', gpus=16)).longest_context['q6']",
        mistakes=((q6_8b_16gb_safe, "that is the length that also leaves load_autosplit's 0.44 GiB load-time "
                                    "reserve free: the question asks for the longest that fits once loaded"),)),
    Exercise(
        "05.flash_gain_14b",
        "By what factor does flash-attn raise the estimated decode speed of Qwen2.5-14B (5.5 bpw, FP16 cache, "
        "32k) on an RTX 3090 (936 GB/s, 24 GiB) at depth 16,384?",
        flash_gain_14b, unit="x", rel_tol=0.02,
        hint="plan(setup.with_(flash_attn=True), 16384).decode.tok_s divided by the same with flash_attn=False",
        mistakes=((flash_gain_inverted, "that is without / with: the question asks how many times faster"),)),
    Exercise(
        "05.gpu0_layers_70b",
        "The split above used a Q4 cache. With a Q8 cache instead (Llama-3.3-70B at 4.0 bpw, 32k, two RTX 3090s, "
        "load_autosplit): how many decoder layers' attention (and cache) land on GPU 0?",
        gpu0_layers_70b, unit="layers", rel_tol=0.0,
        hint="plan_multi(LoadSetup('llama-3.3-70b', bpw=4.0, max_seq_len=32768, cache_mode='q8', "
             "gpus=['RTX 3090'] * 2)); count "
             "the modules of devices[0] that end in 'self_attn'"),
)
