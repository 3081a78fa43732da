"""Prefill and decode speed at a cache length and a context depth, and the bandwidth roofline beside it.

What one measurement does (``bench``):
1. load the model with a cache of ``ctx`` tokens (``backend.load``) and read memory (torch, NVML, or the process RSS);
2. prefill: time ``forward`` of ``prefill_tokens`` tokens appended at depth ``depth`` -> prefill tokens/s;
3. decode: set the cache to ``depth`` tokens directly (``fill_cache``; nobody decodes 30,000 tokens to get there),
   then time ``decode_tokens`` greedy steps, each waiting for its token as a real generator does. ``warmup``
   repeats are thrown away, then ``repeats`` are kept: median, min, max and the spread (max - min) / median;
4. the roofline: a decoded token must read every GPU-resident weight once and the K and V of every layer for
   ``depth`` positions. Those bytes over the memory bandwidth measured on the same device (``measure_bandwidth``)
   is the fastest decode the memory allows; each measured figure is also given as a fraction of it;
5. where the time goes per token (``profile_decode``, torch.profiler, apart from the timed rounds): on CUDA the
   time the GPU's kernels ran (the union of their intervals), the host's own work (wall minus the time it sat in
   synchronising calls) and the kernels launched; on a CPU the time inside torch operators. At batch 1 a fast GPU
   finishes each kernel before the host has launched the next, so it idles and decode stays far below the roofline.

``python -m helpers bench`` is ``main``; ``GPU_RECORDINGS`` records the course's matrix on a CUDA machine (one fresh
process per configuration) into results/speed/, which ``load_recorded`` reads back for notebook 03.

What is counted as "bytes read per decoded token" (``decode_bytes``):
- weights: every tensor the backend keeps on the compute device for the decoder: the quantized linears
  (q_weight, q_scale, q_scale_max, q_groups, q_perm/q_invperm, biases) including the output head, and the norms.
  NOT the input embedding: exllamav2 keeps it in system RAM and copies one row (hidden x 2 bytes) per token.
  For the CPU reference backend, whatever its weight tensors occupy in its own dtype.
- KV cache: K and V of every layer for ``depth`` positions at the cache mode's bytes per element, scales included
  (FP16 2 + 2 bytes, Q4 0.5625 + 0.5625 bytes per element, ...).
- Not counted: activations, the logits, scratch buffers, and for quantized caches exllamav2's expansion of the
  cache into its FP16 temp buffer (it writes and reads ``depth`` positions of FP16 per layer again), so the Q4/Q6/Q8
  roofline at depth is optimistic: a real Q4 decode moves more bytes than this count.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from helpers.core.errors import CourseError

GIB = 2**30
#: exllamav2 pages its cache in blocks of 256 tokens (generator/dynamic.py: PAGED_PAGE_SIZE); a cache length must be
#: a multiple of it
PAGE = 256
#: decode repeats whose (max - min) / median is below this are called repeatable on a GPU
GPU_SPREAD_TARGET = 0.03


# ---------------------------------------------------------------------------------------------------- pure parts
def roofline_tok_s(bytes_per_token: float, bandwidth_bytes_s: float) -> float:
    """The fastest decode memory allows: bandwidth / bytes read per token (tokens/s)."""
    if not bytes_per_token or bytes_per_token <= 0:
        raise CourseError(f"bytes per token must be positive, got {bytes_per_token!r}")
    if not bandwidth_bytes_s or bandwidth_bytes_s <= 0:
        raise CourseError(f"memory bandwidth must be positive, got {bandwidth_bytes_s!r}")
    return float(bandwidth_bytes_s) / float(bytes_per_token)


def summarize(values: Sequence[float]) -> dict[str, float]:
    """median, min, max and spread = (max - min) / median of repeated measurements."""
    vals = [float(v) for v in values]
    if not vals:
        raise CourseError("nothing was measured: repeats must be at least 1")
    med = statistics.median(vals)
    lo, hi = min(vals), max(vals)
    return {"median": med, "min": lo, "max": hi, "spread": (hi - lo) / med if med else math.inf, "n": len(vals)}


def run_to_run(medians: Sequence[float]) -> dict[str, float]:
    """Variation across processes: the same statistics over each process's median."""
    s = summarize(medians)
    return {"processes": s["n"], "median_tok_s": s["median"], "min_tok_s": s["min"], "max_tok_s": s["max"],
            "spread": s["spread"]}


def parse_int_list(text: str | int | Iterable[int], what: str) -> list[int]:
    """'4096,32768' or '4k,32k' -> [4096, 32768]; one clear error for anything else."""
    if isinstance(text, int):
        return [text]
    if not isinstance(text, str):
        return [int(t) for t in text]
    out = []
    for part in text.split(","):
        p = part.strip().lower().replace("_", "")
        if not p:
            continue
        mult = 1024 if p.endswith("k") else 1
        try:
            value = int(p[:-1] if p.endswith("k") else p) * mult
        except ValueError:
            raise CourseError(f"{what} '{part.strip()}' is not a whole number of tokens; write e.g. 4096,32768 "
                              "(or 4k,32k)") from None
        if value < 0:
            raise CourseError(f"{what} must not be negative, got {value}")
        out.append(value)
    if not out:
        raise CourseError(f"no {what} given; write e.g. 4096,32768")
    return out


