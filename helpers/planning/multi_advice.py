"""Advice for a plan across several GPUs, built like the single-GPU planner's: which device is short and by how much,
then what fixes it, in order: a manual ``--split`` that moves layers from the short device to one with room, a
smaller quantized cache, a shorter max_seq_len, a lower bpw, another GPU.

Every setting it names is re-planned with ``plan_multi`` (one thing changed, the rest as given; reached as
``MultiPlan.planner``, since multi.py imports this module) and named only when that plan fits with no device tight
(``MultiPlan.ok``). The split it names is the exact flag: fed back to the planner it gives the plan the advice
describes.
"""
from __future__ import annotations

import warnings
from typing import Any

from helpers.core.errors import CourseError
from helpers.core.units import MIB, fmt_gib
from helpers.format.bits import BPW_RANGE
from helpers.planning.planner import LONGEST_CONTEXT_CAP, PAGE
from helpers.specs.gpus import GPUS, gpu_label

#: the quantized caches the advice offers, best quality first (FP8 is left out: the dynamic generator rejects it)
SMALLER_CACHES = {"fp16": ("q8", "q6", "q4"), "fp8": ("q6", "q4"), "q8": ("q6", "q4"), "q6": ("q4",), "q4": ()}
#: the manual split is searched on this grid (GiB): it is what the flag shows
SPLIT_STEP_GIB = 0.1
HOW = {"autosplit": "load_autosplit", "split": "this gpu_split", "tp": "tensor parallel"}


#: what ``replan`` passes to the planner itself; every other change is a setting of the setup
_PLAN_ARGS = ("split", "split_mode", "depth")


def replan(p, **change: Any):
    """``p``'s plan (a MultiPlan) with ``change`` applied, to its setup or to how it splits (None when the planner
    refuses it); the depth follows a full cache."""
    kw = {"split": p.split, "split_mode": p.split_mode, "depth": None}
    kw.update({k: v for k, v in change.items() if k in _PLAN_ARGS})
    setting = {k: v for k, v in change.items() if k not in _PLAN_ARGS}
    if "gpus" in setting and isinstance(p.setup.reserve_gib, tuple):  # one more card holds no desktop
        setting["reserve_gib"] = p.setup.reserve_gib + (0.0,) * (len(setting["gpus"]) - len(p.setup.reserve_gib))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return p.planner(p.setup.with_(**setting), **kw)
    except CourseError:
        return None


def _ok(q) -> bool:
    return q is not None and q.ok


def split_flag(split: list[float]) -> str:
    return "--split " + ",".join(f"{x:g}" for x in split)


def _layer_split(p) -> tuple[list[float], Any] | None:
    """The manual gpu_split (0.1 GiB steps) whose smallest device margin is largest, if it fits with no device tight.

    For a target margin t, each device but the last takes as much as keeps its own margin >= t (more on a device
    only lowers its margin and raises the later ones'), the last device its whole memory; the largest t for which the
    last device keeps t too is found by bisection (16 MiB steps)."""
    devs = list(p.setup.gpus)
    steps = [int(round(float(g["vram_gib"]) / SPLIT_STEP_GIB)) for g in devs]
    last = float(devs[-1]["vram_gib"])

    def fill(t: int):
        chosen: list[int] = []
        for i in range(len(devs) - 1):
            lo, hi, best = 0, steps[i], None
            while lo <= hi:
                mid = (lo + hi) // 2
                split = [round(c * SPLIT_STEP_GIB, 1) for c in chosen + [mid]] + [float(g["vram_gib"])
                                                                                   for g in devs[i + 1:]]
                q = replan(p, split=split, split_mode="split")
                if q is not None and q.devices[i].margin_bytes >= t:
                    best, lo = mid, mid + 1
                else:
                    hi = mid - 1
            if best is None:
                return None
            chosen.append(best)
        split = [round(c * SPLIT_STEP_GIB, 1) for c in chosen] + [last]
        q = replan(p, split=split, split_mode="split")
        if _ok(q) and all(d.margin_bytes >= t for d in q.devices if d.used):
            return split, q
        return None

    best = fill(0)
    if best is None:
        return None
    lo, hi = 0, max(g["vram_bytes"] for g in devs) // (16 * MIB)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        got = fill(mid * 16 * MIB)
        if got is None:
            hi = mid
        else:
            lo, best = mid, got
    return best


