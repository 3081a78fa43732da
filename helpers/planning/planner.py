"""Will it fit, and how fast? One model on one GPU: the margin, the longest context per cache mode, the highest bpw,
the estimated decode speed at a depth (``helpers.speed.model.decode_estimate``), and advice that weighs both.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from helpers.core.errors import CourseError, CourseWarning
from helpers.core.units import fmt_gib
from helpers.format.bits import BPW_RANGE
from helpers.memory.breakdown import Breakdown, breakdown
from helpers.memory.cache_modes import CACHE_CLASSES, CACHE_MODES, LOAD_AUTOSPLIT_RESERVE_BYTES
from helpers.memory.limits import PAGE
from helpers.memory.setup import LoadSetup
from helpers.specs.gpus import gpu_label
from helpers.specs.shapes import ModelShape, long_context_tip, trained_positions
from helpers.speed.model import UNKNOWNS, decode_estimate

#: the planner's longest-context search stops here (reported as "at least" when reached)
LONGEST_CONTEXT_CAP = 2**20
#: the version of the JSON a plan writes (helpers/planning/plan.schema.json describes it)
SCHEMA_VERSION = "1.2"
SCHEMA_ID = "https://github.com/exl2-course/helpers/planning/plan.schema.json"


def page_note(max_seq_len: int) -> str | None:
    """A note when a length is not a multiple of 256 tokens (exllamav2's dynamic generator refuses it)."""
    if max_seq_len % PAGE == 0:
        return None
    down, up = max_seq_len // PAGE * PAGE, (max_seq_len // PAGE + 1) * PAGE
    return (f"max_seq_len {max_seq_len:,} is not a multiple of {PAGE}: exllamav2 0.3.2's dynamic generator pages the "
            f"cache in {PAGE}-token pages and refuses it ('cache.max_seq_len must be multiple of {PAGE}'); use "
            + (f"{down:,} or " if down else "") + f"{up:,}")


def context_note(shape: ModelShape, tokens: int, what: str = "max_seq_len") -> str | None:
    """A note when ``tokens`` lies beyond the positions the config supports (``trained_positions``)."""
    limit = trained_positions(shape)
    if tokens <= limit:
        return None
    how = (f"rope_scaling {shape.rope_scaling} x{shape.rope_scaling_factor:g}" if shape.rope_scaling else
           "no rope_scaling in its config.json")
    return (f"{what} {tokens:,} is beyond the {limit:,} positions {shape.name} was trained for ({how}): the memory "
            f"figures hold, but quality degrades past {limit:,} tokens; {long_context_tip(shape)}")


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
    #: the longest context per cache mode that also leaves load_autosplit's load-time reserve free (never "tight")
    longest_safe_context: dict = field(default_factory=dict)
    #: DecodeEstimate at ``depth`` for the cache mode and attention path given (None without a bandwidth)
    decode: Any = None
    #: DecodeEstimates at a short chat, a quarter, half and a full cache (and ``depth``), the same path and mode
    decode_by_depth: list = field(default_factory=list)
    #: tok/s (central) at ``depth`` for every cache mode, same attention path (advice weighs them)
    decode_by_cache_mode: dict = field(default_factory=dict)
    depth: int = 0
    trained_positions: int = 0
    notes: list = field(default_factory=list)
    setup: Any = field(default=None, repr=False, compare=False)   # the LoadSetup planned

    @property
    def kv_cache_bytes(self) -> int:
        return self.breakdown.kv_cache_bytes

    @property
    def autosplit_margin_bytes(self) -> int:
        """The margin while ``load_autosplit`` loads: it holds ``LOAD_AUTOSPLIT_RESERVE_BYTES`` more until it ends."""
        return self.margin_bytes - LOAD_AUTOSPLIT_RESERVE_BYTES

    def decode_dict(self) -> dict | None:
        """The decode estimate as JSON-able numbers (tok/s, seconds, bytes), or None."""
        e = self.decode
        if e is None:
            return None
        pb = e.position_bytes
        return {"label": e.label, "depth": e.depth, "cache_mode": pb.cache_mode, "flash_attn": pb.flash_attn,
                "tok_s": e.tok_s, "tok_s_low": e.tok_s_low, "tok_s_high": e.tok_s_high, "seconds": e.seconds,
                "assumptions": list(e.assumptions)}

    def position_bytes_dict(self) -> dict | None:
        if self.decode is None:
            return None
        pb = self.decode.position_bytes
        return {"total": pb.total, "cache_read": pb.cache_read, "temp_written": pb.temp_written,
                "temp_read": pb.temp_read, "per_layer": pb.per_layer.total, "derivation": pb.derivation}

    def within_trained(self, tokens: int) -> bool:
        return not self.trained_positions or tokens <= self.trained_positions

    def longest_within_trained(self) -> dict:
        """The longest context per cache mode, capped at the positions the model was trained for (in 256s)."""
        cap = self.trained_positions // PAGE * PAGE if self.trained_positions else None
        return {m: (n if cap is None else min(n, cap)) for m, n in self.longest_context.items()}

    def depth_table(self) -> list[dict]:
        """The decode estimate at each depth of ``decode_by_depth``: depth, tok/s, likely low/high, ceiling."""
        return [{"depth": e.depth, "tok_s": e.tok_s, "tok_s_low": e.tok_s_low, "tok_s_high": e.tok_s_high,
                 "ceiling_tok_s": e.ceiling_tok_s} for e in self.decode_by_depth]

    def to_dict(self) -> dict:
        e = self.decode
        return {"$schema": SCHEMA_ID, "schema_version": SCHEMA_VERSION, "kind": "single",
                "model": self.model, "gpu": self.gpu, "units": "bytes (GiB = 2**30 bytes); speeds in tok/s",
                "fits": self.fits, "margin_bytes": self.margin_bytes, "kv_cache_bytes": self.kv_cache_bytes,
                "autosplit_margin_bytes": self.autosplit_margin_bytes,
                "vram_total_bytes": self.breakdown.vram_total_bytes, "breakdown": self.breakdown.to_dict(),
                "longest_context": self.longest_context, "longest_context_capped": self.longest_context_capped,
                "longest_safe_context": self.longest_safe_context,
                "longest_context_within_trained": self.longest_within_trained(),
                "max_bpw_that_fits": self.max_bpw_that_fits, "decode_roofline_tok_s": self.decode_roofline_tok_s,
                "depth": self.depth, "trained_positions": self.trained_positions,
                "decode_estimate_tok_s": None if e is None else e.tok_s,
                "decode_estimate_range_tok_s": None if e is None else [e.tok_s_low, e.tok_s_high],
                "decode_estimate": self.decode_dict(),
                "decode_estimate_by_depth": self.depth_table(),
                "decode_estimate_by_cache_mode_tok_s": self.decode_by_cache_mode,
                "bytes_per_position": self.position_bytes_dict(),
                "recommendation": self.recommendation, "notes": self.notes, "warnings": self.warnings}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def verdict(self) -> str:
        return (f"FITS with {fmt_gib(self.margin_bytes)} to spare" if self.fits
                else f"DOES NOT FIT: {fmt_gib(-self.margin_bytes)} short")

    def speed_line(self) -> str:
        """The decode estimate at the depth asked for, in one line, or why there is none."""
        e = self.decode
        if e is None:
            return ("decode estimate: none (the GPU's bandwidth is unknown; name a known card or give "
                    "--bandwidth-gbs)")
        spill = "; assumes nothing spilled, and this plan does not fit" if not self.fits else ""
        return (f"decode at depth {e.depth:,}: {e.short()} (estimate, {self._path()}){spill}")

    def _path(self) -> str:
        e = self.decode
        path = "flash-attn" if e.position_bytes.flash_attn else "no flash-attn: torch attention with repeat_kv"
        return f"{e.position_bytes.cache_mode} cache, {path}, {e.terms.host} host"

    def speed_lines(self) -> list[str]:
        """The estimate at a short chat, a quarter, half and a full cache, the ceiling of the same path, and what the
        model does not know."""
        if self.decode is None:
            return [self.speed_line()]
        by = self.decode_by_depth
        full = self.breakdown.max_seq_len - 1
        def name(d):
            return f"full cache ({d:,} deep)" if d == full else f"{d:,} deep"
        lines = [f"decode (estimate; {self._path()}), tok/s (likely range) by depth: "
                 + " | ".join(f"{name(e.depth)}: {e.tok_s:.0f} ({e.tok_s_low:.0f}-{e.tok_s_high:.0f})" for e in by),
                 "ceiling of the same path (datasheet bandwidth, no host time; not a prediction): "
                 + " | ".join(f"{name(e.depth)}: {e.ceiling_tok_s:.0f}" for e in by),
                 "not known to the model: " + "; ".join(UNKNOWNS)]
        if not self.fits:
            lines[0] += " (assumes nothing spilled, and this plan does not fit)"
        return lines

    def _longest_line(self) -> str:
        limit = self.trained_positions
        over = [m for m, n in self.longest_context.items() if limit and n > limit]
        text = "longest context that fits (multiples of 256 tokens): " + ", ".join(
            f"{m} {'>=' if self.longest_context_capped[m] else ''}{n:,}{'*' if m in over else ''}"
            for m, n in self.longest_context.items())
        if over:
            text += f" (* beyond the {limit:,} positions {self.model} was trained for: memory allows it, quality not)"
        return text

    def brief(self) -> str:
        """The verdict, the longest contexts, the speed by depth and the advice: ``summary`` without the table of
        terms (a figure shows them) and the ceilings."""
        speed = self.speed_lines()[:1]
        return "\n".join([f"GPU: {gpu_label(self.gpu)} -> {self.verdict()}", self._longest_line(), *speed, "",
                          self.recommendation])

    def summary(self) -> str:
        lines = [self.breakdown.table(), "",
                 f"GPU: {gpu_label(self.gpu)} -> {self.verdict()}",
                 self._longest_line(),
                 "  ... leaving load_autosplit's load-time reserve free: " + ", ".join(
                     f"{m} {n:,}" for m, n in self.longest_safe_context.items())]
        lines += self.speed_lines()
        lines += [f"note: {n}" for n in self.notes]
        lines += ["", self.recommendation]
        return "\n".join(lines)


def _margin(setup: LoadSetup, gpu_bytes: int) -> int:
    return gpu_bytes - breakdown(setup, warn=False).vram_total_bytes


def _longest(setup: LoadSetup, gpu_bytes: int) -> tuple[int, bool]:
    """Largest multiple of 256 tokens of the setup's cache mode that fits ``gpu_bytes`` (0 if none), and whether the
    search cap was reached. Exact: a bracket narrowed by bisection; past max_input_len and sqrt(max_attention_size)
    every term grows linearly with the context, so the first guess comes from the slope there."""
    def margin(pages: int) -> int:
        return _margin(setup.with_(max_seq_len=pages * PAGE), gpu_bytes)

    if margin(1) < 0:
        return 0, False
    hi = LONGEST_CONTEXT_CAP // PAGE
    if margin(hi) >= 0:
        return hi * PAGE, True
    lo = 1  # lo fits, hi does not
    edge = max(setup.max_input_len, math.isqrt(setup.max_attention_size) + 1)
    p0 = min(hi - 2, max(2, -(-edge // PAGE)))
    m0 = margin(p0)
    slope = m0 - margin(p0 + 1)
    if m0 >= 0:
        lo = p0
        if slope > 0:
            guess = min(hi - 1, p0 + m0 // slope)
            if margin(guess) >= 0:
                lo = guess
                hi = guess + 1 if margin(guess + 1) < 0 else hi
            else:
                hi = guess
    else:
        hi = p0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if margin(mid) >= 0:
            lo = mid
        else:
            hi = mid
    return lo * PAGE, False


def longest_contexts(setup: LoadSetup, gpu_bytes: int, modes=CACHE_MODES) -> dict:
    """{cache mode: (longest context that fits ``gpu_bytes``, whether the search cap was reached)}."""
    return {m: _longest(setup.with_(cache_mode=m), gpu_bytes) for m in modes}


def longest_for(setup: LoadSetup, modes=CACHE_MODES, safe: bool = True) -> dict:
    """{cache mode: longest context (multiple of 256 tokens; 0 if none)} on the setup's GPU, as ``plan`` finds it;
    ``safe``: leaving load_autosplit's load-time reserve free (what the advice uses)."""
    budget = setup.gpu["vram_bytes"] - (LOAD_AUTOSPLIT_RESERVE_BYTES if safe else 0)
    return {m: n for m, (n, _) in longest_contexts(setup, budget, modes).items()}


def _max_bpw(setup: LoadSetup, gpu_bytes: int) -> float | None:
    """Highest bpw in 0.05 steps over ``BPW_RANGE`` whose estimate fits ``gpu_bytes``, for configs (None for a real
    EXL2 folder)."""
    if setup.shape.exl2_dir:
        return None
    lo_bpw, hi_bpw = BPW_RANGE
    steps = [round(lo_bpw + 0.05 * i, 2) for i in range(int(round((hi_bpw - lo_bpw) / 0.05)) + 1)]
    best = None
    lo, hi = 0, len(steps) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if _margin(setup.with_(bpw=steps[mid]), gpu_bytes) >= 0:
            best, lo = steps[mid], mid + 1
        else:
            hi = mid - 1
    return best


def _speed(by_mode: dict, m: str) -> str:
    return f"~{by_mode[m]:.0f} tok/s" if by_mode.get(m) else "speed unknown"


def _recommend(setup: LoadSetup, bd: Breakdown, margin: int, safe: dict, max_bpw: float | None, by_mode: dict,
               depth: int, flash: dict | None) -> str:
    """Advice that never names a context its own check calls tight (``safe``: lengths that leave load_autosplit's
    load-time reserve free) and weighs decode speed at ``depth`` (``by_mode``: tok/s per cache mode)."""
    max_seq_len, mode, shape, gpu, fits = bd.max_seq_len, bd.cache_mode, setup.shape, setup.gpu, margin >= 0
    p_model = shape.name
    name = gpu_label(gpu, short=True)
    at = f"at depth {depth:,}"

    limit = trained_positions(shape)

    def tokens(m):
        if safe[m] > limit:
            return f"{limit:,} tokens (the length {shape.name} was trained for; memory allows {safe[m]:,})"
        return f"{safe[m]:,} tokens"

    if fits:
        text = (f"Fits: {fmt_gib(margin)} to spare on {name} at max_seq_len {max_seq_len:,} with a {mode} cache. "
                f"The longest context this {mode} cache allows, with room left for load_autosplit, is {tokens(mode)}.")
        better = [m for m in ("q8", "q6", "q4") if m != mode and safe[m] > safe[mode] * 1.2]
        if better:
            text += (" A quantized cache stretches it further: " +
                     ", ".join(f"{m} {tokens(m)}" for m in better) + " (Q8/Q6 cost little quality, Q4 a little more; "
                     "FP8 is rejected by the dynamic generator).")
        if margin < LOAD_AUTOSPLIT_RESERVE_BYTES:
            text += (f" Tight: model.load_autosplit(cache) holds {fmt_gib(LOAD_AUTOSPLIT_RESERVE_BYTES)} more while it "
                     f"loads, {fmt_gib(LOAD_AUTOSPLIT_RESERVE_BYTES - margin)} more than this margin: it fails with "
                     "'Insufficient VRAM' on Linux and spills into system RAM on Windows. "
                     + (f"Use max_seq_len {tokens(mode)} or less, or " if safe[mode] >= PAGE else "")
                     + "load with model.load() and create the cache afterwards.")
    else:
        opts = []
        if safe[mode] >= PAGE:
            opts.append(f"lower max_seq_len to {tokens(mode)} or less with the {mode} cache")
        keep = [m for m in ("q8", "q6", "q4") if m != mode and safe[m] >= max_seq_len]
        if keep:
            m = keep[0]
            why = (f"{m} keeps {max_seq_len:,} tokens ({CACHE_CLASSES[m]}; up to {tokens(m)})")
            if by_mode and "q4" in keep and m != "q4":
                why += (f"; {at} it decodes {_speed(by_mode, m)} and q4 {_speed(by_mode, 'q4')}: nearly the same, "
                        "since exllamav2 0.3.2 dequantizes either to FP16 every token, so prefer the better quality "
                        f"of {m}")
            opts.append(why)
        if max_bpw is not None and bd.bpw is not None and max_bpw < bd.bpw:
            opts.append(f"use a quant of at most {max_bpw:g} bpw at {max_seq_len:,} tokens with the {mode} cache")
        elif shape.exl2_dir:
            opts.append("use a lower-bpw EXL2 quant of this model")
        if not opts:
            opts.append("use a smaller model or a bigger GPU (or two: plan --gpu A --gpu B): even the weights and "
                        "scratch do not fit")
        text = (f"Does not fit: {p_model} at max_seq_len {max_seq_len:,} with a {mode} cache needs "
                f"{fmt_gib(bd.vram_total_bytes)}, {fmt_gib(-margin)} more than the {fmt_gib(gpu['vram_bytes'], 0)} "
                f"of {name}. Options: "
                + "; ".join(f"({i + 1}) {o}" for i, o in enumerate(opts)) + ". On Windows the driver's sysmem "
                "fallback will not fail here: what does not fit goes to system RAM, and how much that slows decoding "
                "depends on what lands there and when the driver places it (notebook 04); on Linux exllamav2 stops "
                "with CUDA out of memory.")
    if by_mode and mode != "fp16" and by_mode.get("fp16") and by_mode.get(mode):
        text += (f" Speed {at}: a {mode} cache decodes {_speed(by_mode, mode)} vs {_speed(by_mode, 'fp16')} with "
                 "FP16 (estimate): exllamav2 0.3.2 dequantizes the whole cache into an FP16 temp layer every token, so "
                 "a quantized cache buys length, not speed.")
    if flash is not None:
        text += (f" Without flash-attn exllamav2 copies K and V to every query head (repeat_kv) at every position: "
                 f"installing flash-attn raises the estimate {at} from {flash['without']:.0f} to "
                 f"{flash['with']:.0f} tok/s.")
    return text


def speed_depths(max_seq_len: int, depth: int | None = None) -> list[int]:
    """The depths a plan shows the speed at: a short chat (256), a quarter, half and a full cache, and ``depth``."""
    full = max_seq_len - 1
    return sorted({min(256, full), max_seq_len // 4, max_seq_len // 2, full} | ({depth} if depth is not None else
                                                                               set()))


def plan(setup: LoadSetup, depth: int | None = None) -> Plan:
    """Plan the setup on its (first) GPU: the breakdown, fits or not and by how much, the longest context per cache
    mode (and the longest that leaves load_autosplit's reserve free), the highest bpw that fits (configs only), the
    estimated decode speed at ``depth`` (default: a full cache) and at a few depths if the bandwidth is known, and
    advice."""
    g, max_seq_len = setup.gpu, setup.max_seq_len
    d = check_depth(depth, max_seq_len)
    bd = breakdown(setup, warn=False)
    gpu_bytes = g["vram_bytes"]
    margin = gpu_bytes - bd.vram_total_bytes
    found = longest_contexts(setup, gpu_bytes)
    longest, capped = {m: n for m, (n, _) in found.items()}, {m: c for m, (_, c) in found.items()}
    safe = longest_for(setup)
    max_bpw = _max_bpw(setup, gpu_bytes - LOAD_AUTOSPLIT_RESERVE_BYTES) if setup.bpw is not None else None
    roof, est, by_mode, flash, by_depth = None, None, {}, None, []
    if g.get("bandwidth_gbs"):
        est = decode_estimate(setup, d)
        by_depth = [decode_estimate(setup, x) for x in speed_depths(max_seq_len, depth)]
        roof = {"empty_cache": decode_estimate(setup, 0).ceiling_tok_s, "full_cache": by_depth[-1].ceiling_tok_s,
                "note": "the bytes of this attention path and cache mode at the datasheet bandwidth with no host "
                        "time: an upper bound, not a prediction"}
        by_mode = {m: decode_estimate(setup.with_(cache_mode=m), d).tok_s for m in CACHE_MODES}
        if not setup.flash_attn and d > 0:
            flash = {"without": est.tok_s, "with": decode_estimate(setup.with_(flash_attn=True), d).tok_s}
    shape = setup.shape
    # a depth note only for a depth given: the default (a full cache) is covered by the max_seq_len note
    beyond = [n for n in (context_note(shape, max_seq_len),
                          context_note(shape, d, "depth") if depth is not None else None) if n]
    notes = [n for n in [page_note(max_seq_len)] if n] + beyond
    msgs = setup.weight_warnings + beyond
    for msg in msgs:
        warnings.warn(msg, CourseWarning, stacklevel=2)
    rec = _recommend(setup, bd, margin, safe, max_bpw, by_mode, d, flash)
    return Plan(model=shape.name, gpu=g, breakdown=bd, fits=margin >= 0, margin_bytes=margin,
                longest_context=longest, longest_context_capped=capped, recommendation=rec,
                max_bpw_that_fits=max_bpw, decode_roofline_tok_s=roof, warnings=msgs, longest_safe_context=safe,
                decode=est, decode_by_depth=by_depth, decode_by_cache_mode=by_mode, depth=d,
                trained_positions=trained_positions(shape), notes=notes, setup=setup)


def check_depth(depth: Any, max_seq_len: int) -> int:
    """The depth a decode estimate is made at: ``depth``, or a full cache (``max_seq_len - 1``, the last position the
    cache can hold) when None; anything else from 0 to ``max_seq_len - 1`` is a one-line error."""
    d = max_seq_len - 1 if depth is None else depth
    if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d < max_seq_len:
        raise CourseError(f"depth must be a whole number of tokens from 0 to max_seq_len - 1 ({max_seq_len - 1:,}); "
                          f"got {depth!r}: the next token's K and V need a free position in the cache")
    return d
