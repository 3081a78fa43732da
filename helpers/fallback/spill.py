"""NVIDIA's Windows "sysmem fallback": a model of its decode speed when part of a model lands in system RAM.

A decoded token reads every GPU-resident weight once and the K/V cache of every layer up to the current depth. On
Windows (driver 536.40 and later) an allocation that does not fit in the card's dedicated VRAM does not fail: the
driver places it in system RAM, and the GPU then reads it over PCIe, at a few percent of VRAM speed. The model

1. walks exllamav2's load order (``memory.load_order``: module by module, each attention module with its cache
   layers, as ``load_autosplit`` allocates them) against the VRAM left after the OS reserve and the allocations
   made before the first module (``fixed``: CUDA context, scratch, RoPE tables, the load-time reserve);
   a module goes to VRAM if it fits in what is left, else to system RAM ("spills"): ``place``;
2. counts the bytes each decoded token reads from each side at a depth: ``read_bytes``;
3. predicts seconds per token = overhead + VRAM bytes / VRAM bandwidth + system-RAM bytes / PCIe bandwidth.

Its parameters come from datasheets or measurements, never from the speed it is meant to predict: bandwidths from
``specs.gpus.GPUS`` (datasheet) or measured on the device; the per-token overhead (host work, kernel launches) from a
run that spills nothing: its measured seconds per token minus its bandwidth time (``overhead_from_run``). When a
measured speed is at or above the bandwidth roofline, that difference is negative: the overhead is taken as 0 and
the prediction says so. ``SpillModel`` ties it to one GPU and a planned load; the seed case is
``helpers.fallback.seed``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from helpers.core.errors import CourseError
from helpers.core.units import GIB, MIB
from helpers.fallback.pcie import pcie_practical_bandwidth
from helpers.memory.breakdown import breakdown
from helpers.memory.cache_modes import LOAD_AUTOSPLIT_RESERVE_BYTES, LOAD_PATHS
from helpers.memory.load_order import load_order
from helpers.specs.gpus import gpu_spec


# -------------------------------------------------------------------------------------------- the spill model
@dataclass
class Prediction:
    """What the spill model says about one configuration. Bytes, seconds, tokens/s; ``placement`` per module."""

    spilled_bytes: int            # module bytes (weights + cache layers + scratch) placed in system RAM
    spilled_weight_bytes: int
    spilled_cache_bytes: int
    vram_read_bytes: int          # read from VRAM per decoded token at ``depth``
    sysmem_read_bytes: int        # read from system RAM over PCIe per decoded token at ``depth``
    tok_s: float
    seconds_per_token: float
    overhead_s_per_token: float
    vram_bandwidth: float         # bytes/s
    pcie_bandwidth: float         # bytes/s
    budget_bytes: int             # VRAM the process may use (card less the OS reserve)
    fixed_bytes: int              # VRAM taken before the first module loads
    depth: int
    max_seq_len: int
    cache_mode: str
    placement: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def spilled_gib(self) -> float:
        return self.spilled_bytes / GIB

    @property
    def roofline_tok_s(self) -> float:
        """The same reads with nothing spilled and no overhead: VRAM bandwidth / bytes per token."""
        total = self.vram_read_bytes + self.sysmem_read_bytes
        return self.vram_bandwidth / total if total else math.inf

    def time_split_ms(self) -> dict[str, float]:
        """Where a token's time goes (ms): overhead, VRAM reads, PCIe reads."""
        return {"overhead_ms": 1e3 * self.overhead_s_per_token,
                "vram_ms": 1e3 * self.vram_read_bytes / self.vram_bandwidth,
                "pcie_ms": 1e3 * self.sysmem_read_bytes / self.pcie_bandwidth}

    def at_depth(self, depth: int) -> "Prediction":
        """The same placement and parameters, evaluated at another cache depth."""
        return evaluate(self.placement, depth=depth, max_seq_len=self.max_seq_len, cache_mode=self.cache_mode,
                        overhead_s_per_token=self.overhead_s_per_token, vram_bandwidth=self.vram_bandwidth,
                        pcie_bandwidth=self.pcie_bandwidth, budget_bytes=self.budget_bytes,
                        fixed_bytes=self.fixed_bytes, notes=self.notes)

    def spilled_modules(self) -> list[str]:
        return [p["module"] for p in self.placement if p["where"] == "sysmem"]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(spilled_gib=self.spilled_gib, roofline_tok_s=self.roofline_tok_s, **self.time_split_ms())
        return d

    def summary(self) -> str:
        t = self.time_split_ms()
        spilled = self.spilled_modules()
        where = (f"{len(spilled)} modules in system RAM ({_span(spilled)})" if spilled else "nothing spilled")
        return (f"cache {self.max_seq_len} ({self.cache_mode}), depth {self.depth}: {where}; "
                f"spilled {self.spilled_bytes / GIB:.2f} GiB ({self.spilled_weight_bytes / GIB:.2f} GiB weights, "
                f"{self.spilled_cache_bytes / GIB:.2f} GiB cache); per token {self.vram_read_bytes / 1e9:.2f} GB from "
                f"VRAM + {self.sysmem_read_bytes / 1e9:.3f} GB over PCIe = {t['overhead_ms']:.1f} + {t['vram_ms']:.1f} "
                f"+ {t['pcie_ms']:.1f} ms -> {self.tok_s:.1f} tok/s")


