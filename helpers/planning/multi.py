"""Several GPUs, the way exllamav2 0.3.2 loads a model across them (model.py), with the bytes and verdict per device.

Three ways, each read off model.py / tensor_p.py:

- ``autosplit``: ``model.load_autosplit(cache, reserve_vram=None)`` (``load_autosplit_gen``). Modules load in order
  on the current device; the first time a device is used it gets a device context (the scratch buffer sized by the
  largest module's ``scratch_space_fixed()`` and the RoPE tables), a ``reserve_vram`` tensor (192 MiB on the first
  device, 64 MiB on the others) and a 256 MiB ``minimum_reserve_vram`` tensor. Each attention module's cache layer
  is created just before it loads, on its device (``cache.update_cache_tensors``); a quantized cache adds one FP16
  temp layer per device. When a module (with a forward pass of a ``max_input_len`` chunk) runs out of memory,
  exllamav2 moves to the next device. The reserve tensors are freed when the load ends.
- ``split``: ``model.load(gpu_split=[GiB, ...])`` (``set_device_map``): each device's allocation, less the RoPE
  tables, hidden state and mask, holds modules until the next one (with its scratch and attention matrix) no longer
  fits; the cache is NOT counted in ``gpu_split`` and lands afterwards with its attention layers.
- ``tp``: ``model.load_tp(gpu_split)`` (tensor_p.py ``TPContext.define_split``): KV heads split in proportion to
  the devices' memory (``integer_split``), attention weights and cache with them; MLP columns (in 128s) and the
  vocabulary (in 32s) split over what memory is left. Every device holds its share of every layer.

The decode estimate comes from ``helpers.speed.model.decode_estimate`` per device: with a layer split the devices
run one after the other (times add); with tensor parallelism they run at once (the slowest sets the pace) plus an
assumed synchronisation cost per layer. Both are labelled estimates with their assumptions.
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
from helpers.memory.breakdown import breakdown_from, resolve_cuda_context, resolve_reserve
from helpers.memory.cache_modes import (
    AUTOSPLIT_MINIMUM_RESERVE,
    AUTOSPLIT_RESERVE_FIRST,
    AUTOSPLIT_RESERVE_OTHERS,
    check_cache_mode,
)
from helpers.memory.kv_cache import kv_cache_per_layer
from helpers.memory.limits import check_batch, check_len
from helpers.memory.scratch import (
    DEFAULT_MAX_ATTENTION_SIZE,
    DEFAULT_MAX_INPUT_LEN,
    attention_scratch_space,
    scratch_detail,
)
from helpers.memory.weights import ModelWeights
from helpers.planning.multi_advice import multi_advice
from helpers.planning.planner import SCHEMA_ID, SCHEMA_VERSION, _gib_bytes, check_depth, context_note, page_note
from helpers.specs.gpus import gpu_label, gpu_spec
from helpers.speed.model import CONSTANTS, UNKNOWNS, Stage, check_host, decode_estimate, decode_terms, position_bytes

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
    inputs: dict = field(default_factory=dict, repr=False, compare=False)
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

    def summary(self) -> str:
        how = {"autosplit": "model.load_autosplit(cache)", "split": "model.load(gpu_split=...), then the cache",
               "tp": "model.load_tp(...) (tensor parallel)"}[self.split_mode]
        lines = [f"{self.model}, max_seq_len {self.max_seq_len:,}, {self.cache_mode} cache, {how}; GiB per device "
                 "('other': RoPE tables, transients, CUDA context, desktop reserve)", self.table(), "",
                 self.verdict()]
        if self.decode:
            e = self.decode
            lines.append(f"decode at depth {self.depth:,} ({e['label']}): {e['tok_s']:.1f} tok/s (likely "
                         f"{e['tok_s_low']:.1f}-{e['tok_s_high']:.1f})")
            lines += [f"  assumption: {a}" for a in self.assumptions]
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


def _gpus(gpus: Any) -> list[dict]:
    if isinstance(gpus, (str, int, float, dict)):
        gpus = [gpus]
    out = [g if isinstance(g, dict) and "vram_bytes" in g else gpu_spec(g) for g in gpus]
    if not out:
        raise CourseError("give at least one GPU")
    if len(out) > 16:
        raise CourseError(f"{len(out)} GPUs: exllamav2 splits across the devices of one machine; give at most 16")
    return out


def _reserves(reserve_gib: Any, n: int) -> list[tuple[int, str]]:
    """Desktop/OS reserve per device: one number for the first (display) GPU and 0 for the others, or a list."""
    if isinstance(reserve_gib, (list, tuple)):
        if len(reserve_gib) != n:
            raise CourseError(f"give one reserve per GPU ({n}), got {len(reserve_gib)}")
        return [resolve_reserve(_gib_bytes(r, "reserve")) for r in reserve_gib]
    first = resolve_reserve(_gib_bytes(reserve_gib, "reserve"))
    return [first] + [(0, "not the display GPU")] * (n - 1)


def plan_multi(spec: Any, gpus: Any, *, bpw: float | None = None, head_bits: int = 6, max_seq_len: int,
               cache_mode: str = "fp16", split: list[float] | None = None, split_mode: str | None = None,
               reserve_gib: Any = None, cuda_context_gib: float | None = None, batch: int = 1,
               max_input_len: int = DEFAULT_MAX_INPUT_LEN, max_attention_size: int = DEFAULT_MAX_ATTENTION_SIZE,
               flash_attn: bool = False, depth: int | None = None, host: str | None = None) -> MultiPlan:
    """One model over ``gpus`` (names or dicts) the way exllamav2 0.3.2 loads it: ``split_mode`` 'autosplit'
    (default), 'split' (``split``: GiB per device, as ``model.load(gpu_split)``) or 'tp' (tensor parallel; ``split``
    optional). The desktop reserve (``reserve_gib``) lies on the first GPU unless a list gives one per GPU."""
    devs = _gpus(gpus)
    mode = check_cache_mode(cache_mode)
    L = check_len(max_seq_len)
    B = check_batch(batch)
    sm = split_mode or ("split" if split else "autosplit")
    if sm not in SPLIT_MODES:
        raise CourseError(f"unknown split mode '{sm}': use autosplit (load_autosplit), split (load with gpu_split) "
                          "or tp (load_tp, tensor parallel)")
    if split is not None:
        if len(split) != len(devs) or any(not isinstance(x, (int, float)) or x < 0 for x in split):
            raise CourseError(f"--split needs one non-negative GiB figure per GPU ({len(devs)}), e.g. 20,24; got "
                              f"{split}")
    d = check_depth(depth, L)
    ctx = resolve_cuda_context(_gib_bytes(cuda_context_gib, "CUDA context"))
    res = _reserves(reserve_gib, len(devs))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        st = ModelWeights(spec, bpw, head_bits)
    shape = st.shape
    bd = breakdown_from(st, L, mode, B, max_input_len, max_attention_size, flash_attn, ctx, res[0])
    cache_layer, temp = kv_cache_per_layer(shape, L, mode, B)
    transient = bd.transient_bytes  # each device runs its layers one at a time: one of each transient per device
    args = (shape, st, bd, devs, ctx[0], [r[0] for r in res], cache_layer, temp, transient, L, B, max_input_len)
    error = None
    if sm == "tp":
        devices = _tensor_parallel(*args, split=split)
    elif sm == "split":
        devices, error = _manual_split(*args, split=split or [float(g["vram_gib"]) for g in devs])
    else:
        devices = _autosplit(*args)
    for dv, r in zip(devices, res):
        dv.reserve_source = r[1]
    dec, assumptions = _decode(shape, devices, d, mode, flash_attn, sm, host)
    notes = [n for n in (page_note(L), context_note(shape, L)) if n]
    if sm == "split":
        notes.append("gpu_split counts weights and scratch only: exllamav2 adds each layer's cache to the device of "
                     "its attention layer afterwards (model.py load docstring), so leave room for it")
    for w in [str(w.message) for w in caught] + [n for n in (context_note(shape, L),) if n]:
        warnings.warn(w, CourseWarning, stacklevel=2)
    inputs = dict(spec=spec, gpus=devs, bpw=bpw, head_bits=head_bits, max_seq_len=L, cache_mode=mode, split=split,
                  split_mode=sm, reserve_gib=reserve_gib, cuda_context_gib=cuda_context_gib, batch=B,
                  max_input_len=max_input_len, max_attention_size=max_attention_size, flash_attn=bool(flash_attn),
                  depth=depth, host=host)
    return MultiPlan(shape.name, sm, L, mode, bool(flash_attn), devices, d, dec, assumptions, notes, error, inputs)


def _device(i, g, ctx, reserve) -> DevicePlan:
    return DevicePlan(i, g, [], [], 0, 0, 0, 0, 0, 0, ctx, reserve)


def _autosplit(shape, st, bd, devs, ctx, reserves, cache_layer, temp, transient, L, B, mil) -> list[DevicePlan]:
    out = [_device(i, g, ctx, reserves[i]) for i, g in enumerate(devs)]
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
            load_time = (dv.total_bytes if dv.used else ctx + dv.reserve_bytes + transient) + extra + \
                m["weight_bytes"] + cache + load_res
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


def _manual_split(shape, st, bd, devs, ctx, reserves, cache_layer, temp, transient, L, B, mil, split):
    """model.py ``set_device_map``: modules fill each device's allocation in order; the cache follows afterwards."""
    out = [_device(i, g, ctx, reserves[i]) for i, g in enumerate(devs)]
    mil = min(mil, L)
    constant = (shape.head_dim * L * 2) * 2 if shape.rope else 0
    # state_size and mask_size of a max_input_len chunk: the breakdown's hidden state + mask term
    alloc = [a * GIB - (constant + bd.hidden_state_transient_bytes) for a in split]
    detail = scratch_detail(shape, L, mil, B)
    # set_device_map reserves each module's scratch_space() (attention: + temp_q/k/v and temp_kv, the repeat_kv copy)
    # but allocates only the largest scratch_space_fixed() per device
    reserve = dict(detail, attention=attention_scratch_space(shape, L, mil, B))
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


