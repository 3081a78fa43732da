"""Where one decode step's time goes, from torch.profiler (run apart from the timed repeats: it slows things).

On CUDA: the time the GPU's kernels ran (the union of their intervals), the host's own work (wall minus the time it
sat in synchronising calls) and the kernels launched; on a CPU the time inside torch operators. At batch 1 a fast GPU
finishes each kernel before the host has launched the next, so it idles and decode stays far below the roofline.
"""
from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterable


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
