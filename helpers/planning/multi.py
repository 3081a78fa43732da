"""Several GPUs, the way exllamav2 0.3.2 loads a model across them, with the bytes and verdict per device.

``plan_multi`` plans one of ``SPLIT_MODES``: ``autosplit`` (``model.load_autosplit``: modules fill the devices in
order, each device with its context, reserve tensors and cache layers), ``split`` (``model.load(gpu_split=...)``:
modules by each device's GiB, the cache not counted and landing afterwards) or ``tp`` (``model.load_tp``: KV heads,
MLP columns and vocabulary split across the devices). How each is read off model.py and tensor_p.py: docs/FACTS.md
§9. Speed: ``helpers.speed.model.decode_estimate`` per device; layer-split devices run in turn (times add),
tensor-parallel ones at once (the slowest sets the pace) plus an assumed sync per layer (``TP_SYNC_S``).
Public names: ``DevicePlan``, ``MultiPlan``, ``plan_multi``, ``integer_split``.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

from helpers.core.errors import CourseError, CourseWarning
from helpers.core.units import GIB, MIB, fmt_gib
from helpers.memory.allocation import alloc_bytes
from helpers.memory.breakdown import breakdown, reserve_of
from helpers.memory.cache_modes import AUTOSPLIT_MINIMUM_RESERVE, AUTOSPLIT_RESERVE_FIRST, AUTOSPLIT_RESERVE_OTHERS
from helpers.memory.kv_cache import kv_cache_per_layer
from helpers.memory.scratch import attention_scratch_space, scratch_detail
from helpers.memory.setup import LoadSetup
from helpers.planning.multi_advice import multi_advice
from helpers.planning.planner import SCHEMA_ID, SCHEMA_VERSION, check_depth, context_note, page_note
from helpers.specs.gpus import gpu_label
from helpers.speed.model import CONSTANTS, UNKNOWNS, Stage, decode_estimate, decode_terms, position_bytes

SPLIT_MODES = ("autosplit", "split", "tp")
#: assumption: tensor parallel synchronises twice per layer (after attention and after the MLP); seconds low..high
#: per synchronisation over PCIe without NVLink
TP_SYNC_S = (15e-6, 60e-6)


@dataclass
class DevicePlan:
    """One device: what lands on it (layers, modules, bytes by term), the total it must hold, and its verdict."""

    index: int
    gpu: dict
    layers: list
    modules: list
    weights_bytes: int
    kv_cache_bytes: int
    kv_temp_bytes: int
    scratch_bytes: int
    rope_bytes: int
    transient_bytes: int
    cuda_context_bytes: int
    reserve_bytes: int
    load_reserve_bytes: int = 0
    #: tensor parallel: the KV heads (and their query heads) this device computes
    kv_heads: int = 0
    reserve_source: str = ""

    @property
    def used(self) -> bool:
        return bool(self.modules)

    @property
    def total_bytes(self) -> int:
        if not self.used:
            return 0
        return (self.weights_bytes + self.kv_cache_bytes + self.kv_temp_bytes + self.scratch_bytes + self.rope_bytes
                + self.transient_bytes + self.cuda_context_bytes + self.reserve_bytes)

    @property
    def margin_bytes(self) -> int:
        return self.gpu["vram_bytes"] - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.margin_bytes >= 0

    @property
    def tight(self) -> bool:
        """Fits once loaded, but by less than the reserve load_autosplit holds on this device while it loads (only
        the last device can end there: autosplit moves on from the others before that)."""
        return self.used and self.fits and self.margin_bytes < self.load_reserve_bytes

    def layer_range(self) -> str:
        """'0-44a': layers 0 to 44, of layer 44 only its attention ('a'; 'm': only its MLP), so that two devices'
        ranges never seem to share a layer."""
        if not self.layers:
            return "-"
        lo, hi = min(self.layers), max(self.layers)

        def mark(i: int) -> str:
            attn = any(m.endswith(f"layers.{i}.self_attn") for m in self.modules)
            mlp = any(m.endswith(f"layers.{i}.mlp") for m in self.modules)
            return "" if attn == mlp else ("a" if attn else "m")

        return f"{lo}{mark(lo)}" if lo == hi else f"{lo}{mark(lo)}-{hi}{mark(hi)}"

    def to_dict(self) -> dict:
        return {"index": self.index, "gpu": gpu_label(self.gpu), "vram_bytes": self.gpu["vram_bytes"],
                "bandwidth_gbs": self.gpu.get("bandwidth_gbs"), "layers": list(self.layers),
                "modules": list(self.modules), "weights_bytes": self.weights_bytes,
                "kv_cache_bytes": self.kv_cache_bytes, "kv_temp_bytes": self.kv_temp_bytes,
                "scratch_bytes": self.scratch_bytes, "rope_bytes": self.rope_bytes,
                "transient_bytes": self.transient_bytes, "cuda_context_bytes": self.cuda_context_bytes,
                "reserve_bytes": self.reserve_bytes, "reserve_source": self.reserve_source,
                "load_reserve_bytes": self.load_reserve_bytes, "total_bytes": self.total_bytes,
                "margin_bytes": self.margin_bytes, "fits": self.fits, "tight": self.tight}


@dataclass
class MultiPlan:
    """A model across several GPUs: the devices, the overall verdict, a decode estimate and the assumptions."""

    model: str
    split_mode: str
    max_seq_len: int
    cache_mode: str
    flash_attn: bool
    devices: list
    depth: int
    decode: dict | None
    assumptions: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    error: str | None = None
    #: what plan_multi was given (the advice re-plans with one thing changed)
    setup: Any = field(default=None, repr=False, compare=False)
    split: Any = field(default=None, repr=False, compare=False)
    _advice: str | None = field(default=None, repr=False, compare=False)

    @staticmethod
    def planner(*a, **kw) -> MultiPlan:
        """``plan_multi``: what the advice re-plans with."""
        return plan_multi(*a, **kw)

    @property
    def fits(self) -> bool:
        return self.error is None and all(d.fits for d in self.devices if d.used)

    @property
    def ok(self) -> bool:
        """Fits, and no device is tight: what the advice requires of every setting it names."""
        return self.fits and not any(d.tight for d in self.devices)

    @property
    def advice(self) -> str:
        """Which device is short and by how much, and what fixes it, in order (``multi_advice``); computed once, on
        first use (it re-plans a few dozen times)."""
        if self._advice is None:
            self._advice = multi_advice(self)
        return self._advice

    @property
    def total_bytes(self) -> int:
        return sum(d.total_bytes for d in self.devices)

    def verdict(self) -> str:
        if self.error:
            return f"DOES NOT LOAD: {self.error}"
        bad = [d for d in self.devices if d.used and not d.fits]
        if not bad:
            text = "FITS on every device (" + ", ".join(f"GPU {d.index}: {fmt_gib(d.margin_bytes)} to spare"
                                                        for d in self.devices if d.used) + ")"
            return text + "".join(f"; TIGHT: load_autosplit holds {fmt_gib(d.load_reserve_bytes)} more on GPU "
                                  f"{d.index} while it loads" for d in self.devices if d.tight)
        return "DOES NOT FIT: " + ", ".join(f"GPU {d.index} is {fmt_gib(-d.margin_bytes)} short" for d in bad)

    def table(self) -> str:
        head = (f"{'GPU':<4}{'card':<34}{'layers':>9}{'weights':>9}{'cache':>8}{'scratch':>9}{'other':>8}"
                f"{'total':>8}{'of':>8}  verdict")
        rows = [head]
        for d in self.devices:
            other = d.transient_bytes + d.cuda_context_bytes + d.reserve_bytes + d.rope_bytes
            tight = ", TIGHT" if d.tight else ""
            verdict = ("unused" if not d.used else
                       (f"fits, {fmt_gib(d.margin_bytes)} spare{tight}" if d.fits else
                        f"{fmt_gib(-d.margin_bytes)} SHORT"))
            rows.append(f"{d.index:<4}{gpu_label(d.gpu, short=True)[:33]:<34}{d.layer_range():>9}"
                        f"{d.weights_bytes / GIB:>9.2f}{(d.kv_cache_bytes + d.kv_temp_bytes) / GIB:>8.2f}"
                        f"{d.scratch_bytes / GIB:>9.2f}{other / GIB:>8.2f}{d.total_bytes / GIB:>8.2f}"
                        f"{d.gpu['vram_bytes'] / GIB:>8.2f}  {verdict}")
        if any(d.layer_range()[-1:] in "am" and d.layer_range() != "-" for d in self.devices if d.used):
            rows.append("layers: 'a' only that layer's attention, 'm' only its MLP (a layer split between devices)")
        return "\n".join(rows)

    def summary(self, assumptions: bool = True) -> str:
        """The devices' table, the verdict, the decode estimate (with its ``assumptions``, also in ``.assumptions``)
        and the advice."""
        how = {"autosplit": "model.load_autosplit(cache)", "split": "model.load(gpu_split=...), then the cache",
               "tp": "model.load_tp(...) (tensor parallel)"}[self.split_mode]
        lines = [f"{self.model}, max_seq_len {self.max_seq_len:,}, {self.cache_mode} cache, {how}; GiB per device "
                 "('other': RoPE tables, transients, CUDA context, desktop reserve)", self.table(), "",
                 self.verdict()]
        if self.decode:
            e = self.decode
            lines.append(f"decode at depth {self.depth:,} ({e['label']}): {e['tok_s']:.1f} tok/s (likely "
                         f"{e['tok_s_low']:.1f}-{e['tok_s_high']:.1f})")
            lines += [f"  assumption: {a}" for a in self.assumptions] if assumptions else []
        lines += [f"note: {n}" for n in self.notes]
        lines += ["", self.advice]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        e = self.decode
        return {"$schema": SCHEMA_ID, "schema_version": SCHEMA_VERSION, "kind": "multi", "model": self.model,
                "split_mode": self.split_mode, "max_seq_len": self.max_seq_len, "cache_mode": self.cache_mode,
                "flash_attn": self.flash_attn, "units": "bytes (GiB = 2**30 bytes); speeds in tok/s",
                "fits": self.fits, "verdict": self.verdict(), "error": self.error,
                "total_bytes": self.total_bytes, "devices": [d.to_dict() for d in self.devices],
                "depth": self.depth, "decode_estimate_tok_s": None if e is None else e["tok_s"],
                "decode_estimate": e, "assumptions": self.assumptions, "notes": self.notes, "advice": self.advice}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _check_gpus(setup: LoadSetup) -> tuple:
    if not setup.gpus:
        raise CourseError("give at least one GPU")
    if len(setup.gpus) > 16:
        raise CourseError(f"{len(setup.gpus)} GPUs: exllamav2 splits across the devices of one machine; give at most "
                          "16")
    return setup.gpus


@dataclass(frozen=True)
class _Split:
    """What every way of splitting shares: the setup, its breakdown, each layer's cache, the FP16 temp layer, the
    transients each device holds, and each device's CUDA context and reserve."""

    setup: LoadSetup
    bd: Any
    cache_layer: list
    temp: int
    transient: int
    reserves: list

    def device(self, i: int) -> DevicePlan:
        g = self.setup.gpus[i]
        return DevicePlan(i, g, [], [], 0, 0, 0, 0, 0, 0, self.bd.cuda_context_bytes, self.reserves[i][0],
                          reserve_source=self.reserves[i][1])


def plan_multi(setup: LoadSetup, *, split: list[float] | None = None, split_mode: str | None = None,
               depth: int | None = None) -> MultiPlan:
    """The setup over its GPUs the way exllamav2 0.3.2 loads it: ``split_mode`` 'autosplit' (default), 'split'
    (``split``: GiB per device, as ``model.load(gpu_split)``) or 'tp' (tensor parallel; ``split`` optional). The
    desktop reserve lies on the first GPU unless the setup gives one per GPU."""
    devs, max_seq_len, shape = _check_gpus(setup), setup.max_seq_len, setup.shape
    sm = split_mode or ("split" if split else "autosplit")
    if sm not in SPLIT_MODES:
        raise CourseError(f"unknown split mode '{sm}': use autosplit (load_autosplit), split (load with gpu_split) "
                          "or tp (load_tp, tensor parallel)")
    if split is not None:
        if len(split) != len(devs) or any(not isinstance(x, (int, float)) or x < 0 for x in split):
            raise CourseError(f"--split needs one non-negative GiB figure per GPU ({len(devs)}), e.g. 20,24; got "
                              f"{split}")
    d = check_depth(depth, max_seq_len)
    reserves = [reserve_of(setup, i) for i in range(len(devs))]
    bd = breakdown(setup, warn=False, reserve=reserves[0])
    cache_layer, temp = kv_cache_per_layer(setup)
    # each device runs its layers one at a time: one of each transient per device
    c = _Split(setup, bd, cache_layer, temp, bd.transient_bytes, reserves)
    error = None
    if sm == "tp":
        devices = _tensor_parallel(c, split)
    elif sm == "split":
        devices, error = _manual_split(c, split or [float(g["vram_gib"]) for g in devs])
    else:
        devices = _autosplit(c)
    dec, assumptions = _decode(setup, devices, d, sm)
    notes = [n for n in (page_note(max_seq_len), context_note(shape, max_seq_len)) if n]
    if sm == "split":
        notes.append("gpu_split counts weights and scratch only: exllamav2 adds each layer's cache to the device of "
                     "its attention layer afterwards (model.py load docstring), so leave room for it")
    for w in setup.weight_warnings + [n for n in (context_note(shape, max_seq_len),) if n]:
        warnings.warn(w, CourseWarning, stacklevel=2)
    return MultiPlan(shape.name, sm, max_seq_len, setup.cache_mode, setup.flash_attn, devices, d, dec, assumptions,
                     notes, error, setup=setup, split=split)


