"""What a bench is asked to measure: cache lengths x depths x cache modes, each bad request refused in one line.

``check_config`` (a cache length and a depth), ``check_request`` (that, and whether it needs a CUDA GPU),
``plan_matrix`` (the combinations that fit) and ``check_modes``; contexts and depths are read by
``core.units.parse_token_list``.
"""
from __future__ import annotations

from typing import Iterable

from helpers.core import devices as gpu
from helpers.core.errors import CourseError
from helpers.memory.cache_modes import check_cache_mode
from helpers.memory.limits import PAGE


def check_modes(modes: list[str]) -> list[str]:
    """Each cache mode checked by ``memory.cache_modes.check_cache_mode`` (its one error message); at least one."""
    if not modes:
        raise CourseError("no cache mode given; write e.g. --cache fp16,q4")
    return [check_cache_mode(m) for m in modes]


def check_config(max_seq_len: int, depth: int, *, decode_tokens: int = 0, exllamav2: bool = False) -> None:
    """The bad inputs a bench can be given, each as one line."""
    if max_seq_len <= 0:
        raise CourseError(f"cache length must be positive, got {max_seq_len}")
    if exllamav2 and max_seq_len % PAGE:
        lo, hi = max_seq_len // PAGE * PAGE, -(-max_seq_len // PAGE) * PAGE
        near = f"{hi}" if lo == 0 else f"{lo} or {hi}"
        raise CourseError(f"exllamav2 pages its cache in blocks of {PAGE} tokens, so a cache of {max_seq_len} "
                          f"tokens cannot be paged; use a multiple of {PAGE} such as {near}")
    if depth < 0:
        raise CourseError(f"context depth must not be negative, got {depth}")
    if depth >= max_seq_len:
        raise CourseError(f"depth {depth} does not fit: the cache holds {max_seq_len} tokens, so the depth must be "
                          f"below {max_seq_len}; raise --max-seq-len or lower --depth")
    if decode_tokens and depth + decode_tokens > max_seq_len:
        raise CourseError(f"depth {depth} plus {decode_tokens} decoded tokens passes the cache's {max_seq_len} tokens; "
                          f"use a depth of at most {max_seq_len - decode_tokens} or fewer decode tokens")


def _needs_gpu(backend: str, cache_mode: str) -> str | None:
    """Why a configuration can only be measured on a CUDA GPU, or None."""
    if backend == "exllamav2":
        return "the exllamav2 backend"
    if str(cache_mode).lower() not in ("fp16",):
        return f"cache mode '{cache_mode}' (quantized caches exist only in exllamav2, on CUDA)"
    return None


def uses_exllamav2(backend: str) -> bool:
    """Whether a load with this backend choice ends in exllamav2 (then the cache pages in 256s)."""
    if backend == "exllamav2":
        return True
    if backend != "auto":
        return False
    return gpu.course_path()[0] == "gpu"


def _require_gpu_for(backend: str, cache_mode: str) -> None:
    why = _needs_gpu(backend, cache_mode)
    if why:
        gpu.require_cuda(f"measuring {why}")


def check_request(max_seq_len: int, depth: int, *, cache_mode: str = "fp16", backend: str = "auto",
                  decode_tokens: int = 0) -> None:
    """Every bad input of a bench as one line, before anything is loaded."""
    check_config(max_seq_len, depth, decode_tokens=decode_tokens, exllamav2=uses_exllamav2(backend))
    _require_gpu_for(backend, cache_mode)


def unfit(max_seq_lens: Iterable[int], depths: Iterable[int], *, decode_tokens: int = 32) -> list[str]:
    """One short line per (cache length, depth) a matrix leaves out, e.g. 'skipped 4096@30000: depth >= context'."""
    out = []
    for c in max_seq_lens:
        for d in depths:
            if d >= c:
                out.append(f"skipped {c}@{d}: depth >= context")
            elif decode_tokens and d + decode_tokens > c:
                out.append(f"skipped {c}@{d}: depth + {decode_tokens} decoded tokens > context")
    return out


def plan_matrix(max_seq_lens: Iterable[int], depths: Iterable[int], cache_modes: Iterable[str], *,
                decode_tokens: int = 32, backend: str = "auto",
                skip_unfit: bool = True) -> list[tuple[str, int, list[int]]]:
    """[(cache_mode, max_seq_len, [depths])] to measure; combinations whose depth does not fit the cache are left out
    (``skip_unfit``) unless nothing would be left, then the first one's error is raised."""
    max_seq_lens, depths, modes = list(max_seq_lens), list(depths), [str(m).lower() for m in cache_modes]
    ex = uses_exllamav2(backend)
    for c in max_seq_lens:  # a cache length that cannot be paged is an error whatever the depth
        check_config(c, 0, exllamav2=ex)
    for m in modes:
        _require_gpu_for(backend, m)
    plan, first_error = [], None
    for m in modes:
        for c in max_seq_lens:
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
        raise first_error or CourseError("nothing to measure: give at least one --max-seq-len and one --depth")
    return plan
