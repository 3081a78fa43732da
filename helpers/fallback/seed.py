"""The seed case as a test of rival explanations: Qwen2.5-14B EXL2 5.5 bpw on an RTX 4080 Super under Windows, 80
tok/s at a 4k cache and 25 tok/s at 32k (docs/FACTS.md §1).

Every prediction here comes from THE speed model (``helpers.speed.model.decode_estimate``), through the spill model
(``fallback.spill``) where something spilled: datasheet bandwidths, the speed model's overhead range, and the
placement assumption named (``fallback.placement``). Nothing is fitted to the reported speeds. ``hypotheses`` gives
one row per explanation: what must be true, what it predicts, and the observation on the user's machine that
confirms or rules it out. ``ways_out`` checks the fixes with the planner and the model.
"""
from __future__ import annotations

import textwrap
import warnings
from typing import Any, Callable, Sequence

from helpers.core.units import GIB
from helpers.fallback.pcie import pcie_practical_bandwidth, pcie_raw_bandwidth
from helpers.fallback.placement import PLACEMENTS
from helpers.fallback.spill import SpillModel
from helpers.memory.breakdown import breakdown
from helpers.memory.cache_modes import AUTOSPLIT_RESERVE_FIRST, LOAD_PATHS
from helpers.memory.setup import LoadSetup
from helpers.planning.planner import plan
from helpers.speed.model import Spill, decode_estimate, position_bytes
from helpers.speed.roofline import roofline_tok_s

#: what the user reported (docs/FACTS.md §1): Qwen2.5-14B-Instruct EXL2 5.5 bpw, ExLlamaV2, RTX 4080 Super, Windows
SEED = {"model": "qwen2.5-14b", "bpw": 5.5, "gpu": "RTX 4080 Super", "tok_s_4k": 80.0, "tok_s_32k": 25.0,
        "used_4k_gib": 12.0, "full_gib": 15.8, "source": "the user's report (docs/FACTS.md §1)",
        "url": "https://github.com/turboderp-org/exllamav2/issues/739",
        "title": "Only 25t/s at 4080s with 14B model 5.5bits",
        "command": "python examples/chat.py -m <Qwen2.5-14B-Instruct EXL2> -mode raw -pt -ncf -ngram",
        "setup": "Windows, torch 2.6.0+cu124, bartowski's Qwen2.5-14B-Instruct EXL2 (the body says 5.0 bit)",
        "reading": "no -l: the cache takes the model's full length (32,768); no cache flag: FP16; no -gs: "
                   "model.load() and then the cache; -ngram: n-gram speculative decoding; -pt: timings printed"}
#: the share of the datasheet bandwidth a good memory-bound kernel reaches: an ASSUMPTION (typical, not measured
#: here), used only to say how far 80 tok/s is from a realistic ceiling
REALISTIC_BANDWIDTH_SHARE = 0.85


#: the seed's desktop/OS reserve, from exllamav2's own sources and never from the user's readings: the VRAM
#: ``load_autosplit`` keeps back on the first GPU for what neither the model nor its cache accounts for when the caller
#: passes no ``reserve_vram`` (exllamav2 0.3.2 model.py ``load_autosplit_gen``: ``[192 MiB] + [64 MiB] * (n - 1)``;
#: docs/FACTS.md §2). Its 256 MiB ``minimum_reserve_vram`` is held only while loading: the spill model counts it apart.
SEED_RESERVE_GIB = AUTOSPLIT_RESERVE_FIRST / GIB
SEED_RESERVE_SOURCE = ("exllamav2's default reserve_vram on the first GPU (192 MiB, model.py load_autosplit_gen; "
                       "docs/FACTS.md §2), not the planner's 0.5 GiB default")


