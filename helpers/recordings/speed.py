"""GPU recordings of decode and prefill speed (notebook 03): the course's matrix of cache lengths, depths and cache
modes for the embedded model and the 14B-shaped checkpoint, and the run-to-run variation, each configuration in a
fresh process (``helpers.speed.harness.bench_subprocess``), into results/speed/ (read back by
``helpers.speed.report.load_recorded``)."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from helpers.core import devices as gpu
from helpers.core import results
from helpers.core.errors import CourseError
from helpers.core.progress import progress
from helpers.memory.kv_cache import kv_cache_bytes
from helpers.memory.setup import LoadSetup
from helpers.models import embedded as models
from helpers.models.synthetic_dirs import synthetic_14b_dir
from helpers.speed.harness import Measure, bench_subprocess, run_to_run
from helpers.speed.matrix import plan_matrix
from helpers.speed.report import EMBEDDED_LABEL, SYNTH_LABEL
from helpers.speed.roofline import decode_bytes, roofline_tok_s

#: the recorded matrix: cache lengths, depths (only where depth < max_seq_len), cache modes
REC_MAX_SEQ_LENS = (4096, 32768)
REC_DEPTHS = (128, 30000)
REC_MODES = ("fp16", "q4")
REC_MEASURE = Measure(backend="exllamav2", repeats=5, warmup=2, decode_tokens=64, prefill_tokens=512)


def record_matrix(model_dir, label: str, name: str, *, max_seq_lens=REC_MAX_SEQ_LENS, depths=REC_DEPTHS,
                  modes=REC_MODES, measure: Measure = REC_MEASURE, results_dir: Path | None = None) -> Path:
    """Every (mode, max_seq_len, depth) of the matrix, each in a fresh process, saved as
    results/speed/<name>-<gpu>.json."""
    gpu.require_cuda("recording decode speed")
    plan = plan_matrix(max_seq_lens, depths, modes, decode_tokens=measure.decode_tokens, backend=measure.backend)
    jobs = [(m, c, d) for m, c, ds in plan for d in ds]
    base = LoadSetup(model_dir)
    rows = []
    for m, c, d in progress(jobs, desc=f"recording {label}", unit="config"):
        rows += bench_subprocess(base.with_(max_seq_len=c, cache_mode=m), depth=d, measure=measure,
                                 model_label=label)
    prov = results.provenance()
    return results.save_result("speed", f"{name}-{prov.get('gpu') or 'gpu'}", rows, prov=prov,
                               results_dir=results_dir,
                               extra={"what": f"decode/prefill speed of {label}, one fresh process per row",
                                      "settings": asdict(measure)})


def record_repeatability(setup: LoadSetup | None = None, label: str = SYNTH_LABEL, *, processes: int = 3,
                         depth: int = 128, results_dir: Path | None = None) -> Path:
    """One configuration (default: the 14B-shaped checkpoint, an fp16 cache of 4096) in ``processes`` fresh
    processes: the spread within each run and across runs."""
    gpu.require_cuda("recording run-to-run variation")
    setup = setup or LoadSetup(synthetic_14b_dir(), max_seq_len=4096)
    rows = []
    for i in progress(range(processes), desc="repeatability", unit="process"):
        for r in bench_subprocess(setup, depth=depth, measure=REC_MEASURE, model_label=label):
            r["process"] = i
            rows.append(r)
    across = run_to_run([r["decode_tok_s"] for r in rows])
    prov = results.provenance()
    return results.save_result("speed", f"repeatability-{prov.get('gpu') or 'gpu'}", rows, prov=prov,
                               results_dir=results_dir,
                               extra={"what": f"{label}, {setup.cache_mode} cache {setup.max_seq_len}, depth {depth}, "
                                              f"{processes} fresh processes", "run_to_run": across})


def _record_synthetic(mode: str) -> Path:
    gpu.require_cuda("recording the 14B-shaped checkpoint's speed")
    return record_matrix(synthetic_14b_dir(), SYNTH_LABEL, f"speed-qwen2.5-14b-5.5bpw-{mode}", modes=(mode,))


def _record_embedded() -> Path:
    gpu.require_cuda("recording the embedded model's speed")
    return record_matrix(models.embedded_model_dir(), EMBEDDED_LABEL, "speed-embedded")


def _record_repeatability() -> Path:
    return record_repeatability()


# --------------------------------------------------------------------------------------- external records
_EXTERNAL_MODEL = "qwen2.5-14b"
_EXTERNAL_BPW = 5.5


def _neutral(text: str) -> str:
    """A record's cross-references to notes outside the course, replaced by a pointer to its own caveats."""
    return re.sub(r"\s*\(see [A-Z]+\.md[^)]*\)", " (see the record's caveats)", text)