def _autosplit(c: _Split) -> list[DevicePlan]:
    st, bd, cache_layer, temp, transient = c.setup.weights, c.bd, c.cache_layer, c.temp, c.transient
    out = [c.device(i) for i in range(len(c.setup.gpus))]
    fixed = bd.device_scratch_bytes + bd.rope_bytes
    cur = 0
    for m in st.modules:
        if m["device_hint"] == "cpu":
            continue
        cache = cache_layer[m["layer"]] if m["kind"] == "attention" else 0
        while True:
            dv = out[cur]
            load_res = (AUTOSPLIT_RESERVE_FIRST if cur == 0 else AUTOSPLIT_RESERVE_OTHERS) + AUTOSPLIT_MINIMUM_RESERVE
            extra = (0 if dv.used else fixed) + (temp if cache and not dv.kv_cache_bytes else 0)
            held = dv.total_bytes if dv.used else dv.cuda_context_bytes + dv.reserve_bytes + transient
            load_time = held + extra + m["weight_bytes"] + cache + load_res
            if load_time <= dv.gpu["vram_bytes"] or cur == len(out) - 1:
                break
            cur += 1
        dv = out[cur]
        if not dv.used:
            dv.scratch_bytes, dv.rope_bytes, dv.transient_bytes = bd.device_scratch_bytes, bd.rope_bytes, transient
            dv.load_reserve_bytes = load_res
        if cache and not dv.kv_cache_bytes:
            dv.kv_temp_bytes = temp
        dv.modules.append(m["module"])
        dv.weights_bytes += m["weight_bytes"]
        dv.kv_cache_bytes += cache
        if m["layer"] is not None and m["layer"] not in dv.layers:
            dv.layers.append(m["layer"])
    return out