def _tp_split(p) -> tuple[list[float], Any] | None:
    """Two devices, tensor parallel: the memory figures (0.5 GiB steps, one device below its memory) whose smallest
    device margin is largest, if it fits with no device tight."""
    devs = list(p.setup.gpus)
    if len(devs) != 2:
        return None
    v = [float(g["vram_gib"]) for g in devs]
    cands = [[k / 2, v[1]] for k in range(1, int(v[0] * 2))] + [[v[0], k / 2] for k in range(1, int(v[1] * 2))]
    best = None
    for split in cands:
        q = replan(p, split=split, split_mode="tp")
        if _ok(q):
            worst = min(d.margin_bytes for d in q.devices if d.used)
            if best is None or worst > best[0]:
                best = (worst, split, q)
    return None if best is None else (best[1], best[2])


def _longest(p, lo: int, hi: int, **change: Any) -> int:
    """The largest multiple of 256 tokens from ``lo`` to ``hi`` (rounded down to pages) whose plan is ok; 0 if none
    (then it tries 256)."""
    lo_p, hi_p = lo // PAGE, hi // PAGE
    if lo_p < 1 or not _ok(replan(p, max_seq_len=lo_p * PAGE, **change)):
        lo_p = 0
    if lo_p == 0:
        if hi_p < 1 or not _ok(replan(p, max_seq_len=PAGE, **change)):
            return 0
        lo_p = 1
    if _ok(replan(p, max_seq_len=hi_p * PAGE, **change)):
        return hi_p * PAGE
    while hi_p - lo_p > 1:
        mid = (lo_p + hi_p) // 2
        if _ok(replan(p, max_seq_len=mid * PAGE, **change)):
            lo_p = mid
        else:
            hi_p = mid
    return lo_p * PAGE


def _lower_bpw(p, split_mode: str) -> float | None:
    """The highest bpw below the plan's (0.05 steps) whose plan is ok; None without one (or for an EXL2 folder)."""
    bpw = p.setup.bpw
    if bpw is None:
        return None
    lo = BPW_RANGE[0]
    steps = [round(lo + 0.05 * i, 2) for i in range(int(round((bpw - lo) / 0.05)))]
    steps = [b for b in steps if b < bpw]
    best, a, z = None, 0, len(steps) - 1
    while a <= z:
        mid = (a + z) // 2
        if _ok(replan(p, bpw=steps[mid], split_mode=split_mode,
                      split=None if split_mode == "autosplit" else p.split)):
            best, a = steps[mid], mid + 1
        else:
            z = mid - 1
    return best


def _gpu_flag(devs: list[dict]) -> str:
    names = [g.get("name") for g in devs]
    if all(n in GPUS for n in names) and len(set(names)) == 1:
        return f"--gpu {len(devs)}x'{names[0]}'"
    return " ".join(f"--gpu '{n}'" if n in GPUS else f"--gpu-gib {float(g['vram_gib']):g}"
                    for n, g in zip(names, devs))


def tp_assumptions(p) -> str:
    """The tensor-parallel estimate's own assumptions (multi.py ``_decode``) in one clause: the advice states them
    once."""
    own = [a.removeprefix("tensor parallel: ") for a in p.assumptions
           if a.startswith("tensor parallel:") or "define_split" in a]
    return "an estimate that assumes " + "; ".join(own)


def _moves(p, q) -> str:
    """'moves layers 41-55 from GPU 0 to GPU 1': the decoder layers a split places on another device than ``p``."""
    home = {}
    for d in p.devices:
        for layer in d.layers:
            home.setdefault(layer, d.index)
    moved: dict = {}
    for d in q.devices:
        for layer in d.layers:
            if layer in home and home[layer] != d.index and layer not in [x for e in q.devices[:d.index]
                                                                          for x in e.layers]:
                moved.setdefault((home[layer], d.index), []).append(layer)
    if not moved:
        return "keeps the layers where they are"
    return "moves " + ", ".join(f"layer{'s' if len(v) > 1 else ''} {min(v)}{f'-{max(v)}' if len(v) > 1 else ''} "
                                f"({len(v)}) from GPU {a} to GPU {b}" for (a, b), v in sorted(moved.items()))


def _where(p) -> str:
    return ", ".join(f"GPU {d.index} ({gpu_label(d.gpu, short=True)}) {fmt_gib(d.margin_bytes)}"
                     for d in p.devices if d.used)


