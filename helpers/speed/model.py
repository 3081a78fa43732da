"""THE speed model: the time to decode one token with exllamav2 0.3.2 at a context depth, from the bytes it moves.

    time per token = weights in VRAM / bandwidth
                   + depth x bytes per position / bandwidth   (x ``efficiency`` where a calibration is applied)
                   + host overhead not hidden behind GPU work
                   + bytes read over PCIe (spilled weights every token; spilled cache layers up to the depth) / PCIe

Bytes per position (``position_bytes``), per decoded token, summed over the layers, from first principles and the
exllamav2 0.3.2 sources (docs/FACTS.md "Decode cost at depth"):

- the cache itself is read for every position: K and V at the cache mode's bytes, scales included
  (``memory.kv_cache.kv_layer_bytes_per_token``);
- quantized and FP8 caches: ``get_kv_state`` (cache.py) first dequantizes positions 0..depth of the layer into the
  FP16 temp layer (``q_to_fp16_kv`` for Q4/Q6/Q8, ``fp8_to_fp16`` for FP8): FP16 K and V written, then read;
- without flash-attn, ``ExLlamaV2Attention._attn_torch`` (attn.py; SDPA and matmul paths alike) calls ``repeat_kv``:
  K and V go from n_kv_heads to n_heads for every position (a copy: n_heads x head_dim FP16 written, then read by
  the attention op);
- with flash-attn (``flash_attn_func``/paged ``flash_attn_with_kvcache``) the FP16 K and V (the cache, or the temp
  layer for quantized modes) are read once, with the KV heads as they are.

Not counted: the attention scores (n_heads x 2 bytes a few times per position, under 1%), the new token's own K/V
write, activations. ``CALIBRATION`` is the ratio of a measured slope (the external H100 record) to this count.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from helpers.core.errors import CourseError
from helpers.memory.cache_modes import CACHE_RULES, check_cache_mode
from helpers.memory.kv_cache import kv_layer_bytes_per_token
from helpers.specs.shapes import model_shape

#: the host overhead per token assumed when none is given (seconds, low and high): the host work that is NOT hidden
#: behind GPU work. On a consumer card a 14B model's kernels run long enough for the host to launch the next ones in
#: the meantime (the card sits near its roofline); on an H100 the same host work is most of the step (see
#: ``h100_overhead_s``).
DEFAULT_OVERHEAD_S = (0.0, 0.002)


@dataclass(frozen=True)
class LayerBytes:
    """Bytes one layer moves per position per decoded token."""

    cache_read: int
    temp_written: int
    temp_read: int

    @property
    def total(self) -> int:
        return self.cache_read + self.temp_written + self.temp_read

    def __getitem__(self, key: str) -> int:
        return getattr(self, key)


@dataclass(frozen=True)
class PositionBytes:
    """Bytes moved per position already in the cache, per decoded token, all layers (``per_layer``: one layer)."""

    cache_mode: str
    flash_attn: bool
    n_layers: int
    per_layer: LayerBytes
    derivation: str

    @property
    def cache_read(self) -> int:
        return self.n_layers * self.per_layer.cache_read

    @property
    def temp_written(self) -> int:
        return self.n_layers * self.per_layer.temp_written

    @property
    def temp_read(self) -> int:
        return self.n_layers * self.per_layer.temp_read

    @property
    def total(self) -> int:
        return self.n_layers * self.per_layer.total


def position_bytes(shape: Any, cache_mode: str = "fp16", flash_attn: bool = False) -> PositionBytes:
    """Bytes per position per decoded token for an attention path and a cache mode (see the module docstring)."""
    s = model_shape(shape)
    mode = check_cache_mode(cache_mode)
    fp16_kv = 2 * s.kv_dim * 2                   # K and V, n_kv_heads x head_dim, 2 bytes each
    fp16_rep = 2 * s.n_heads * s.head_dim * 2    # K and V repeated to n_heads by repeat_kv
    cache = kv_layer_bytes_per_token(s, mode)    # the cache's own bytes, scales included
    written = read = 0
    steps = [f"read the {mode.upper()} cache: {cache} B (K and V, {s.n_kv_heads} KV heads x {s.head_dim}"
             + (", scales included" if CACHE_RULES[mode].scales else "") + ")"]
    if CACHE_RULES[mode].temp:
        fn = "fp8_to_fp16" if mode == "fp8" else "q_to_fp16_kv"
        written += fp16_kv
        read += fp16_kv
        steps.append(f"cache.py get_kv_state -> {fn}: positions 0..depth dequantized into the FP16 temp layer every "
                     f"step: {fp16_kv} B written, {fp16_kv} B read by attention")
    if flash_attn:
        steps.append("flash-attn (attn.py _attn_flash / flash_attn_with_kvcache) reads the FP16 K/V once, "
                     f"{s.n_kv_heads} KV heads as stored")
    elif s.n_heads != s.n_kv_heads:
        written += fp16_rep
        read += fp16_rep
        steps.append(f"attn.py _attn_torch -> repeat_kv: K and V copied from {s.n_kv_heads} to {s.n_heads} heads "
                     f"for every position: {fp16_rep} B written, {fp16_rep} B read by the attention op")
    else:
        steps.append("attn.py _attn_torch: no repeat_kv copy (as many KV heads as query heads)")
    layer = LayerBytes(cache, written, read)
    derivation = (f"{s.name}, {mode.upper()} cache, {'flash-attn' if flash_attn else 'torch attention (no flash-attn)'}"
                  f", exllamav2 0.3.2, per layer and position: " + "; ".join(steps)
                  + f". Total {layer.total} B x {s.n_layers} layers = {layer.total * s.n_layers:,} B per position.")
    return PositionBytes(mode, bool(flash_attn), s.n_layers, layer, derivation)


# ------------------------------------------------------------------------------------------------ calibration
#: the external record's figures (results/speed/external-h100-exllamav2-0-3-2-2026-11-25.json, imported by
#: scripts/import_external.py): Qwen2.5-14B-shaped 5.5 bpw, H100 80GB HBM3, no flash-attn, FP16 cache, no spill
H100_RECORD = {"gpu": "NVIDIA H100 80GB HBM3", "hbm_read_gbs": 2857.0, "model": "qwen2.5-14b", "cache_mode": "fp16",
               "flash_attn": False, "shallow": (128, 59.4), "deep": (30000, 18.1),
               "source": "results/speed/external-h100-exllamav2-0-3-2-2026-11-25.json"}


@dataclass(frozen=True)
class Calibration:
    """measured slope / first-principles slope of decode time against depth, on one GPU. ``value`` multiplies the
    first-principles attention time (1.0 = the bytes at full bandwidth)."""

    value: float
    measured_s_per_position: float
    predicted_s_per_position: float
    gpu: str
    label: str
    source: str

    def __float__(self) -> float:
        return self.value


def measured_slope(record: dict = H100_RECORD) -> float:
    """Seconds per token added by each position of depth: (1/deep tok/s - 1/shallow tok/s) / (deep - shallow)."""
    (d0, t0), (d1, t1) = record["shallow"], record["deep"]
    return (1 / t1 - 1 / t0) / (d1 - d0)


def predicted_slope(record: dict = H100_RECORD) -> float:
    """Seconds per position from first principles: bytes per position / the record's measured bandwidth."""
    pb = position_bytes(record["model"], record["cache_mode"], record["flash_attn"])
    return pb.total / (record["hbm_read_gbs"] * 1e9)


