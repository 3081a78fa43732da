"""THE speed model: seconds to decode one token with exllamav2 at a depth, from the bytes it moves and a few physical
constants fitted to public measurements (``constants.json``, refitted by ``python -m helpers calibrate``):

    t = weights / (eta B) + depth (k_path A + k_dq Q) / (eta B) + layers h_host + hops t_hop + spilled bytes / PCIe

B is the datasheet bandwidth, A the bytes per position the attention path reads and Q what dequantizing a quantized
cache moves (``position_bytes``, counted from the exllamav2 0.3.2 sources), eta the share of B reached, k the cost
of each kind of attention byte relative to a weight byte, h the host/launch cost per layer on a desktop or a server,
t_hop a GPU boundary. Every estimate carries the range that leaving each source out of the fit gave.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from helpers.core.errors import CourseError
from helpers.core.paths import PACKAGE_DIR
from helpers.memory.cache_modes import CACHE_RULES, check_cache_mode
from helpers.memory.kv_cache import kv_layer_bytes_per_token
from helpers.memory.setup import HOSTS, LoadSetup
from helpers.specs.shapes import model_shape

#: where ``python -m helpers calibrate`` writes the fitted constants (package data: the planner needs no results/)
CONSTANTS_PATH = PACKAGE_DIR / "speed" / "constants.json"
#: what the model cannot see, said beside every range
UNKNOWNS = ("the front end (its sampler and tok/s counter)", "the exllamav2 version", "the host CPU",
            "speculative decoding (a draft model or n-grams can exceed these figures)")


# ---------------------------------------------------------------------------------------- bytes per position
@dataclass(frozen=True)
class LayerBytes:
    """Bytes one layer moves per position per decoded token: the cache as stored (``cache_read``), FP16 copies
    written (``temp_written``: the dequantized temp layer, the repeat_kv copy) and read back (``temp_read``). The same
    bytes by what moves them: ``dequant`` (a quantized cache read and expanded to FP16) and ``attention`` (what the
    attention path itself reads and writes)."""

    cache_read: int
    temp_written: int
    temp_read: int
    dequant: int = 0

    @property
    def total(self) -> int:
        return self.cache_read + self.temp_written + self.temp_read

    @property
    def attention(self) -> int:
        return self.total - self.dequant

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

    def __getattr__(self, key: str) -> int:
        if key in ("cache_read", "temp_written", "temp_read", "total", "attention", "dequant"):
            return self.n_layers * getattr(self.per_layer, key)
        raise AttributeError(key)


def position_bytes(shape: Any, cache_mode: str = "fp16", flash_attn: bool = False) -> PositionBytes:
    """Bytes per position per decoded token for an attention path and a cache mode, from the exllamav2 0.3.2 sources:
    the cache is read (scales included); a quantized or FP8 cache is first dequantized into the FP16 temp layer
    (cache.py ``get_kv_state``: written, then read); without flash-attn ``_attn_torch`` (attn.py) copies K and V to
    every query head (``repeat_kv``: written, then read); flash-attn reads the FP16 K and V once. Not counted: the
    scores (under 1%), the new token's own K/V, activations."""
    s = model_shape(shape)
    mode = check_cache_mode(cache_mode)
    fp16_kv = 2 * s.kv_dim * 2                   # K and V, n_kv_heads x head_dim, 2 bytes each
    fp16_rep = 2 * s.n_heads * s.head_dim * 2    # K and V repeated to n_heads by repeat_kv
    cache = kv_layer_bytes_per_token(s, mode)    # the cache's own bytes, scales included
    written = read = dequant = 0
    steps = [f"read the {mode.upper()} cache: {cache} B (K and V, {s.n_kv_heads} KV heads x {s.head_dim}"
             + (", scales included" if CACHE_RULES[mode].scales else "") + ")"]
    if CACHE_RULES[mode].temp:
        fn = "fp8_to_fp16" if mode == "fp8" else "q_to_fp16_kv"
        written += fp16_kv
        read += fp16_kv
        dequant = cache + fp16_kv
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
    layer = LayerBytes(cache, written, read, dequant)
    derivation = (f"{s.name}, {mode.upper()} cache, {'flash-attn' if flash_attn else 'torch attention (no flash-attn)'}"
                  f", exllamav2 0.3.2, per layer and position: " + "; ".join(steps)
                  + f". Total {layer.total} B x {s.n_layers} layers = {layer.total * s.n_layers:,} B per position.")
    return PositionBytes(mode, bool(flash_attn), s.n_layers, layer, derivation)