def readings_reserve_gib(setup: LoadSetup, *, used_gib: float, full_gib: float) -> tuple[float, str]:
    """What two readings of a real run imply the rest of the system held, to CHECK a reserve against (never an input
    of the seed's predictions): the card's dedicated memory left unused when the driver started spilling
    (``full_gib``), plus the reading of a run of ``setup`` that fits (``used_gib``) less what the planner puts in
    that run's process. Returns (GiB, how)."""
    g, max_seq_len = setup.gpu, setup.max_seq_len
    process = breakdown(setup.with_(reserve_gib=0.0), warn=False).vram_total_bytes / GIB
    unused = float(g["vram_gib"]) - full_gib
    others = used_gib - process
    how = (f"{g['vram_gib']:g} GiB card - {full_gib:g} GiB used when full = {unused:.2f} GiB never used; "
           f"{used_gib:g} GiB used at {max_seq_len} tokens - {process:.2f} GiB the planner puts in that process = "
           f"{others:.2f} GiB held by the rest of the system")
    res = unused + others
    if res < 0:
        return 0.0, how + f"; together {res:.2f} GiB, taken as 0"
    return res, how + f"; together {res:.2f} GiB"


def seed_setup(**changes) -> LoadSetup:
    """The seed's setup: Qwen2.5-14B at 5.5 bpw, a 32k FP16 cache, no flash-attn, on an RTX 4080 Super, with the
    desktop/OS reserve of ``SEED_RESERVE_GIB``; ``changes``: any of ``LoadSetup``'s settings."""
    s = SEED
    base = LoadSetup(s["model"], bpw=s["bpw"], max_seq_len=32768, gpus=s["gpu"])
    return base.with_(**{"reserve_gib": seed_reserve_gib(), **changes})


def seed_reserve_gib() -> float:
    """The seed's desktop/OS reserve: exllamav2's default ``reserve_vram`` on the first GPU (``SEED_RESERVE_GIB``)."""
    return SEED_RESERVE_GIB


def readings_check() -> dict:
    """The seed's reserve beside what the user's memory readings imply (``readings_reserve_gib`` of the 4k run):
    a check of the source-derived value, which the readings never set."""
    s = SEED
    four_k = LoadSetup(s["model"], bpw=s["bpw"], max_seq_len=4096, gpus=s["gpu"])
    implied, how = readings_reserve_gib(four_k, used_gib=s["used_4k_gib"], full_gib=s["full_gib"])
    return {"reserve_gib": SEED_RESERVE_GIB, "source": SEED_RESERVE_SOURCE, "implied_gib": implied, "how": how,
            "difference_gib": implied - SEED_RESERVE_GIB}


def roofline_check(depth: int = 256) -> dict:
    """How the reported 80 tok/s at 4k compares with what the card's memory allows: the bytes a token reads
    (every GPU weight, the FP16 cache up to ``depth``) over the datasheet bandwidth, and over an assumed realistic
    share of it (``REALISTIC_BANDWIDTH_SHARE``)."""
    s, setup = SEED, seed_setup()
    g = setup.gpu
    w = setup.weights.vram
    kv = position_bytes(setup.shape, "fp16", flash_attn=True).cache_read * depth
    bw = float(g["bandwidth_gbs"]) * 1e9
    roof = roofline_tok_s(w + kv, bw)
    real = REALISTIC_BANDWIDTH_SHARE * roof
    return {"weight_bytes": w, "kv_bytes": kv, "bytes_per_token": w + kv, "bandwidth": bw, "roofline_tok_s": roof,
            "reported_tok_s": s["tok_s_4k"], "reported_over_roofline": s["tok_s_4k"] / roof,
            "realistic_tok_s": real, "reported_over_realistic": s["tok_s_4k"] / real, "depth": depth}


def _model(flash_attn: bool = False, **kw) -> SpillModel:
    return SpillModel(seed_setup(flash_attn=flash_attn), **kw)


def seed_case(*, depth: int = 256, pcie_bandwidth: float | None = None, flash_attn: bool = False,
              load_path: str = "autosplit", placement: str = "first_come") -> dict:
    """The seed case told with the spill model: VRAM 736 GB/s (datasheet); PCIe 4.0 x16 23.9 GB/s in practice (31.5
    raw by the standard x the share the external H100 record measured, docs/FACTS.md §5); the speed model's fitted
    constants (NOT derived from the 80 tok/s, which is above what the memory allows: ``roofline_check``); the OS
    reserve, exllamav2's default ``reserve_vram`` (``SEED_RESERVE_GIB``); the load path (the report's chat.py without
    -gs: 'load'; other front ends: 'autosplit') and the placement, which the report does not give. Returns the
    predictions at 4k and 32k, the spill the reported 25 tok/s would need, and the ratio predicted/reported."""
    s = SEED
    m = _model(pcie_bandwidth=pcie_bandwidth, flash_attn=flash_attn, load_path=load_path, placement=placement)
    p4 = m.with_(max_seq_len=4096).predict(depth)
    p32 = m.predict(depth)
    need = m.spill_needed_for(s["tok_s_32k"], depth)
    ratio = p32.tok_s / s["tok_s_32k"]
    return {"seed": dict(s), "depth": depth, "load_path": load_path, "placement": placement,
            "vram_bandwidth": p32.vram_bandwidth, "pcie_bandwidth": p32.pcie_bandwidth,
            "reserve_gib": seed_reserve_gib(), "prediction_4k": p4, "prediction_32k": p32,
            "needed_for_reported": need, "predicted_over_reported": ratio, "within_20pct": abs(ratio - 1) <= 0.20}