def calibrate(record: dict = H100_RECORD, label: str = "calibrated on H100 (external record)") -> Calibration:
    m, p = measured_slope(record), predicted_slope(record)
    return Calibration(m / p, m, p, record["gpu"], label, record["source"])


#: the attention path's time multiplier measured on the external H100 record (no flash-attn, FP16 cache). Applying it
#: to another GPU is an assumption, stated wherever it is used.
CALIBRATION = calibrate()


def h100_overhead_s(weight_bytes: float, record: dict = H100_RECORD) -> float:
    """Host time per token on the H100 record not explained by memory traffic: 1 / shallow tok/s - weights - the
    shallow depth's attention (first principles), at the record's bandwidth."""
    d0, t0 = record["shallow"]
    return 1 / t0 - weight_bytes / (record["hbm_read_gbs"] * 1e9) - d0 * predicted_slope(record)


# ------------------------------------------------------------------------------------------------- estimate
@dataclass
class DecodeEstimate:
    """Decode speed at one depth: ``tok_s`` (central), ``tok_s_low``..``tok_s_high``, the seconds per token by term
    (central), the bytes per position used, and the assumptions behind it. Always an estimate."""

    tok_s: float
    tok_s_low: float
    tok_s_high: float
    seconds: dict
    position_bytes: PositionBytes
    depth: int
    assumptions: list = field(default_factory=list)
    label: str = "estimate"

    def describe(self) -> str:
        return (f"{self.tok_s:.1f} tok/s ({self.label}; range {self.tok_s_low:.1f}-{self.tok_s_high:.1f}) at depth "
                f"{self.depth:,}, {self.position_bytes.cache_mode.upper()} cache, "
                f"{'flash-attn' if self.position_bytes.flash_attn else 'no flash-attn'}")


def _pair(overhead_s) -> tuple[float, float]:
    lo, hi = (overhead_s, overhead_s) if isinstance(overhead_s, (int, float)) else tuple(overhead_s)
    if lo < 0 or hi < lo:
        raise CourseError(f"overhead_s must be seconds >= 0: a number, or (low, high) with low <= high; got "
                          f"{overhead_s}")
    return float(lo), float(hi)