def check_config(ctx: int, depth: int, *, decode_tokens: int = 0, exllamav2: bool = False) -> None:
    """The bad inputs a bench can be given, each as one line."""
    if ctx <= 0:
        raise CourseError(f"cache length must be positive, got {ctx}")
    if exllamav2 and ctx % PAGE:
        lo, hi = ctx // PAGE * PAGE, -(-ctx // PAGE) * PAGE
        near = f"{hi}" if lo == 0 else f"{lo} or {hi}"
        raise CourseError(f"exllamav2 pages its cache in blocks of {PAGE} tokens, so a cache of {ctx} tokens cannot "
                          f"be paged; use a multiple of {PAGE} such as {near}")
    if depth < 0:
        raise CourseError(f"context depth must not be negative, got {depth}")
    if depth >= ctx:
        raise CourseError(f"depth {depth} does not fit: the cache holds {ctx} tokens, so the depth must be below "
                          f"{ctx}; raise --ctx or lower --depth")
    if decode_tokens and depth + decode_tokens > ctx:
        raise CourseError(f"depth {depth} plus {decode_tokens} decoded tokens passes the cache's {ctx} tokens; "
                          f"use a depth of at most {ctx - decode_tokens} or fewer decode tokens")


# -------------------------------------------------------------------------------------------- bytes per token
def kv_read_bytes(shape: Any, depth: int, cache_mode: str = "fp16") -> int:
    """K and V of every layer for ``depth`` positions at the cache mode's bytes per element, scales included.

    Not the FP16 temp layer that quantized modes also allocate: it is scratch, written and read again while a layer
    runs (that traffic is left out of the count, so the quantized-cache roofline is optimistic at depth)."""
    from helpers.memory import accounting as memory

    s = memory.model_shape(shape)
    return int(s.n_layers * memory.kv_layer_bytes_per_token(s, cache_mode) * depth)


def decode_bytes(model_dir_or_shape: Any, depth: int, cache_mode: str = "fp16", *,
                 weight_bytes: int | None = None, bpw: float | None = None) -> dict[str, int]:
    """What one decoded token reads at ``depth``: {'weights_bytes', 'kv_bytes', 'total_bytes', 'embedding_row_bytes'}.

    ``model_dir_or_shape``: an EXL2 model directory (its GPU-resident bytes come from ``memory.weight_bytes``), or a
    model shape (then pass ``weight_bytes`` or ``bpw``). ``weight_bytes`` overrides the weight count, e.g. with what
    a loaded backend really holds. The embedding row is reported apart, not added: it comes from system RAM.
    """
    from helpers.memory import accounting as memory

    if depth < 0:
        raise CourseError(f"context depth must not be negative, got {depth}")
    spec = model_dir_or_shape
    shape = memory.model_shape(spec)
    if weight_bytes is None:
        if isinstance(spec, (str, os.PathLike)) or bpw is not None:
            weight_bytes = int(memory.weight_bytes(spec, bpw=bpw)["vram_bytes"])
        else:
            raise CourseError("a model shape alone does not say how many weight bytes a token reads; pass a model "
                              "directory, or weight_bytes=, or bpw=")
    kv = kv_read_bytes(shape, depth, cache_mode)
    hidden = _shape_get(shape, "hidden")
    return {"weights_bytes": int(weight_bytes), "kv_bytes": kv, "total_bytes": int(weight_bytes) + kv,
            "embedding_row_bytes": int(hidden) * 2 if hidden else 0}


def bytes_per_decoded_token(model_dir_or_shape: Any, depth: int, cache_mode: str = "fp16", **kw) -> int:
    """GPU-resident weight bytes + the KV cache read at ``depth`` (see ``decode_bytes`` for what is counted)."""
    return decode_bytes(model_dir_or_shape, depth, cache_mode, **kw)["total_bytes"]


def _shape_get(shape: Any, key: str, default=None):
    if isinstance(shape, dict):
        return shape.get(key, default)
    return getattr(shape, key, default)


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
        from helpers.core import devices as gpu

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
        n = (nbytes or 256 * 2**20) // 4
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
    """The datasheet memory bandwidth of a known GPU (bytes/s) from ``memory.GPUS``, or None."""
    if not device_name:
        return None
    from helpers.memory import accounting as memory

    name = str(device_name).strip()
    try:
        spec = memory.gpu_spec(name)
    except (CourseError, KeyError, LookupError):
        return None
    if spec is None:
        return None
    for key in ("bandwidth_bytes_s", "bandwidth_Bps", "bandwidth"):
        val = spec.get(key) if isinstance(spec, dict) else getattr(spec, key, None)
        if val:
            return float(val)
    gbs = spec.get("bandwidth_gbs") if isinstance(spec, dict) else getattr(spec, "bandwidth_gbs", None)
    return float(gbs) * 1e9 if gbs else None


# ------------------------------------------------------------------------------------------------- the harness
def _needs_gpu(backend: str, cache_mode: str) -> str | None:
    """Why a configuration can only be measured on a CUDA GPU, or None."""
    if backend == "exllamav2":
        return "the exllamav2 backend"
    if str(cache_mode).lower() not in ("fp16",):
        return f"cache mode '{cache_mode}' (quantized caches exist only in exllamav2, on CUDA)"
    return None


def _uses_exllamav2(backend: str) -> bool:
    """Whether a load with this backend choice ends in exllamav2 (then the cache pages in 256s)."""
    if backend == "exllamav2":
        return True
    if backend != "auto":
        return False
    from helpers.core import devices as gpu

    return gpu.course_path()[0] == "gpu"