def _span(names: Sequence[str]) -> str:
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]} ... {names[-1]}"


def _get(d: Any, key: str, default=None):
    return d.get(key, default) if isinstance(d, dict) else getattr(d, key, default)


def place(order: Iterable[dict], budget_bytes: int, fixed_bytes: int = 0) -> list[dict]:
    """Walk the load order against the VRAM budget: first fit, module by module.

    ``order``: dicts with ``module``, ``weight_bytes``, ``cache_bytes`` (the cache layers allocated with it) and
    ``device_hint`` ('cpu' for what exllamav2 keeps in system RAM anyway, the input embedding), optionally
    ``scratch_bytes`` (buffers that take VRAM but are not read per token: the device context). Each GPU module goes
    to 'vram' if its bytes fit in what is left of ``budget_bytes - fixed_bytes``, otherwise to 'sysmem' (the driver
    cannot place it in VRAM; on Windows it lands in shared system memory). Returns one dict per module with ``where``
    and ``vram_left_bytes`` after it.
    """
    left = int(budget_bytes) - int(fixed_bytes)
    out = []
    for m in order:
        w, c = int(_get(m, "weight_bytes", 0) or 0), int(_get(m, "cache_bytes", 0) or 0)
        x = int(_get(m, "scratch_bytes", 0) or 0)
        hint = str(_get(m, "device_hint", "gpu") or "gpu").lower()
        if hint == "cpu" or _get(m, "where") == "cpu":
            where = "cpu"
        elif w + c + x <= left:
            where, left = "vram", left - (w + c + x)
        else:
            where = "sysmem"
        out.append({"module": str(_get(m, "module", f"module{len(out)}")), "kind": _get(m, "kind", ""),
                    "weight_bytes": w, "cache_bytes": c, "scratch_bytes": x, "where": where,
                    "vram_left_bytes": left})
    return out


def read_bytes(placement: Iterable[dict], depth: int, max_seq_len: int) -> tuple[int, int]:
    """(VRAM bytes, system-RAM bytes) one decoded token reads at ``depth``: all weights of each GPU module and the
    first ``depth`` of its cache layers' ``max_seq_len`` positions. Modules on the CPU ('cpu') are not GPU reads."""
    if max_seq_len <= 0:
        raise CourseError(f"max_seq_len must be positive, got {max_seq_len}")
    if not 0 <= depth <= max_seq_len:
        raise CourseError(f"depth {depth} must be between 0 and the cache's {max_seq_len} tokens")
    vram = sysmem = 0
    for p in placement:
        b = int(p["weight_bytes"]) + int(round(int(p["cache_bytes"]) * depth / max_seq_len))
        if p["where"] == "vram":
            vram += b
        elif p["where"] == "sysmem":
            sysmem += b
    return vram, sysmem