def seed_variants(depth: int = 256) -> list[dict]:
    """The seed's 32k prediction for each load path and each placement, PCIe practical (23.9 GB/s) and raw
    (31.5 GB/s). None is fitted."""
    rows = []
    for path in LOAD_PATHS:
        for placement in PLACEMENTS:
            c = seed_case(depth=depth, load_path=path, placement=placement)
            raw = seed_case(depth=depth, load_path=path, placement=placement, pcie_bandwidth=pcie_raw_bandwidth(4, 16))
            p = c["prediction_32k"]
            rows.append({"load_path": path, "placement": placement, "spilled_gib": p.spilled_gib,
                         "spilled_weight_gb": p.spilled_weight_bytes / 1e9, "sysmem_read_gb": p.sysmem_read_bytes / 1e9,
                         "tok_s": p.tok_s, "tok_s_raw_pcie": raw["prediction_32k"].tok_s,
                         "vs_reported": p.tok_s / SEED["tok_s_32k"] - 1})
    return rows


def depth_at(tok_s_at: Callable[[int], float], target: float, max_depth: int = 32767) -> int | None:
    """The depth (0..``max_depth``) at which a speed that falls with depth, ``tok_s_at(depth)``, reaches ``target``:
    0 if it is already at or below it at depth 0, None if it stays above it to ``max_depth``. Bisection."""
    if tok_s_at(0) <= target:
        return 0
    if tok_s_at(max_depth) > target:
        return None
    lo, hi = 0, max_depth
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if tok_s_at(mid) > target else (lo, mid)
    return hi


def depth_for_speed(case: dict, tok_s: float) -> int | None:
    """The cache depth at which ``case``'s 32k prediction (``seed_case``) slows to ``tok_s`` (``depth_at``)."""
    p = case["prediction_32k"]
    return depth_at(lambda d: p.at_depth(d).tok_s, tok_s, p.max_seq_len - 1)


def _no_spill(depth: int, flash_attn: bool):
    return decode_estimate(seed_setup(flash_attn=flash_attn), depth)


def lm_head_only(depth: int, pcie_bandwidth: float | None = None):
    """Row (c')'s estimate: only the lm_head in system RAM, read over PCIe every token (flash-attn, FP16 cache) at
    ``depth``; ``pcie_bandwidth`` in bytes/s (default: the card's own link in practice,
    ``pcie_practical_bandwidth``)."""
    setup = seed_setup(flash_attn=True)
    g = setup.gpu
    pcie = pcie_bandwidth or pcie_practical_bandwidth(int(g["pcie_gen"]), int(g["pcie_lanes"]))
    return decode_estimate(setup, depth, spill=Spill(setup.weights.head, 0, pcie / 1e9))


def _span(fn: Callable[[int], Any]) -> dict:
    """Depth for the reported 25 tok/s: central, and the range's early and late ends."""
    t = SEED["tok_s_32k"]
    return {"depth_for_25": depth_at(lambda d: fn(d).tok_s, t),
            "depth_for_25_early": depth_at(lambda d: fn(d).tok_s_low, t),
            "depth_for_25_late": depth_at(lambda d: fn(d).tok_s_high, t)}


