"""Figures for the notebooks. Each room's plots live in its own section; plots may import any module below.

Every function returns the matplotlib Figure (so a notebook cell shows it) and labels sizes in GiB (2**30 bytes).
"""
from __future__ import annotations

import sys
import warnings

from helpers.core.units import GIB, gib
from helpers.memory.breakdown import breakdown
from helpers.memory.cache_modes import LOAD_PATHS
from helpers.memory.kv_cache import kv_cache_bytes
from helpers.specs.gpus import gpu_spec
from helpers.specs.shapes import model_shape

# ================================================================================================================
# memory (notebooks 01 and 05): KV cache and the planner. Owner: helpers.memory's author.
# ================================================================================================================

def _plt():
    import matplotlib

    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


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


# ================================================================================================================
# fallback (notebook 04): the Windows sysmem fallback, its spill model and the Linux emulator. Owner: helpers.fallback.
# ================================================================================================================

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


# ================================================================================================================
# speed (notebook 03): decode speed vs depth with the roofline, time per token, cache bytes. Owner: helpers.speed.
# ================================================================================================================
def _speed_key(r: dict) -> tuple:
    return (r.get("model", "?"), r.get("cache_mode", "?"), int(r["ctx"]))


def _speed_short(model) -> str:
    return str(model or "?").split(" (")[0][:28]


def _speed_roofline_curve(r: dict, depths):
    """tokens/s the memory allows at each depth for a row's model, cache and bandwidth: B / (W + kv_per_pos * d)."""
    per_pos = r["kv_read_bytes"] / r["depth"] if r.get("depth") else None
    if not per_pos or not r.get("weights_bytes") or not r.get("bandwidth_gbs"):
        return None
    return [r["bandwidth_gbs"] * 1e9 / (r["weights_bytes"] + per_pos * d) for d in depths]


