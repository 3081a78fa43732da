"""GPU recordings of memory: the CUDA context, and predicted vs measured allocations (each in a fresh process).

Run on a CUDA machine (``python -m helpers record``); the results land in results/memory and are read back by
helpers.memory.recorded and helpers.memory.breakdown's ``cuda_context_default``. ``import_external_memory`` (called by
scripts/import_external.py) writes the memory figure of a record measured outside the course into results/memory,
labelled external like its speed rows.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Iterable

from helpers.core import devices as gpu
from helpers.core import results
from helpers.core.errors import CourseError
from helpers.core.progress import progress
from helpers.core.units import gib
from helpers.engines import exllama
from helpers.memory.breakdown import breakdown
from helpers.memory.recorded import EXTERNAL_KIND
from helpers.memory.setup import LoadSetup
from helpers.models.embedded import embedded_model_dir
from helpers.models.synthetic_dirs import synthetic_14b_dir
from helpers.recordings.speed import external_speed_record
from helpers.speed.report import SYNTH_LABEL

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

    loaded = exllama.prepare(LoadSetup(model_dir, max_seq_len=max_seq_len, cache_mode=mode))
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
                                 models: Iterable[str] = ("embedded", "qwen2.5-14b"), label: str = "") -> Path:
    """Predicted vs measured for the embedded model and a synthetic Qwen2.5-14B 5.5 bpw checkpoint, each cache mode
    and length in a fresh process. Rows say whether torch's allocation is within 2% and NVML within 3%. ``label``
    goes into the file name (predicted-vs-measured-<label>-<gpu>-<date>), so that recordings of different models on
    one day keep their own files."""
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
    jobs = [(name, d, mode, max_seq_len) for name, d in dirs.items() for mode in modes for max_seq_len in lengths]
    for name, d, mode, max_seq_len in progress(jobs, desc="memory: fresh process per configuration"):
        meas = _run_child(f"_child_measure({str(d)!r}, {mode!r}, {int(max_seq_len)})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bd = breakdown(LoadSetup(str(d), max_seq_len=max_seq_len, cache_mode=mode, cuda_context_gib=0,
                                     reserve_gib=0))
        row = {"kind": "predicted_vs_measured", "model": name, "model_dir": str(d), "cache_mode": mode,
               "max_seq_len": int(max_seq_len), "predicted_torch_bytes": bd.exllamav2_resident_bytes,
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
    part = f"{label}-" if label else ""
    name = f"predicted-vs-measured-{part}{results.slug(prov.get('gpu') or 'gpu')}-{prov['date'][:10]}"
    return results.save_result("memory", name, rows, prov=prov)


# --------------------------------------------------------------------------------------- external records
_EXTERNAL_FIELD = re.compile(r"^torch_bytes_allocated_by_exllamav2_at_cache_(\d+)_gib$")


def _from_text(pattern: str, text: str, what: str, src: Path) -> str:
    m = re.search(pattern, text)
    if m is None:
        raise CourseError(f"{src.name}: the record does not state {what}; the memory figure cannot be matched to a "
                          "configuration, so it is not imported")
    return m.group(1)


def external_memory_record(src: Path) -> tuple[str, dict, list[dict], dict]:
    """(name, provenance, rows, extra) of the memory figures of an external record (see
    ``helpers.recordings.speed.external_speed_record``, whose provenance it shares: external, source file, SHA-256).

    One row per ``torch_bytes_allocated_by_exllamav2_at_cache_<N>_gib`` figure, copied untouched into
    ``torch_allocated_gib``. The configuration it was measured at is read from the record's own text (the model
    detail and the method), never assumed: a record that does not state it is refused. No prediction is stored:
    ``helpers.memory.recorded.external_points`` computes it from the course's model whenever it is shown.
    """
    _, prov, _, extra = external_speed_record(src)
    memory, method, detail = extra.get("memory", {}), prov["method"], prov["model_detail"]
    model = _from_text(r"(Qwen2\.5-\d+B) shape", detail, "the model's shape", src).lower()
    bpw = float(_from_text(r"at ([\d.]+) bpw", detail, "the bits per weight", src))
    head_bits = int(_from_text(r"\(head (\d+) bits\)", detail, "the head's bits", src))
    max_input_len = int(_from_text(r"max_input_len (\d+)", method, "max_input_len", src))
    att = int(_from_text(r"max_attention_size (\d+)\^2", method, "max_attention_size", src))
    _from_text(r"(ExLlamaV2Cache)\(", method, "an FP16 cache (ExLlamaV2Cache)", src)
    _from_text(r"(load_autosplit)", method, "how it was loaded (load_autosplit)", src)
    rows = []
    for key, value in memory.items():
        m = _EXTERNAL_FIELD.match(key)
        if m is None:
            continue
        rows.append({"kind": EXTERNAL_KIND, "model": SYNTH_LABEL, "model_config": model, "bpw": bpw,
                     "head_bits": head_bits, "cache_mode": "fp16", "max_seq_len": int(m.group(1)),
                     "max_input_len": max_input_len, "max_attention_size": att * att, "flash_attn": False,
                     "load": "load_autosplit", "torch_allocated_gib": value, "source_field": f"memory.{key}",
                     "external": True})
    if not rows:
        raise CourseError(f"{src.name}: no torch_bytes_allocated_by_exllamav2_at_cache_<N>_gib figure in its memory "
                          "block: nothing to import")
    extra = {"what": f"memory allocated by exllamav2 while loading, from: {extra['what']}", "memory": memory,
             "caveats": extra.get("caveats", []),
             "derived": {"torch_allocated_gib": "the record's memory figure named in source_field, copied untouched",
                         "configuration": "model_config, bpw, head_bits from provenance.model_detail; max_input_len, "
                                          "max_attention_size, the cache class and load_autosplit from "
                                          "provenance.method; max_seq_len from the figure's name",
                         "prediction": "not stored: helpers.memory.recorded computes it with the course's model "
                                       "(weights + cache + scratch, no CUDA context, no reserve) when shown"},
             "edits": extra.get("edits", [])}
    return "external-" + Path(src).stem, prov, rows, extra


def import_external_memory(src: Path, results_dir: Path | None = None) -> Path:
    """Write the memory figures of an external record into results/memory/ (see ``external_memory_record``)."""
    name, prov, rows, extra = external_memory_record(Path(src))
    return results.save_result("memory", name, rows, prov=prov, extra=extra, results_dir=results_dir)


#: the 14B-shaped checkpoint and the embedded model apart: the embedded model must be built on the GPU machine from
#: its GGUF (98 MB), the synthetic checkpoint is written there from nothing, so either can run without the other
GPU_RECORDINGS = {
    "memory_cuda_context": record_cuda_context,
    "memory_predicted_vs_measured_14b": lambda: record_predicted_vs_measured(models=("qwen2.5-14b",), label="14b"),
    "memory_predicted_vs_measured_embedded": lambda: record_predicted_vs_measured(models=("embedded",),
                                                                                  label="embedded"),
}
