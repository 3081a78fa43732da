"""The decode roofline: bytes moved per decoded token over the memory bandwidth is the fastest decode memory allows.

``decode_bytes`` counts the weights the backend keeps on the compute device (``helpers.memory.weights``: quantized
linears with their scales, groups and permutations, the head, the norms; not the input embedding, which stays in
system RAM, docs/FACTS.md §2) plus ``depth`` x the attention path's bytes per position
(``helpers.speed.model.position_bytes``, docs/FACTS.md §8); not activations, logits or scratch. The roofline equals
``decode_estimate`` with ``first_principles()``: full bandwidth, no host time. Bandwidth is measured
(``measure_bandwidth``: median of sums over one large buffer) or the datasheet's (``datasheet_bandwidth``). Also:
``roofline_tok_s``, ``roofline_curve``, ``bytes_per_decoded_token``.
"""
from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from typing import Any

from helpers.core import devices as gpu
from helpers.core.errors import CourseError
from helpers.core.units import GIB, MIB
from helpers.memory import weights
from helpers.specs.gpus import gpu_spec
from helpers.specs.shapes import model_shape
from helpers.speed.model import position_bytes


def roofline_tok_s(bytes_per_token: float, bandwidth_bytes_s: float) -> float:
    """The fastest decode memory allows: bandwidth / bytes read per token (tokens/s)."""
    if not bytes_per_token or bytes_per_token <= 0:
        raise CourseError(f"bytes per token must be positive, got {bytes_per_token!r}")
    if not bandwidth_bytes_s or bandwidth_bytes_s <= 0:
        raise CourseError(f"memory bandwidth must be positive, got {bandwidth_bytes_s!r}")
    return float(bandwidth_bytes_s) / float(bytes_per_token)


def roofline_curve(weights_bytes: float, position_bytes_per_token: float, bandwidth_gbs: float, depths) -> list:
    """The roofline at each depth: bandwidth / (weights + bytes per position x depth), tokens/s."""
    return [roofline_tok_s(weights_bytes + position_bytes_per_token * d, bandwidth_gbs * 1e9) for d in depths]


# -------------------------------------------------------------------------------------------- bytes per token
def decode_bytes(model_dir_or_shape: Any, depth: int, cache_mode: str = "fp16", *,
                 weight_bytes: int | None = None, bpw: float | None = None, flash_attn: bool = False) -> dict[str, int]:
    """What one decoded token moves at ``depth``: {'weights_bytes', 'kv_bytes', 'position_bytes', 'total_bytes',
    'embedding_row_bytes'}; ``kv_bytes`` = ``depth`` x ``position_bytes`` (``speed.model.position_bytes`` for the
    attention path: ``flash_attn`` or exllamav2's torch attention).

    ``model_dir_or_shape``: an EXL2 model directory (its GPU-resident bytes come from ``memory.weights.weight_bytes``),
    or a model shape (then pass ``weight_bytes`` or ``bpw``). ``weight_bytes`` overrides the weight count, e.g. with
    what a loaded backend really holds. The embedding row is reported apart, not added: it comes from system RAM.
    """
    if depth < 0:
        raise CourseError(f"context depth must not be negative, got {depth}")
    spec = model_dir_or_shape
    shape = model_shape(spec)
    if weight_bytes is None:
        if isinstance(spec, (str, os.PathLike)) or bpw is not None:
            weight_bytes = int(weights.weight_bytes(spec, bpw=bpw)["vram_bytes"])
        else:
            raise CourseError("a model shape alone does not say how many weight bytes a token reads; pass a model "
                              "directory, or weight_bytes=, or bpw=")
    per_pos = position_bytes(shape, cache_mode, flash_attn).total
    kv = per_pos * int(depth)
    return {"weights_bytes": int(weight_bytes), "kv_bytes": kv, "position_bytes": per_pos,
            "total_bytes": int(weight_bytes) + kv, "embedding_row_bytes": int(shape.hidden) * 2}


def bytes_per_decoded_token(model_dir_or_shape: Any, depth: int, cache_mode: str = "fp16", **kw) -> int:
    """GPU-resident weight bytes + the attention bytes at ``depth`` (see ``decode_bytes`` for what is counted)."""
    return decode_bytes(model_dir_or_shape, depth, cache_mode, **kw)["total_bytes"]


# ----------------------------------------------------------------------------------------------- bandwidth
_BANDWIDTH_CACHE: dict[str, float] = {}


@contextmanager
def _threads(n: int | None):
    import torch

    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def measure_bandwidth(device: str = "cpu", *, nbytes: int | None = None, repeats: int = 5, threads: int | None = 2,
                      cached: bool = True) -> float:
    """Memory read bandwidth of ``device`` in bytes/s: the median over ``repeats`` sums of one large buffer.

    GPU: a 1 GiB fp16 buffer summed, timed with CUDA events. CPU: a 256 MiB fp32 buffer summed with ``threads``
    threads (2 by default, what the course's CPU runs use). The first pass is a warm-up and is not counted.
    """
    import torch

    device = str(device)
    is_cuda = device.startswith("cuda")
    if is_cuda:
        gpu.require_cuda("measuring GPU memory bandwidth")
    key = f"{device}:{nbytes}:{threads}"
    if cached and key in _BANDWIDTH_CACHE:
        return _BANDWIDTH_CACHE[key]
    if repeats < 1:
        raise CourseError(f"repeats must be at least 1, got {repeats}")
    if is_cuda:
        n = (nbytes or GIB) // 2
        buf = torch.ones(n, dtype=torch.float16, device=device)
        times = gpu.timed_reads(buf, repeats)
        read = n * 2
        del buf
        torch.cuda.empty_cache()
    else:
        n = (nbytes or 256 * MIB) // 4
        buf = torch.ones(n, dtype=torch.float32)
        times = []
        with _threads(threads):
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                buf.sum()
                dt = time.perf_counter() - t0
                if i:
                    times.append(dt)
        read = n * 4
        del buf
    bw = read / statistics.median(times)
    _BANDWIDTH_CACHE[key] = bw
    return bw


def datasheet_bandwidth(device_name: str | None) -> float | None:
    """The datasheet memory bandwidth of a known GPU (bytes/s) from ``specs.gpus.GPUS``, or None."""
    if not device_name:
        return None
    try:
        gbs = gpu_spec(str(device_name).strip())["bandwidth_gbs"]
    except CourseError:  # not a known card
        return None
    return float(gbs) * 1e9 if gbs else None


def datasheet_host(device_name: str | None) -> str | None:
    """Where a known GPU usually sits ('desktop' or 'server', ``specs.gpus``), or None for an unknown card."""
    try:
        return gpu_spec(str(device_name).strip())["host"] if device_name else None
    except CourseError:
        return None

