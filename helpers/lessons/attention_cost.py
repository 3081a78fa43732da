"""Notebook 03's CPU experiment: what one decoded token's attention costs per cached position, three ways.

One attention layer of Qwen2.5-14B's shape (40 query heads, 8 KV heads, head_dim 128) attends for one new token
over a cache ``depth`` positions deep: GQA-aware (each KV head read once, as flash-attn does), with the repeat_kv
copy exllamav2 0.3.2 makes without flash-attn (K and V written out at 40 heads, then read), and with a Q4 cache
dequantized whole into a float layer first. The seconds each position adds, relative to the GQA path, are set
against the bytes per position the speed model counts (``speed.model.position_bytes``). Float32 on a CPU, so
the ratios, not the times, carry over to a GPU.
"""
from __future__ import annotations

import statistics
import time

import torch

from helpers.core.progress import progress
from helpers.speed.model import position_bytes

HEADS, KV_HEADS, HEAD_DIM = 40, 8, 128
WAYS = ("GQA, no copy (flash-attn)", "repeat_kv copy (no flash-attn)", "Q4 dequantized, then repeat_kv")


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q (heads, 1, d); k, v (heads, depth, d): softmax(q k^T / sqrt(d)) v."""
    w = torch.softmax(q @ k.transpose(-1, -2) / HEAD_DIM ** 0.5, dim=-1)
    return w @ v


def _gqa(q, k, v):
    group = HEADS // KV_HEADS                # each KV head serves 5 query heads: read once, no copy
    out = _attend(q.view(KV_HEADS, group, HEAD_DIM), k, v)
    return out.reshape(HEADS, 1, HEAD_DIM)


def _repeat(q, k, v):
    group = HEADS // KV_HEADS                # repeat_kv: K and V copied to every query head, then read
    return _attend(q, k.repeat_interleave(group, 0), v.repeat_interleave(group, 0))


def _q4(q, codes_k, scale_k, codes_v, scale_v):
    # the whole cache layer dequantized first (4-bit codes around 8, one scale per 32 values), then as _repeat
    k = ((codes_k.float() - 8) * scale_k).reshape(KV_HEADS, -1, HEAD_DIM)
    v = ((codes_v.float() - 8) * scale_v).reshape(KV_HEADS, -1, HEAD_DIM)
    return _repeat(q, k, v)


def _timed(fn, *args, repeats: int) -> float:
    fn(*args)                                 # warm-up: allocation and first-touch costs out of the timing
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times)                         # noise on a shared machine only ever adds time


def measure(depths=(1024, 4096, 8192, 16384, 32768), *, repeats: int = 5, seed: int = 0) -> dict:
    """Seconds for one token's attention at each depth, each way (the fastest of ``repeats``), and the slope of
    each (seconds per position, a least-squares line) against the GQA path's, beside the speed model's byte ratio."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(HEADS, 1, HEAD_DIM, generator=g)
    rows = {w: [] for w in WAYS}
    for depth in progress(list(depths), desc="attention, one token", unit="depth"):
        k = torch.randn(KV_HEADS, depth, HEAD_DIM, generator=g)
        v = torch.randn(KV_HEADS, depth, HEAD_DIM, generator=g)
        codes = [torch.randint(0, 16, (KV_HEADS * depth * HEAD_DIM // 32, 32), generator=g, dtype=torch.uint8)
                 for _ in range(2)]
        scales = [torch.rand(KV_HEADS * depth * HEAD_DIM // 32, 1, generator=g) for _ in range(2)]
        rows[WAYS[0]].append(_timed(_gqa, q, k, v, repeats=repeats))
        rows[WAYS[1]].append(_timed(_repeat, q, k, v, repeats=repeats))
        rows[WAYS[2]].append(_timed(_q4, q, codes[0], scales[0], codes[1], scales[1], repeats=repeats))
    slopes = {w: _slope(list(depths), t) for w, t in rows.items()}
    model = {WAYS[0]: position_bytes("qwen2.5-14b", "fp16", True).per_layer.total,
             WAYS[1]: position_bytes("qwen2.5-14b", "fp16", False).per_layer.total,
             WAYS[2]: position_bytes("qwen2.5-14b", "q4", False).per_layer.total}
    base = WAYS[0]
    return {"depths": list(depths), "seconds": rows, "slope_s_per_position": slopes,
            "measured_ratio": {w: slopes[w] / slopes[base] for w in WAYS},
            "bytes_ratio": {w: model[w] / model[base] for w in WAYS}}


def _slope(x: list[int], y: list[float]) -> float:
    mx, my = statistics.fmean(x), statistics.fmean(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def summary(r: dict) -> str:
    """One line per way: the cost per position against the GQA path's, measured here and counted in bytes."""
    lines = ["cost per cached position, relative to GQA without a copy: measured on this CPU | the speed model's bytes"]
    for w in WAYS:
        lines.append(f"  {w:<32} {r['measured_ratio'][w]:5.1f}x | {r['bytes_ratio'][w]:5.1f}x")
    return "\n".join(lines)
