"""The popular VRAM formula (params x bpw / 8 + a plain KV cache) beside exllamav2's real total (notebook 05)."""
from __future__ import annotations

from typing import Iterable

from helpers.core.errors import CourseError
from helpers.core.units import gib
from helpers.memory.breakdown import breakdown
from helpers.memory.setup import LoadSetup


def simple_calculator_bytes(setup: LoadSetup, kv_bits: int | None = None) -> int:
    """What popular VRAM calculators compute: params x bpw / 8 + 2 x layers x kv_dim x max_seq_len x kv_bits / 8
    (``kv_bits``: the setup's cache mode read as plain bits unless given). No lm_head at its own bits, embedding on
    the GPU, no scales or temp layer, no scratch, no CUDA context: notebook 05 shows how far this is from
    ``breakdown``."""
    s = setup.shape
    bpw = setup.bpw if setup.bpw is not None else setup.weights.bpw
    if bpw is None:
        raise CourseError("a simple calculator needs a bpw: give it with the setup")
    kv_bits = SIMPLE_KV_BITS[setup.cache_mode] if kv_bits is None else kv_bits
    if kv_bits not in (4, 6, 8, 16, 32):
        raise CourseError(f"kv_bits must be one of 4, 6, 8, 16, 32 (got {kv_bits!r})")
    return int(s.n_params * bpw / 8 + 2 * s.n_layers * s.kv_dim * setup.max_seq_len * kv_bits / 8)


#: the cache bits a simple calculator would use for each exllamav2 mode
SIMPLE_KV_BITS = {"fp16": 16, "fp8": 8, "q8": 8, "q6": 6, "q4": 4}


def calculator_rows(setups: Iterable[LoadSetup]) -> list[dict]:
    """For each setup: exllamav2's total (``breakdown``) beside the simple formula, in GiB, and the formula's error
    in percent of exllamav2's total (an EXL2 folder without a bpw is read as 5 bpw by the formula)."""
    out = []
    for setup in setups:
        bd = breakdown(setup, warn=False)
        simple = simple_calculator_bytes(setup if setup.bpw is not None else setup.with_(bpw=5.0))
        bpw = setup.bpw if setup.bpw is not None else ""
        out.append({"case": f"{setup.shape.name} {bpw}bpw {setup.max_seq_len // 1024}k {bd.cache_mode}",
                    "exllamav2_gib": round(gib(bd.vram_total_bytes), 2),
                    "resident_gib": round(gib(bd.exllamav2_resident_bytes), 2),
                    "simple_gib": round(gib(simple), 2),
                    "error_pct": round(100.0 * (simple - bd.vram_total_bytes) / bd.vram_total_bytes, 1)})
    return out
