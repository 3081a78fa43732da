"""Will it fit? One model on one GPU: the margin, the longest context per cache mode, the highest bpw, advice.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from helpers.core.errors import CourseError, CourseWarning
from helpers.core.units import GIB, fmt_gib
from helpers.memory.breakdown import Breakdown, breakdown_from, resolve_cuda_context, resolve_reserve
from helpers.memory.cache_modes import CACHE_CLASSES, CACHE_MODES, LOAD_AUTOSPLIT_RESERVE_BYTES, check_cache_mode
from helpers.memory.limits import check_batch, check_len
from helpers.memory.scratch import DEFAULT_MAX_ATTENTION_SIZE, DEFAULT_MAX_INPUT_LEN
from helpers.memory.weights import ModelWeights
from helpers.specs.gpus import gpu_spec
from helpers.specs.shapes import ModelShape, model_shape

#: the planner's longest-context search stops here (reported as "at least" when reached)
LONGEST_CONTEXT_CAP = 2**20
#: the dynamic generator pages the cache in 256-token pages; the planner reports lengths in these steps
PAGE = 256


@dataclass
class Plan:
    """Will it fit? ``fits``, ``margin_bytes`` (negative: short by), the cache, the longest contexts, advice."""

    model: str
    gpu: dict
    breakdown: Breakdown
    fits: bool
    margin_bytes: int
    longest_context: dict
    longest_context_capped: dict
    recommendation: str
    max_bpw_that_fits: float | None = None
    decode_roofline_tok_s: dict | None = None
    warnings: list = field(default_factory=list)

    @property
    def kv_cache_bytes(self) -> int:
        return self.breakdown.kv_cache_bytes

    @property
    def autosplit_margin_bytes(self) -> int:
        """The margin while ``load_autosplit`` loads: it holds ``LOAD_AUTOSPLIT_RESERVE_BYTES`` more until it ends."""
        return self.margin_bytes - LOAD_AUTOSPLIT_RESERVE_BYTES

    def to_dict(self) -> dict:
        return {"model": self.model, "gpu": self.gpu, "units": "bytes (GiB = 2**30 bytes)",
                "fits": self.fits, "margin_bytes": self.margin_bytes, "kv_cache_bytes": self.kv_cache_bytes,
                "autosplit_margin_bytes": self.autosplit_margin_bytes,
                "vram_total_bytes": self.breakdown.vram_total_bytes, "breakdown": self.breakdown.to_dict(),
                "longest_context": self.longest_context, "longest_context_capped": self.longest_context_capped,
                "max_bpw_that_fits": self.max_bpw_that_fits, "decode_roofline_tok_s": self.decode_roofline_tok_s,
                "recommendation": self.recommendation, "warnings": self.warnings}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def summary(self) -> str:
        g = self.gpu
        verdict = (f"FITS with {fmt_gib(self.margin_bytes)} to spare" if self.fits
                   else f"DOES NOT FIT: {fmt_gib(-self.margin_bytes)} short")
        lines = [self.breakdown.table(), "",
                 f"GPU: {g['name']}, {g['vram_gib']:g} GiB -> {verdict}",
                 "longest context that fits (multiples of 256 tokens): " + ", ".join(
                     f"{m} {'>=' if self.longest_context_capped[m] else ''}{n:,}" for m, n in
                     self.longest_context.items())]
        if self.decode_roofline_tok_s:
            r = self.decode_roofline_tok_s
            lines.append(f"decode upper bound from {g['bandwidth_gbs']:g} GB/s (bandwidth roofline, not a prediction): "
                         f"{r['empty_cache']:.0f} tok/s at an empty cache, {r['full_cache']:.0f} tok/s at a full one")
        lines += ["", self.recommendation]
        return "\n".join(lines)


def _fits_at(st: ModelWeights, L: int, mode: str, gpu_bytes: int, kw: dict) -> int:
    bd = breakdown_from(st, L, mode, **kw)
    return gpu_bytes - bd.vram_total_bytes


def _longest(st: ModelWeights, mode: str, gpu_bytes: int, kw: dict) -> tuple[int, bool]:
    """Largest multiple of 256 tokens that fits (0 if none), and whether the search cap was reached."""
    if _fits_at(st, PAGE, mode, gpu_bytes, kw) < 0:
        return 0, False
    hi_pages = LONGEST_CONTEXT_CAP // PAGE
    if _fits_at(st, hi_pages * PAGE, mode, gpu_bytes, kw) >= 0:
        return hi_pages * PAGE, True
    lo, hi = 1, hi_pages  # lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _fits_at(st, mid * PAGE, mode, gpu_bytes, kw) >= 0:
            lo = mid
        else:
            hi = mid
    return lo * PAGE, False


def _max_bpw(spec: Any, head_bits: int, L: int, mode: str, gpu_bytes: int, kw: dict) -> float | None:
    """Highest bpw in 0.05 steps (2.0..8.0) whose estimate fits, for configs (None for a real EXL2 folder)."""
    shape = model_shape(spec)
    if shape.exl2_dir:
        return None
    steps = [round(2.0 + 0.05 * i, 2) for i in range(121)]
    best = None
    lo, hi = 0, len(steps) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        st = ModelWeights(shape, steps[mid], head_bits)
        if _fits_at(st, L, mode, gpu_bytes, kw) >= 0:
            best, lo = steps[mid], mid + 1
        else:
            hi = mid - 1
    return best


def _recommend(p_model: str, gpu: dict, bd: Breakdown, fits: bool, margin: int, longest: dict, capped: dict,
               max_bpw: float | None, shape: ModelShape) -> str:
    L, mode = bd.max_seq_len, bd.cache_mode

    def ctx(m):
        return f"{'at least ' if capped[m] else ''}{longest[m]:,} tokens"

    if fits:
        text = (f"Fits: {fmt_gib(margin)} to spare on {gpu['name']} at max_seq_len {L:,} with a {mode} cache. "
                f"The longest context this {mode} cache allows is {ctx(mode)}.")
        better = [m for m in CACHE_MODES if m != mode and m != "fp8" and longest[m] > longest[mode] * 1.2]
        if better:
            text += (" A quantized cache stretches it further: " +
                     ", ".join(f"{m} {ctx(m)}" for m in better) + " (Q4/Q6/Q8 caches cost little quality; FP8 "
                     "is rejected by the dynamic generator).")
        if margin < LOAD_AUTOSPLIT_RESERVE_BYTES:
            text += (f" Tight: model.load_autosplit(cache) holds {fmt_gib(LOAD_AUTOSPLIT_RESERVE_BYTES)} more while it "
                     f"loads, {fmt_gib(LOAD_AUTOSPLIT_RESERVE_BYTES - margin)} more than this margin: it fails with "
                     "'Insufficient VRAM' on Linux and spills into system RAM on Windows. Leave that much free, or "
                     "load with model.load() and create the cache afterwards.")
    else:
        opts = []
        if longest[mode] >= PAGE:
            opts.append(f"lower max_seq_len to {ctx(mode)} or less with the {mode} cache")
        for m in ("q8", "q6", "q4"):
            if m != mode and longest[m] >= L:
                opts.append(f"keep {L:,} tokens with a {m} cache ({CACHE_CLASSES[m]}; fits up to {ctx(m)})")
                break
        if max_bpw is not None and bd.bpw is not None and max_bpw < bd.bpw:
            opts.append(f"use a quant of at most {max_bpw:g} bpw at {L:,} tokens with the {mode} cache")
        elif shape.exl2_dir:
            opts.append("use a lower-bpw EXL2 quant of this model")
        if not opts:
            opts.append("use a smaller model or a bigger GPU: even the weights and scratch do not fit")
        text = (f"Does not fit: {p_model} at max_seq_len {L:,} with a {mode} cache needs {fmt_gib(bd.vram_total_bytes)}"
                f", {fmt_gib(-margin)} more than {gpu['name']}'s {gpu['vram_gib']:g} GiB. Options: "
                + "; ".join(f"({i + 1}) {o}" for i, o in enumerate(opts)) + ". On Windows the driver's sysmem "
                "fallback will not fail here: it spills into system RAM over PCIe and decoding slows several-fold "
                "(notebook 04); on Linux exllamav2 stops with CUDA out of memory.")
    if L > shape.max_position_embeddings:
        text += (f" Note: {L:,} tokens is beyond the {shape.max_position_embeddings:,} the model was trained for "
                 "(see the warning on RoPE scaling).")
    return text


def plan(spec: Any, gpu: Any, *, bpw: float | None = None, head_bits: int = 6, max_seq_len: int,
         cache_mode: str = "fp16", reserve_gib: float | None = None, cuda_context_gib: float | None = None,
         batch: int = 1, max_input_len: int = DEFAULT_MAX_INPUT_LEN,
         max_attention_size: int = DEFAULT_MAX_ATTENTION_SIZE, flash_attn: bool = False,
         bandwidth_gbs: float | None = None) -> Plan:
    """Plan one model on one GPU: the breakdown, fits or not and by how much, the longest context per cache mode,
    the highest bpw that fits (configs only), a decode roofline if the bandwidth is known, and a recommendation."""
    g = gpu_spec(gpu, bandwidth_gbs) if not isinstance(gpu, dict) or "vram_bytes" not in gpu else gpu
    mode = check_cache_mode(cache_mode)
    L = check_len(max_seq_len)
    check_len(max_input_len, "max_input_len")
    ctx = resolve_cuda_context(None if cuda_context_gib is None
                       else int(round(_check_gib(cuda_context_gib, "CUDA context") * GIB)))
    res = resolve_reserve(None if reserve_gib is None else int(round(_check_gib(reserve_gib, "reserve") * GIB)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        st = ModelWeights(spec, bpw, head_bits)
    kw = dict(batch=check_batch(batch), max_input_len=max_input_len, max_attention_size=max_attention_size,
              flash_attn=flash_attn, ctx=ctx, reserve=res)
    bd = breakdown_from(st, L, mode, **kw)
    gpu_bytes = g["vram_bytes"]
    margin = gpu_bytes - bd.vram_total_bytes
    longest, capped = {}, {}
    for m in CACHE_MODES:
        longest[m], capped[m] = _longest(st, m, gpu_bytes, kw)
    max_bpw = _max_bpw(st.shape, head_bits, L, mode, gpu_bytes, kw) if bpw is not None else None
    roof = None
    if g.get("bandwidth_gbs"):
        per_tok = bd.kv_layers_bytes / L
        bw = float(g["bandwidth_gbs"]) * 1e9
        roof = {"empty_cache": bw / bd.weights_bytes, "full_cache": bw / (bd.weights_bytes + per_tok * L),
                "note": "GPU weights (+ the cache as stored) read once per token at datasheet bandwidth; an upper "
                        "bound, not a prediction"}
    msgs = [str(w.message) for w in caught] + bd.warnings
    for msg in msgs:
        warnings.warn(msg, CourseWarning, stacklevel=2)
    rec = _recommend(st.shape.name, g, bd, margin >= 0, margin, longest, capped, max_bpw, st.shape)
    return Plan(model=st.shape.name, gpu=g, breakdown=bd, fits=margin >= 0, margin_bytes=margin,
                longest_context=longest, longest_context_capped=capped, recommendation=rec,
                max_bpw_that_fits=max_bpw, decode_roofline_tok_s=roof, warnings=msgs)


def _check_gib(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise CourseError(f"{what} must be zero or a positive number of GiB (got {v!r})")
    if v > 4096:
        raise CourseError(f"{what} of {v:g} GiB is absurd; give it in GiB, e.g. 0.5")
    return float(v)