def hypotheses(depth: int = 256) -> list[dict]:
    """The rival explanations of the case, one row each: ``id``, ``hypothesis``, ``must_be_true``, the predicted
    tok/s at ``depth`` tokens deep (``tok_s``, likely range ``tok_s_low``..``tok_s_high``), the depth at which it
    gives the reported 25 tok/s (``depth_for_25``: 0 = slower from the first token, None = not within the 32k cache;
    with the range's ends), ``prediction`` (one line) and ``observation`` (what confirms or rules it out on the
    user's machine). Spill rows use flash-attn so that the spill alone is tested; depth rows spill nothing; (b+d)
    is both at once; (f) and (g) are about how the tok/s figure itself was counted."""
    s, rows = SEED, []

    def row(rid, hyp, must, fn, observation, prediction=None):
        e = fn(depth)
        r = {"id": rid, "hypothesis": hyp, "must_be_true": must, "depth": depth, "tok_s": e.tok_s,
             "tok_s_low": e.tok_s_low, "tok_s_high": e.tok_s_high, **_span(fn), "observation": observation}
        d = r["depth_for_25"]
        when = ("slower than 25 from the first token" if d == 0 else "never 25 within the 32k cache" if d is None
                else f"25 tok/s at ~{d:,} deep ({likely(r)})")
        r["prediction"] = prediction or f"{e.tok_s:.0f} tok/s at {depth} deep; {when}"
        rows.append(r)

    fns = _row_functions()
    a = fns["a"]
    gb = a(0).spilled_bytes / 1e9
    torch_attn = _model(placement="first_come").predict(depth)
    row("a", "load_autosplit spill, first-come placement",
        "load_autosplit(cache) (TabbyAPI, webui autosplit; NOT the seed's chat.py, which had no -gs); the driver "
        f"places each allocation when made: the last layers and the lm_head ({a(0).spilled_weight_bytes / 1e9:.2f} "
        "GB of weights) in system RAM",
        a, f"Task Manager 'Shared GPU memory' ~{gb:.1f}-{torch_attn.spilled_bytes / 1e9:.1f} GB while decoding; slow "
           "already at a short prompt; with 'Prefer No Sysmem Fallback' the load fails ('Insufficient VRAM')",
        prediction=f"{a(depth).tok_s:.0f} tok/s at {depth} deep ({torch_attn.tok_s:.0f} without flash-attn); slower "
                   "than 25 from the first token")
    b = fns["b"]
    row("b", "model.load() then the cache: the last cache layers spill",
        "the seed's own load path: chat.py without -gs calls model.load(), then creates the cache; first-come "
        f"placement: {b(0).spilled_cache_layers} cache layers in system RAM, read over PCIe up to the depth",
        b, f"'Shared GPU memory' ~{b(0).spilled_bytes / 1e9:.1f} GB; fast at a short prompt, slowing with depth; "
           "the same depth with a cache that fits is fast again")
    row("c", "only untouched buffers in system RAM (placement at first touch)",
        f"the driver keeps in VRAM what decoding touches: the dequant scratch and the prompt's transients "
        f"({fns['c'](0).spilled_bytes / 1e9:.1f} GB) go to system RAM, no weight or cache layer does",
        fns["c"], "'Shared GPU memory' > 0 but the speed is that of a cache that fits: the spill explains nothing; "
                  "`python -m helpers probe --fallback` reports the placement this driver follows")
    row("c'", "only the lm_head in system RAM",
        "the lm_head (read in full every token) is the one weight over PCIe: a smaller overflow, or a driver that "
        "demoted it", fns["c'"],
        "'Shared GPU memory' ~0.6 GB; slow already at a short prompt, nearly flat with depth (flash-attn); a cache "
        "that fits restores the full speed")
    row("d", "no spill: depth without flash-attn",
        "flash-attn absent (no official Windows wheel; exllamav2 falls back to torch attention with repeat_kv, "
        f"{position_bytes(s['model'], 'fp16', False).total / 1e6:.2f} MB per position per token); the 25 tok/s read "
        "that deep into the conversation", fns["d"],
        "`import flash_attn` fails in that Python; chat.py -pt prints 'Context: N tokens' beside the speed: N is "
        "in the range of depths here; the same depth with a cache that fits is just as slow")
    row("e", "no spill: depth with flash-attn",
        f"flash-attn installed ({position_bytes(s['model'], 'fp16', True).total / 1e6:.2f} MB per position per "
        "token); the 25 tok/s read deep in the conversation", fns["e"],
        "`import flash_attn` works; on its own it cannot reach 25 tok/s within the 32k cache")
    row("b+d", "both: model.load() spill and no flash-attn",
        "the command line's load path and a Windows Python without flash-attn, at once: the spilled cache layers "
        "cross PCIe and every position pays the repeat_kv copy", fns["b+d"],
        "'Shared GPU memory' ~1-2 GB and `import flash_attn` fails; slower than (d) at the same depth")
    rc = roofline_check(depth)
    clean4k = fns["d"](depth)
    ratio = s["tok_s_4k"] / clean4k.tok_s
    rows.append({"id": "f", "hypothesis": "speculative decoding: the -ngram flag counts accepted tokens",
                 "must_be_true": "chat.py -ngram drafts tokens from n-grams already in the context and keeps those the "
                                 "model agrees with, several per forward pass; its tok/s counts kept tokens",
                 "depth": depth, "tok_s": clean4k.tok_s, "tok_s_low": clean4k.tok_s_low,
                 "tok_s_high": clean4k.tok_s_high, "depth_for_25": None, "depth_for_25_early": None,
                 "depth_for_25_late": None, "tokens_per_forward_for_80": ratio,
                 "prediction": f"a clean decode at 4k, {depth} deep, without flash-attn: {clean4k.short()}, at most "
                               f"{rc['roofline_tok_s']:.0f} (roofline); 80 needs ~{ratio:.1f} kept tokens per forward "
                               f"pass; the same gain makes the 25 a clean ~{25 / ratio:.0f} tok/s",
                 "observation": "chat.py -pt prints 'SD eff.' and 'SD acc.' beside the speed; rerun without -ngram: "
                                "both figures fall, the 4k one below the roofline"})
    rows.append({"id": "g", "hypothesis": "prompt processing folded into the tok/s counter",
                 "must_be_true": "the counter divides the reply's tokens by a time that includes the prompt's prefill",
                 "depth": depth, "tok_s": clean4k.tok_s, "tok_s_low": clean4k.tok_s_low,
                 "tok_s_high": clean4k.tok_s_high, "depth_for_25": None, "depth_for_25_early": None,
                 "depth_for_25_late": None,
                 "prediction": "ruled out for chat.py: it starts its timer after begin_stream_ex, which runs the "
                               "prefill (examples/chat.py, exllamav2 0.3.2); other front ends may differ",
                 "observation": "none needed for chat.py; for another front end, its tok/s against a long and a "
                                "short reply to the same prompt"})
    return rows


