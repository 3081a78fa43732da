"""Figures for notebook 05's planner: bpw against the longest context (iso-VRAM), and the bytes on each device."""
from __future__ import annotations

from helpers.core.units import GIB
from helpers.format.bits import BPW_RANGE
from helpers.planning.planner import longest_for
from helpers.plots.style import CACHE_LINESTYLES, figure, pyplot


def plot_iso_vram(setup, cards_gib=(12, 16, 24), *, modes=("fp16", "q8", "q6", "q4"), bpws=None, ax=None,
                  title=None):
    """For the setup's model on cards of ``cards_gib`` GiB: the longest context (leaving load_autosplit's reserve
    free) against bpw, one line per cache mode. Each line is the edge of what fits: pick a bpw, read off the
    context, or the reverse."""
    plt = pyplot()
    lo, hi = BPW_RANGE
    bpws = list(bpws or [round(lo + 0.25 * i, 2) for i in range(int((hi - lo) / 0.25) + 1)])
    n = len(cards_gib)
    fig, axes = (ax.figure, [ax]) if ax is not None and n == 1 else plt.subplots(1, n, figsize=(4 * n, 3.8),
                                                                                  sharey=True, squeeze=False)
    axes = list(axes[0]) if not isinstance(axes, list) else axes
    shape = setup.shape
    for a, card in zip(axes, cards_gib):
        rows = [longest_for(setup.with_(gpus=(float(card),), bpw=b), modes) for b in bpws]
        for i, m in enumerate(modes):
            ys = [r[m] / 1024 for r in rows]
            a.plot(bpws, ys, linestyle=CACHE_LINESTYLES.get(m, "-"), color=f"C{i}", label=f"{m} cache")
        a.axhline(shape.max_position_embeddings / 1024, color="grey", linewidth=0.8)
        a.text(bpws[0], shape.max_position_embeddings / 1024, " trained length", fontsize=7, color="grey",
               va="bottom")
        a.set_title(f"{card:g} GiB card")
        a.set_xlabel("bits per weight")
        a.grid(True, alpha=0.3)
    axes[0].set_ylabel("longest context (k tokens)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title or f"{shape.name}: bpw against the longest context that fits (iso-VRAM)")
    fig.tight_layout()
    return fig


def plot_devices(multi, ax=None, title=None):
    """Stacked bars of a multi-GPU plan: weights, cache, scratch, the rest, per device, against each card's memory."""
    devs = list(multi.devices)
    fig, ax = figure(ax, (8, 1.6 + 0.7 * len(devs)))
    terms = [("weights", lambda d: d.weights_bytes), ("KV cache", lambda d: d.kv_cache_bytes + d.kv_temp_bytes),
             ("scratch + RoPE", lambda d: d.scratch_bytes + d.rope_bytes),
             ("transients, CUDA context, reserve", lambda d: d.transient_bytes + d.cuda_context_bytes
              + d.reserve_bytes if d.used else 0)]
    labels = [f"GPU {d.index}: {d.gpu['name']}" for d in devs]
    left = [0.0] * len(devs)
    for i, (name, fn) in enumerate(terms):
        vals = [fn(d) / GIB for d in devs]
        ax.barh(labels, vals, left=left, color=f"C{i}", label=name)
        left = [a + b for a, b in zip(left, vals)]
    for y, d in enumerate(devs):
        ax.plot([d.gpu["vram_bytes"] / GIB] * 2, [y - 0.4, y + 0.4], color="k", linewidth=2)
    ax.invert_yaxis()
    ax.set_xlabel("GiB (black tick: the card's memory)")
    ax.set_title(title or f"{multi.model}: what each device holds ({multi.split_mode})")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=4, frameon=False)
    fig.tight_layout()
    return fig


def plot_all_gpus(rows: list[dict], *, ax=None):
    """``planning.table.all_gpus`` as bars: each card's margin (GiB to spare, or short), the estimated tok/s at the
    rows' depth beside the cards where it fits."""
    rows = sorted(rows, key=lambda r: r["margin_bytes"])
    fig, ax = figure(ax, (8, 0.22 * len(rows) + 1.2))
    margins = [r["margin_bytes"] / GIB for r in rows]
    ax.barh([r["gpu"] for r in rows], margins, color=["#2a9d3a" if r["fits"] else "#d62728" for r in rows])
    for i, r in enumerate(rows):
        if r["fits"] and r.get("decode_estimate_tok_s"):
            ax.text(margins[i], i, f" {r['decode_estimate_tok_s']:.0f} tok/s", va="center", fontsize=7)
    ax.axvline(0, color="k", linewidth=0.8)
    r0 = rows[0]
    ax.set_xlabel("GiB to spare (green) or short (red)")
    ax.set_title(f"{r0['model']}, max_seq_len {r0['max_seq_len']:,}, {r0['cache_mode']} cache: every known card "
                 f"(tok/s estimated {r0['depth']:,} deep)", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig
