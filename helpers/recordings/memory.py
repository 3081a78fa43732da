"""GPU recordings of memory: the CUDA context, and predicted vs measured allocations (each in a fresh process).

Run on a CUDA machine (``python -m helpers record``); the results land in results/memory and are read back by
helpers.memory.recorded and helpers.memory.breakdown's ``cuda_context_default``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Iterable

from helpers.core import devices as gpu
from helpers.core import results
from helpers.core.progress import progress
from helpers.core.units import gib
from helpers.engines import exllama
from helpers.memory.breakdown import breakdown
from helpers.models.embedded import embedded_model_dir
from helpers.models.synthetic_dirs import synthetic_14b_dir

_JSON_TAG = "@@MEMORY_JSON@@"


def _nvml_used() -> int | None:
    return gpu.nvml_used_bytes(int(os.environ.get("EXL2_COURSE_GPU_INDEX", "0")))


def _child_cuda_context() -> dict:
    """(child process) NVML used before CUDA starts, after torch.cuda.init() + a tiny allocation; minus the
    allocator's segment for that tiny tensor."""
    before = _nvml_used()
    import torch

    torch.cuda.init()
    x = torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    after = _nvml_used()
    reserved = int(torch.cuda.memory_reserved())
    # libraries: the first fp16 matmul creates the cuBLAS handle and loads its kernels (one-time, per process)
    a = torch.ones((64, 64), dtype=torch.float16, device="cuda")
    (a @ a).sum().item()
    torch.cuda.synchronize()
    after_lib = _nvml_used()
    reserved_lib = int(torch.cuda.memory_reserved())
    del x, a
    out = {"nvml_before_bytes": before, "nvml_after_init_bytes": after, "nvml_after_matmul_bytes": after_lib,
           "torch_reserved_bytes": reserved, "torch_reserved_after_matmul_bytes": reserved_lib}
    if before is not None and after is not None:
        out["cuda_context_bytes"] = int(after - before - reserved)
        out["cuda_context_raw_bytes"] = int(after - before)
        if after_lib is not None:
            out["cuda_libraries_bytes"] = int((after_lib - after) - (reserved_lib - reserved))
    return out


def _child_measure(model_dir: str, mode: str, max_seq_len: int) -> dict:
    """(child process) Load one EXL2 model with load_autosplit and one cache; report torch and NVML readings."""
    out = _child_cuda_context()
    import torch

    loaded = exllama.prepare(model_dir, max_seq_len=max_seq_len, cache_mode=mode)
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()  # the matmul above left a cuBLAS workspace: count from a clean baseline
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    alloc0 = int(torch.cuda.memory_allocated())
    exllama.load_modules(loaded, "autosplit")
    torch.cuda.synchronize()
    out["torch_allocated_bytes"] = int(torch.cuda.memory_allocated()) - alloc0
    out["torch_peak_bytes"] = int(torch.cuda.max_memory_allocated()) - alloc0
    if clear is not None:
        clear()
    out["torch_allocated_no_cublas_bytes"] = int(torch.cuda.memory_allocated()) - alloc0
    out["cublas_workspace_bytes"] = out["torch_allocated_bytes"] - out["torch_allocated_no_cublas_bytes"]
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    out["torch_reserved_after_bytes"] = int(torch.cuda.memory_reserved())
    after = _nvml_used()
    if after is not None and out.get("nvml_before_bytes") is not None:
        out["nvml_used_delta_bytes"] = int(after - out["nvml_before_bytes"])
    return out


