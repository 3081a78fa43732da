"""Figures for notebook 03: decode speed against depth with the roofline, time per token, cache bytes."""
from __future__ import annotations

from helpers.core.units import GIB
from helpers.plots.style import figure, pyplot
from helpers.speed.roofline import roofline_curve


def _speed_key(r: dict) -> tuple:
    return (r.get("model", "?"), r.get("cache_mode", "?"), int(r["max_seq_len"]))


def _speed_short(model) -> str:
    return str(model or "?").split(" (")[0][:28]


def _speed_roofline_curve(r: dict, depths):
    """tokens/s the memory allows at each depth for a row's model, cache, attention path and bandwidth
    (``speed.roofline.roofline_curve`` with the row's bytes per position from ``speed.model``)."""
    if not r.get("position_bytes") or not r.get("weights_bytes") or not r.get("bandwidth_gbs"):
        return None
    return roofline_curve(r["weights_bytes"], r["position_bytes"], r["bandwidth_gbs"], depths)


def plot_speed_vs_depth(panels: dict, *, title: str = "decode speed vs context depth, roofline dashed"):
    """Decode tokens/s (median, bars from min to max) against depth, one panel per entry of ``panels``
    ({title: rows}), one line per (model, cache mode, cache length, device), and one grey dashed roofline per
    (model, cache mode, device): bandwidth / (weight bytes + KV bytes per position x depth); the cache length does
    not change it. An empty panel says it is not recorded yet."""
    plt = pyplot()
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
            model, mode, max_seq_len, where = key
            rs = sorted(rs, key=lambda r: r["depth"])
            color = f"C{i % 10}"
            d = [r["depth"] for r in rs]
            y = [r["decode_tok_s"] for r in rs]
            err = [[r["decode_tok_s"] - r["decode_tok_s_min"] for r in rs],
                   [r["decode_tok_s_max"] - r["decode_tok_s"] for r in rs]]
            extra = f" ({_speed_short(model)}, {where})" if several else ""
            extra += ", external" if any(r.get("external") for r in rs) else ""
            short = max_seq_len <= 4096  # 4k: small filled circles, longer: large hollow squares
            ax.errorbar(d, y, yerr=err, marker="o" if short else "s", markersize=5 if short else 10,
                        markerfacecolor=color if short else "none", color=color, capsize=3,
                        linestyle="-" if short else ":", label=f"{mode}, cache {max_seq_len // 1024}k{extra}")
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
                path = {True: ", flash-attn", False: ", no flash-attn"}.get(ref.get("flash_attn"), "")
                ax.plot(xs, ys, linestyle=(0, (4, 2 + 2 * j)), color="0.35", linewidth=1,
                        label=f"roofline, {key[1]}{path}" + (f" ({_speed_short(key[0])}, {key[2]})" if several else ""))
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