# --------------------------------------------------------------------------------------------- the constants
#: the fitted constants: name -> (symbol, unit shown, scale to that unit, what it is)
CONSTANT_INFO = {
    "bandwidth_fraction": ("eta", "", 1.0, "share of the datasheet bandwidth reached reading weights"),
    "flash_attn_cost": ("k_flash", "x", 1.0, "cost of an attention byte with flash-attn, relative to a weight byte"),
    "torch_attn_cost": ("k_torch", "x", 1.0, "cost of an attention byte on torch attention (repeat_kv, no flash-attn)"),
    "dequant_cost": ("k_dq", "x", 1.0, "cost of a byte a quantized cache moves when dequantized to FP16 each step"),
    "layer_s_desktop": ("h_desktop", "us", 1e6, "host/launch time per layer per token on a desktop"),
    "layer_s_server": ("h_server", "us", 1e6, "host/launch time per layer per token on a cloud/server host"),
    "torch_host_extra": ("r_torch", "x", 1.0, "extra host time per layer on torch attention (its many small ops), as a "
                                              "share of the host time with flash-attn"),
    "hop_s": ("t_hop", "us", 1e6, "time per token for each boundary between GPUs in a layer split"),
}


@dataclass(frozen=True)
class SpeedConstants:
    """The speed model's constants and the range its out-of-source errors gave (``constants.json``)."""

    values: dict
    range_low: float
    range_high: float
    range_from: str
    data_sha256: str = ""
    n_points: int = 0
    n_sources: int = 0
    validation: dict = field(default_factory=dict)
    #: constants no calibration point pins down, with what they fall back to
    fallbacks: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> float:
        return float(self.values[name])

    def how(self, name: str) -> str:
        """'fitted', or why not: the fallback a constant takes when no calibration point pins it down."""
        return f"assumed: {self.fallbacks[name]}" if name in self.fallbacks else "fitted"

    def coefficients(self) -> dict[str, float]:
        """The constants as the multipliers of the terms: seconds = sum of coefficient x term."""
        eta = self["bandwidth_fraction"]
        r = self["torch_host_extra"]
        return {"weights": 1 / eta, "attention_flash": self["flash_attn_cost"] / eta,
                "attention_torch": self["torch_attn_cost"] / eta, "dequant": self["dequant_cost"] / eta,
                "layers_desktop": self["layer_s_desktop"], "layers_server": self["layer_s_server"],
                "layers_desktop_torch": r * self["layer_s_desktop"], "layers_server_torch": r * self["layer_s_server"],
                "hops": self["hop_s"]}

    def table(self) -> list[dict]:
        """One row per constant: name, symbol, fitted value in its unit, meaning."""
        return [{"constant": k, "symbol": sym, "value": round(self[k] * scale, 3), "unit": unit, "meaning": what}
                for k, (sym, unit, scale, what) in CONSTANT_INFO.items()]

    def range_text(self) -> str:
        return (f"likely x{self.range_low:.2f} to x{self.range_high:.2f} of the central figure: {self.range_from}")


def first_principles(host_s_per_layer: float = 0.0) -> SpeedConstants:
    """Constants with nothing fitted: the full datasheet (or measured) bandwidth, every attention byte as cheap as a
    weight byte, the host time given; the range is a point. For a ceiling, or a comparison on one machine whose host
    time was measured."""
    vals = {k: 1.0 for k in ("bandwidth_fraction", "flash_attn_cost", "torch_attn_cost", "dequant_cost")}
    vals.update(layer_s_desktop=host_s_per_layer, layer_s_server=host_s_per_layer, hop_s=0.0, torch_host_extra=0.0)
    return SpeedConstants(vals, 1.0, 1.0, "first principles: no range", fallbacks={
        k: "first principles" for k in CONSTANT_INFO})


