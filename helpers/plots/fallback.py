"""Figures for notebook 04: the Windows sysmem fallback, its spill model and the Linux emulator."""
from __future__ import annotations

from helpers.core.units import GIB
from helpers.memory.cache_modes import LOAD_PATHS
from helpers.plots.style import pyplot as _plt


def plot_spill_walk(prediction, ax=None, title=None):
    """exllamav2's load order walked against the VRAM budget: cumulative GiB per module, coloured by where it went."""
    plt = _plt()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 3.8))
    colours = {"vram": "C0", "sysmem": "C3", "cpu": "0.7"}
    total = prediction.fixed_bytes
    xs, bottoms, heights, cols = [], [], [], []
    for i, p in enumerate(prediction.placement):
        if p["where"] == "cpu":
            continue
        size = p["weight_bytes"] + p["cache_bytes"] + int(p.get("scratch_bytes", 0) or 0)
        xs.append(i)
        bottoms.append(total / GIB)
        heights.append(size / GIB)
        cols.append(colours[p["where"]])
        total += size
    ax.bar(xs, heights, bottom=bottoms, color=cols, width=1.0, linewidth=0)
    ax.axhline(prediction.budget_bytes / GIB, color="k", linestyle="--", linewidth=1)
    ax.text(0, prediction.budget_bytes / GIB, " VRAM budget (card - OS reserve)", va="bottom", fontsize=8)
    ax.axhspan(0, prediction.fixed_bytes / GIB, color="0.85", zorder=0)
    cache_after = any(p.get("kind") == "cache" for p in prediction.placement)
    ax.text(0, prediction.fixed_bytes / GIB / 2, " before the first module: CUDA context" +
            ("" if cache_after else ", transients, load reserve"), va="center", fontsize=7)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="C0", label="in VRAM"), Patch(color="C3", label="spilled to system RAM")],
              fontsize=8, loc="lower right")
    ax.set_xlabel("allocation, in exllamav2's order: " + ("weights, then the cache layers" if cache_after else
                                                          "modules, each attention module with its cache layer"))
    ax.set_ylabel("VRAM taken so far (GiB)")
    ax.set_title(title or f"cache {prediction.max_seq_len:,} ({prediction.cache_mode}): "
                          f"{prediction.spilled_bytes / GIB:.2f} GiB spilled")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_time_per_token(predictions, reported=None, ax=None):
    """Where a decoded token's time goes (ms), stacked: overhead, VRAM reads, PCIe reads; one bar per prediction.
    ``predictions``: {label: fallback.Prediction}; ``reported``: {label: tok/s} drawn as markers at 1000/tok_s."""
    plt = _plt()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 2.2 + 0.45 * len(predictions)))
    labels = list(predictions)
    left = [0.0] * len(labels)
    for key, name, colour in (("overhead_ms", "overhead", "0.6"), ("vram_ms", "read from VRAM", "C0"),
                              ("pcie_ms", "read over PCIe", "C3")):
        vals = [predictions[k].time_split_ms()[key] for k in labels]
        ax.barh(labels, vals, left=left, color=colour, label=name)
        left = [a + b for a, b in zip(left, vals)]
    for i, k in enumerate(labels):
        ax.text(left[i], i, f" {predictions[k].tok_s:.1f} tok/s", va="center", fontsize=8)
    for k, tok_s in (reported or {}).items():
        if k in labels:
            ax.plot([1000 / tok_s], [labels.index(k)], marker="D", color="k", linestyle="none",
                    label="reported" if k == next(iter(reported)) else None)
    ax.invert_yaxis()
    ax.set_xlabel("ms per decoded token")
    ax.set_xlim(0, max(left) * 1.18)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_speed_vs_spill(case, max_spill_gb=2.5, ax=None):
    """Predicted tok/s against the weight bytes read over PCIe per token, for the seed's card: the reported speed,
    what the model predicts, and what would have to spill to give the reported speed. ``case``: fallback.seed_case()."""
    plt = _plt()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 3.8))
    p = case["prediction_32k"]
    total = p.vram_read_bytes + p.sysmem_read_bytes
    xs = [max_spill_gb * i / 200 for i in range(201)]
    ys = [1 / (p.overhead_s_per_token + (total - x * 1e9) / p.vram_bandwidth + x * 1e9 / p.pcie_bandwidth) for x in xs]
    ax.plot(xs, ys, color="C0", label=f"model: PCIe {p.pcie_bandwidth / 1e9:.1f} GB/s, VRAM "
                                      f"{p.vram_bandwidth / 1e9:.0f} GB/s")
    rep = case["seed"]["tok_s_32k"]
    need = case["needed_for_reported"]["sysmem_read_bytes"] / 1e9
    ax.axhline(rep, color="k", linestyle=":", linewidth=1)
    ax.plot([need], [rep], "kD", label=f"reported {rep:g} tok/s needs {need:.2f} GB/token over PCIe")
    ax.plot([p.sysmem_read_bytes / 1e9], [p.tok_s], "o", color="C3",
            label=f"predicted: {p.sysmem_read_bytes / 1e9:.2f} GB/token -> {p.tok_s:.1f} tok/s")
    ax.set_xlabel("GB read from system RAM per decoded token")
    ax.set_ylabel("decode tok/s")
    ax.set_ylim(0, max(ys) * 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_spill_vs_depth(curves, reported=None, ax=None):
    """Predicted decode tok/s against how deep the cache is filled, one line per load path, with the depth at which
    each would decode at the reported speed. ``curves``: fallback.seed_depth_curves()."""
    plt = _plt()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 3.6))

    for i, (path, c) in enumerate(curves.items()):
        ax.plot(c["depths"], c["tok_s"], color=f"C{i}",
                label=f"{LOAD_PATHS.get(path, path)}: {c['spilled_gib']:.2f} GiB spilled")
        d = c.get("depth_at_reported")
        if reported and d is not None:
            ax.plot([d], [reported], "D", color=f"C{i}")
            ax.annotate(f"{d:,} tokens deep", (d, reported), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if reported:
        ax.axhline(reported, color="k", linestyle=":", linewidth=1, label=f"reported {reported:g} tok/s")
    ax.set_xlabel("tokens already in the cache (depth)")
    ax.set_ylabel("decode tok/s")
    ax.set_ylim(0, None)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_emulated(rows, ax=None):
    """Recorded emulator runs: native vs emulated decode tok/s per cache length, with the spill model's emulated
    prediction. ``rows``: emulate.load_recorded()['emulated']."""
    plt = _plt()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 3.5))
    labels = [f"cache {r['ctx']:,}" + ("" if r.get("load_path", "autosplit") == "autosplit" else
                                       f", model.load()\n{r['depth']:,} deep") +
              f"\n{r['spilled_bytes'] / GIB:.2f} GiB spilled" for r in rows]
    x = list(range(len(rows)))
    ax.bar([i - 0.2 for i in x], [r["native_tok_s"] for r in rows], width=0.4, color="C0", label="native")
    ax.bar([i + 0.2 for i in x], [r["emulated_tok_s"] for r in rows], width=0.4, color="C3",
           label="emulated 16 GiB card")
    ax.plot([i + 0.2 for i in x], [r["native_tok_s"] / r["predicted_slowdown"] for r in rows], "kD",
            label="spill model")
    ax.set_xticks(x, labels)
    ax.set_ylabel("decode tok/s")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
