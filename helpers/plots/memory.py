"""Figures for notebooks 01 and 05: the KV cache against context, the memory breakdown and the planner."""

import warnings

from helpers.core.units import GIB, gib
from helpers.memory.breakdown import breakdown
from helpers.memory.kv_cache import kv_cache_bytes
from helpers.plots.style import pyplot as _plt
from helpers.specs.gpus import gpu_spec
from helpers.specs.shapes import model_shape


def plot_kv_cache_vs_context(models, modes=("fp16", "q8", "q4"), lengths=None, ax=None):
    """KV cache (GiB) against max_seq_len for several models and cache modes, as exllamav2 allocates it."""

    plt = _plt()
    lengths = list(lengths or [2**k for k in range(10, 18)])
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 4.5))
    styles = {"fp16": "-", "fp8": (0, (1, 1)), "q8": "--", "q6": "-.", "q4": ":"}
    for i, name in enumerate(models):
        shape = model_shape(name)
        for mode in modes:
            y = [gib(kv_cache_bytes(shape, n, mode)) for n in lengths]
            ax.plot(lengths, y, linestyle=styles.get(mode, "-"), color=f"C{i}", marker="o", markersize=3,
                    label=f"{shape.name} {mode}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("max_seq_len (tokens)")
    ax.set_ylabel("KV cache (GiB)")
    ax.set_title("exllamav2 allocates the whole cache up front")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_total_vs_context(spec, gpu, *, bpw=None, modes=("fp16", "q8", "q6", "q4"), lengths=None, ax=None,
                          **plan_kw):
    """Everything the GPU must hold against max_seq_len, one line per cache mode, with the card's memory."""


    plt = _plt()
    g = gpu_spec(gpu)
    lengths = list(lengths or [1024 * k for k in range(1, 65)])
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 4.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, mode in enumerate(modes):
            y = [gib(breakdown(spec, bpw=bpw, max_seq_len=n, cache_mode=mode, **plan_kw)
                     .vram_total_bytes) for n in lengths]
            ax.plot(lengths, y, color=f"C{i}", label=f"{mode} cache")
        shape = model_shape(spec)
    ax.axhline(g["vram_gib"], color="k", linewidth=1)
    ax.text(lengths[0], g["vram_gib"], f" {g['name']}: {g['vram_gib']:g} GiB", va="bottom", fontsize=8)
    if shape.max_position_embeddings <= lengths[-1]:
        ax.axvline(shape.max_position_embeddings, color="grey", linestyle=":", linewidth=1)
        ax.text(shape.max_position_embeddings, ax.get_ylim()[0], " trained length", rotation=90, fontsize=7,
                va="bottom", color="grey")
    ax.set_xlabel("max_seq_len (tokens)")
    ax.set_ylabel("GPU memory needed (GiB)")
    ax.set_title(f"{shape.name}" + (f" at {bpw:g} bpw" if bpw else "") + ": what fits")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_breakdown(breakdowns, gpu_gib=None, ax=None):
    """Stacked bars, one per labelled Breakdown ({label: Breakdown}): where every GiB goes."""
    plt = _plt()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 4.5))
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
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    return fig


def plot_calculator_error(rows, ax=None):
    """Popular formula vs exllamav2's accounting: rows of {'case', 'exllamav2_gib', 'simple_gib'}."""
    plt = _plt()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["exllamav2_gib"] for r in rows], width=0.4, label="exllamav2 (this course)")
    ax.bar([i + 0.2 for i in x], [r["simple_gib"] for r in rows], width=0.4, label="simple calculator")
    ax.set_xticks(list(x))
    ax.set_xticklabels([r["case"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("GiB")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_predicted_vs_measured(rows, ax=None):
    """Recorded predicted vs measured (torch allocated) GiB, one point per configuration, with the 2% band."""
    plt = _plt()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 5))
    pts = [(r["predicted_torch_bytes"] / GIB, r["torch_allocated_no_cublas_bytes"] / GIB, r)
           for r in rows if "torch_allocated_no_cublas_bytes" in r]
    if not pts:
        ax.text(0.5, 0.5, "not recorded yet", ha="center")
        return fig
    hi = max(max(p, q) for p, q, _ in pts) * 1.1
    ax.plot([0, hi], [0, hi], color="k", linewidth=1)
    ax.fill_between([0, hi], [0, hi * 0.98], [0, hi * 1.02], color="grey", alpha=0.2, label="within 2%")
    for p, q, _ in pts:
        ax.scatter([p], [q], s=15)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("predicted (GiB)")
    ax.set_ylabel("torch allocated (GiB)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
