"""NVIDIA's Windows "sysmem fallback": which allocations land in system RAM, and the decode speed that follows.

What does not fit in dedicated VRAM goes to system RAM, read over PCIe (docs/FACTS.md §4, §5). ``place`` walks
exllamav2's allocations (``memory.load_order``) against the VRAM left after the OS reserve and what precedes the
first module, under one assumption, ``placement`` (``fallback.placement``). ``read_bytes`` counts what a decoded
token reads from each side (weights, cache layers up to the depth); the time per token is THE speed model's
(``helpers.speed.model.decode_estimate``), no formula of its own. Its parameters never come from the speed it
predicts. ``SpillModel`` ties it to one GPU and a planned load; the seed case is ``fallback.seed``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from helpers.core.errors import CourseError
from helpers.core.units import GIB, MIB
from helpers.fallback.pcie import pcie_practical_bandwidth
from helpers.fallback.placement import DEFAULT_PLACEMENT, PLACEMENTS, check_placement, touched_by_decode
from helpers.memory.breakdown import breakdown
from helpers.memory.cache_modes import LOAD_AUTOSPLIT_RESERVE_BYTES, LOAD_PATHS
from helpers.memory.load_order import load_order
from helpers.memory.setup import LoadSetup
from helpers.speed.model import SpeedConstants, Spill, decode_estimate, first_principles

#: kinds of ``load_order`` entry that hold a layer's own cache (a spilled one is read over PCIe up to the depth)
_CACHE_LAYER_KINDS = ("attention", "cache")


# -------------------------------------------------------------------------------------------- the spill model
@dataclass
class Prediction:
    """What the spill model says about one setup at one depth. Bytes, seconds, tokens/s; ``modules``: where each
    allocation went. ``tok_s`` is the speed model's central estimate, ``tok_s_low``..``tok_s_high`` its range;
    ``seconds``: the time per token by term (weights, attention, host, hops, pcie)."""

    spilled_bytes: int            # bytes (weights + cache layers + buffers) placed in system RAM
    spilled_weight_bytes: int
    spilled_cache_bytes: int
    spilled_cache_layers: int
    vram_read_bytes: int          # weights + cache up to ``depth`` read from VRAM per decoded token (a count)
    sysmem_read_bytes: int        # the same read over PCIe
    weight_bytes: int             # every weight byte a token reads (VRAM and system RAM)
    tok_s: float
    tok_s_low: float
    tok_s_high: float
    seconds: dict
    depth: int
    budget_bytes: int             # VRAM the process may use (card less the OS reserve)
    fixed_bytes: int              # VRAM taken before the first module loads
    modules: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)
    model: Any = field(default=None, repr=False)   # the SpillModel that placed it

    max_seq_len = property(lambda self: self.model.setup.max_seq_len)
    cache_mode = property(lambda self: self.model.setup.cache_mode)
    flash_attn = property(lambda self: self.model.setup.flash_attn)
    host = property(lambda self: self.model.setup.host_class)
    placement = property(lambda self: self.model.placement)
    vram_bandwidth = property(lambda self: self.model.bandwidths()[0])
    pcie_bandwidth = property(lambda self: self.model.bandwidths()[1])

    @property
    def seconds_per_token(self) -> float:
        return 1.0 / self.tok_s

    @property
    def spilled_gib(self) -> float:
        return self.spilled_bytes / GIB

    @property
    def roofline_tok_s(self) -> float:
        """The same reads with nothing spilled and no overhead: VRAM bandwidth / bytes per token."""
        total = self.vram_read_bytes + self.sysmem_read_bytes
        return self.vram_bandwidth / total if total else math.inf

    def time_split_ms(self) -> dict[str, float]:
        """Where a token's time goes (ms): host, VRAM reads (weights + attention), PCIe reads."""
        s = self.seconds
        return {"host_ms": 1e3 * (s["host"] + s["hops"]), "vram_ms": 1e3 * (s["weights"] + s["attention"]),
                "pcie_ms": 1e3 * s["pcie"]}

    def estimate(self, depth: int | None = None, spill: Spill | None = None):
        """``speed.model.decode_estimate`` for this prediction, at another ``depth`` or with another ``spill``."""
        sp = spill or Spill(self.spilled_weight_bytes, self.spilled_cache_layers, self.pcie_bandwidth / 1e9)
        return decode_estimate(self.model.setup, self.depth if depth is None else depth,
                               weight_bytes=self.weight_bytes, bandwidth_gbs=self.vram_bandwidth / 1e9, spill=sp,
                               constants=self.model.constants)

    def at_depth(self, depth: int) -> "Prediction":
        """The same placement and parameters, evaluated at another cache depth."""
        return evaluate(self.modules, self.model, depth, budget_bytes=self.budget_bytes, fixed_bytes=self.fixed_bytes,
                        notes=self.notes)

    def spilled_modules(self) -> list[str]:
        return [p["module"] for p in self.modules if p["where"] == "sysmem"]

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "model"}
        d.update(spilled_gib=self.spilled_gib, roofline_tok_s=self.roofline_tok_s, max_seq_len=self.max_seq_len,
                 cache_mode=self.cache_mode, flash_attn=self.flash_attn, placement=self.placement,
                 vram_bandwidth=self.vram_bandwidth, pcie_bandwidth=self.pcie_bandwidth,
                 seconds_per_token=self.seconds_per_token, **self.time_split_ms())
        return d

    def summary(self) -> str:
        t = self.time_split_ms()
        spilled = self.spilled_modules()
        where = (f"{len(spilled)} allocations in system RAM ({_span(spilled)})" if spilled else "nothing spilled")
        return (f"cache {self.max_seq_len} ({self.cache_mode}), depth {self.depth}, placement {self.placement}: "
                f"{where}; spilled {self.spilled_bytes / GIB:.2f} GiB ({self.spilled_weight_bytes / GIB:.2f} GiB "
                f"weights, {self.spilled_cache_bytes / GIB:.2f} GiB cache); per token {self.vram_read_bytes / 1e9:.2f}"
                f" GB from VRAM + {self.sysmem_read_bytes / 1e9:.3f} GB over PCIe = {t['host_ms']:.1f} + "
                f"{t['vram_ms']:.1f} + {t['pcie_ms']:.1f} ms -> {self.tok_s:.1f} tok/s (estimate, likely "
                f"{self.tok_s_low:.1f}-{self.tok_s_high:.1f})")