def multi_advice(p) -> str:
    """The advice paragraph for ``p`` (see the module docstring)."""
    max_seq_len, mode, sm = p.max_seq_len, p.cache_mode, p.split_mode
    devs = list(p.setup.gpus)
    if p.ok:
        text = f"Fits on every device, to spare: {_where(p)}."
        if sm == "autosplit" and len(devs) > 1:
            text += " load_autosplit fills GPU 0 first and moves on only when the next module would not fit."
        longest = _longest(p, max_seq_len, LONGEST_CONTEXT_CAP)
        if longest > max_seq_len:
            cap = ">= " if longest >= LONGEST_CONTEXT_CAP else ""
            text += (f" The longest context this {mode} cache allows, loaded the same way ({HOW[sm]}) with no device "
                     f"tight, is {cap}{longest:,} tokens.")
        if sm == "tp":
            text += f" The tensor-parallel speed is {tp_assumptions(p)}."
        elif len(devs) > 1 and p.decode:
            tp = replan(p, split=None, split_mode="tp", depth=p.depth)
            if _ok(tp) and tp.decode:
                text += (f" Speed at depth {p.depth:,}: a layer split runs the devices one after the other "
                         f"({p.decode['tok_s']:.1f} tok/s, estimate); tensor parallel (add --tp) runs them at once: "
                         f"{tp.decode['tok_s']:.1f} tok/s, {tp_assumptions(tp)}.")
        return text
    short = [d for d in p.devices if d.used and not d.fits]
    tight = [d for d in p.devices if d.tight]
    room = [d for d in p.devices if d.fits and not d.tight]
    what = []
    if p.error:
        what.append(p.error)
    what += [f"GPU {d.index} ({gpu_label(d.gpu, short=True)}) is {fmt_gib(-d.margin_bytes)} short (it holds "
             f"{fmt_gib(d.total_bytes)} of {fmt_gib(d.gpu['vram_bytes'], 0)})" for d in short]
    what += [f"GPU {d.index} fits by {fmt_gib(d.margin_bytes)}, less than the {fmt_gib(d.load_reserve_bytes)} "
             "load_autosplit holds there while it loads (tight)" for d in tight]
    if room:
        what.append("room on " + ", ".join(f"GPU {d.index} ({fmt_gib(d.margin_bytes)} to spare)" for d in room))
    opts = []
    found = _tp_split(p) if sm == "tp" else (_layer_split(p) if len(devs) > 1 else None)
    if found:
        split, q = found
        spare = ", ".join(f"GPU {d.index} {fmt_gib(d.margin_bytes)}" for d in q.devices if d.used)
        if sm == "tp":
            opts.append(f"shift the tensor-parallel shares: {split_flag(split)} --tp (to spare: {spare})")
        else:
            gib = ", ".join(f"{x:g}" for x in split)
            opts.append(f"a manual split, {split_flag(split)} (model.load(gpu_split=[{gib}]), then the cache), which "
                        f"{_moves(p, q)}; to spare: {spare}")
    auto = replan(p, split=None, split_mode="autosplit") if sm == "split" else None
    if _ok(auto):
        opts.append("drop --split: load_autosplit places it (to spare: " + ", ".join(
            f"GPU {d.index} {fmt_gib(d.margin_bytes)}" for d in auto.devices if d.used) + ")")
    for m in SMALLER_CACHES.get(mode, ()):
        if _ok(replan(p, cache_mode=m)):
            opts.append(f"a {m} cache (--cache {m}) keeps {max_seq_len:,} tokens, loaded the same way ({HOW[sm]})")
            break
    shorter = _longest(p, PAGE, max_seq_len - PAGE) if max_seq_len > PAGE else 0
    if shorter:
        opts.append(f"max_seq_len {shorter:,} (--max-seq-len {shorter}) with the {mode} cache, loaded the same way")
    # a gpu_split sized for one bpw is wrong for another: a lower bpw is checked with load_autosplit
    bpw = None if _ok(auto) else _lower_bpw(p, "autosplit" if sm == "split" else sm)
    if bpw is not None:
        how = "load_autosplit" if sm == "split" else HOW[sm]
        opts.append(f"a {bpw:g} bpw quant (--bpw {bpw:g}) at {max_seq_len:,} tokens with the {mode} cache and {how}")
    elif p.setup.bpw is None and not _ok(auto):
        opts.append("a lower-bpw EXL2 quant of this model")
    more = replan(p, gpus=devs + [devs[-1]], split=None, split_mode="autosplit")
    if _ok(more):
        opts.append(f"another {gpu_label(devs[-1], short=True)}: {_gpu_flag(devs + [devs[-1]])} holds it with "
                    "load_autosplit")
    else:
        opts.append("a bigger GPU, or more of them")
    head = "Does not fit" if short or p.error else "Tight"
    text = (f"{head}: {p.model} at max_seq_len {max_seq_len:,} with a {mode} cache, {HOW[sm]}: " + "; ".join(what)
            + ". Options, each checked by this planner: " + "; ".join(f"({i + 1}) {o}" for i, o in enumerate(opts))
            + ". On Linux exllamav2 stops with CUDA out of memory; on Windows the driver's sysmem fallback puts the "
            "excess in system RAM, slower by an amount that depends on what lands there (notebook 04).")
    if sm == "tp":
        text += f" The tensor-parallel speed is {tp_assumptions(p)}."
    return text