def likely(r: dict) -> str:
    """"likely 1,531-5,803": where the printed range's slow and fast ends reach the reported 25 tok/s."""
    lo, hi = r["depth_for_25_early"], r["depth_for_25_late"]
    def f(d):
        return "0" if d == 0 else "beyond 32k" if d is None else f"{d:,}"

    return f"likely {f(lo)}-{f(hi)}"


def reaches_25(r: dict) -> str:
    """Where a row of ``hypotheses`` gives the reported 25 tok/s, in words: '~3,051 deep (likely 1,531-5,803)',
    'from the first token', 'not within 32k', or '-' for the rows about how the figure was counted ((f), (g))."""
    if r["id"] in ("f", "g"):
        return "-"
    d = r["depth_for_25"]
    return "from the first token" if d == 0 else "not within 32k" if d is None else f"~{d:,} deep ({likely(r)})"


def hypothesis_summary(rows: Sequence[dict]) -> list[dict]:
    """One short row per row of ``hypotheses``, for a table (``core.tables.table``): the id, the explanation, its
    tok/s at the rows' depth with the likely range, and where it reaches the reported 25 tok/s."""
    return [{"id": r["id"], "hypothesis": r["hypothesis"],
             f"tok/s at {r['depth']}": f"{r['tok_s']:.0f} ({r['tok_s_low']:.0f}-{r['tok_s_high']:.0f})",
             "25 tok/s": reaches_25(r)} for r in rows]