def _span(names: Sequence[str]) -> str:
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]} ... {names[-1]}"


def _get(d: Any, key: str, default=None):
    return d.get(key, default) if isinstance(d, dict) else getattr(d, key, default)


def place(order: Iterable[dict], budget_bytes: int, fixed_bytes: int = 0,
          placement: str = DEFAULT_PLACEMENT) -> list[dict]:
    """Walk the allocations against the VRAM budget, under the placement assumption (``fallback.placement``).

    ``order``: dicts with ``module``, ``weight_bytes``, ``cache_bytes`` (the cache layers allocated with it),
    ``kind`` and ``device_hint`` ('cpu' for what exllamav2 keeps in system RAM anyway, the input embedding),
    optionally ``scratch_bytes`` (buffers that take VRAM but are not read per token). ``"first_come"``: in the order
    given, each GPU entry goes to 'vram' if its bytes fit in what is left of ``budget_bytes - fixed_bytes``,
    otherwise to 'sysmem'. ``"first_touch"``: the same walk for what a one-token decode touches first, then the
    entries it never touches (``placement.UNTOUCHED_BY_DECODE``) get what is left. Returns one dict per entry, in the
    order given, with ``where`` and ``vram_left_bytes`` after its decision.
    """
    check_placement(placement)
    left = int(budget_bytes) - int(fixed_bytes)
    entries = list(order)
    out: list[dict | None] = [None] * len(entries)
    passes = ([True] if placement == "first_come" else [True, False])
    for first_pass in passes:
        for i, m in enumerate(entries):
            kind = str(_get(m, "kind", "") or "")
            if placement == "first_touch" and touched_by_decode(kind) != first_pass:
                continue
            w, c = int(_get(m, "weight_bytes", 0) or 0), int(_get(m, "cache_bytes", 0) or 0)
            x = int(_get(m, "scratch_bytes", 0) or 0)
            hint = str(_get(m, "device_hint", "gpu") or "gpu").lower()
            if hint == "cpu" or _get(m, "where") == "cpu":
                where = "cpu"
            elif w + c + x <= left:
                where, left = "vram", left - (w + c + x)
            else:
                where = "sysmem"
            out[i] = {"module": str(_get(m, "module", f"module{i}")), "kind": kind, "weight_bytes": w,
                      "cache_bytes": c, "scratch_bytes": x, "where": where, "vram_left_bytes": left}
    return [o for o in out if o is not None]


