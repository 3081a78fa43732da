"""GPU recordings of the emulated sysmem fallback (notebook 04): native vs emulated decode on an emulated 16 GiB card
at 4k and 32k for both load paths, and Linux's out-of-memory for the same overflow, into results/fallback/ (read back
by ``helpers.fallback.emulated_report.load_recorded``)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from helpers.core import devices as gpu
from helpers.core import results
from helpers.fallback.compare import cleanup_checks, compare, resolve_model_dir
from helpers.fallback.emulated_report import TOPIC, result_name
from helpers.fallback.emulator import CARD_GIB, context_bytes_now
from helpers.fallback.hostalloc import HostAllocLib, build_hostalloc
from helpers.fallback.linux_oom import linux_oom_demo


def record_compare(max_seq_len: int, *, model_dir=None, results_dir: Path | None = None, load_path: str = "autosplit",
                   **kw) -> Path:
    """Record ``compare`` for one cache length and load path into results/fallback/ (run it in a fresh process)."""
    nvml_before = gpu.nvml_used_bytes()          # before CUDA starts in this process
    gpu.require_cuda("recording the emulated sysmem fallback")
    ctx_bytes = context_bytes_now(nvml_before)
    lib = HostAllocLib(build_hostalloc())
    out = compare(resolve_model_dir(model_dir), max_seq_len=max_seq_len, context_bytes=ctx_bytes, lib=lib,
                  load_path=load_path, **kw)
    s = out["summary"]
    if s["spilled_bytes"]:
        s.update(cleanup_checks(resolve_model_dir(model_dir), max_seq_len=max_seq_len, cache_mode=s["cache_mode"],
                                budget_bytes=s["budget_bytes"], lib=lib, load_path=load_path))
    prov = results.provenance()
    return results.save_result(TOPIC, result_name(max_seq_len, load_path, prov), [out["summary"]], prov=prov,
                               results_dir=results_dir,
                               extra={"what": f"Qwen2.5-14B-shaped 5.5 bpw on an emulated {CARD_GIB:g} GiB card, "
                                              f"cache {max_seq_len}, {load_path} load path, {s['depth']} tokens deep: "
                                              "native vs emulated decode, alternating rounds",
                                      "measurements": out["measurements"], "decisions": out["decisions"]})


def record_oom(*, model_dir=None, results_dir: Path | None = None, **kw) -> Path:
    nvml_before = gpu.nvml_used_bytes()
    gpu.require_cuda("recording Linux's out-of-memory")
    ctx_bytes = context_bytes_now(nvml_before)
    row = linux_oom_demo(resolve_model_dir(model_dir), context_bytes=ctx_bytes, **kw)
    prov = results.provenance()
    return results.save_result(TOPIC, f"linux-oom-{prov.get('gpu') or 'gpu'}", [row], prov=prov,
                               results_dir=results_dir,
                               extra={"what": "the 32k overflow without the emulator, VRAM capped to the small card"})


GPU_RECORDINGS: dict[str, Callable[[], Path]] = {
    "emulated_4k": lambda: record_compare(4096),
    "emulated_32k": lambda: record_compare(32768),
    # model.load(), then the cache: the last cache layers spill, read only as deep as the context goes
    "emulated_32k_load": lambda: record_compare(32768, load_path="load", depth=16384),
    "linux_oom": lambda: record_oom(),
}