def seconds_per_token(vram_bytes: float, sysmem_bytes: float, *, overhead_s_per_token: float,
                      vram_bandwidth: float, pcie_bandwidth: float) -> float:
    """overhead + VRAM bytes / VRAM bandwidth + system-RAM bytes / PCIe bandwidth."""
    if vram_bandwidth <= 0 or pcie_bandwidth <= 0:
        raise CourseError("bandwidths must be positive (bytes/s)")
    if overhead_s_per_token < 0:
        raise CourseError(f"the per-token overhead cannot be negative, got {overhead_s_per_token}")
    return overhead_s_per_token + vram_bytes / vram_bandwidth + sysmem_bytes / pcie_bandwidth


def overhead_from_run(tok_s: float, bytes_per_token: float, vram_bandwidth: float) -> tuple[float, str | None]:
    """Per-token overhead of a run that spills nothing: its seconds per token minus its bandwidth time.

    Returns (overhead seconds, note). When the measured speed is at or above the roofline the difference is not
    positive: the overhead is 0 and the note says that the measurement is at or above what the memory allows."""
    if tok_s <= 0:
        raise CourseError(f"a measured speed must be positive, got {tok_s} tok/s")
    band = bytes_per_token / vram_bandwidth
    over = 1.0 / tok_s - band
    if over <= 0:
        roof = vram_bandwidth / bytes_per_token
        return 0.0, (f"the measured {tok_s:g} tok/s is at or above the roofline of {roof:.1f} tok/s "
                     f"({bytes_per_token / 1e9:.2f} GB per token at {vram_bandwidth / 1e9:.0f} GB/s): it leaves no "
                     "time for overhead, so the overhead is taken as 0")
    return over, None


def evaluate(placement: list[dict], *, depth: int, max_seq_len: int, cache_mode: str = "fp16",
             overhead_s_per_token: float, vram_bandwidth: float, pcie_bandwidth: float, budget_bytes: int = 0,
             fixed_bytes: int = 0, notes: Sequence[str] = ()) -> Prediction:
    """The prediction for a given placement (from ``place``, or the one an emulator really made)."""
    vram, sysmem = read_bytes(placement, depth, max_seq_len)
    s = seconds_per_token(vram, sysmem, overhead_s_per_token=overhead_s_per_token, vram_bandwidth=vram_bandwidth,
                          pcie_bandwidth=pcie_bandwidth)
    sp = [p for p in placement if p["where"] == "sysmem"]
    sw, sc = sum(p["weight_bytes"] for p in sp), sum(p["cache_bytes"] for p in sp)
    sx = sum(int(p.get("scratch_bytes", 0) or 0) for p in sp)
    return Prediction(spilled_bytes=sw + sc + sx, spilled_weight_bytes=sw, spilled_cache_bytes=sc, vram_read_bytes=vram,
                      sysmem_read_bytes=sysmem, tok_s=1.0 / s, seconds_per_token=s,
                      overhead_s_per_token=overhead_s_per_token, vram_bandwidth=float(vram_bandwidth),
                      pcie_bandwidth=float(pcie_bandwidth), budget_bytes=int(budget_bytes),
                      fixed_bytes=int(fixed_bytes), depth=int(depth), max_seq_len=int(max_seq_len),
                      cache_mode=cache_mode, placement=list(placement), notes=list(notes))


# ------------------------------------------------------------------------------------- the model on a planned load
#: what ``load_autosplit`` holds while it loads (``memory.LOAD_AUTOSPLIT_RESERVE_BYTES``: 192 + 256 MiB). Every spill
#: decision is made with it in VRAM; it is freed when the load ends, too late to bring anything back.
LOAD_RESERVE_BYTES = LOAD_AUTOSPLIT_RESERVE_BYTES