def check_request(ctx: int, depth: int, *, cache_mode: str = "fp16", backend: str = "auto",
                  decode_tokens: int = 0) -> None:
    """Every bad input of a bench as one line, before anything is loaded."""
    check_config(ctx, depth, decode_tokens=decode_tokens, exllamav2=_uses_exllamav2(backend))
    why = _needs_gpu(backend, cache_mode)
    if why:
        from helpers.core import devices as gpu

        gpu.require_cuda(f"measuring {why}")


def _trained_ctx(model_dir: Path) -> int | None:
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg.get("max_position_embeddings")


def _prompt_ids(vocab_size: int, n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, int(vocab_size), (1, n), generator=g)


def _time_decode(b, depth: int, steps: int, first_token: int) -> dict[str, Any]:
    """``steps`` greedy decode steps from depth ``depth``: total seconds and each step's wall time. Each step waits
    for its token (a generator needs it before the next step), so a step's wall time is what a reader sees."""
    b.fill_cache(depth)
    b.synchronize()
    tok, walls = first_token, []
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        tok = int(b.decode_step(tok).argmax())
        walls.append(time.perf_counter() - t0)
    b.synchronize()
    return {"seconds": time.perf_counter() - start, "walls": walls}


def _time_prefill(b, depth: int, ids) -> float:
    b.fill_cache(depth)
    b.synchronize()
    t0 = time.perf_counter()
    b.forward(ids, reset=False)
    b.synchronize()
    return time.perf_counter() - t0


