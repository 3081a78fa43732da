"""Figure for notebook 01: grouped-query attention as a picture, and what ``repeat_kv`` does without flash-attn."""
from __future__ import annotations

from helpers.plots.style import pyplot as _plt
from helpers.specs.shapes import model_shape


def plot_gqa(spec="qwen2.5-14b", *, flash_attn: bool = False):
    """Query heads (top) and the KV heads they share (bottom) of one layer, per token; right panel: what attention
    reads without flash-attn, where exllamav2's ``repeat_kv`` (attn.py, ``_attn_torch``) copies each KV head once per
    query head of its group into a temporary tensor. The cache itself keeps only the KV heads."""
    plt = _plt()
    shape = model_shape(spec)
    h, kv, d = shape.n_heads, shape.n_kv_heads, shape.head_dim
    group = h // kv
    panels = 1 if flash_attn else 2
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    w_q, w_kv = 1.0 / h, 1.0 / kv
    for i in range(h):
        ax.add_patch(plt.Rectangle((i * w_q, 0.72), w_q * 0.85, 0.12, color=f"C{i // group}"))
        ax.plot([(i + 0.42) * w_q, (i // group + 0.45) * w_kv], [0.72, 0.34], color=f"C{i // group}", lw=0.6,
                alpha=0.7)
    for j in range(kv):
        ax.add_patch(plt.Rectangle((j * w_kv + 0.1 * w_kv, 0.16), w_kv * 0.7, 0.18, color=f"C{j}"))
        ax.text((j + 0.45) * w_kv, 0.25, f"K,V {j}", ha="center", va="center", fontsize=7, color="white")
    ax.text(0, 0.88, f"{h} query heads (computed per token, never cached)", fontsize=8)
    ax.text(0, 0.04, f"{kv} KV heads: the cache stores {kv} x {d} values of K and of V per layer and token "
                     f"({group} query heads share each)", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    ax.set_title(f"{shape.name}: grouped-query attention, one layer")
    if not flash_attn:
        ax2 = axes[0][1]
        for i in range(h):
            ax2.add_patch(plt.Rectangle((i * w_q, 0.72), w_q * 0.85, 0.12, color=f"C{i // group}"))
            ax2.add_patch(plt.Rectangle((i * w_q, 0.40), w_q * 0.85, 0.18, color=f"C{i // group}",
                                        alpha=0.45 if i % group else 1.0))
        ax2.text(0, 0.88, f"{h} query heads", fontsize=8)
        ax2.text(0, 0.26, f"repeat_kv: each KV head copied {group}x -> {h} x {d} K and V values per position,\n"
                          "a temporary tensor the size of an MHA cache for the whole context read\n"
                          "(faded = copies). flash-attn reads the 8 KV heads directly instead.", fontsize=8,
                 va="top")
        ax2.set_xlim(0, 1)
        ax2.set_ylim(0, 1)
        ax2.axis("off")
        ax2.set_title("without flash-attn (torch SDPA path): repeat_kv")
    fig.tight_layout()
    return fig