@dataclass
class SpillModel:
    """The spill model for one GPU: its bandwidths, the per-token overhead, and what is taken before the model loads.

    ``gpu``: a name or GiB (``specs.gpus.gpu_spec``) or a spec dict. Bandwidths in bytes/s; None takes the datasheet's
    memory bandwidth and ``pcie_practical_bandwidth`` of its link. ``reserve_gib``/``cuda_context_gib``: None takes
    the planner's documented defaults (``memory.breakdown``). ``flash_attn``: the attention path does not materialise
    the attention matrix while a prompt chunk runs (flash-attn or SDPA; the course's own exllamav2 runs use
    ``no_sdpa`` and do). ``load_path``: how the front end loads (``memory.LOAD_PATHS``): 'autosplit'
    (``load_autosplit(cache)``: a test forward per module, so the transients exist from the first module, and its
    load-time reserve is held) or 'load' (``model.load()`` then the cache: no test forward and no reserve; the first
    forward's transients come after the cache). ``load_reserve_bytes``: None takes the path's own (448 MiB / 0).
    """

    gpu: Any
    vram_bandwidth: float | None = None
    pcie_bandwidth: float | None = None
    overhead_s_per_token: float = 0.0
    reserve_gib: float | None = None
    cuda_context_gib: float | None = None
    flash_attn: bool = False
    load_reserve_bytes: int | None = None
    head_bits: int = 6
    load_path: str = "autosplit"

    def reserve_while_loading(self) -> int:
        if self.load_reserve_bytes is not None:
            return int(self.load_reserve_bytes)
        return LOAD_RESERVE_BYTES if self.load_path == "autosplit" else 0

    def spec(self) -> dict:
        g = self.gpu
        return g if isinstance(g, dict) and "vram_bytes" in g else gpu_spec(g)

    def bandwidths(self) -> tuple[float, float]:
        g = self.spec()
        vram = self.vram_bandwidth or (float(g["bandwidth_gbs"]) * 1e9 if g.get("bandwidth_gbs") else None)
        pcie = self.pcie_bandwidth or (pcie_practical_bandwidth(int(g["pcie_gen"]), int(g["pcie_lanes"]))
                                       if g.get("pcie_gen") and g.get("pcie_lanes") else None)
        if not vram or not pcie:
            raise CourseError(f"the spill model needs {g.get('name')}'s memory and PCIe bandwidths: pass "
                              "vram_bandwidth= and pcie_bandwidth= (bytes/s), or pick a GPU from specs.gpus.GPUS")
        return float(vram), float(pcie)

    def layout(self, spec: Any, *, bpw: float | None, max_seq_len: int, cache_mode: str = "fp16") -> dict:
        """The load order and the fixed VRAM before it (CUDA context, transients, the load-time reserve), from the
        planner's breakdown; and the budget: the card less the OS reserve."""
        g = self.spec()
        res = None if self.reserve_gib is None else int(round(self.reserve_gib * GIB))
        ctx = None if self.cuda_context_gib is None else int(round(self.cuda_context_gib * GIB))
        bd = breakdown(spec, bpw=bpw, head_bits=self.head_bits, max_seq_len=max_seq_len,
                              cache_mode=cache_mode, flash_attn=self.flash_attn, cuda_context_bytes=ctx,
                              reserve_bytes=res)
        order = load_order(spec, bpw=bpw, head_bits=self.head_bits, max_seq_len=max_seq_len,
                                  cache_mode=cache_mode, path=self.load_path)
        load_res = self.reserve_while_loading()
        fixed = bd.cuda_context_bytes + int(load_res)
        if self.load_path == "autosplit":
            fixed += bd.transient_bytes
        else:
            order = order + [{"module": "first forward's transients", "kind": "transient", "layer": None,
                              "weight_bytes": 0, "cache_bytes": 0, "scratch_bytes": bd.transient_bytes,
                              "bytes": bd.transient_bytes, "device_hint": "gpu"}]
        budget = int(g["vram_bytes"]) - bd.reserve_bytes
        terms = {"cuda_context_bytes": bd.cuda_context_bytes, "transient_bytes": bd.transient_bytes,
                 "load_reserve_bytes": int(load_res), "os_reserve_bytes": bd.reserve_bytes,
                 "card_bytes": int(g["vram_bytes"])}
        when = "while loading" if self.load_path == "autosplit" else "at the first forward, after the cache"
        notes = [f"load path: {LOAD_PATHS[self.load_path]}",
                 f"CUDA context {bd.cuda_context_bytes / GIB:.2f} GiB ({bd.cuda_context_source.split(':')[0]})",
                 f"OS reserve {bd.reserve_bytes / GIB:.2f} GiB ({bd.reserve_source.split(':')[0]})",
                 f"transients {when} {bd.transient_bytes / GIB:.2f} GiB "
                 f"({'flash-attn/SDPA' if self.flash_attn else 'attention matrix materialised'})",
                 f"reserve held while loading {load_res / MIB:.0f} MiB"]
        return {"order": order, "fixed_bytes": fixed, "budget_bytes": budget, "terms": terms, "notes": notes,
                "breakdown": bd}

    def predict(self, spec: Any, *, bpw: float | None = None, max_seq_len: int, cache_mode: str = "fp16",
                depth: int = 0) -> Prediction:
        """Place exllamav2's load order on this card and predict decode speed at ``depth``."""
        lay = self.layout(spec, bpw=bpw, max_seq_len=max_seq_len, cache_mode=cache_mode)
        vram_bw, pcie_bw = self.bandwidths()
        placement = place(lay["order"], lay["budget_bytes"], lay["fixed_bytes"])
        return evaluate(placement, depth=depth, max_seq_len=max_seq_len, cache_mode=cache_mode,
                        overhead_s_per_token=self.overhead_s_per_token, vram_bandwidth=vram_bw,
                        pcie_bandwidth=pcie_bw, budget_bytes=lay["budget_bytes"], fixed_bytes=lay["fixed_bytes"],
                        notes=lay["notes"])

    def spill_needed_for(self, tok_s: float, spec: Any, *, bpw: float | None = None, max_seq_len: int,
                         cache_mode: str = "fp16", depth: int = 0) -> dict:
        """How much must have spilled to decode at ``tok_s``: the bytes per token that must come over PCIe, and the
        tail of the load order (lm_head first, then the last layers backwards) that reads that much; the last module
        counted in part."""
        if tok_s <= 0:
            raise CourseError(f"a target speed must be positive, got {tok_s}")
        lay = self.layout(spec, bpw=bpw, max_seq_len=max_seq_len, cache_mode=cache_mode)
        vram_bw, pcie_bw = self.bandwidths()
        gpu_mods = [{**m, "where": "vram"} for m in lay["order"] if str(m.get("device_hint")) != "cpu"]
        total, _ = read_bytes(gpu_mods, depth, max_seq_len)
        extra = 1.0 / tok_s - self.overhead_s_per_token - total / vram_bw
        per_byte = 1.0 / pcie_bw - 1.0 / vram_bw
        need = max(0.0, extra / per_byte)
        out = {"tok_s": tok_s, "sysmem_read_bytes": need, "spilled_bytes": 0.0, "spilled_weight_bytes": 0.0,
               "modules": [], "possible": True}
        got = 0.0
        for m in reversed(gpu_mods):
            if got >= need:
                break
            r, _ = read_bytes([m], depth, max_seq_len)
            size = m["weight_bytes"] + m["cache_bytes"] + int(m.get("scratch_bytes", 0) or 0)
            frac = 1.0 if r == 0 or got + r <= need else (need - got) / r
            got += r * frac
            out["spilled_bytes"] += size * frac
            out["spilled_weight_bytes"] += m["weight_bytes"] * frac
            out["modules"].append((m["module"], round(frac, 3)))
        out["possible"] = got >= need - 1
        return out