@contextmanager
def _quiet_stderr_fd():
    """Silence file descriptor 2 for a moment: the profiler's C++ side prints start/stop lines there."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


#: CUDA runtime calls in which the host waits for the GPU (their time is not the host's own work)
_BLOCKING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                   "cudaMemcpyAsync", "cuStreamSynchronize", "cuCtxSynchronize", "cuMemcpyDtoH")


def busy_time_us(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: the time at least one of them was running."""
    total, end = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def profile_decode(b, depth: int, steps: int = 4, first_token: int = 0) -> dict[str, Any]:
    """Where one decode step's time goes, from torch.profiler (run apart from the timed repeats: it slows things).

    Returns per token: ``profiled_ms`` (the step's wall time under the profiler), ``torch_ops_ms`` (host time inside
    torch operators: on a CPU the arithmetic itself), and on CUDA ``gpu_busy_ms`` (time the GPU's kernels and copies
    ran), ``host_blocked_ms`` (time the host sat in synchronising calls, waiting for the GPU), ``host_work_ms``
    (profiled wall minus blocked: Python, exllamav2's host code and kernel launches) and ``kernel_launches``.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = str(b.device).startswith("cuda")
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    b.fill_cache(depth)
    b.synchronize()
    tok = first_token
    with _quiet_stderr_fd(), profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = int(b.decode_step(tok).argmax())
        b.synchronize()
        wall = time.perf_counter() - t0
    events = prof.events()
    host = [e for e in events if e.device_type == DeviceType.CPU]
    out: dict[str, Any] = {"profiled_ms": wall * 1e3 / steps,
                           "torch_ops_ms": sum(e.self_cpu_time_total for e in host if e.name.startswith("aten::"))
                           / 1e3 / steps,
                           "gpu_busy_ms": None, "host_blocked_ms": None, "host_work_ms": None, "kernel_launches": None}
    if cuda:
        dev = [e for e in events if e.device_type == DeviceType.CUDA]
        # the time at least one kernel or copy ran (the union of their intervals: annotations may overlap them)
        busy_us = busy_time_us([(e.time_range.start, e.time_range.end) for e in dev])
        blocked_us = sum(e.time_range.elapsed_us() for e in host if e.name in _BLOCKING_CALLS)
        launches = sum(1 for e in host if e.name.startswith(("cudaLaunch", "cuLaunch")))
        out.update(gpu_busy_ms=busy_us / 1e3 / steps if dev else None,
                   host_blocked_ms=blocked_us / 1e3 / steps,
                   host_work_ms=max(0.0, wall * 1e3 - blocked_us / 1e3) / steps,
                   kernel_launches=launches / steps)
    return out


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _flat_memory(prefix: str, reading: dict) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in (reading or {}).items() if isinstance(v, (int, float, str, type(None)))}


def _decode_bytes_of(b, depth: int) -> dict[str, Any]:
    """What one decoded token reads on the loaded backend ``b`` at ``depth`` (see the module's docstring).

    exllamav2: the checkpoint's GPU-resident bytes and the cache mode's bytes per token (``memory``). The reference:
    its own tensors in its own dtype (float32 on a CPU: twice fp16's bytes), counted from the loaded model.
    """
    if b.name == "reference" and hasattr(b, "model"):
        m = b.model
        tensors = [m.norm, m.lm_head]
        for layer in m.layers:
            tensors += [t for t in vars(layer).values() if hasattr(t, "element_size")]
        weights = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        kv = int(m.cache.bytes_per_token()) * depth
        return {"weights_bytes": int(weights), "kv_bytes": kv, "total_bytes": int(weights) + kv,
                "counted": f"reference {str(b.dtype).replace('torch.', '')} tensors: layers, final norm, head "
                           f"(not the input embedding unless tied as the head); K and V of {depth} positions"}
    d = decode_bytes(b.model_dir, depth, b.cache_mode)
    d["counted"] = (f"EXL2 GPU-resident weights incl. head and norms (not the input embedding, in system RAM); K and "
                    f"V of {depth} positions at {b.cache_mode}")
    return d


def measure_loaded(b, depth: int, *, repeats: int = 5, warmup: int = 2, decode_tokens: int = 32,
                   prefill_tokens: int = 512, profile_steps: int = 4, bandwidth_bytes_s: float | None = None,
                   progress: bool = True, desc: str = "") -> dict[str, Any]:
    """Measure one depth on an already loaded backend ``b`` (its cache length is ``b.max_seq_len``)."""
    from helpers.core.progress import progress as bar

    ctx, mode = int(b.max_seq_len), str(b.cache_mode)
    check_config(ctx, depth, decode_tokens=decode_tokens, exllamav2=(b.name == "exllamav2"))
    if repeats < 1 or warmup < 0 or decode_tokens < 1 or prefill_tokens < 0:
        raise CourseError("repeats and decode_tokens must be at least 1, warmup and prefill_tokens at least 0")
    n_prefill = min(prefill_tokens, ctx - depth)
    ids = _prompt_ids(b.vocab_size, n_prefill) if n_prefill else None
    rounds = warmup + repeats
    pbar = bar(total=rounds * (decode_tokens + (1 if n_prefill else 0)), desc=desc or f"ctx {ctx} depth {depth}",
               unit="tok") if progress else None
    prefill_s, decode, walls = [], [], []
    try:
        for r in range(rounds):
            if n_prefill:
                dt = _time_prefill(b, depth, ids)
                if r >= warmup:
                    prefill_s.append(dt)
                if pbar:
                    pbar.update(1)
            run = _time_decode(b, depth, decode_tokens, first_token=0)
            if r >= warmup:
                decode.append(decode_tokens / run["seconds"])
                walls += run["walls"]
            if pbar:
                pbar.update(decode_tokens)
    finally:
        if pbar:
            pbar.close()
    mem_run = b.memory()
    prof = profile_decode(b, depth, steps=profile_steps) if profile_steps else {}
    d = summarize(decode)
    row: dict[str, Any] = {
        "ctx": ctx, "depth": depth, "cache_mode": mode, "backend": b.name, "device": str(b.device),
        "torch_threads": _torch_threads(),
        "decode_tokens": decode_tokens, "repeats": repeats, "warmup": warmup,
        "decode_tok_s": d["median"], "decode_tok_s_min": d["min"], "decode_tok_s_max": d["max"],
        "decode_spread": d["spread"], "decode_tok_s_all": decode,
        "prefill_tokens": n_prefill,
    }
    if n_prefill:
        p = summarize([n_prefill / s for s in prefill_s])
        row.update(prefill_tok_s=p["median"], prefill_tok_s_min=p["min"], prefill_tok_s_max=p["max"],
                   prefill_spread=p["spread"])
    else:
        row.update(prefill_tok_s=None)
    step_ms = statistics.median(walls) * 1e3
    cuda = str(b.device).startswith("cuda")
    gpu_ms = prof.get("gpu_busy_ms")
    ops_ms = prof.get("torch_ops_ms")
    row.update(
        step_ms=step_ms,
        # CUDA: the host's own work per token (profiled: Python, exllamav2's host code, kernel launches); CPU: all of it
        cpu_ms_per_token=prof.get("host_work_ms") if cuda else step_ms,
        gpu_ms_per_token=gpu_ms,
        gpu_idle_fraction=(max(0.0, 1 - gpu_ms / step_ms) if gpu_ms is not None and step_ms else None),
        host_blocked_ms_per_token=prof.get("host_blocked_ms"),
        kernel_launches_per_token=prof.get("kernel_launches"),
        profiled_ms_per_token=prof.get("profiled_ms"),
        torch_ops_ms_per_token=ops_ms,
        outside_torch_ops_ms_per_token=(max(0.0, prof["profiled_ms"] - ops_ms) if ops_ms is not None else None),
    )
    # bytes and the roofline
    counted = _decode_bytes_of(b, depth)
    row.update(weights_bytes=counted["weights_bytes"], kv_read_bytes=counted["kv_bytes"],
               bytes_per_token=counted["total_bytes"], bytes_counted=counted["counted"])
    if bandwidth_bytes_s is None:
        bandwidth_bytes_s = measure_bandwidth(str(b.device))
    row["bandwidth_gbs"] = bandwidth_bytes_s / 1e9
    roof = roofline_tok_s(row["bytes_per_token"], bandwidth_bytes_s)
    row.update(roofline_tok_s=roof, roofline_fraction=row["decode_tok_s"] / roof)
    if row.get("prefill_tok_s"):
        # prefill reads the weights once for the whole prompt: memory is not what limits it, compute is
        row["prefill_over_decode"] = row["prefill_tok_s"] / row["decode_tok_s"]
    row["cache_bytes"] = int(b.cache_bytes())
    row["cache_gib"] = row["cache_bytes"] / GIB
    row.update(_flat_memory("mem_after_run_", mem_run))
    return row


def bench(model_dir=None, *, ctx: int = 4096, depth: int = 128, cache_mode: str = "fp16", backend: str = "auto",
          repeats: int = 5, warmup: int = 2, decode_tokens: int = 32, prefill_tokens: int = 512,
          progress: bool = True, device: str | None = None, profile_steps: int = 4) -> dict[str, Any]:
    """One measurement (one row): load with a cache of ``ctx`` tokens, set it to ``depth``, time prefill and decode.

    Keys (units in the names): ctx, depth, cache_mode, backend, device, prefill_tok_s, decode_tok_s (median of
    ``repeats``), decode_tok_s_min/max, decode_spread = (max - min) / median, bytes_per_token (weights_bytes +
    kv_read_bytes), roofline_tok_s, roofline_fraction, bandwidth_gbs, cache_bytes, mem_* readings, step_ms,
    cpu_ms_per_token, gpu_ms_per_token (CUDA), gpu_idle_fraction, torch_ops_ms_per_token.
    """
    return bench_matrix(model_dir, ctxs=[ctx], depths=[depth], cache_modes=[cache_mode], backend=backend,
                        repeats=repeats, warmup=warmup, decode_tokens=decode_tokens, prefill_tokens=prefill_tokens,
                        progress=progress, device=device, profile_steps=profile_steps, skip_unfit=False)[0]


def plan_matrix(ctxs: Iterable[int], depths: Iterable[int], cache_modes: Iterable[str], *, decode_tokens: int = 32,
                backend: str = "auto", skip_unfit: bool = True) -> list[tuple[str, int, list[int]]]:
    """[(cache_mode, ctx, [depths])] to measure; combinations whose depth does not fit the cache are left out
    (``skip_unfit``) unless nothing would be left, then the first one's error is raised."""
    ctxs, depths, modes = list(ctxs), list(depths), [str(m).lower() for m in cache_modes]
    ex = _uses_exllamav2(backend)
    for c in ctxs:  # a cache length that cannot be paged is an error whatever the depth
        check_config(c, 0, exllamav2=ex)
    for m in modes:
        why = _needs_gpu(backend, m)
        if why:
            from helpers.core import devices as gpu

            gpu.require_cuda(f"measuring {why}")
    plan, first_error = [], None
    for m in modes:
        for c in ctxs:
            fit = []
            for d in depths:
                try:
                    check_config(c, d, decode_tokens=decode_tokens, exllamav2=ex)
                    fit.append(d)
                except CourseError as exc:
                    if not skip_unfit:
                        raise
                    first_error = first_error or exc
            if fit:
                plan.append((m, c, fit))
    if not plan:
        raise first_error or CourseError("nothing to measure: give at least one --ctx and one --depth")
    return plan


def bench_matrix(model_dir=None, *, ctxs: Iterable[int] = (4096, 32768), depths: Iterable[int] = (128,),
                 cache_modes: Iterable[str] = ("fp16",), backend: str = "auto", repeats: int = 5, warmup: int = 2,
                 decode_tokens: int = 32, prefill_tokens: int = 512, progress: bool = True,
                 device: str | None = None, profile_steps: int = 4, skip_unfit: bool = True,
                 model_label: str | None = None) -> list[dict[str, Any]]:
    """Every (cache mode, ctx, depth) combination; one load per (cache mode, ctx). Depths that do not fit a cache
    are skipped (a single combination that does not fit is an error)."""
    from helpers.engines import backend as backend_mod
    from helpers.models import embedded as models

    model_dir = models.resolve_model_dir(model_dir)
    plan = plan_matrix(ctxs, depths, cache_modes, decode_tokens=decode_tokens, backend=backend,
                       skip_unfit=skip_unfit)
    trained = _trained_ctx(model_dir)
    rows = []
    bw = None
    for mode, c, ds in plan:
        before = _memory_before_load()
        b = backend_mod.load(model_dir, max_seq_len=c, cache_mode=mode, backend=backend, device=device)
        try:
            mem_loaded = b.memory()
            if bw is None:  # the same threads as the decode it bounds
                bw = measure_bandwidth(str(b.device), threads=_torch_threads())
            for d in ds:
                row = measure_loaded(b, d, repeats=repeats, warmup=warmup, decode_tokens=decode_tokens,
                                     prefill_tokens=prefill_tokens, profile_steps=profile_steps,
                                     bandwidth_bytes_s=bw, progress=progress,
                                     desc=f"{mode} ctx {c} depth {d}")
                row.update(_flat_memory("mem_before_load_", before))
                row.update(_flat_memory("mem_loaded_", mem_loaded))
                if str(b.device).startswith("cuda"):
                    import torch

                    row["mem_peak_torch_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
                row.update(model=model_label or Path(model_dir).name, model_dir=str(model_dir),
                           trained_ctx=trained, beyond_trained_ctx=bool(trained and c > trained),
                           bandwidth_method=_bandwidth_method(str(b.device)))
                ds_bw = datasheet_bandwidth(_device_name(str(b.device)))
                row["datasheet_bandwidth_gbs"] = ds_bw / 1e9 if ds_bw else None
                rows.append(row)
        finally:
            b.unload()
    return rows


def _memory_before_load() -> dict[str, Any]:
    """Readings taken before a load (NVML's used bytes include other processes and the CUDA context)."""
    from helpers.core import devices as gpu

    out: dict[str, Any] = {"process_rss_bytes": gpu.process_rss_bytes()}
    if gpu.cuda_status()["available"]:
        import torch

        torch.cuda.reset_peak_memory_stats()
        out["nvml_used_bytes"] = gpu.nvml_used_bytes(torch.cuda.current_device())
    return out


def _bandwidth_method(device: str) -> str:
    if device.startswith("cuda"):
        return "median of 5 sums over a 1 GiB fp16 buffer, CUDA events"
    return f"median of 5 sums over a 256 MiB fp32 buffer, {_torch_threads()} torch threads"


def _device_name(device: str) -> str | None:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return None


# ---------------------------------------------------------------------------------------- fresh processes, CLI
def bench_subprocess(model_dir, *, ctx: int, depth: int, cache_mode: str = "fp16", backend: str = "auto",
                     repeats: int = 5, warmup: int = 2, decode_tokens: int = 32, prefill_tokens: int = 512,
                     model_label: str | None = None, timeout: float | None = None) -> list[dict[str, Any]]:
    """The same measurement in a fresh Python process (nothing cached, allocated or compiled by earlier runs)."""
    import tempfile

    from helpers.core.paths import REPO_DIR

    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "helpers", "bench", "--ctx", str(ctx), "--depth", str(depth), "--cache",
               cache_mode, "--backend", backend, "--repeats", str(repeats), "--warmup", str(warmup),
               "--decode-tokens", str(decode_tokens), "--prefill-tokens", str(prefill_tokens), "--out", str(out)]
        if model_dir is not None:
            cmd += ["--model", str(model_dir)]
        if model_label:
            cmd += ["--label", model_label]
        # the child's stdout goes to our stderr: exllamav2 prints while it loads, and `record` reads our stdout
        try:
            sink = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # a captured stderr (pytest, some notebooks) has no descriptor
            sink = None
        proc = subprocess.run(cmd, stdout=sink, timeout=timeout, cwd=REPO_DIR)
        if proc.returncode != 0 or not out.is_file():
            raise CourseError(f"the bench process for ctx {ctx} depth {depth} {cache_mode} failed (exit "
                              f"{proc.returncode}); run `python {' '.join(cmd[1:-2])}` to see why")
        return json.loads(out.read_text(encoding="utf-8"))["rows"]


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def format_rows(rows: list[dict], *, where: bool = False) -> str:
    """A plain table of bench rows (``where``: add the model and the device or GPU each row was measured on)."""
    head = (f"{'cache':<5} {'ctx':>6} {'depth':>6} {'prefill':>8} {'decode tok/s (min-max)':>23} {'spread':>6} "
            f"{'roofline':>8} {'fraction':>8} {'cache GiB':>9}")
    if where:
        head = f"{'model':<24} {'measured on':<22} " + head
    lines = [head]
    for r in rows:
        dec = f"{_fmt(r['decode_tok_s'])} ({_fmt(r['decode_tok_s_min'])}-{_fmt(r['decode_tok_s_max'])})"
        line = (f"{r['cache_mode']:<5} {r['ctx']:>6} {r['depth']:>6} {_fmt(r.get('prefill_tok_s')):>8} "
                f"{dec:>23} {_fmt(100 * r['decode_spread'], '.1f') + '%':>6} "
                f"{_fmt(r.get('roofline_tok_s')):>8} {_fmt(r.get('roofline_fraction'), '.3f'):>8} "
                f"{_fmt(r.get('cache_gib'), '.3f'):>9}")
        if where:
            line = f"{str(r.get('model', '?'))[:24]:<24} {str(r.get('gpu') or r.get('device', '?'))[:22]:<22} " + line
        lines.append(line)
    if rows and not where:
        r = rows[0]
        lines.append(f"roofline = {r['bandwidth_gbs']:.1f} GB/s measured on {r['device']} / bytes read per decoded "
                     "token (weights + KV cache at the depth); fraction = decode / roofline")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m helpers bench --ctx 4096,32768 --depth 128,30000 [--cache fp16,q4] [--model DIR] [--json]`"""
    ap = argparse.ArgumentParser(prog="python -m helpers bench",
                                 description="Prefill and decode tokens/s at cache lengths and context depths, "
                                             "with the memory-bandwidth roofline.")
    ap.add_argument("--ctx", default="4096,32768", help="cache lengths (max_seq_len), comma-separated; 4k = 4096")
    ap.add_argument("--depth", default="128", help="context depths: tokens already in the cache, comma-separated")
    ap.add_argument("--cache", default="fp16", help="cache modes, comma-separated: fp16, q8, q6, q4 (quantized: "
                                                    "exllamav2 on CUDA only)")
    ap.add_argument("--model", default=None, help="EXL2 model directory (default: $EXL2_COURSE_MODEL, else the "
                                                  "embedded model)")
    ap.add_argument("--backend", default="auto", choices=["auto", "exllamav2", "reference"])
    ap.add_argument("--device", default=None, help="cpu or cuda (reference backend)")
    ap.add_argument("--repeats", type=int, default=5, help="kept repeats (median, min, max)")
    ap.add_argument("--warmup", type=int, default=2, help="repeats run first and thrown away")
    ap.add_argument("--decode-tokens", type=int, default=32, help="decoded tokens per repeat")
    ap.add_argument("--prefill-tokens", type=int, default=512, help="prompt tokens per prefill (0: skip)")
    ap.add_argument("--label", default=None, help="the model's name in the results")
    ap.add_argument("--json", action="store_true", help="print one JSON object {provenance, rows}")
    ap.add_argument("--out", default=None, help="also write the JSON object {provenance, rows} to this file")
    ap.add_argument("--record", action="store_true", help="also save it under results/speed/")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise CourseError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        raise CourseError(f"--repeats must be at least 1, got {args.repeats}")
    if args.warmup < 0 or args.decode_tokens < 1 or args.prefill_tokens < 0:
        raise CourseError("--warmup and --prefill-tokens must be 0 or more, --decode-tokens 1 or more")
    ctxs = parse_int_list(args.ctx, "cache length")
    depths = parse_int_list(args.depth, "depth")
    modes = [m.strip().lower() for m in args.cache.split(",") if m.strip()]
    _check_modes(modes)
    single = len(ctxs) == 1 and len(depths) == 1
    rows = bench_matrix(args.model, ctxs=ctxs, depths=depths, cache_modes=modes, backend=args.backend,
                        repeats=args.repeats, warmup=args.warmup, decode_tokens=args.decode_tokens,
                        prefill_tokens=args.prefill_tokens, progress=not args.no_progress, device=args.device,
                        skip_unfit=not single, model_label=args.label)
    from helpers.core import results

    prov = results.provenance(["python", "-m", "helpers", "bench", *(argv if argv is not None else sys.argv[1:])])
    if args.record:
        where = prov.get("gpu") or prov.get("cpu") or prov["device"]
        path = results.save_result("speed", f"bench-{rows[0]['model']}-{where}-{prov['date'][:19]}", rows, prov=prov)
        print(f"recorded {path}", file=sys.stderr)
    doc = json.dumps({"provenance": prov, "rows": rows}, indent=1)
    if args.out:
        results.atomic_write_text(Path(args.out), doc + "\n")
    if args.json:
        print(doc)
    else:
        print(format_rows(rows))
    return 0


def _check_modes(modes: list[str]) -> None:
    from helpers.engines.backend import CACHE_MODES

    known = [m.lower() for m in CACHE_MODES]
    for m in modes:
        if m not in known:
            raise CourseError(f"unknown cache mode '{m}'; choose from {', '.join(known)}")
    if not modes:
        raise CourseError("no cache mode given; write e.g. --cache fp16,q4")


# ------------------------------------------------------------------------------------------------ GPU recordings
#: the 14B-shaped checkpoint of the seed case: Qwen2.5-14B's shape, random weights, 5.5 bits per weight
SYNTH_CONFIG = "qwen2.5-14b"
SYNTH_BPW = 5.5
SYNTH_LABEL = "Qwen2.5-14B-shaped 5.5 bpw (random weights)"
EMBEDDED_LABEL = "SmolLM2-135M-Instruct (embedded)"
#: the recorded matrix: cache lengths, depths (only where depth < ctx), cache modes
REC_CTXS = (4096, 32768)
REC_DEPTHS = (128, 30000)
REC_MODES = ("fp16", "q4")
REC_SETTINGS = dict(repeats=5, warmup=2, decode_tokens=64, prefill_tokens=512)


def synthetic_dir() -> Path:
    """The 14B-shaped 5.5 bpw checkpoint in the cache folder (written once)."""
    from helpers.format import synthetic
    from helpers.core.paths import cache_dir

    out = cache_dir() / "synthetic" / f"{SYNTH_CONFIG}-{SYNTH_BPW}bpw"
    if not (out / "config.json").exists():
        synthetic.write_synthetic(SYNTH_CONFIG, SYNTH_BPW, out)
    return out


def record_matrix(model_dir, label: str, name: str, *, ctxs=REC_CTXS, depths=REC_DEPTHS, modes=REC_MODES,
                  settings: dict | None = None, results_dir: Path | None = None) -> Path:
    """Every (mode, ctx, depth) of the matrix, each in a fresh process, saved as results/speed/<name>-<gpu>.json."""
    from helpers.core import devices as gpu
    from helpers.core import results
    from helpers.core.progress import progress

    gpu.require_cuda("recording decode speed")
    settings = {**REC_SETTINGS, **(settings or {})}
    plan = plan_matrix(ctxs, depths, modes, decode_tokens=settings["decode_tokens"], backend="exllamav2")
    jobs = [(m, c, d) for m, c, ds in plan for d in ds]
    rows = []
    for m, c, d in progress(jobs, desc=f"recording {label}", unit="config"):
        rows += bench_subprocess(model_dir, ctx=c, depth=d, cache_mode=m, backend="exllamav2", model_label=label,
                                 **settings)
    prov = results.provenance()
    return results.save_result("speed", f"{name}-{prov.get('gpu') or 'gpu'}", rows, prov=prov,
                               results_dir=results_dir,
                               extra={"what": f"decode/prefill speed of {label}, one fresh process per row",
                                      "settings": settings})


def record_repeatability(model_dir=None, label: str = SYNTH_LABEL, *, processes: int = 3, ctx: int = 4096,
                         depth: int = 128, cache_mode: str = "fp16", results_dir: Path | None = None) -> Path:
    """One configuration in ``processes`` fresh processes: the spread within each run and across runs."""
    from helpers.core import devices as gpu
    from helpers.core import results
    from helpers.core.progress import progress

    gpu.require_cuda("recording run-to-run variation")
    model_dir = model_dir or synthetic_dir()
    rows = []
    for i in progress(range(processes), desc="repeatability", unit="process"):
        for r in bench_subprocess(model_dir, ctx=ctx, depth=depth, cache_mode=cache_mode, backend="exllamav2",
                                  model_label=label, **REC_SETTINGS):
            r["process"] = i
            rows.append(r)
    across = run_to_run([r["decode_tok_s"] for r in rows])
    prov = results.provenance()
    return results.save_result("speed", f"repeatability-{prov.get('gpu') or 'gpu'}", rows, prov=prov,
                               results_dir=results_dir,
                               extra={"what": f"{label}, {cache_mode} cache {ctx}, depth {depth}, "
                                              f"{processes} fresh processes", "run_to_run": across})


def _record_synthetic(mode: str) -> Path:
    from helpers.core import devices as gpu

    gpu.require_cuda("recording the 14B-shaped checkpoint's speed")
    return record_matrix(synthetic_dir(), SYNTH_LABEL, f"speed-qwen2.5-14b-5.5bpw-{mode}", modes=(mode,))


def _record_embedded() -> Path:
    from helpers.core import devices as gpu
    from helpers.models import embedded as models

    gpu.require_cuda("recording the embedded model's speed")
    return record_matrix(models.embedded_model_dir(), EMBEDDED_LABEL, "speed-embedded")


def _record_repeatability() -> Path:
    return record_repeatability()


#: each runs on a CUDA machine (``python -m helpers record``), starts one fresh process per configuration, and
#: writes results/speed/<name>-<gpu>.json. The 14B matrix is split by cache mode to stay within one recording's time.
GPU_RECORDINGS: dict[str, Callable[[], Path]] = {
    "speed_embedded": _record_embedded,
    "speed_14b_synthetic_fp16": lambda: _record_synthetic("fp16"),
    "speed_14b_synthetic_q4": lambda: _record_synthetic("q4"),
    "speed_repeatability": _record_repeatability,
}


def load_recorded(results_dir: Path | None = None, *, include_repeatability: bool = False) -> list[dict]:
    """Every recorded speed row, each with its ``label`` (where and when it was measured), ``gpu`` and ``source``
    file. The repeatability runs (one configuration in several processes) are left out unless asked for."""
    from helpers.core import results

    out = []
    for doc in results.load_results("speed", results_dir=results_dir):
        if "run_to_run" in doc and not include_repeatability:
            continue
        lab = results.label(doc["provenance"])
        for r in doc["rows"]:
            out.append({**r, "label": lab, "source": Path(doc["path"]).name, "gpu": doc["provenance"].get("gpu")})
    return out


def load_run_to_run(results_dir: Path | None = None) -> list[dict]:
    """The recorded run-to-run documents: [{'label', 'what', 'run_to_run', 'within_spreads'}]."""
    from helpers.core import results

    out = []
    for doc in results.load_results("speed", results_dir=results_dir):
        if "run_to_run" in doc:
            out.append({"label": results.label(doc["provenance"]), "what": doc.get("what"),
                        "run_to_run": doc["run_to_run"],
                        "within_spreads": [r["decode_spread"] for r in doc["rows"]]})
    return out


def describe_repeatability(results_dir: Path | None = None) -> str:
    """Within-run spread of each process and the spread across processes, per recorded repeatability run."""
    docs = load_run_to_run(results_dir)
    if not docs:
        return "repeatability: not recorded yet: run `make gpu-results` on a CUDA machine"
    lines = []
    for d in docs:
        within = ", ".join(f"{100 * s:.1f}%" for s in d["within_spreads"])
        rr = d["run_to_run"]
        ok = all(s < GPU_SPREAD_TARGET for s in d["within_spreads"])
        lines.append(f"{d['what']} ({d['label']}):\n  within each run (max-min)/median of the decode repeats: {within} "
                     f"({'all' if ok else 'NOT all'} under {100 * GPU_SPREAD_TARGET:.0f}%)\n  across "
                     f"{rr['processes']} processes: medians {rr['min_tok_s']:.1f}-{rr['max_tok_s']:.1f} tok/s, "
                     f"(max-min)/median {100 * rr['spread']:.1f}%")
    return "\n".join(lines)


def format_time_split(rows: list[dict]) -> str:
    """Per decoded token: wall time, and where it went (GPU busy vs idle; on a CPU, inside torch operators or not)."""
    head = (f"{'measured on':<22} {'model':<22} {'cache':<5} {'ctx':>6} {'depth':>6} {'ms/token':>9} "
            f"{'GPU busy':>9} {'GPU idle':>8} {'launches':>8} {'host ms':>8} {'in torch ops':>12}")
    lines = [head]
    for r in rows:
        idle = f"{100 * r['gpu_idle_fraction']:.0f}%" if r.get("gpu_idle_fraction") is not None else "-"
        ops = r.get("torch_ops_ms_per_token")
        share = f"{100 * ops / r['profiled_ms_per_token']:.0f}%" if ops and r.get("profiled_ms_per_token") else "-"
        lines.append(f"{str(r.get('gpu') or r.get('device'))[:22]:<22} {str(r.get('model', '?'))[:22]:<22} "
                     f"{r['cache_mode']:<5} {r['ctx']:>6} {r['depth']:>6} {_fmt(r['step_ms'], '.2f'):>9} "
                     f"{_fmt(r.get('gpu_ms_per_token'), '.2f'):>9} {idle:>8} "
                     f"{_fmt(r.get('kernel_launches_per_token'), '.0f'):>8} {_fmt(r.get('cpu_ms_per_token'), '.2f'):>8} "
                     f"{share:>12}")
    return "\n".join(lines)