def _manual_split(c: _Split, split: list[float]):
    """model.py ``set_device_map``: modules fill each device's allocation in order; the cache follows afterwards."""
    shape, st, bd, max_seq_len = c.setup.shape, c.setup.weights, c.bd, c.setup.max_seq_len
    cache_layer, temp, transient = c.cache_layer, c.temp, c.transient
    out = [c.device(i) for i in range(len(c.setup.gpus))]
    constant = (shape.head_dim * max_seq_len * 2) * 2 if shape.rope else 0
    # state_size and mask_size of a max_input_len chunk: the breakdown's hidden state + mask term
    alloc = [a * GIB - (constant + bd.hidden_state_transient_bytes) for a in split]
    detail = scratch_detail(c.setup)
    # set_device_map reserves each module's scratch_space() (attention: + temp_q/k/v and temp_kv, the repeat_kv copy)
    # but allocates only the largest scratch_space_fixed() per device
    reserve = dict(detail, attention=attention_scratch_space(c.setup))
    res_s, res_a, fixed = [0] * len(out), [0] * len(out), [0] * len(out)
    cur, error = 0, None
    for m in st.modules:
        if m["device_hint"] == "cpu":
            continue
        scratch = detail.get(m["kind"], detail["lm_head"] if m["kind"] == "head" else 0)
        need = reserve.get(m["kind"], scratch)
        attn = bd.attention_transient_bytes if m["kind"] == "attention" else 0
        while cur < len(out):
            s, a = max(need, res_s[cur]), max(attn, res_a[cur])
            if m["weight_bytes"] + s + a <= alloc[cur]:
                break
            cur += 1
        if cur >= len(out):
            error = (f"gpu_split {','.join(f'{x:g}' for x in split)} GiB is too small for the weights: exllamav2 "
                     "stops with 'Insufficient space in device allocation'")
            cur = len(out) - 1
        res_s[cur], res_a[cur] = max(need, res_s[cur]), max(attn, res_a[cur])
        fixed[cur] = max(fixed[cur], scratch)
        alloc[cur] -= m["weight_bytes"]
        dv = out[cur]
        dv.modules.append(m["module"])
        dv.weights_bytes += m["weight_bytes"]
        if m["kind"] == "attention":
            dv.kv_cache_bytes += cache_layer[m["layer"]]
        if m["layer"] is not None and m["layer"] not in dv.layers:
            dv.layers.append(m["layer"])
    for i, dv in enumerate(out):
        if dv.used:
            dv.scratch_bytes = alloc_bytes((fixed[i] // 2) * 2)
            dv.rope_bytes, dv.transient_bytes = bd.rope_bytes, transient
            dv.kv_temp_bytes = temp if dv.kv_cache_bytes else 0
    return out, error


def integer_split(x: int, split: list[float], minimum: int = 0) -> list[int]:
    """exllamav2 util.py ``integer_split``: x whole units in proportion to ``split`` (largest remainders first),
    portions below ``minimum`` given to the smallest others."""
    total = sum(split)
    portions = [int(x * p / total) for p in split]
    rema = [(x * p / total) - q for p, q in zip(split, portions)]
    for _ in range(x - sum(portions)):
        i = rema.index(max(rema))
        portions[i] += 1
        rema[i] -= 1
    adjust = sum(p for p in portions if p < minimum)
    portions = [p if p >= minimum else 0 for p in portions]
    for _ in range(adjust):
        i = min((j for j, v in enumerate(portions) if v), key=lambda j: portions[j], default=-1)
        portions[i] += 1
    return portions


def _tensor_parallel(c: _Split, split: list[float] | None):
    """tensor_p.py ``define_split``: KV heads by memory, attention and cache with them; MLP and vocab by what is
    left. Norms are counted on every device (they are small)."""
    shape, st, bd, devs, cache_layer, temp = c.setup.shape, c.setup.weights, c.bd, c.setup.gpus, c.cache_layer, c.temp
    mem = [float(x) * 1024 for x in (split or [g["vram_gib"] for g in devs])]  # MiB, as define_split works
    kv = integer_split(shape.n_kv_heads, mem)
    r = [k / shape.n_kv_heads for k in kv]
    cache_total = sum(cache_layer)
    att_total = sum(m["weight_bytes"] for m in st.modules if m["kind"] == "attention")
    left = [max(0.0, g - (cache_total + att_total) * ri / MIB) for g, ri in zip(mem, r)]
    if not any(left):
        left = mem
    mlp_units = integer_split(shape.intermediate // 128, left, 2)
    voc_units = integer_split((shape.vocab + 31) // 32, left, 16)
    mlp_r = [u / max(1, sum(mlp_units)) for u in mlp_units]
    voc_r = [u / max(1, sum(voc_units)) for u in voc_units]
    mlp_total = sum(m["weight_bytes"] for m in st.modules if m["kind"] == "mlp")
    head = st.head
    norm = sum(m["weight_bytes"] for m in st.modules if m["kind"] == "norm")
    out = []
    for i in range(len(devs)):
        dv = c.device(i)
        if r[i] or mlp_r[i] or voc_r[i]:
            dv.layers = list(range(shape.n_layers))
            dv.kv_heads = kv[i]
            dv.modules = [f"{r[i]:.0%} of attention ({kv[i]} KV heads)", f"{mlp_r[i]:.0%} of MLP",
                          f"{voc_r[i]:.0%} of lm_head"]
            dv.weights_bytes = int(att_total * r[i] + mlp_total * mlp_r[i] + head * voc_r[i] + norm)
            dv.kv_cache_bytes = int(cache_total * r[i])
            dv.kv_temp_bytes = int(temp * r[i])
            dv.scratch_bytes = bd.device_scratch_bytes
            dv.rope_bytes = bd.rope_bytes
            dv.transient_bytes = (int((bd.attention_transient_bytes + bd.repeat_kv_bytes) * r[i])
                                  + bd.hidden_state_transient_bytes)
        out.append(dv)
    return out


def _decode(setup: LoadSetup, devices, depth, sm) -> tuple[dict | None, list]:
    shape, mode, flash_attn = setup.shape, setup.cache_mode, setup.flash_attn
    used = [dv for dv in devices if dv.used]
    if not used or any(not dv.gpu.get("bandwidth_gbs") for dv in used):
        return None, ["no decode estimate: a device's bandwidth is unknown (name known cards)"]
    host = setup.host or ("server" if all(dv.gpu.get("host") == "server" for dv in used) else "desktop")
    setup = setup.with_(host=host)
    c = CONSTANTS
    pb = position_bytes(shape, mode, flash_attn)
    if sm == "tp":  # every device reads its share of every layer at once: the slowest sets the pace
        parts = []
        for dv in used:
            sub = dataclasses.replace(shape, n_kv_heads=dv.kv_heads, n_heads=dv.kv_heads * shape.gqa_group)
            t = decode_terms(setup.with_(model=sub),
                             [Stage(shape.n_layers, dv.weights_bytes, float(dv.gpu["bandwidth_gbs"]))], depth)
            parts.append(t.seconds(c))
        sync = 2 * shape.n_layers
        central = (max(p["weights"] + p["attention"] for p in parts) + parts[0]["host"]
                   + sync * sum(TP_SYNC_S) / 2)
        label = "estimate (tensor parallel: devices at once; assumptions below)"
        extra = [f"tensor parallel: every device reads its share of every layer at the same time; the slowest sets "
                 f"the pace; {sync} synchronisations per token (after attention and MLP of each layer) at "
                 f"{TP_SYNC_S[0] * 1e6:g}-{TP_SYNC_S[1] * 1e6:g} us each over PCIe (assumed, no NVLink; no "
                 "tensor-parallel measurement is in the speed model's calibration)",
                 "the attention share of each device follows its KV heads (tensor_p.py define_split)"]
        per_device = [1 / (p["weights"] + p["attention"] + p["host"]) for p in parts]
    else:  # a layer split: the devices run one after the other
        stages = [Stage(sum(1 for m in dv.modules if m.endswith("self_attn")), dv.weights_bytes,
                        float(dv.gpu["bandwidth_gbs"])) for dv in used]
        stages = [st for st in stages if st.n_layers]
        terms = decode_terms(setup, stages, depth)
        central = sum(terms.seconds(c).values())
        label = "estimate (layer split: devices one after the other)"
        extra = ([f"layer split: the devices run one after the other, each reading its own layers' weights and "
                  f"cache; {terms.hops} GPU boundary(ies) per token at {c['hop_s'] * 1e6:.0f} us each "
                  f"({c.how('hop_s')})"]
                 if terms.hops else [])
        per_device = [decode_estimate(setup.with_(model=dataclasses.replace(shape, n_layers=st.n_layers)), depth,
                                      weight_bytes=st.weight_bytes, bandwidth_gbs=st.bandwidth_gbs).tok_s
                      for st in stages]
    assumptions = extra + [f"{pb.total:,} B per position per token over the whole model ({mode.upper()} cache, "
                           f"{'flash-attn' if flash_attn else 'torch attention with repeat_kv'}), first principles",
                           f"bandwidth: {c['bandwidth_fraction']:.2f} of each device's datasheet figure; {host} host: "
                           f"{c['layer_s_' + host] * 1e6:.0f} us per layer per token ({c.how('layer_s_' + host)})",
                           f"range: {c.range_text()}", "not known to the model: " + "; ".join(UNKNOWNS)]
    assumptions.append("bandwidth per device: " + ", ".join(f"GPU {dv.index} {dv.gpu['bandwidth_gbs']:g} GB/s"
                                                            for dv in used))
    tok_s = 1 / central
    return ({"label": label, "depth": depth, "tok_s": tok_s, "tok_s_low": tok_s * c.range_low,
             "tok_s_high": tok_s * c.range_high, "per_device_tok_s": per_device}, assumptions)
