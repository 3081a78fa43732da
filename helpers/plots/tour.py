"""Figures for notebook 02: inside an EXL2 checkpoint, where its bytes go, what quantization costs."""
from __future__ import annotations

from helpers.core.units import GIB
from helpers.plots.style import figure

_KIND_MARKERS = {"q_proj": "o", "k_proj": "v", "v_proj": "^", "o_proj": "s", "gate_proj": "D", "up_proj": "P",
                 "down_proj": "X"}


def plot_layer_bpw(layers, title=None, ax=None):
    """Bits per weight of every quantized linear against its layer, one marker per kind, the head as a line.

    ``layers``: rows of ``Exl2Checkpoint.layer_table()`` (what ``python -m helpers inspect`` prints)."""
    fig, ax = figure(ax, (8, 4))
    kinds = {}
    for r in layers:
        kinds.setdefault(r["kind"], []).append(r)
    for i, (kind, rows) in enumerate(kinds.items()):
        if kind == "lm_head":
            ax.axhline(rows[0]["bpw"], color="k", linestyle="--", linewidth=1)
            ax.text(0, rows[0]["bpw"], f" lm_head {rows[0]['bpw']:.2f} bpw ({rows[0]['mix']})", va="bottom",
                    fontsize=7)
            continue
        ax.plot([r["layer"] for r in rows], [r["bpw"] for r in rows], linestyle="-", linewidth=0.6, alpha=0.8,
                marker=_KIND_MARKERS.get(kind, "."), markersize=4, color=f"C{i}", label=kind)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("bits per weight (codes + scales + metadata)")
    ax.set_title(title or "bits per weight of each quantized linear")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return fig


def plot_bytes_where(bb, title=None, ax=None):
    """Disk vs VRAM vs system RAM of a checkpoint (GiB), the VRAM bar stacked by what it holds. ``bb``: the totals of
    ``python -m helpers inspect --json`` (``exl2.inspect_summary``) or ``Exl2Checkpoint.byte_breakdown()``."""
    bb = bb.get("bytes", bb)
    fig, ax = figure(ax, (7, 4))
    ax.bar(["on disk"], [bb["disk_bytes"] / GIB], color="grey", label="*.safetensors")
    parts = [("q_weight", "q_weight (codes)"), ("q_scale", "q_scale"), ("q_meta", "groups map, perms, scale max"),
             ("norms", "norms"), ("bias", "biases"), ("fp16_head", "fp16 head (tied: embedding copy)"),
             ("other_fp16", "other fp16")]
    bottom = 0.0
    for j, (key, name) in enumerate(parts):
        v = bb["by_kind"].get(key, 0) / GIB
        if v:
            ax.bar(["in VRAM"], [v], bottom=[bottom], color=f"C{j}", label=name)
            bottom += v
    ax.bar(["in system RAM"], [bb["system_ram_bytes"] / GIB], color="C9", label="input embedding (fp16)")
    for x, v in enumerate((bb["disk_bytes"], bb["vram_bytes"], bb["system_ram_bytes"])):
        ax.text(x, v / GIB, f"{v / GIB:.3f} GiB", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("GiB (2^30 bytes)")
    ax.set_title(title or "where the checkpoint's bytes go when exllamav2 loads it")
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return fig


def plot_quantization_cost(rows, ax=None):
    """Perplexity against weight size: the float source and each EXL2 width (rows of ``quality.quality_sweep``)."""
    fig, ax = figure(ax, (7, 4))
    q = [r for r in rows if r.get("bits") is not None]
    f = [r for r in rows if r.get("bits") is None]
    ax.plot([r["weights_bytes"] / GIB for r in q], [r["perplexity"] for r in q], marker="o", color="C0", label="EXL2")
    for i, r in enumerate(q):     # labels alternate above and below: neighbours (6 and 8 bpw) nearly coincide
        ax.annotate(f"{r['bpw']:.2f} bpw", (r["weights_bytes"] / GIB, r["perplexity"]), textcoords="offset points",
                    xytext=(-10, 8) if i % 2 == 0 else (-10, -14), fontsize=7)
    for r in f:
        ax.scatter([r["weights_bytes"] / GIB], [r["perplexity"]], color="k", marker="*", s=80, zorder=3,
                   label="float source (float32 file)")
        ax.axhline(r["perplexity"], color="k", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xlabel("weights on disk (GiB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("what quantization costs: perplexity against size")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_agreement_steps(rows, title=None, ax=None):
    """Per greedy step: the logit difference between exllamav2 and the reference, and the reference's top-two gap.
    Where the gap falls below the difference, the engines may pick different tokens (a near-tie)."""
    fig, ax = figure(ax, (7, 3.5))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["max_abs_diff"] for r in rows], marker="o", label="max |logit difference|")
    ax.plot(steps, [r["reference_top2_gap"] for r in rows], marker="s", label="reference top-1 minus top-2")
    for r in rows:
        if not r["same"]:
            ax.axvline(r["step"], color="r", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xlabel("greedy step")
    ax.set_ylabel("logits")
    ax.set_title(title or "exllamav2 vs reference, step by step")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