def plot_speed_vs_depth(panels: dict, *, title: str = "decode speed vs context depth, roofline dashed"):
    """Decode tokens/s (median, bars from min to max) against depth, one panel per entry of ``panels``
    ({title: rows}), one line per (model, cache mode, cache length, device), and one grey dashed roofline per
    (model, cache mode, device): bandwidth / (weight bytes + KV bytes per position x depth); the cache length does
    not change it. An empty panel says it is not recorded yet."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels.items()):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("context depth (tokens already in the cache)")
        ax.set_ylabel("decode tokens/s")
        if not rows:
            ax.text(0.5, 0.5, "not recorded yet:\nrun `make gpu-results`\non a CUDA machine", ha="center",
                    va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            groups.setdefault(_speed_key(r) + (r.get("gpu") or r.get("device", ""),), []).append(r)
        several = len({k[3] for k in groups}) > 1 or len({k[0] for k in groups}) > 1
        for i, (key, rs) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
            model, mode, ctx, where = key
            rs = sorted(rs, key=lambda r: r["depth"])
            color = f"C{i % 10}"
            d = [r["depth"] for r in rs]
            y = [r["decode_tok_s"] for r in rs]
            err = [[r["decode_tok_s"] - r["decode_tok_s_min"] for r in rs],
                   [r["decode_tok_s_max"] - r["decode_tok_s"] for r in rs]]
            extra = f" ({_speed_short(model)}, {where})" if several else ""
            short = ctx <= 4096  # 4k: small filled circles; longer: large hollow squares, so equal points both show
            ax.errorbar(d, y, yerr=err, marker="o" if short else "s", markersize=5 if short else 10,
                        markerfacecolor=color if short else "none", color=color, capsize=3,
                        linestyle="-" if short else ":", label=f"{mode}, cache {ctx // 1024}k{extra}")
        # one roofline per (model, cache mode, device): the cache length does not change the bytes a token reads
        roofs: dict[tuple, dict] = {}
        for r in rows:
            if r.get("depth"):
                roofs.setdefault((r.get("model"), r.get("cache_mode"), r.get("gpu") or r.get("device")), r)
        top = max(r["depth"] for r in rows) * 1.05
        xs = [top * k / 40 for k in range(41)]
        for j, (key, ref) in enumerate(sorted(roofs.items(), key=lambda kv: str(kv[0]))):
            ys = _speed_roofline_curve(ref, xs)
            if ys:
                ax.plot(xs, ys, linestyle=(0, (4, 2 + 2 * j)), color="0.35", linewidth=1,
                        label=f"roofline, {key[1]}" + (f" ({_speed_short(key[0])}, {key[2]})" if several else ""))
        models = sorted({k[0] for k in groups})
        ax.set_title(f"{name}\n{', '.join(_speed_short(m) for m in models)}", fontsize=9)
        ax.set_yscale("log")
        from matplotlib.ticker import FuncFormatter

        fmt = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_decode_time_split(rows: list[dict], *, ax=None, title: str = "where one decoded token's time goes"):
    """One bar per row, as shares of a decode step (the ms per token written beside it): on a GPU the time its
    kernels ran vs the time it waited for the host; on a CPU the time inside torch operators vs everything else
    (Python, the harness). Returns the figure."""
    plt = _plt()
    if ax is None:
        fig, ax = plt.subplots(figsize=(10, 1.6 + 0.42 * max(1, len(rows))))
    else:
        fig = ax.figure
    labels, busy, colours = [], [], []
    for r in rows:
        where = r.get("gpu") or r.get("device", "?")
        labels.append(f"{_speed_short(r.get('model'))}, {r['cache_mode']} {r['ctx'] // 1024}k @ {r['depth']} ({where})")
        if r.get("gpu_ms_per_token") is not None:
            busy.append(min(1.0, r["gpu_ms_per_token"] / r["step_ms"]))
            colours.append(("C2", "C3"))
        else:
            ops, prof = r.get("torch_ops_ms_per_token"), r.get("profiled_ms_per_token")
            busy.append(min(1.0, ops / prof) if ops and prof else 1.0)
            colours.append(("C0", "0.6"))
    y = list(range(len(rows)))
    ax.barh(y, [100 * b for b in busy], color=[c[0] for c in colours])
    ax.barh(y, [100 * (1 - b) for b in busy], left=[100 * b for b in busy], color=[c[1] for c in colours])
    for i, r in enumerate(rows):
        ax.text(101, i, f"{r['step_ms']:.2f} ms/token", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 122)
    ax.set_xticks([0, 25, 50, 75, 100])
    ax.set_xlabel("% of the time per decoded token")
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color="C2", label="GPU: kernels running"),
                       Patch(color="C3", label="GPU: idle, waiting for the host"),
                       Patch(color="C0", label="CPU: inside torch operators"),
                       Patch(color="0.6", label="CPU: everything else")],
              fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3 if len(rows) > 3 else -0.45), ncol=2)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_cache_bytes_by_ctx(rows: list[dict], *, ax=None, title: str = "KV cache allocated: 4k vs 32k"):
    """Bars of the cache's bytes (GiB) per (model, cache mode, cache length), one bar per distinct configuration."""
    plt = _plt()

    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3.5))
    else:
        fig = ax.figure
    seen: dict[tuple, float] = {}
    for r in rows:
        seen.setdefault(_speed_key(r) + (r.get("gpu") or r.get("device", ""),), r["cache_bytes"] / GIB)
    keys = sorted(seen, key=lambda k: (str(k[0]), k[1], k[2]))
    names = [f"{k[0][:20]}\n{k[1]} {k[2] // 1024}k" for k in keys]
    vals = [seen[k] for k in keys]
    bars = ax.bar(range(len(keys)), vals, color=["C0" if k[2] <= 4096 else "C1" for k in keys])
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(keys)), names, fontsize=7)
    ax.set_ylabel("GiB (2^30 bytes)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


# ================================================================================================================
# tour (notebook 02): inside an EXL2 checkpoint, where its bytes go, what quantization costs. Owner: helpers.lessons.
# ================================================================================================================

_KIND_MARKERS = {"q_proj": "o", "k_proj": "v", "v_proj": "^", "o_proj": "s", "gate_proj": "D", "up_proj": "P",
                 "down_proj": "X"}


def plot_layer_bpw(layers, title=None, ax=None):
    """Bits per weight of every quantized linear against its layer, one marker per kind, the head as a line.

    ``layers``: rows of ``Exl2Checkpoint.layer_table()`` (what ``python -m helpers inspect`` prints)."""
    plt = _plt()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(8, 4))
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
    plt = _plt()
    bb = bb.get("bytes", bb)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 4))
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
    plt = _plt()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 4))
    q = [r for r in rows if r.get("bits") is not None]
    f = [r for r in rows if r.get("bits") is None]
    ax.plot([r["weights_bytes"] / GIB for r in q], [r["perplexity"] for r in q], marker="o", color="C0", label="EXL2")
    for r in q:
        ax.annotate(f"{r['bpw']:.2f} bpw", (r["weights_bytes"] / GIB, r["perplexity"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    for r in f:
        ax.scatter([r["weights_bytes"] / GIB], [r["perplexity"]], color="k", marker="*", s=80, zorder=3,
                   label=f"{r['label']} (float32 file)")
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
    plt = _plt()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(7, 3.5))
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