def read_bytes(modules: Iterable[dict], depth: int, max_seq_len: int) -> tuple[int, int]:
    """(VRAM bytes, system-RAM bytes) one decoded token reads at ``depth``: all weights of each GPU module and the
    first ``depth`` of its cache layers' ``max_seq_len`` positions (a count; the time comes from the speed model).
    Modules on the CPU ('cpu') are not GPU reads; buffers (``scratch_bytes``) are not read per token."""
    if max_seq_len <= 0:
        raise CourseError(f"max_seq_len must be positive, got {max_seq_len}")
    if not 0 <= depth <= max_seq_len:
        raise CourseError(f"depth {depth} must be between 0 and the cache's {max_seq_len} tokens")
    vram = sysmem = 0
    for p in modules:
        b = int(p["weight_bytes"]) + int(round(int(p["cache_bytes"]) * depth / max_seq_len))
        if p["where"] == "vram":
            vram += b
        elif p["where"] == "sysmem":
            sysmem += b
    return vram, sysmem


def overhead_from_run(tok_s: float, setup: LoadSetup, *, weight_bytes: float, vram_bandwidth: float,
                      depth: int = 0) -> tuple[float, str | None]:
    """Host time per token of a MEASURED run of the setup that spills nothing, on the machine a prediction is for:
    its seconds per token minus the bytes it moves at ``vram_bandwidth`` (``speed.model.first_principles``).

    Returns (seconds, note). A speed at or above what the bytes allow leaves no time for the host: that does not
    mean it is zero, it means the reading is not a clean decode of that model; 0 is returned with a note saying so,
    and should not be used."""
    if tok_s <= 0:
        raise CourseError(f"a measured speed must be positive, got {tok_s} tok/s")
    est = decode_estimate(setup, depth, weight_bytes=weight_bytes, bandwidth_gbs=vram_bandwidth / 1e9,
                          constants=first_principles())
    over = 1.0 / tok_s - 1.0 / est.tok_s
    if over <= 0:
        return 0.0, (f"the measured {tok_s:g} tok/s is at or above the {est.tok_s:.1f} tok/s the bytes allow at "
                     f"{vram_bandwidth / 1e9:.0f} GB/s: not a clean decode of that model, so it says nothing about "
                     "the host time (do not use 0)")
    return over, None


def evaluate(modules: list[dict], model: "SpillModel", depth: int, *, budget_bytes: int = 0, fixed_bytes: int = 0,
             notes: Sequence[str] = ()) -> Prediction:
    """The prediction for a given set of placed modules (from ``place``, or what an emulator really did) under the
    spill model's setup and bandwidths: bytes counted here, the time per token from ``speed.model.decode_estimate``."""
    vram_bw, pcie_bw = model.bandwidths()
    if vram_bw <= 0 or pcie_bw <= 0:
        raise CourseError("bandwidths must be positive (bytes/s)")
    setup = model.setup
    vram, sysmem = read_bytes(modules, depth, setup.max_seq_len)
    gpu = [p for p in modules if p["where"] in ("vram", "sysmem")]
    sp = [p for p in modules if p["where"] == "sysmem"]
    weights = sum(int(p["weight_bytes"]) for p in gpu)
    sw, sc = sum(p["weight_bytes"] for p in sp), sum(p["cache_bytes"] for p in sp)
    sx = sum(int(p.get("scratch_bytes", 0) or 0) for p in sp)
    layers = sum(1 for p in sp if p["cache_bytes"] and p.get("kind", "attention") in _CACHE_LAYER_KINDS)
    est = decode_estimate(setup, depth, weight_bytes=weights, bandwidth_gbs=vram_bw / 1e9,
                          spill=Spill(sw, min(layers, setup.shape.n_layers), pcie_bw / 1e9), constants=model.constants)
    return Prediction(spilled_bytes=sw + sc + sx, spilled_weight_bytes=sw, spilled_cache_bytes=sc,
                      spilled_cache_layers=layers, vram_read_bytes=vram, sysmem_read_bytes=sysmem,
                      weight_bytes=weights, tok_s=est.tok_s, tok_s_low=est.tok_s_low, tok_s_high=est.tok_s_high,
                      seconds=dict(est.seconds), depth=int(depth), budget_bytes=int(budget_bytes),
                      fixed_bytes=int(fixed_bytes), modules=list(modules), notes=list(notes),
                      assumptions=list(est.assumptions), model=model)