def constants_from_dict(doc: dict) -> SpeedConstants:
    vals = {k: float(doc["constants"][k]["value"]) for k in CONSTANT_INFO}
    r = doc["range"]
    falls = {k: v["fallback"] for k, v in doc["constants"].items() if v.get("fallback")}
    return SpeedConstants(vals, float(r["low"]), float(r["high"]), r["from"], doc.get("data_sha256", ""),
                          int(doc.get("n_points", 0)), int(doc.get("n_sources", 0)), doc.get("validation", {}), falls)


def load_constants(path=CONSTANTS_PATH) -> SpeedConstants:
    """The fitted constants; a one-line error when the file is missing or damaged."""
    try:
        return constants_from_dict(json.loads(open(path, encoding="utf-8").read()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CourseError(f"the speed model's constants ({path}) cannot be read ({type(exc).__name__}): run "
                          "`python -m helpers calibrate` to fit them again") from None


CONSTANTS = load_constants()


# ------------------------------------------------------------------------------------------------- the terms
@dataclass(frozen=True)
class Stage:
    """One device's share of a layer split: its layers, the weight bytes it reads per token, its bandwidth."""

    n_layers: int
    weight_bytes: float
    bandwidth_gbs: float


@dataclass(frozen=True)
class DecodeTerms:
    """What one token costs before any constant is applied: seconds at the full datasheet bandwidth for the weights,
    the attention bytes and the dequantization bytes; the layers and GPU boundaries; the PCIe seconds of a spill."""

    weights_s: float
    attention_s: float
    dequant_s: float
    layers: int
    hops: int
    pcie_s: float
    flash_attn: bool
    host: str

    def features(self) -> dict[str, float]:
        """The terms ``SpeedConstants.coefficients`` multiply (one attention entry is 0: the other path's)."""
        desk, serv = (self.layers if self.host == h else 0.0 for h in HOSTS)
        torch = 0.0 if self.flash_attn else 1.0
        return {"weights": self.weights_s, "attention_flash": self.attention_s if self.flash_attn else 0.0,
                "attention_torch": 0.0 if self.flash_attn else self.attention_s, "dequant": self.dequant_s,
                "layers_desktop": desk, "layers_server": serv, "layers_desktop_torch": desk * torch,
                "layers_server_torch": serv * torch, "hops": float(self.hops)}

    def seconds(self, constants: SpeedConstants | None = None) -> dict[str, float]:
        """Seconds per token by term: weights, attention (dequantization included), host, hops, pcie."""
        c = (constants or CONSTANTS).coefficients()
        f = self.features()
        return {"weights": c["weights"] * f["weights"],
                "attention": (c["attention_flash"] * f["attention_flash"] + c["attention_torch"]
                              * f["attention_torch"] + c["dequant"] * f["dequant"]),
                "host": sum(c[k] * f[k] for k in ("layers_desktop", "layers_server", "layers_desktop_torch",
                                                  "layers_server_torch")),
                "hops": c["hops"] * f["hops"], "pcie": self.pcie_s}


@dataclass(frozen=True)
class Spill:
    """What sits in system RAM and is read over PCIe: weight bytes (every token) and cache layers (up to the depth)."""

    weight_bytes: float = 0
    cache_layers: int = 0
    pcie_gbs: float | None = None


def decode_terms(setup: LoadSetup, stages: Sequence[Stage], depth: int, spill: Spill | None = None) -> DecodeTerms:
    """The terms of one token at ``depth`` for the setup's model split over ``stages`` (one per device, in order); a
    ``spill`` is for one device."""
    s = setup.shape
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise CourseError(f"depth must be a whole number of tokens >= 0, got {depth!r}")
    if not stages or sum(st.n_layers for st in stages) != s.n_layers:
        raise CourseError(f"the devices must hold {s.n_layers} layers between them")
    for st in stages:
        if st.bandwidth_gbs is None or st.bandwidth_gbs <= 0:
            raise CourseError(f"bandwidth_gbs must be a positive number of GB/s, got {st.bandwidth_gbs!r}")
        if st.weight_bytes is None or st.weight_bytes <= 0:
            raise CourseError("weight_bytes must be positive")
    sp = spill or Spill()
    spilled = sp.weight_bytes or sp.cache_layers
    if spilled and len(stages) > 1:
        raise CourseError("the spill model covers one GPU")
    if not 0 <= sp.weight_bytes <= stages[0].weight_bytes:
        raise CourseError("spilled weight bytes must be between 0 and the weight bytes")
    if not 0 <= sp.cache_layers <= s.n_layers:
        raise CourseError(f"spilled cache layers must be between 0 and {s.n_layers}, got {sp.cache_layers}")
    if spilled and not sp.pcie_gbs:
        raise CourseError("something spilled: give pcie_gbs, the GB/s the GPU reads system memory at")
    pb = position_bytes(s, setup.cache_mode, setup.flash_attn)
    # spilled cache layers: their own cache crosses PCIe; the FP16 copies are made in VRAM
    cache_pcie = sp.cache_layers * pb.per_layer.cache_read * depth
    weights = attention = dequant = 0.0
    for st in stages:
        bw = st.bandwidth_gbs * 1e9
        share = st.n_layers / s.n_layers
        weights += st.weight_bytes / bw
        attention += depth * pb.attention * share / bw
        dequant += depth * pb.dequant * share / bw
    bw0 = stages[0].bandwidth_gbs * 1e9
    weights -= sp.weight_bytes / bw0
    if cache_pcie:  # the spilled layers' cache is no longer read from VRAM
        moved = cache_pcie / bw0
        take = min(moved, dequant) if pb.dequant else 0.0
        dequant -= take
        attention -= moved - take
    pcie = (sp.weight_bytes + cache_pcie) / (sp.pcie_gbs * 1e9) if spilled else 0.0
    return DecodeTerms(weights, max(0.0, attention), max(0.0, dequant), s.n_layers, len(stages) - 1, pcie,
                       setup.flash_attn, setup.host_class)


@dataclass
class DecodeEstimate:
    """Decode speed at one depth: ``tok_s`` (central), ``tok_s_low``..``tok_s_high`` (the likely range), the
    seconds per token by term, the bytes per position, and the assumptions behind it. Always an estimate."""

    tok_s: float
    tok_s_low: float
    tok_s_high: float
    seconds: dict
    position_bytes: PositionBytes
    depth: int
    assumptions: list = field(default_factory=list)
    label: str = "estimate"
    terms: DecodeTerms | None = None

    @property
    def ceiling_tok_s(self) -> float:
        """The same bytes at the full datasheet bandwidth with no host time: what memory allows on this path."""
        t = self.terms
        return 1 / (t.weights_s + t.attention_s + t.dequant_s + t.pcie_s)

    def likely(self) -> str:
        """'31-46': the likely range, whole tok/s."""
        return f"{self.tok_s_low:.0f}-{self.tok_s_high:.0f}"

    def short(self) -> str:
        """'38 tok/s (likely 31-46)'."""
        return f"{self.tok_s:.0f} tok/s (likely {self.likely()})"

    def describe(self) -> str:
        return (f"{self.short()} at depth {self.depth:,}, {self.position_bytes.cache_mode.upper()} cache, "
                f"{'flash-attn' if self.position_bytes.flash_attn else 'no flash-attn'} ({self.label})")


def estimate_from_terms(terms: DecodeTerms, pb: PositionBytes, depth: int,
                        constants: SpeedConstants | None = None, extra: Sequence[str] = ()) -> DecodeEstimate:
    c = constants or CONSTANTS
    sec = terms.seconds(c)
    tok_s = 1 / sum(sec.values())
    path = "flash-attn" if terms.flash_attn else "torch attention with repeat_kv"
    assumptions = [
        f"{pb.total:,} B per position per token ({pb.cache_mode.upper()} cache, {path}), first principles",
        f"bandwidth: {c['bandwidth_fraction']:.2f} of the datasheet's; attention bytes cost "
        f"x{c['flash_attn_cost' if terms.flash_attn else 'torch_attn_cost']:.2f}"
        + (f", dequantization bytes x{c['dequant_cost']:.2f}" if pb.dequant else "")
        + f" ({c.how('flash_attn_cost' if terms.flash_attn else 'torch_attn_cost')})",
        f"{terms.host} host: {c['layer_s_' + terms.host] * 1e6:.0f} us per layer per token "
        f"({c.how('layer_s_' + terms.host)})" + ("" if terms.flash_attn else
                                                  f", x{1 + c['torch_host_extra']:.2f} on torch attention "
                                                  f"({c.how('torch_host_extra')})"),
        f"range: {c.range_text()}",
        "not known to the model: " + "; ".join(UNKNOWNS),
    ] + list(extra)
    if terms.hops:
        assumptions.append(f"{terms.hops} GPU boundary(ies) at {c['hop_s'] * 1e6:.0f} us per token ({c.how('hop_s')})")
    if terms.pcie_s:
        assumptions.append("the PCIe term is first principles (sourced link bandwidth); no spill is in the fit")
    return DecodeEstimate(tok_s, tok_s * c.range_low, tok_s * c.range_high, sec, pb, int(depth), assumptions,
                          terms=terms)


def decode_estimate(setup: LoadSetup, depth: int, *, weight_bytes: float | None = None,
                    bandwidth_gbs: float | None = None, spill: Spill | None = None,
                    constants: SpeedConstants | None = None) -> DecodeEstimate:
    """Decode tokens/s at ``depth`` for the setup on one GPU (see the module docstring). ``weight_bytes``: every
    weight byte a token reads (default: the setup's GPU-resident weights), ``spill.weight_bytes`` of them over PCIe;
    ``bandwidth_gbs``: default the setup's GPU's datasheet figure."""
    s = setup.shape
    if bandwidth_gbs is None:
        bandwidth_gbs = setup.gpu.get("bandwidth_gbs")
        if not bandwidth_gbs:
            raise CourseError(f"{setup.gpu.get('name')}'s memory bandwidth is unknown: name a known card or give "
                              "--bandwidth-gbs")
    stage = Stage(s.n_layers, setup.weights.vram if weight_bytes is None else weight_bytes, float(bandwidth_gbs))
    terms = decode_terms(setup, [stage], depth, spill)
    extra = ([f"PCIe {spill.pcie_gbs:g} GB/s: {spill.weight_bytes:,.0f} B of weights every token, "
              f"{spill.cache_layers} cache layer(s) up to the depth"] if terms.pcie_s else [])
    return estimate_from_terms(terms, position_bytes(s, setup.cache_mode, setup.flash_attn), depth, constants, extra)


def estimate_curve(setup: LoadSetup, depths, **kw) -> list[DecodeEstimate]:
    """``decode_estimate`` at each depth (the same keyword arguments)."""
    return [decode_estimate(setup, int(d), **kw) for d in depths]


def depth_for_speed(setup: LoadSetup, tok_s: float, **kw) -> int | None:
    """The depth at which the central estimate (nothing spilled; ``decode_estimate``'s keywords) falls to ``tok_s``:
    0 if it is already slower at depth 0. The time is linear in the depth, so two estimates give it."""
    if tok_s <= 0:
        raise CourseError(f"a target speed must be positive, got {tok_s}")
    t0 = 1 / decode_estimate(setup, 0, **kw).tok_s
    t1 = 1 / decode_estimate(setup, 1000, **kw).tok_s
    per_pos = (t1 - t0) / 1000
    left = 1 / tok_s - t0
    return max(0, math.floor(left / per_pos + 0.5)) if per_pos > 0 else (0 if left <= 0 else None)
