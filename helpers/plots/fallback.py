"""Figures for notebook 04: the Windows sysmem fallback, its spill model and the Linux emulator."""
from __future__ import annotations

from helpers.core.units import GIB
from helpers.plots.style import figure
from helpers.speed.model import Spill


def plot_spill_walk(prediction, ax=None, title=None):
    """exllamav2's load order walked against the VRAM budget: cumulative GiB per module, coloured by where it went."""
    fig, ax = figure(ax, (8, 3.8))
    colours = {"vram": "C0", "sysmem": "C3", "cpu": "0.7"}
    total = prediction.fixed_bytes
    xs, bottoms, heights, cols = [], [], [], []
    for i, p in enumerate(prediction.modules):
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
    cache_after = any(p.get("kind") == "cache" for p in prediction.modules)
    ax.text(0, prediction.fixed_bytes / GIB / 2, " before the first module: CUDA context" +
            ("" if cache_after else ", transients, load reserve"), va="center", fontsize=7)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="C0", label="in VRAM"), Patch(color="C3", label="spilled to system RAM")],
              fontsize=8, loc="lower right")
    ax.set_xlabel("allocation, in exllamav2's order: " + ("weights, then the cache layers" if cache_after else
                                                          "modules, each attention module with its cache layer"))
    ax.set_ylabel("VRAM taken so far (GiB)")
    ax.set_title(title or f"cache {prediction.max_seq_len:,} ({prediction.cache_mode}), {prediction.placement}: "
                          f"{prediction.spilled_bytes / GIB:.2f} GiB spilled")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_time_per_token(predictions, reported=None, ax=None, title=None):
    """Where a decoded token's time goes (ms), stacked: overhead, VRAM reads, PCIe reads; one bar per prediction.
    ``predictions``: {label: fallback.Prediction}; ``reported``: {label: tok/s} drawn as markers at 1000/tok_s."""
    fig, ax = figure(ax, (8, 2.2 + 0.45 * len(predictions)))
    labels = list(predictions)
    left = [0.0] * len(labels)
    for key, name, colour in (("host_ms", "host", "0.6"), ("vram_ms", "read from VRAM", "C0"),
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
    ax.set_title(title or "Where a decoded token's time goes (speed model, estimate)")
    ax.set_xlabel("ms per decoded token")
    ax.set_xlim(0, max(left) * 1.18)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_speed_vs_spill(case, max_spill_gb=2.5, ax=None, title=None):
    """Predicted tok/s against the weight bytes read over PCIe per token, for the seed's card (every point from the
    speed model, ``Prediction.estimate``): the reported speed, what the model predicts, and what would have to spill
    to give the reported speed. ``case``: fallback.seed.seed_case()."""
    fig, ax = figure(ax, (7, 3.8))
    p = case["prediction_32k"]
    top = min(max_spill_gb * 1e9, p.weight_bytes)
    xs = [top * i / 100 for i in range(101)]
    ys = [p.estimate(spill=Spill(x, 0, p.pcie_bandwidth / 1e9)).tok_s for x in xs]
    ax.plot([x / 1e9 for x in xs], ys, color="C0",
            label=f"speed model: PCIe {p.pcie_bandwidth / 1e9:.1f} GB/s, VRAM {p.vram_bandwidth / 1e9:.0f} GB/s")
    rep = case["seed"]["tok_s_32k"]
    need = case["needed_for_reported"]["sysmem_read_bytes"] / 1e9
    ax.axhline(rep, color="k", linestyle=":", linewidth=1)
    ax.plot([need], [rep], "kD", label=f"reported {rep:g} tok/s needs {need:.2f} GB/token over PCIe")
    ax.plot([p.sysmem_read_bytes / 1e9], [p.tok_s], "o", color="C3",
            label=f"{p.placement}, {case['load_path']}: {p.sysmem_read_bytes / 1e9:.2f} GB/token -> "
                  f"{p.tok_s:.1f} tok/s")
    ax.set_title(title or "Decode speed against the bytes read over PCIe per token (32k cache)")
    ax.set_xlabel("GB read from system RAM per decoded token")
    ax.set_ylabel("decode tok/s")
    ax.set_ylim(0, max(ys) * 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_hypotheses_vs_depth(curves, reported=None, ax=None, title=None):
    """Predicted decode tok/s against how deep the cache is filled, one line per hypothesis, with the depth at which
    each gives the reported speed. ``curves``: fallback.seed.depth_curves()."""
    fig, ax = figure(ax, (10, 4))
    seen: dict = {}
    for i, (key, c) in enumerate(curves.items()):
        same = next((k for k, v in seen.items() if v == c["tok_s"]), None)   # a line on top of another: dashed
        ax.plot(c["depths"], c["tok_s"], color=f"C{i}", linestyle="--" if same else "-",
                label=f"({key}) {c['label']}" + (f" (= ({same}))" if same else ""))
        seen[key] = c["tok_s"]
        d = c.get("depth_for_25")
        if reported and d:
            ax.plot([d], [reported], "D", color=f"C{i}")
    if reported:
        ax.axhline(reported, color="k", linestyle=":", linewidth=1, label=f"reported {reported:g} tok/s")
    ax.set_title(title or "Each hypothesis: predicted decode speed against depth (speed model, 32k cache)")
    ax.set_xlabel("tokens already in the cache (depth)")
    ax.set_ylabel("decode tok/s")
    ax.set_ylim(0, None)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def plot_emulated(rows, ax=None, title=None):
    """Recorded emulator runs: native vs emulated decode tok/s per cache length, with the spill model's emulated
    prediction. ``rows``: emulate.load_recorded()['emulated']."""
    fig, ax = figure(ax, (7, 3.5))
    labels = [f"cache {r['max_seq_len']:,}" + ("" if r.get("load_path", "autosplit") == "autosplit" else
                                       f", model.load()\n{r['depth']:,} deep") +
              f"\n{r['spilled_bytes'] / GIB:.2f} GiB spilled" for r in rows]
    x = list(range(len(rows)))
    ax.bar([i - 0.2 for i in x], [r["native_tok_s"] for r in rows], width=0.4, color="C0", label="native")
    ax.bar([i + 0.2 for i in x], [r["emulated_tok_s"] for r in rows], width=0.4, color="C3",
           label="emulated 16 GiB card")
    ax.plot([i + 0.2 for i in x], [r["native_tok_s"] / r["predicted_slowdown"] for r in rows], "kD",
            label="spill model")
    ax.set_xticks(x, labels)
    ax.set_title(title or "Recorded: native vs emulated 16 GiB card, with the spill model's prediction")
    ax.set_ylabel("decode tok/s")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