def decode_estimate(shape: Any, *, weight_bytes: float, bandwidth_gbs: float, depth: int, cache_mode: str = "fp16",
                    flash_attn: bool = False, overhead_s=DEFAULT_OVERHEAD_S, efficiency=None,
                    spilled_weight_bytes: float = 0, spilled_cache_layers: int = 0,
                    pcie_gbs: float | None = None) -> DecodeEstimate:
    """Decode tokens/s at ``depth`` (see the module docstring for the formula).

    ``weight_bytes``: every weight byte a token reads (GPU-resident and spilled); ``spilled_weight_bytes`` of them are
    read over PCIe instead of VRAM. ``spilled_cache_layers``: layers whose cache sits in system memory; their cache
    bytes (not the FP16 temp copies, made in VRAM) up to the depth cross PCIe. ``efficiency``: None (the range spans
    first principles to ``CALIBRATION``, the central figure is first principles), or a multiplier of the attention
    time such as ``CALIBRATION`` (then the central figure uses it). ``overhead_s``: seconds or (low, high).
    """
    s = model_shape(shape)
    if bandwidth_gbs is None or bandwidth_gbs <= 0:
        raise CourseError(f"bandwidth_gbs must be a positive number of GB/s, got {bandwidth_gbs!r}")
    if depth < 0:
        raise CourseError(f"depth must not be negative, got {depth}")
    if weight_bytes is None or weight_bytes <= 0 or not 0 <= spilled_weight_bytes <= weight_bytes:
        raise CourseError("weight_bytes must be positive and spilled_weight_bytes between 0 and weight_bytes")
    if not 0 <= spilled_cache_layers <= s.n_layers:
        raise CourseError(f"spilled_cache_layers must be between 0 and {s.n_layers}, got {spilled_cache_layers}")
    spill = spilled_weight_bytes or spilled_cache_layers
    if spill and not pcie_gbs:
        raise CourseError("something spilled: pass pcie_gbs, the GB/s the GPU reads system memory at")
    pb = position_bytes(s, cache_mode, flash_attn)
    lo_oh, hi_oh = _pair(overhead_s)
    eff = None if efficiency is None else float(efficiency)
    if eff is not None and eff <= 0:
        raise CourseError(f"efficiency must be a positive multiplier, got {efficiency!r}")
    bw = bandwidth_gbs * 1e9
    # bytes of spilled cache layers' own cache cross PCIe; the rest of the attention traffic stays in VRAM
    cache_pcie = spilled_cache_layers * pb.per_layer.cache_read * depth
    pcie_s = (spilled_weight_bytes + cache_pcie) / (pcie_gbs * 1e9) if spill else 0.0
    weights_s = (weight_bytes - spilled_weight_bytes) / bw
    attn_base = (depth * pb.total - cache_pcie) / bw
    effs = [1.0, float(CALIBRATION)] if eff is None else [1.0, eff]
    central_eff = 1.0 if eff is None else eff
    fixed = weights_s + pcie_s
    seconds = {"weights": weights_s, "attention": attn_base * central_eff, "overhead": (lo_oh + hi_oh) / 2,
               "pcie": pcie_s}
    central = sum(seconds.values())
    fast = fixed + attn_base * min(effs) + lo_oh
    slow = fixed + attn_base * max(effs) + hi_oh
    assumptions = [
        f"bandwidth {bandwidth_gbs:g} GB/s for weights and attention traffic",
        f"{pb.total:,} B per position per token ({pb.cache_mode.upper()} cache, "
        f"{'flash-attn' if pb.flash_attn else 'torch attention with repeat_kv'}), first principles",
        f"host overhead not hidden behind GPU work: {lo_oh * 1e3:g}-{hi_oh * 1e3:g} ms per token",
    ]
    if eff is None:
        assumptions.append(f"attention time x1 (first principles) to x{CALIBRATION.value:.2f} "
                           f"({CALIBRATION.label}; applying it to another GPU is an assumption)")
    else:
        assumptions.append(f"attention time x{eff:.2f}"
                           + (f" ({efficiency.label}; applying it to another GPU is an assumption)"
                              if isinstance(efficiency, Calibration) else " (given)"))
    if spill:
        assumptions.append(f"PCIe {pcie_gbs:g} GB/s: {spilled_weight_bytes:,.0f} B of weights every token, "
                           f"{spilled_cache_layers} cache layer(s) up to the depth")
    return DecodeEstimate(1 / central, 1 / slow, 1 / fast, seconds, pb, int(depth), assumptions)


def estimate_curve(shape: Any, depths, **kw) -> list[DecodeEstimate]:
    """``decode_estimate`` at each depth (the same keyword arguments)."""
    return [decode_estimate(shape, depth=int(d), **kw) for d in depths]


def depth_for_speed(shape: Any, tok_s: float, *, weight_bytes: float, bandwidth_gbs: float, cache_mode: str = "fp16",
                    flash_attn: bool = False, overhead_s: float = 0.0, efficiency=None) -> int | None:
    """The depth at which ``decode_estimate`` (no spill, one overhead, one efficiency) falls to ``tok_s``; 0 if it
    is already slower at depth 0."""
    pb = position_bytes(shape, cache_mode, flash_attn)
    bw = bandwidth_gbs * 1e9
    per_pos = pb.total / bw * (1.0 if efficiency is None else float(efficiency))
    left = 1 / tok_s - weight_bytes / bw - float(overhead_s)
    return max(0, round(left / per_pos))