def external_speed_record(src: Path) -> tuple[str, dict, list[dict], dict]:
    """(name, provenance, rows, extra) of a decode-speed record measured outside the course (a standalone script on a
    GPU, before the course's harness existed), in the course's result format.

    Measured figures are copied untouched (decode_tok_s, load_s, the bandwidth block, the memory block, caveats).
    Fields the course derives for its tables and plots are added and listed under ``derived``: the weights a token
    reads (estimated from the shape at 5.5 bpw, ``memory.weights``), the bytes per position of the record's attention
    path (``speed.model.position_bytes``), the roofline at the record's measured HBM bandwidth.
    """
    raw = src.read_bytes()
    doc = json.loads(raw)
    p = doc["provenance"]
    if p.get("flash_attn") is not False or "Qwen2.5-14B" not in p.get("model", ""):
        raise CourseError(f"{src.name}: only the Qwen2.5-14B-shaped no-flash-attn record is understood by this import")
    prov = {"device": "cuda", "gpu": p["gpu"], "driver": p.get("driver"), "cuda": None, "cpu": None,
            "torch": str(p.get("cuda_torch", "")).removeprefix("torch ") or None,
            "exllamav2": str(p.get("exllamav2", "")).split(" ")[0],
            "python": p.get("python"), "os": None, "date": p["date"], "command": None,
            "external": True, "harness": p["harness"], "method": p["method"], "pcie": p.get("pcie"),
            "flash_attn": False, "model_detail": p["model"], "source_file": src.name,
            "source_sha256": hashlib.sha256(raw).hexdigest(), "imported_by": "scripts/import_external.py"}
    bw = float(doc["bandwidth"]["hbm_read_gbs"])
    rows = []
    for r in doc["rows"]:
        tok = float(r["decode_tok_s"])
        b = decode_bytes(_EXTERNAL_MODEL, r["depth"], "fp16", bpw=_EXTERNAL_BPW, flash_attn=False)
        row = {"run": r["run"], "max_seq_len": r["cache_len"], "depth": r["depth"], "cache_mode": "fp16",
               "backend": "exllamav2", "device": "cuda", "model": SYNTH_LABEL, "flash_attn": False,
               "attention_path": "torch attention with repeat_kv", "decode_tok_s": tok, "decode_tok_s_min": tok,
               "decode_tok_s_max": tok, "decode_spread": None, "prefill_tok_s": None, "load_s": r.get("load_s"),
               "external": True, "weights_bytes": b["weights_bytes"], "position_bytes": b["position_bytes"],
               "kv_read_bytes": b["kv_bytes"], "bytes_per_token": b["total_bytes"], "bandwidth_gbs": bw,
               "cache_bytes_computed": kv_cache_bytes(_EXTERNAL_MODEL, r["cache_len"], "fp16")}
        row["roofline_tok_s"] = roofline_tok_s(row["bytes_per_token"], bw * 1e9)
        row["roofline_fraction"] = tok / row["roofline_tok_s"]
        rows.append(row)
    memory = dict(doc.get("memory", {}))
    if "method" in memory:
        memory["method"] = _neutral(memory["method"])
    extra = {"what": doc["what"], "bandwidth": doc["bandwidth"], "memory": memory, "caveats": doc.get("caveats", []),
             "derived": {"weights_bytes": f"estimated from the Qwen2.5-14B shape at {_EXTERNAL_BPW} bpw, head 6 "
                                          "bits (helpers.memory.weights)",
                         "position_bytes": "helpers.speed.model.position_bytes (FP16 cache, no flash-attn)",
                         "bandwidth_gbs": "the record's measured HBM read bandwidth",
                         "roofline_tok_s": "bandwidth / (weights + position_bytes x depth)",
                         "cache_bytes_computed": "helpers.memory.kv_cache.kv_cache_bytes (not measured)"},
             "edits": ["memory.method: a cross-reference to a note outside the course replaced by \"see the record's "
                       "caveats\"; every figure untouched (source_sha256 is the original file's)"]}
    name = "external-" + src.stem
    return name, prov, rows, extra


def import_external(src: Path, results_dir: Path | None = None) -> Path:
    """Write an external record into results/speed/ (see ``external_speed_record``); returns the path written."""
    name, prov, rows, extra = external_speed_record(Path(src))
    return results.save_result("speed", name, rows, prov=prov, extra=extra, results_dir=results_dir)


#: each runs on a CUDA machine (``python -m helpers record``), starts one fresh process per configuration, and
#: writes results/speed/<name>-<gpu>.json. The 14B matrix is split by cache mode to stay within one recording's time.
GPU_RECORDINGS: dict[str, Callable[[], Path]] = {
    "speed_embedded": _record_embedded,
    "speed_14b_synthetic_fp16": lambda: _record_synthetic("fp16"),
    "speed_14b_synthetic_q4": lambda: _record_synthetic("q4"),
    "speed_repeatability": _record_repeatability,
}
