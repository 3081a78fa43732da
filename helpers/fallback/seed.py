"""The seed case told with the spill model: Qwen2.5-14B EXL2 5.5 bpw on an RTX 4080 Super under Windows, 80 tok/s
at a 4k cache and 25 tok/s at 32k (docs/FACTS.md §1); what would have to spill, how it varies with the setup details
the report leaves out and with depth, and the ways out (``ways_out``, each checked by the planner and the model).
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

from helpers.core.units import GIB
from helpers.fallback.pcie import pcie_raw_bandwidth
from helpers.fallback.spill import SpillModel, overhead_from_run
from helpers.memory.breakdown import breakdown
from helpers.memory.cache_modes import LOAD_PATHS
from helpers.memory.planner import plan
from helpers.specs.gpus import gpu_spec

#: what the user reported (docs/FACTS.md §1): Qwen2.5-14B-Instruct EXL2 5.5 bpw, ExLlamaV2, RTX 4080 Super, Windows
SEED = {"model": "qwen2.5-14b", "bpw": 5.5, "gpu": "RTX 4080 Super", "tok_s_4k": 80.0, "tok_s_32k": 25.0,
        "used_4k_gib": 12.0, "full_gib": 15.8, "source": "the user's report (docs/FACTS.md §1)"}


def anchored_reserve_gib(spec: Any, gpu: Any, *, bpw: float | None, used_gib: float, full_gib: float,
                         max_seq_len: int = 4096, cache_mode: str = "fp16", flash_attn: bool = False,
                         cuda_context_gib: float | None = None) -> tuple[float, str]:
    """The VRAM a process could not have, from two readings of a real run: the card's dedicated memory when the
    driver started spilling (``full_gib``: what was left unused) plus what the rest of the system held (the reading
    of a run that fits, ``used_gib``, less what the planner says that run's process holds). Returns (GiB, how)."""
    g = gpu_spec(gpu) if not isinstance(gpu, dict) else gpu
    ctx = None if cuda_context_gib is None else int(round(cuda_context_gib * GIB))
    bd = breakdown(spec, bpw=bpw, max_seq_len=max_seq_len, cache_mode=cache_mode, flash_attn=flash_attn,
                          cuda_context_bytes=ctx, reserve_bytes=0)
    process = bd.vram_total_bytes / GIB
    unused = float(g["vram_gib"]) - full_gib
    others = used_gib - process
    how = (f"{g['vram_gib']:g} GiB card - {full_gib:g} GiB used when full = {unused:.2f} GiB never used; "
           f"{used_gib:g} GiB used at {max_seq_len} tokens - {process:.2f} GiB the planner puts in that process = "
           f"{others:.2f} GiB held by the rest of the system")
    res = unused + others
    if res < 0:
        return 0.0, how + f"; together {res:.2f} GiB, taken as 0"
    return res, how + f"; reserve {res:.2f} GiB"


def seed_case(*, depth: int = 256, pcie_bandwidth: float | None = None, flash_attn: bool = False,
              load_path: str = "autosplit") -> dict:
    """The seed case told with the model, parameters from the datasheet and the user's own readings:

    - VRAM 736 GB/s (datasheet, ``specs.gpus.GPUS``); PCIe 4.0 x16 ~25 GB/s in practice (an assumption,
      docs/FACTS.md §5);
    - overhead: the 4k run's 80 tok/s minus its bandwidth time (negative: at or above the roofline, so 0);
    - the reserve: from the user's memory readings (12 GB used at 4k, 15.8 of 16 GB when full), not the speeds;
    - ``load_path``: how the front end loaded (the report does not say): ``SpillModel.load_path``.
    Returns the roofline, the predictions at 4k and 32k, the spill needed for 25 tok/s, and the verdict."""
    s = SEED
    base = SpillModel(s["gpu"], pcie_bandwidth=pcie_bandwidth, flash_attn=flash_attn, load_path=load_path)
    vram_bw, pcie_bw = base.bandwidths()
    res, how = anchored_reserve_gib(s["model"], s["gpu"], bpw=s["bpw"], used_gib=s["used_4k_gib"],
                                    full_gib=s["full_gib"], flash_attn=flash_attn)
    base.reserve_gib = res
    p4_raw = base.predict(s["model"], bpw=s["bpw"], max_seq_len=4096, depth=depth)
    bytes_4k = p4_raw.vram_read_bytes + p4_raw.sysmem_read_bytes
    overhead, note = overhead_from_run(s["tok_s_4k"], bytes_4k, vram_bw)
    base.overhead_s_per_token = overhead
    p4 = base.predict(s["model"], bpw=s["bpw"], max_seq_len=4096, depth=depth)
    p32 = base.predict(s["model"], bpw=s["bpw"], max_seq_len=32768, depth=depth)
    need = base.spill_needed_for(s["tok_s_32k"], s["model"], bpw=s["bpw"], max_seq_len=32768, depth=depth)
    ratio = p32.tok_s / s["tok_s_32k"]
    return {"seed": dict(s), "depth": depth, "load_path": load_path, "vram_bandwidth": vram_bw,
            "pcie_bandwidth": pcie_bw,
            "bytes_per_token_4k": bytes_4k, "roofline_4k_tok_s": vram_bw / bytes_4k,
            "reported_over_roofline": s["tok_s_4k"] / (vram_bw / bytes_4k),
            "overhead_s_per_token": overhead, "overhead_note": note, "reserve_gib": res, "reserve_how": how,
            "prediction_4k": p4, "prediction_32k": p32, "needed_for_reported": need,
            "predicted_over_reported": ratio, "within_20pct": abs(ratio - 1) <= 0.20}


def seed_variants(depth: int = 256) -> list[dict]:
    """The seed's 32k prediction under the two setup details the report does not give: how the front end loaded
    (``load_autosplit`` with a lazy cache, or ``model.load()`` then the cache), and PCIe practical vs raw. (The
    attention path, a third, cancels: its memory is in the 4k reading the reserve is derived from.) None is fitted."""
    rows = []
    for path in LOAD_PATHS:
        for name, bw in (("practical 25 GB/s", None), ("raw 31.5 GB/s", pcie_raw_bandwidth(4, 16))):
            c = seed_case(depth=depth, pcie_bandwidth=bw, load_path=path)
            p = c["prediction_32k"]
            rows.append({"load_path": path, "pcie": name, "reserve_gib": c["reserve_gib"],
                         "spilled_gib": p.spilled_gib, "spilled_weight_gb": p.spilled_weight_bytes / 1e9,
                         "sysmem_read_gb": p.sysmem_read_bytes / 1e9, "tok_s": p.tok_s,
                         "vs_reported": p.tok_s / SEED["tok_s_32k"] - 1})
    return rows


def depth_for_speed(case: dict, tok_s: float) -> int | None:
    """The cache depth at which ``case``'s 32k prediction (``seed_case``) slows to ``tok_s``: the placement does not
    change with depth and the bytes read grow linearly with it, so the time per token is a line in depth. None if
    that speed is not reached between depth 0 and a full cache."""
    p = case["prediction_32k"]
    L = p.max_seq_len
    t0, t1, target = p.at_depth(0).seconds_per_token, p.at_depth(L).seconds_per_token, 1.0 / tok_s
    if not t0 <= target <= t1:
        return None
    return int(round(L * (target - t0) / (t1 - t0)))


def seed_depth_curves(depths: Sequence[int] | None = None) -> dict:
    """Predicted 32k decode speed against cache depth for each load path (practical PCIe), and the depth at which each
    would decode at the reported 25 tok/s."""
    depths = list(depths) if depths is not None else list(range(0, 32768, 512)) + [32767]
    out = {}
    for path in LOAD_PATHS:
        c = seed_case(depth=0, load_path=path)
        p = c["prediction_32k"]
        tok = [p.at_depth(d).tok_s for d in depths]
        out[path] = {"depths": depths, "tok_s": tok, "spilled_gib": p.spilled_gib,
                     "depth_at_reported": depth_for_speed(c, SEED["tok_s_32k"])}
    return out


def ways_out(spec: Any = None, gpu: Any = None, *, bpw: float | None = None, max_seq_len: int = 32768,
             depth: int = 256, reserve_gib: float | None = None, desktop_extra_gib: float = 1.0,
             overhead_s_per_token: float = 0.0) -> list[dict]:
    """The ways out of a spill, each checked with the planner (``memory.plan``: fits, margin) and the spill model
    (what would spill, with load_autosplit's load-time reserve, and the predicted tok/s). Defaults: the seed case
    with the reserve from the user's readings."""
    spec = spec or SEED["model"]
    gpu = gpu or SEED["gpu"]
    bpw = SEED["bpw"] if bpw is None and spec == SEED["model"] else bpw
    if reserve_gib is None:
        reserve_gib = anchored_reserve_gib(spec, gpu, bpw=bpw, used_gib=SEED["used_4k_gib"],
                                           full_gib=SEED["full_gib"])[0]
    rows = []

    def check(way: str, *, b=bpw, L=max_seq_len, mode="fp16", res=reserve_gib):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl = plan(spec, gpu, bpw=b, max_seq_len=L, cache_mode=mode, reserve_gib=res)
            pr = SpillModel(gpu, reserve_gib=res, overhead_s_per_token=overhead_s_per_token).predict(
                spec, bpw=b, max_seq_len=L, cache_mode=mode, depth=min(depth, L - 1))
        rows.append({"way": way, "bpw": b, "max_seq_len": L, "cache_mode": mode, "reserve_gib": res,
                     "fits": pl.fits, "margin_gib": pl.margin_bytes / GIB, "spilled_gib": pr.spilled_gib,
                     "tok_s": pr.tok_s})
        return pl, pr

    def spills(b, L) -> bool:
        return SpillModel(gpu, reserve_gib=reserve_gib).predict(spec, bpw=b, max_seq_len=L).spilled_bytes > 0

    pl, _ = check("as reported (spills)")
    # the planner's longest context, then down in 1024-token steps until load_autosplit's load-time reserve fits too
    L = pl.longest_context["fp16"]
    while L > 1024 and spills(bpw, L):
        L -= 1024
    check("shorter max_seq_len", L=L)
    for mode in ("q8", "q6", "q4"):
        check(f"{mode.upper()} cache", mode=mode)
    if pl.max_bpw_that_fits is not None:
        b = pl.max_bpw_that_fits
        while b > 2.0 and spills(b, max_seq_len):
            b = round(b - 0.05, 2)
        check("lower bpw", b=b)
    check(f"Q4 cache, {desktop_extra_gib:g} GiB more reserve", mode="q4", res=reserve_gib + desktop_extra_gib)
    return rows


def format_rows(rows: list[dict]) -> str:
    """A text table of ``ways_out`` rows."""
    head = (f"{'way out':<32}{'bpw':>5}{'max_seq_len':>12}{'cache':>6}{'fits':>6}{'margin':>11}{'spilled':>11}"
            f"{'tok/s':>7}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['way']:<32}{r['bpw']:>5g}{r['max_seq_len']:>12,}{r['cache_mode']:>6}"
                     f"{'yes' if r['fits'] else 'NO':>6}{r['margin_gib']:>7.2f} GiB{r['spilled_gib']:>7.2f} GiB"
                     f"{r['tok_s']:>7.1f}")
    lines.append("fits/margin: memory.plan (what the GPU must hold); spilled/tok/s: the spill model (load order, "
                 "load_autosplit's load-time reserve included)")
    return "\n".join(lines)