def plot_decode_model(panels: dict, *, title: str = "decode speed against depth: the speed model (estimate)"):
    """One panel per entry of ``panels`` ({panel title: {"curves": {label: [DecodeEstimate, ...]}, "points": rows,
    "lines": {label: tok/s}, "bands": True}}): each curve is the central estimate with its low-high range shaded
    (unless "bands" is False); ``points`` are
    measured rows (depth, decode_tok_s, label) drawn as markers, "external" in the legend when they are."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.4), squeeze=False)
    for ax, (name, panel) in zip(axes[0], panels.items()):
        for i, (label, est) in enumerate(panel.get("curves", {}).items()):
            xs = [e.depth for e in est]
            ax.plot(xs, [e.tok_s for e in est], color=f"C{i}", label=label)
            if panel.get("bands", True):
                ax.fill_between(xs, [e.tok_s_low for e in est], [e.tok_s_high for e in est], color=f"C{i}",
                                alpha=0.15)
        for j, (label, y) in enumerate(panel.get("lines", {}).items()):
            ax.axhline(y, color="0.3", linestyle=(0, (3, 2 + 2 * j)), linewidth=1, label=label)
        pts = panel.get("points") or []
        lengths = sorted({r["max_seq_len"] for r in pts})
        for k, (max_seq_len, rs) in enumerate((n, [x for x in pts if x["max_seq_len"] == n]) for n in lengths):
            ext = ", external" if any(r.get("external") for r in rs) else ""
            where = _speed_short(rs[0].get("gpu") or rs[0].get("device"))
            ax.plot([r["depth"] for r in rs], [r["decode_tok_s"] for r in rs], linestyle="none",
                    marker="os"[k % 2], markersize=8, markerfacecolor="none" if k else "k", color="k",
                    label=f"measured, cache {max_seq_len // 1024}k ({where}{ext})")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("context depth (tokens already in the cache)")
        ax.set_ylabel("decode tokens/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_decode_time_split(rows: list[dict], *, ax=None, title: str = "where one decoded token's time goes"):
    """One bar per row, as shares of a decode step (the ms per token written beside it): on a GPU the time its
    kernels ran vs the time it waited for the host; on a CPU the time inside torch operators vs everything else
    (Python, the harness). Returns the figure."""
    fig, ax = figure(ax, (10, 1.6 + 0.42 * max(1, len(rows))))
    labels, busy, colours = [], [], []
    for r in rows:
        where = r.get("gpu") or r.get("device", "?")
        labels.append(f"{_speed_short(r.get('model'))}, {r['cache_mode']} {r['max_seq_len'] // 1024}k @ {r['depth']} "
                      f"({where})")
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


def plot_cache_bytes_by_max_seq_len(rows: list[dict], *, ax=None, title: str = "KV cache allocated: 4k vs 32k"):
    """Bars of the cache's bytes (GiB) per (model, cache mode, cache length), one bar per distinct configuration."""
    fig, ax = figure(ax, (7, 3.5))
    seen: dict[tuple, float] = {}
    for r in rows:
        if r.get("cache_bytes") is None:  # e.g. an external record: its cache was not measured
            continue
        seen.setdefault(_speed_key(r) + (r.get("gpu") or r.get("device", ""),), r["cache_bytes"] / GIB)
    keys = sorted(seen, key=lambda k: (str(k[0]), k[1], k[2]))
    names = [f"{_speed_short(k[0])}\n{k[1]} {k[2] // 1024}k" for k in keys]
    vals = [seen[k] for k in keys]
    bars = ax.bar(range(len(keys)), vals, color=["C0" if k[2] <= 4096 else "C1" for k in keys])
    for b, v in zip(bars, vals):
        ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(keys)), names, fontsize=7)
    ax.set_ylabel("GiB (2^30 bytes)")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_calibration(rows: list[dict], low: float, high: float, *,
                     title: str = "the speed model against every public measurement it is fitted on"):
    """Left: measured against predicted tok/s, log-log, one marker per source, the y = x line and the printed range
    (x``low`` to x``high``). Right: each point predicted by a fit that left its source out, as measured/predicted per
    source. ``rows``: ``speed.calibration.calibration_rows``."""
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.1, 1]})
    sources = sorted({r["source"] for r in rows})
    markers = "os^vD<>phP*X"
    lo_v = min(min(r["measured_tok_s"], r["predicted_tok_s"]) for r in rows) / 1.5
    hi_v = max(max(r["measured_tok_s"], r["predicted_tok_s"]) for r in rows) * 1.5
    xs = [lo_v, hi_v]
    ax.plot(xs, xs, color="k", linewidth=1, label="measured = predicted")
    ax.fill_between(xs, [x * low for x in xs], [x * high for x in xs], color="0.5", alpha=0.2,
                    label=f"printed range (x{low:.2f} to x{high:.2f})")
    for i, s in enumerate(sources):
        rs = [r for r in rows if r["source"] == s]
        kw = dict(marker=markers[i % len(markers)], linestyle="none", color=f"C{i % 10}", markersize=6)
        ax.plot([r["predicted_tok_s"] for r in rs], [r["measured_tok_s"] for r in rs], label=s, **kw)
        bx.plot([r["ratio_out"] for r in rs], [i] * len(rs), alpha=0.8, **kw)
    ax.set(xscale="log", yscale="log", xlim=xs, ylim=xs, xlabel="predicted decode tok/s (fit on every source)",
           ylabel="measured decode tok/s (public, external)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6.5, loc="upper left", ncol=2)
    bx.axvline(1, color="k", linewidth=1)
    bx.axvspan(low, high, color="0.5", alpha=0.2)
    bx.set(yticks=range(len(sources)), yticklabels=sources,
           xlabel="measured / predicted, each source left out of the fit")
    bx.tick_params(axis="y", labelsize=7)
    bx.grid(alpha=0.3, axis="x")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_attention_cost(r: dict, *, ax=None):
    """``lessons.attention_cost.measure``: one token's attention time against the cache depth, each way, with the
    cost per position relative to the GQA path (measured | counted in bytes) in the legend."""
    fig, ax = figure(ax, (8, 4))
    for i, (way, secs) in enumerate(r["seconds"].items()):
        ax.plot(r["depths"], [s * 1e3 for s in secs], marker="o", color=f"C{i}",
                label=f"{way}: {r['measured_ratio'][way]:.1f}x per position here | {r['bytes_ratio'][way]:.1f}x bytes")
    ax.set_xlabel("cache depth (positions attended to)")
    ax.set_ylabel("ms for one token, one layer (this CPU)")
    ax.set_title("one attention layer of Qwen2.5-14B's shape, one new token, on this CPU")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
