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
from helpers.fallback.emulator import CARD_GIB, context_bytes_now, emulated_setup
from helpers.fallback.hostalloc import HostAllocLib, build_hostalloc
from helpers.fallback.linux_oom import linux_oom_demo


def _emulated(model_dir, what: str, **settings):
    """The emulated 16 GiB card's setup, with the CUDA context this process measured."""
    nvml_before = gpu.nvml_used_bytes()          # before CUDA starts in this process
    gpu.require_cuda(what)
    return emulated_setup(resolve_model_dir(model_dir), context_bytes=context_bytes_now(nvml_before), **settings)


def record_compare(max_seq_len: int, *, model_dir=None, results_dir: Path | None = None, load_path: str = "autosplit",
                   depth: int = 128) -> Path:
    """Record ``compare`` for one cache length and load path into results/fallback/ (run it in a fresh process)."""
    setup = _emulated(model_dir, "recording the emulated sysmem fallback", max_seq_len=max_seq_len)
    lib = HostAllocLib(build_hostalloc())
    out = compare(setup, depth=depth, lib=lib, load_path=load_path)
    s = out["summary"]
    if s["spilled_bytes"]:
        s.update(cleanup_checks(setup, lib=lib, load_path=load_path))
    prov = results.provenance()
    return results.save_result(TOPIC, result_name(max_seq_len, load_path, prov), [out["summary"]], prov=prov,
                               results_dir=results_dir,
                               extra={"what": f"Qwen2.5-14B-shaped 5.5 bpw on an emulated {CARD_GIB:g} GiB card, "
                                              f"cache {max_seq_len}, {load_path} load path, {s['depth']} tokens deep: "
                                              "native vs emulated decode, alternating rounds",
                                      "measurements": out["measurements"], "decisions": out["decisions"]})


def record_oom(*, model_dir=None, results_dir: Path | None = None, max_seq_len: int = 32768) -> Path:
    row = linux_oom_demo(_emulated(model_dir, "recording Linux's out-of-memory", max_seq_len=max_seq_len))
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