def _run_child(call: str, timeout: int = 1800) -> dict:
    code = (f"import json; from helpers.recordings.memory import _JSON_TAG, {call.split('(')[0]}; "
            f"print(_JSON_TAG + json.dumps({call}))")
    env = dict(os.environ, EXL2_COURSE_NO_PROGRESS="1")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(_JSON_TAG):
            return json.loads(line[len(_JSON_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}


def record_cuda_context(repeats: int = 3) -> Path:
    """Measure the CUDA context in ``repeats`` fresh processes; saves results/memory/cuda-context-<gpu>-<date>.json."""
    gpu.require_cuda("measuring the CUDA context")
    rows = []
    for i in range(repeats):
        r = _run_child("_child_cuda_context()")
        r.update(kind="cuda_context", run=i)
        if "cuda_context_bytes" in r:
            r["cuda_context_gib"] = round(gib(r["cuda_context_bytes"]), 4)
        rows.append(r)
    prov = results.provenance()
    name = f"cuda-context-{results.slug(prov.get('gpu') or 'gpu')}-{prov['date'][:10]}"
    return results.save_result("memory", name, rows, prov=prov)


def record_predicted_vs_measured(modes: Iterable[str] = ("fp16", "q8", "q4"),
                                 lengths: Iterable[int] = (4096, 32768),
                                 models: Iterable[str] = ("embedded", "qwen2.5-14b")) -> Path:
    """Predicted vs measured for the embedded model and a synthetic Qwen2.5-14B 5.5 bpw checkpoint, each cache mode
    and length in a fresh process. Rows say whether torch's allocation is within 2% and NVML within 3%."""
    gpu.require_cuda("recording predicted vs measured memory")
    dirs = {}
    for m in models:
        if m == "embedded":
            dirs[m] = Path(embedded_model_dir())
        elif m == "qwen2.5-14b":
            dirs["qwen2.5-14b-synthetic-5.5bpw"] = synthetic_14b_dir()
        else:
            dirs[Path(m).name] = Path(m)
    rows = []
    jobs = [(name, d, mode, L) for name, d in dirs.items() for mode in modes for L in lengths]
    for name, d, mode, L in progress(jobs, desc="memory: fresh process per configuration"):
        meas = _run_child(f"_child_measure({str(d)!r}, {mode!r}, {int(L)})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bd = breakdown(str(d), max_seq_len=L, cache_mode=mode, cuda_context_bytes=0, reserve_bytes=0)
        row = {"kind": "predicted_vs_measured", "model": name, "model_dir": str(d), "cache_mode": mode,
               "max_seq_len": int(L), "predicted_torch_bytes": bd.exllamav2_resident_bytes,
               "predicted_weights_bytes": bd.weights_bytes, "predicted_kv_cache_bytes": bd.kv_cache_bytes,
               "predicted_scratch_bytes": bd.scratch_bytes, **meas}
        if "torch_allocated_no_cublas_bytes" in meas:
            m = meas["torch_allocated_no_cublas_bytes"]
            row["torch_error_pct"] = round(100.0 * (bd.exllamav2_resident_bytes - m) / m, 3)
            row["within_2pct_torch"] = abs(row["torch_error_pct"]) <= 2.0
        if "nvml_used_delta_bytes" in meas and "cuda_context_bytes" in meas:
            # one-time process costs measured in the same fresh process before the model loaded (not fitted)
            one_time = meas["cuda_context_bytes"] + int(meas.get("cuda_libraries_bytes") or 0)
            row["one_time_process_bytes"] = one_time
            pred = bd.exllamav2_resident_bytes + one_time
            row["predicted_nvml_bytes"] = pred
            measured = meas["nvml_used_delta_bytes"]
            row["nvml_error_pct"] = round(100.0 * (pred - measured) / measured, 3)
            row["within_3pct_nvml"] = abs(row["nvml_error_pct"]) <= 3.0
        for k in [k for k in row if k.endswith("_bytes") and isinstance(row[k], int)]:
            row[k[:-6] + "_gib"] = round(gib(row[k]), 4)
        rows.append(row)
    prov = results.provenance()
    name = f"predicted-vs-measured-{results.slug(prov.get('gpu') or 'gpu')}-{prov['date'][:10]}"
    return results.save_result("memory", name, rows, prov=prov)


GPU_RECORDINGS = {
    "memory_cuda_context": record_cuda_context,
    "memory_predicted_vs_measured": record_predicted_vs_measured,
}