#: ``ways_out`` rows as a table (``core.tables.table(rows, WAYS_OUT_COLUMNS)``): key -> heading
WAYS_OUT_COLUMNS = {"way": "way out", "bpw": "bpw", "max_seq_len": "max_seq_len", "cache_mode": "cache",
                    "reserve_gib": "reserve GiB", "verdict": "fits", "margin_gib": "margin GiB",
                    "spilled_gib": "spilled GiB", "tok_s": "tok/s"}


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, int]]) -> str:
    """A text table of ``rows``: ``columns`` are (key, heading, width); long cells wrap within their width."""
    def cells(r):
        return [textwrap.wrap(str(r.get(k, "")), w) or [""] for k, _, w in columns]

    head = " | ".join(f"{h:<{w}}" for _, h, w in columns)
    lines = [head, "-+-".join("-" * w for _, _, w in columns)]
    for r in rows:
        cs = cells(r)
        for i in range(max(len(c) for c in cs)):
            lines.append(" | ".join(f"{(c[i] if i < len(c) else ''):<{w}}" for c, (_, _, w) in zip(cs, columns)))
        lines.append("-+-".join("-" * w for _, _, w in columns))
    return "\n".join(x.rstrip() for x in lines)


HYPOTHESIS_COLUMNS = (("id", "", 2), ("hypothesis", "hypothesis", 22), ("must_be_true", "what must be true", 30),
                      ("prediction", "predicted (speed model)", 24), ("observation", "observation that decides", 32))


def depth_curves(depths: Sequence[int] | None = None) -> dict:
    """Predicted decode tok/s against depth for the rows of ``hypotheses`` that vary with it (a ... b+d)."""
    depths = list(depths) if depths is not None else list(range(0, 32768, 512)) + [32767]
    out = {}
    fns = _row_functions()
    for r in hypotheses(0):
        if r["id"] in fns:
            out[r["id"]] = {"label": r["hypothesis"], "depths": depths, "depth_for_25": r["depth_for_25"],
                            "tok_s": [fns[r["id"]](d).tok_s for d in depths]}
    return out


#: whether each speed row of ``hypotheses`` assumes flash-attn installed (spill rows: so that the spill alone counts)
_FLASH = {"a": True, "b": True, "c": True, "c'": True, "d": False, "e": True, "b+d": False}


def judge(readings: dict) -> list[dict]:
    """Which rival explanation survives a set of readings: ``{"shared_gpu_memory_gb": GB, "flash_attn": bool,
    "tok_s": {depth: tok/s}}``. A row stands when it assumes the attention path read, spills exactly when Task
    Manager's Shared GPU memory reads more than 0.1 GB, and every tok/s read lies in its likely range at that depth.
    One dict per speed row of ``hypotheses``: id, hypothesis, stands, reason."""
    fns, out = _row_functions(), []
    names = {r["id"]: r["hypothesis"] for r in hypotheses(0)}
    shared = float(readings["shared_gpu_memory_gb"])
    for rid, fn in fns.items():
        why = []
        if _FLASH[rid] != bool(readings["flash_attn"]):
            why.append(f"it needs flash-attn {'installed' if _FLASH[rid] else 'absent'}")
        if (rid not in ("d", "e")) != (shared > 0.1):
            why.append(f"nothing spills in it, yet Shared GPU memory reads {shared:g} GB" if shared > 0.1
                       else "it spills, yet Shared GPU memory reads ~0")
        for depth, tok_s in sorted(readings["tok_s"].items()):
            e = fn(int(depth))
            if not e.tok_s_low <= tok_s <= e.tok_s_high:
                why.append(f"it gives {e.tok_s_low:.0f}-{e.tok_s_high:.0f} tok/s at {int(depth):,} deep, not {tok_s:g}")
        out.append({"id": rid, "hypothesis": names[rid], "stands": not why,
                    "reason": "; ".join(why) or "every reading lies in what it predicts"})
    return out


def _row_functions() -> dict:
    def spill(path, placement, flash_attn=True):
        p = _model(load_path=path, placement=placement, flash_attn=flash_attn).predict(0)
        return lambda d: p.at_depth(min(d, 32767))

    return {"a": spill("autosplit", "first_come"), "b": spill("load", "first_come"),
            "c": spill("autosplit", "first_touch"), "c'": lm_head_only,
            "d": lambda d: _no_spill(d, False), "e": lambda d: _no_spill(d, True),
            "b+d": spill("load", "first_come", flash_attn=False)}