def predict(spec: Any, gpu: Any, *, bpw: float | None = None, max_seq_len: int, cache_mode: str = "fp16",
            depth: int = 0, reserve_gib: float | None = None, overhead_s_per_token: float = 0.0,
            vram_bandwidth: float | None = None, pcie_bandwidth: float | None = None, **kw) -> Prediction:
    """``SpillModel(gpu, ...).predict(spec, ...)`` in one call (extra keywords go to ``SpillModel``)."""
    return SpillModel(gpu, vram_bandwidth=vram_bandwidth, pcie_bandwidth=pcie_bandwidth,
                      overhead_s_per_token=overhead_s_per_token, reserve_gib=reserve_gib, **kw).predict(
        spec, bpw=bpw, max_seq_len=max_seq_len, cache_mode=cache_mode, depth=depth)


def spill_needed_for(tok_s: float, spec: Any, gpu: Any, *, bpw: float | None = None, max_seq_len: int,
                     cache_mode: str = "fp16", depth: int = 0, **kw) -> dict:
    """``SpillModel(gpu, **kw).spill_needed_for(tok_s, spec, ...)``."""
    return SpillModel(gpu, **kw).spill_needed_for(tok_s, spec, bpw=bpw, max_seq_len=max_seq_len,
                                                  cache_mode=cache_mode, depth=depth)