def _tensor_parallel(shape, st, bd, devs, ctx, reserves, cache_layer, temp, transient, L, B, mil, split):
    """tensor_p.py ``define_split``: KV heads by memory, attention and cache with them; MLP and vocab by what is
    left. Norms are counted on every device (they are small)."""
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
    for i, g in enumerate(devs):
        dv = _device(i, g, ctx, reserves[i])
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


def _decode(shape, devices, depth, mode, flash_attn, sm, host=None) -> tuple[dict | None, list]:
    used = [dv for dv in devices if dv.used]
    if not used or any(not dv.gpu.get("bandwidth_gbs") for dv in used):
        return None, ["no decode estimate: a device's bandwidth is unknown (name known cards)"]
    host = check_host(host or ("server" if all(dv.gpu.get("host") == "server" for dv in used) else "desktop"))
    c = CONSTANTS
    pb = position_bytes(shape, mode, flash_attn)
    if sm == "tp":  # every device reads its share of every layer at once: the slowest sets the pace
        parts = []
        for dv in used:
            sub = dataclasses.replace(shape, n_kv_heads=dv.kv_heads, n_heads=dv.kv_heads * shape.gqa_group)
            t = decode_terms(sub, [Stage(shape.n_layers, dv.weights_bytes, float(dv.gpu["bandwidth_gbs"]))],
                             depth=depth, cache_mode=mode, flash_attn=flash_attn, host=host)
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
        terms = decode_terms(shape, stages, depth=depth, cache_mode=mode, flash_attn=flash_attn, host=host)
        central = sum(terms.seconds(c).values())
        label = "estimate (layer split: devices one after the other)"
        extra = ([f"layer split: the devices run one after the other, each reading its own layers' weights and "
                  f"cache; {terms.hops} GPU boundary(ies) per token at {c['hop_s'] * 1e6:.0f} us each "
                  f"({c.how('hop_s')})"]
                 if terms.hops else [])
        per_device = [decode_estimate(dataclasses.replace(shape, n_layers=st.n_layers), weight_bytes=st.weight_bytes,
                                      bandwidth_gbs=st.bandwidth_gbs, depth=depth, cache_mode=mode,
                                      flash_attn=flash_attn, host=host).tok_s for st in stages]
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