def ways_out(setup: LoadSetup | None = None, *, depth: int = 256, desktop_extra_gib: float = 1.0) -> list[dict]:
    """The ways out of a spill, each checked with the planner (``planning.plan``: fits, margin) and the spill model
    (what would spill, with load_autosplit's load-time reserve, first-come placement, and the predicted tok/s at
    ``depth`` from the speed model). Default: the seed's setup, its reserve exllamav2's default ``reserve_vram``."""
    setup = setup or seed_setup()
    reserve = setup.reserve_gib_of(0) or 0.0
    rows = []

    def check(way: str, **change):
        s = setup.with_(**change)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl = plan(s, min(depth, s.max_seq_len - 1))
            pr = SpillModel(s).predict(min(depth, s.max_seq_len - 1))
        # "tight": fits once loaded, but load_autosplit's load-time reserve pushes something into system RAM
        verdict = "NO" if not pl.fits else ("tight" if pr.spilled_bytes else "yes")
        rows.append({"way": way, "bpw": s.bpw, "max_seq_len": s.max_seq_len, "cache_mode": s.cache_mode,
                     "reserve_gib": s.reserve_gib_of(0), "fits": pl.fits, "verdict": verdict,
                     "margin_gib": pl.margin_bytes / GIB, "spilled_gib": pr.spilled_gib, "tok_s": pr.tok_s})
        return pl, pr

    def spills(**change) -> bool:
        return SpillModel(setup.with_(**change)).predict().spilled_bytes > 0

    pl, _ = check("as reported (spills)")
    # the planner's longest context, then down in 1024-token steps until load_autosplit's load-time reserve fits too
    max_seq_len = pl.longest_context[setup.cache_mode]
    while max_seq_len > 1024 and spills(max_seq_len=max_seq_len):
        max_seq_len -= 1024
    check("shorter max_seq_len", max_seq_len=min(max_seq_len, setup.max_seq_len))
    for mode in ("q8", "q6", "q4"):
        check(f"{mode.upper()} cache", cache_mode=mode)
    if pl.max_bpw_that_fits is not None:
        b = pl.max_bpw_that_fits
        while b > 2.0 and spills(bpw=b):
            b = round(b - 0.05, 2)
        check("lower bpw", bpw=b)
    check(f"Q8 cache, {desktop_extra_gib:g} GiB more reserve", cache_mode="q8", reserve_gib=reserve + desktop_extra_gib)
    return rows


def format_rows(rows: list[dict], depth: int | None = None) -> str:
    """A text table of ``ways_out`` rows."""
    head = (f"{'way out':<32}{'bpw':>5}{'max_seq_len':>12}{'cache':>6}{'fits':>6}{'margin':>11}{'spilled':>11}"
            f"{'tok/s':>7}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['way']:<32}{r['bpw']:>5g}{r['max_seq_len']:>12,}{r['cache_mode']:>6}"
                     f"{r['verdict']:>6}{r['margin_gib']:>7.2f} GiB{r['spilled_gib']:>7.2f} GiB"
                     f"{r['tok_s']:>7.1f}")
    res = sorted({round(r["reserve_gib"], 2) for r in rows if r.get("reserve_gib") is not None})
    if res:
        more = f" ({', '.join(f'{x:.2f}' for x in res[1:])} GiB in the row that adds reserve)" if res[1:] else ""
        lines.append(f"desktop/OS reserve: {res[0]:.2f} GiB{more}, {SEED_RESERVE_SOURCE}: the planner alone gives "
                     "slightly shorter contexts and lower bpw (notebook 05)")
    lines.append("fits/margin: planning.plan (what the GPU must hold once loaded; 'tight': it fits then, but "
                 "load_autosplit's load-time reserve spills something); spilled: the spill model (load order, "
                 "load_autosplit's reserve, first-come placement); tok/s: the speed model"
                 + (f" at {depth:,} deep" if depth is not None else "") + " (estimate)")
    return "\n".join(lines)


__all__ = ["SEED", "SEED_RESERVE_GIB", "SEED_RESERVE_SOURCE", "readings_reserve_gib", "readings_check",
           "seed_reserve_gib", "roofline_check", "seed_case", "seed_variants", "lm_head_only", "depth_at",
           "depth_for_speed", "hypotheses", "likely", "format_table", "HYPOTHESIS_COLUMNS", "depth_curves", "ways_out",
           "format_rows", "reaches_25", "hypothesis_summary", "WAYS_OUT_COLUMNS"]
