"""Which cards fit? One model, bpw, context and cache mode planned on every known GPU (``specs.gpus.GPUS``)."""
from __future__ import annotations

import json
import warnings

from helpers.core.units import GIB
from helpers.memory.cache_modes import CACHE_MODES
from helpers.memory.limits import PAGE
from helpers.memory.setup import LoadSetup
from helpers.planning.planner import SCHEMA_ID, SCHEMA_VERSION, plan
from helpers.specs.gpus import GPUS

#: the cache modes the table shows a longest context for (FP8 is left out: the dynamic generator rejects it)
TABLE_MODES = tuple(m for m in CACHE_MODES if m != "fp8")


def all_gpus(setup: LoadSetup, depth: int | None = None, gpus: list[str] | None = None) -> list[dict]:
    """One row per known GPU (or per name in ``gpus``) for the setup: fits, margin, the longest context per cache
    mode that leaves load_autosplit's load-time reserve free, and the estimated decode tok/s at ``depth`` (default: a
    full cache)."""
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same context warning for every card: the caller sees it once
        for name in gpus or list(GPUS):
            p = plan(setup.with_(gpus=(name,)), depth)
            rows.append({"gpu": name, "vram_gib": float(p.gpu["vram_gib"]), "bandwidth_gbs": p.gpu["bandwidth_gbs"],
                         "fits": p.fits, "margin_bytes": p.margin_bytes,
                         "reserve_bytes": p.breakdown.reserve_bytes,
                         "longest_safe_context": {m: p.longest_safe_context[m] for m in TABLE_MODES},
                         "trained_positions": p.trained_positions, "host": p.decode.terms.host if p.decode else None,
                         "decode_estimate_tok_s": None if p.decode is None else p.decode.tok_s,
                         "decode_estimate_range_tok_s": None if p.decode is None else [p.decode.tok_s_low,
                                                                                        p.decode.tok_s_high],
                         "depth": p.depth, "model": p.model, "cache_mode": p.breakdown.cache_mode,
                         "max_seq_len": p.breakdown.max_seq_len})
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as text: one line per GPU."""
    if not rows:
        return "no GPUs"
    r0 = rows[0]
    cap = r0["trained_positions"] // PAGE * PAGE if r0.get("trained_positions") else None
    head = (f"{r0['model']}, max_seq_len {r0['max_seq_len']:,}, {r0['cache_mode']} cache; decode estimate at depth "
            f"{r0['depth']:,}, tok/s (likely range), only where it fits (a spill is slower, notebook 04); longest "
            "context leaving load_autosplit's reserve free, in tokens"
            + (f" ('{cap:,}+': memory allows more, but the model was trained for {cap:,} positions)" if cap else ""))
    cols = (f"{'GPU':<18}{'GiB':>5}  {'verdict':<20}" + "".join(f"{m:>11}" for m in TABLE_MODES)
            + f"  {'tok/s est.':<16}")
    lines = [head, cols]

    def tokens(n):
        return f"{cap:,}+" if cap and n > cap else f"{n:,}"

    for r in rows:
        m = r["margin_bytes"] / GIB
        verdict = f"fits (+{m:.2f} GiB)" if r["fits"] else f"no ({m:.2f} GiB)"
        e, rng = r["decode_estimate_tok_s"], r.get("decode_estimate_range_tok_s")
        speed = f"{e:.0f} ({rng[0]:.0f}-{rng[1]:.0f})" if e and r["fits"] else "-"
        lines.append(f"{r['gpu']:<18}{r['vram_gib']:>5g}  {verdict:<20}"
                     + "".join(f"{tokens(r['longest_safe_context'][k]):>11}" for k in TABLE_MODES) + f"  {speed:<16}")
    return "\n".join(x.rstrip() for x in lines)


def table_json(rows: list[dict]) -> str:
    return json.dumps({"$schema": SCHEMA_ID, "schema_version": SCHEMA_VERSION, "kind": "all_gpus",
                       "units": "bytes (GiB = 2**30 bytes); speeds in tok/s", "rows": rows}, indent=1)