# ------------------------------------------------------------------------------------- the model on a planned load
#: what ``load_autosplit`` holds while it loads (``memory.LOAD_AUTOSPLIT_RESERVE_BYTES``: 192 + 256 MiB, a
#: ``torch.empty`` never written). Under "first_come" every spill decision is made with it in VRAM; it is freed when
#: the load ends, too late to bring anything back. Under "first_touch" it never takes VRAM.
LOAD_RESERVE_BYTES = LOAD_AUTOSPLIT_RESERVE_BYTES


@dataclass
class SpillModel:
    """The spill model for one setup on its GPU: the bandwidths, what is taken before the model loads, the load path
    and the placement assumption.

    Bandwidths in bytes/s; None takes the datasheet's memory bandwidth and ``pcie_practical_bandwidth`` of the link.
    ``load_path`` (``memory.LOAD_PATHS``): 'autosplit' (``load_autosplit(cache)``: a test forward per module, so the
    transients exist from the first module, and its load-time reserve is held) or 'load' (``model.load()`` then the
    cache: no reserve; the first forward's transients come after the cache). ``placement``:
    ``fallback.placement.PLACEMENTS``. ``constants``: the speed model's (None: the fitted ones)."""

    setup: LoadSetup
    load_path: str = "autosplit"
    placement: str = DEFAULT_PLACEMENT
    vram_bandwidth: float | None = None
    pcie_bandwidth: float | None = None
    load_reserve_bytes: int | None = None
    constants: SpeedConstants | None = None

    def reserve_while_loading(self) -> int:
        if self.load_reserve_bytes is not None:
            return int(self.load_reserve_bytes)
        return LOAD_RESERVE_BYTES if self.load_path == "autosplit" else 0

    def with_(self, **changes) -> "SpillModel":
        """The same model for a changed setup (``max_seq_len``, ``cache_mode``, ``bpw``, ...)."""
        return dataclasses.replace(self, setup=self.setup.with_(**changes))

    def bandwidths(self) -> tuple[float, float]:
        if self.vram_bandwidth and self.pcie_bandwidth:
            return float(self.vram_bandwidth), float(self.pcie_bandwidth)
        g = self.setup.gpu
        vram = self.vram_bandwidth or (float(g["bandwidth_gbs"]) * 1e9 if g.get("bandwidth_gbs") else None)
        pcie = self.pcie_bandwidth or (pcie_practical_bandwidth(int(g["pcie_gen"]), int(g["pcie_lanes"]))
                                       if g.get("pcie_gen") and g.get("pcie_lanes") else None)
        if not vram or not pcie:
            raise CourseError(f"the spill model needs {g.get('name')}'s memory and PCIe bandwidths: pass "
                              "vram_bandwidth= and pcie_bandwidth= (bytes/s), or pick a GPU from specs.gpus.GPUS")
        return float(vram), float(pcie)

    def layout(self) -> dict:
        """The allocations in exllamav2's order and the fixed VRAM before them, from the planner's breakdown; and
        the budget: the card less the OS reserve. Under "first_touch" the buffers a decode never touches are
        entries of their own (the dequantization scratch split from the RoPE tables; the prompt's transients), and
        load_autosplit's never-written reserve takes nothing."""
        check_placement(self.placement)
        setup, g = self.setup, self.setup.gpu
        bd = breakdown(setup, warn=False)
        order = load_order(setup, self.load_path)
        touch = self.placement == "first_touch"
        load_res = 0 if touch else self.reserve_while_loading()
        prompt = bd.transient_bytes - bd.repeat_kv_bytes
        transient = {"module": "prompt transients (attention matrix, hidden state)", "kind": "transient",
                     "layer": None, "weight_bytes": 0, "cache_bytes": 0, "scratch_bytes": prompt,
                     "bytes": prompt, "device_hint": "gpu"}
        # made by decode steps as the depth grows, after the load: last in either placement; decode reads it
        repeat = ([{"module": "repeat_kv copy (one layer's K/V at every query head)", "kind": "repeat_kv",
                    "layer": None, "weight_bytes": 0, "cache_bytes": 0, "scratch_bytes": bd.repeat_kv_bytes,
                    "bytes": bd.repeat_kv_bytes, "device_hint": "gpu"}] if bd.repeat_kv_bytes else [])
        fixed = bd.cuda_context_bytes + int(load_res)
        if touch:
            order = [e for o in order for e in _split_device_context(o, bd)]
            order = order[:2] + [transient] + order[2:] if self.load_path == "autosplit" else order + [transient]
        elif self.load_path == "autosplit":
            fixed += prompt
        else:
            order = order + [dict(transient, module="first forward's transients")]
        order = order + repeat
        budget = int(g["vram_bytes"]) - bd.reserve_bytes
        terms = {"cuda_context_bytes": bd.cuda_context_bytes, "transient_bytes": bd.transient_bytes,
                 "load_reserve_bytes": int(load_res), "os_reserve_bytes": bd.reserve_bytes,
                 "card_bytes": int(g["vram_bytes"])}
        when = ("while loading" if self.load_path == "autosplit" else "at the first forward, after the cache")
        notes = [f"load path: {LOAD_PATHS[self.load_path]}", f"placement: {PLACEMENTS[self.placement]}",
                 f"CUDA context {bd.cuda_context_bytes / GIB:.2f} GiB ({bd.cuda_context_source.split(':')[0]})",
                 f"OS reserve {bd.reserve_bytes / GIB:.2f} GiB ({bd.reserve_source.split(':')[0]})",
                 f"transients {when} {bd.transient_bytes / GIB:.2f} GiB "
                 f"({'flash-attn/SDPA' if setup.flash_attn else 'attention matrix materialised'})",
                 f"reserve held while loading {load_res / MIB:.0f} MiB"
                 + (" (never written: no VRAM under first_touch)" if touch and self.load_path == "autosplit" else "")]
        return {"order": order, "fixed_bytes": fixed, "budget_bytes": budget, "terms": terms, "notes": notes,
                "breakdown": bd}

    def predict(self, depth: int = 0) -> Prediction:
        """Place exllamav2's allocations on this card and predict decode speed at ``depth`` (the speed model)."""
        lay = self.layout()
        modules = place(lay["order"], lay["budget_bytes"], lay["fixed_bytes"], self.placement)
        return evaluate(modules, self, depth, budget_bytes=lay["budget_bytes"], fixed_bytes=lay["fixed_bytes"],
                        notes=lay["notes"])

    def spill_needed_for(self, tok_s: float, depth: int = 0) -> dict:
        """How much must have spilled to decode at ``tok_s``: the weight bytes per token that must come over PCIe
        (the speed model is linear in them: two estimates give the line), and the tail of the load order (lm_head
        first, then the last layers backwards) that holds that much; the last module counted in part."""
        if tok_s <= 0:
            raise CourseError(f"a target speed must be positive, got {tok_s}")
        lay = self.layout()
        gpu_mods = [{**m, "where": "vram"} for m in lay["order"] if str(m.get("device_hint")) != "cpu"]
        base = evaluate(gpu_mods, self, depth)
        t0 = 1.0 / base.tok_s
        probe = min(float(GIB), float(base.weight_bytes))
        per_byte = (1.0 / base.estimate(spill=Spill(probe, 0, base.pcie_bandwidth / 1e9)).tok_s - t0) / probe
        need = min(float(base.weight_bytes), max(0.0, (1.0 / tok_s - t0) / per_byte))
        out = {"tok_s": tok_s, "sysmem_read_bytes": need, "spilled_bytes": 0.0, "spilled_weight_bytes": 0.0,
               "modules": [], "possible": (1.0 / tok_s - t0) / per_byte <= base.weight_bytes}
        got = 0.0
        for m in reversed(gpu_mods):
            if got >= need:
                break
            w = m["weight_bytes"]
            if not w:
                continue
            frac = 1.0 if got + w <= need else (need - got) / w
            got += w * frac
            out["spilled_bytes"] += (w + m["cache_bytes"]) * frac
            out["spilled_weight_bytes"] += w * frac
            out["modules"].append((m["module"], round(frac, 3)))
        return out


def _split_device_context(entry: dict, bd) -> list[dict]:
    """The device context as two allocations: the dequantization scratch (a one-token decode never touches it) and
    the RoPE tables (every token reads them)."""
    if entry.get("kind") != "device_context":
        return [entry]
    rope = min(int(bd.rope_bytes), int(entry["scratch_bytes"]))
    dq = int(entry["scratch_bytes"]) - rope
    return [dict(entry, module="dequantization scratch (device context)", kind="dequant_scratch", scratch_bytes=dq,
                 bytes=dq),
            dict(entry, module="RoPE sin/cos tables", scratch_bytes=rope, bytes=rope)]
