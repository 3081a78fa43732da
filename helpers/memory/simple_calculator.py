"""The popular VRAM formula (params x bpw / 8 + a plain KV cache) beside exllamav2's real total (notebook 05)."""
from __future__ import annotations

import warnings
from typing import Any, Iterable

from helpers.core.errors import CourseError
from helpers.core.units import gib
from helpers.memory.breakdown import breakdown
from helpers.memory.limits import check_len
from helpers.specs.shapes import model_shape


def simple_calculator_bytes(shape: Any, bpw: float, max_seq_len: int, kv_bits: int = 16) -> int:
    """What popular VRAM calculators compute: params x bpw / 8 + 2 x layers x kv_dim x max_seq_len x kv_bits / 8.

    No lm_head at its own bits, embedding counted on the GPU, no cache scales or temp layer, no scratch, no CUDA
    context: notebook 05 shows by how much this errs against ``breakdown``.
    """
    s = model_shape(shape)
    L = check_len(max_seq_len, "ctx")
    if isinstance(bpw, bool) or not isinstance(bpw, (int, float)) or bpw <= 0 or bpw > 32:
        raise CourseError(f"bits per weight must be a positive number up to 32 (got {bpw!r})")
    if kv_bits not in (4, 6, 8, 16, 32):
        raise CourseError(f"kv_bits must be one of 4, 6, 8, 16, 32 (got {kv_bits!r})")
    return int(s.n_params * bpw / 8 + 2 * s.n_layers * s.kv_dim * L * kv_bits / 8)


#: the cache bits a simple calculator would use for each exllamav2 mode
SIMPLE_KV_BITS = {"fp16": 16, "fp8": 8, "q8": 8, "q6": 6, "q4": 4}


def calculator_rows(cases: Iterable[tuple], **plan_kw) -> list[dict]:
    """For (model, bpw, max_seq_len, cache_mode) cases: exllamav2's total (``breakdown``) beside the simple formula,
    in GiB, and the formula's error in percent of exllamav2's total."""
    out = []
    for spec, bpw, max_seq_len, mode in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bd = breakdown(spec, bpw=bpw, max_seq_len=max_seq_len, cache_mode=mode, **plan_kw)
        shape = model_shape(spec)
        simple = simple_calculator_bytes(shape, bpw if bpw is not None else 5.0, max_seq_len,
                                         SIMPLE_KV_BITS[bd.cache_mode])
        out.append({"case": f"{shape.name} {bpw if bpw is not None else ''}bpw {max_seq_len // 1024}k {bd.cache_mode}",
                    "exllamav2_gib": round(gib(bd.vram_total_bytes), 2),
                    "resident_gib": round(gib(bd.exllamav2_resident_bytes), 2),
                    "simple_gib": round(gib(simple), 2),
                    "error_pct": round(100.0 * (simple - bd.vram_total_bytes) / bd.vram_total_bytes, 1)})
    return out
