"""Figures for notebooks 01 and 05: the KV cache against context, the memory breakdown and the planner."""

import warnings

from helpers.core.units import GIB, gib
from helpers.memory.breakdown import breakdown
from helpers.memory.kv_cache import kv_cache_bytes
from helpers.plots.style import CACHE_LINESTYLES, figure
from helpers.specs.shapes import model_shape


def _label_line_ends(ax, items, x_end, min_gap=None):
    """Write each line's label at its right end, nudging labels apart vertically so none overlaps another.
    ``items``: [(y at the end, label, color)]."""
    items = sorted(items)
    lo, hi = ax.get_ylim()
    gap = min_gap if min_gap is not None else (hi - lo) * 0.045
    placed = []
    for y, text, color in items:
        y_text = max(y, placed[-1] + gap) if placed else y
        placed.append(y_text)
        ax.annotate(text, (x_end, y), xytext=(x_end * 1.02, y_text), fontsize=7, color=color, va="center",
                    annotation_clip=False, arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5})


def plot_kv_cache_vs_context(models, modes=("fp16", "q8", "q4"), lengths=None, ax=None):
    """KV cache (GiB) against max_seq_len for several models and cache modes, as exllamav2 allocates it.

    Both axes are linear, so each line is straight through the origin, its slope the bytes per token; each line is
    labelled at its right end with that slope (labels nudged apart where two lines nearly coincide)."""
    lengths = list(lengths or [1024 * k for k in range(0, 33)])
    fig, ax = figure(ax, (8, 4.5))
    ends = []
    for i, name in enumerate(models):
        shape = model_shape(name)
        for mode in modes:
            y = [gib(kv_cache_bytes(shape, n, mode)) if n else 0.0 for n in lengths]
            ax.plot(lengths, y, linestyle=CACHE_LINESTYLES.get(mode, "-"), color=f"C{i}", linewidth=1.6,
                    label=f"{shape.name} {mode}")
            per_token = kv_cache_bytes(shape, lengths[-1], mode) / lengths[-1]
            ends.append((y[-1], f"{shape.name} {mode}: {per_token / 1024:.0f} KiB/token", f"C{i}"))
    ax.set_xlim(0, lengths[-1])
    ax.set_ylim(bottom=0)
    _label_line_ends(ax, ends, lengths[-1])
    ax.set_xlabel("max_seq_len (tokens)")
    ax.set_ylabel("KV cache (GiB)")
    ax.set_title("KV cache against context: linear, slope = bytes per token (allocated in full at load)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def plot_total_vs_context(setup, *, modes=("fp16", "q8", "q6", "q4"), lengths=None, ax=None):
    """Everything the GPU must hold against max_seq_len, one line per cache mode, with the card's memory.

    The lines bend once, at 2,048 tokens by default: below it the attention matrix exllamav2 budgets for grows with
    max_seq_len^2 (scratch.py, ``min(max_attention_size, max_seq_len^2)``) and the prompt chunk with max_seq_len; above
    it both are capped and only the cache keeps growing. The bend is marked and labelled."""
    g = setup.gpu
    lengths = list(lengths or [1024 * k for k in range(1, 65)])
    fig, ax = figure(ax, (8, 4.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, mode in enumerate(modes):
            y = [gib(breakdown(setup.with_(max_seq_len=n, cache_mode=mode)).vram_total_bytes) for n in lengths]
            ax.plot(lengths, y, color=f"C{i}", label=f"{mode} cache")
        shape = setup.shape
    ax.axhline(g["vram_gib"], color="k", linewidth=1)
    ax.text(lengths[0], g["vram_gib"], f" {g['name']}: {g['vram_gib']:g} GiB", va="bottom", fontsize=8)
    # the bend: the attention matrix exllamav2 budgets for grows as max_seq_len^2 up to max_attention_size
    # (2048^2 by default) and the prompt chunk as max_seq_len up to max_input_len (2048); past that both stay flat
    knee = min(int(setup.max_attention_size ** 0.5), setup.max_input_len)
    if lengths[0] < knee < lengths[-1]:
        ax.axvline(knee, color="grey", linestyle="--", linewidth=0.8)
        ax.text(knee, 0.72, f" bend at {knee:,} tokens: the attention scratch\n stops growing (max_attention_size "
                f"= {knee}^2,\n max_input_len = {knee:,}); only the cache grows on", fontsize=7, color="grey",
                transform=ax.get_xaxis_transform())
    if shape.max_position_embeddings <= lengths[-1]:
        ax.axvline(shape.max_position_embeddings, color="grey", linestyle=":", linewidth=1)
        ax.text(shape.max_position_embeddings, ax.get_ylim()[0], " trained length", rotation=90, fontsize=7,
                va="bottom", color="grey")
    ax.set_xlabel("max_seq_len (tokens)")
    ax.set_ylabel("GPU memory needed (GiB)")
    ax.set_title(f"{shape.name}" + (f" at {setup.bpw:g} bpw" if setup.bpw else "") + ": what fits")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_breakdown(breakdowns, gpu_gib=None, ax=None, title=None):
    """Stacked bars, one per labelled Breakdown ({label: Breakdown}): where every GiB goes."""
    fig, ax = figure(ax, (8, 4.5))
    labels = list(breakdowns)
    terms = [t[0] for t in next(iter(breakdowns.values())).terms()]
    terms = [t.split(",")[0] for t in terms]  # "KV cache, 48 layers x 4,096 tokens" -> "KV cache"
    bottoms = [0.0] * len(labels)
    for j, term in enumerate(terms):
        vals = [breakdowns[k].terms()[j][1] / GIB for k in labels]
        ax.bar(labels, vals, bottom=bottoms, color=f"C{j % 10}", label=term)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    if gpu_gib:
        ax.axhline(gpu_gib, color="k", linewidth=1)
        ax.text(-0.4, gpu_gib, f"{gpu_gib:g} GiB card", va="bottom", fontsize=8)
    ax.set_ylabel("GiB")
    ax.set_title(title or "where every GiB goes, " + " vs ".join(labels))
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return fig


def plot_calculator_error(rows, ax=None, title=None):
    """Popular formula vs exllamav2's accounting: rows of {'case', 'exllamav2_gib', 'simple_gib'}."""
    fig, ax = figure(ax, (8, 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["exllamav2_gib"] for r in rows], width=0.4, label="exllamav2 (this course)")
    ax.bar([i + 0.2 for i in x], [r["simple_gib"] for r in rows], width=0.4, label="simple calculator")
    ax.set_xticks(list(x))
    ax.set_xticklabels([r["case"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("GiB")
    ax.set_title(title or "exllamav2's accounting vs a simple calculator")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_predicted_vs_measured(rows, ax=None, title=None, external=None):
    """Recorded predicted vs measured (torch allocated) GiB, one point per configuration, with the 2% band.
    ``external``: points of ``helpers.memory.recorded.external_points`` (measured outside the course), drawn hollow
    and labelled external."""
    fig, ax = figure(ax, (5, 5))
    pts = [(r["predicted_torch_bytes"] / GIB, r["torch_allocated_no_cublas_bytes"] / GIB, r)
           for r in rows if "torch_allocated_no_cublas_bytes" in r]
    ext = [(p["predicted_gib"], p["measured_gib"], p) for p in external or []]
    if not pts and not ext:
        ax.text(0.5, 0.5, "not recorded yet", ha="center")
        ax.set_title(title or "predicted vs measured (recorded)")
        return fig
    lo = min(min(p, q) for p, q, _ in pts + ext) / 1.1
    hi = max(max(p, q) for p, q, _ in pts + ext) * 1.1
    ax.plot([lo, hi], [lo, hi], color="k", linewidth=1)
    ax.fill_between([lo, hi], [lo * 0.98, hi * 0.98], [lo * 1.02, hi * 1.02], color="grey", alpha=0.2,
                    label="within 2%")
    for i, (p, q, _) in enumerate(pts):
        ax.scatter([p], [q], s=15, label="recorded by the course" if i == 0 else None)
    for p, q, e in ext:
        where = e["provenance"].get("gpu") or "?"
        ax.scatter([p], [q], s=40, marker="D", facecolors="none", edgecolors="C3",
                   label=f"external ({where}): {q / p:.3f} x predicted")
    if hi / lo > 3:  # configurations of very different sizes; a close-up of a few similar ones stays linear
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("predicted (GiB)")
    ax.set_ylabel("torch allocated (GiB)")
    ax.set_title(title or ("predicted vs measured (recorded)" if pts else "predicted vs measured: external only, "
                           "the course's own not recorded yet"), fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig
