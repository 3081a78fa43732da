"""GPU recordings of decode and prefill speed (notebook 03): the course's matrix of cache lengths, depths and cache
modes for the embedded model and the 14B-shaped checkpoint, and the run-to-run variation, each configuration in a
fresh process (``helpers.speed.harness.bench_subprocess``), into results/speed/ (read back by
``helpers.speed.report.load_recorded``)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from helpers.core import devices as gpu
from helpers.core import results
from helpers.core.progress import progress
from helpers.models import embedded as models
from helpers.models.synthetic_dirs import synthetic_14b_dir
from helpers.speed.harness import bench_subprocess, run_to_run
from helpers.speed.matrix import plan_matrix
from helpers.speed.report import EMBEDDED_LABEL, SYNTH_LABEL

#: the recorded matrix: cache lengths, depths (only where depth < max_seq_len), cache modes
REC_MAX_SEQ_LENS = (4096, 32768)
REC_DEPTHS = (128, 30000)
REC_MODES = ("fp16", "q4")
REC_SETTINGS = dict(repeats=5, warmup=2, decode_tokens=64, prefill_tokens=512)


def record_matrix(model_dir, label: str, name: str, *, max_seq_lens=REC_MAX_SEQ_LENS, depths=REC_DEPTHS,
                  modes=REC_MODES, settings: dict | None = None, results_dir: Path | None = None) -> Path:
    """Every (mode, max_seq_len, depth) of the matrix, each in a fresh process, saved as
    results/speed/<name>-<gpu>.json."""
    gpu.require_cuda("recording decode speed")
    settings = {**REC_SETTINGS, **(settings or {})}
    plan = plan_matrix(max_seq_lens, depths, modes, decode_tokens=settings["decode_tokens"], backend="exllamav2")
    jobs = [(m, c, d) for m, c, ds in plan for d in ds]
    rows = []
    for m, c, d in progress(jobs, desc=f"recording {label}", unit="config"):
        rows += bench_subprocess(model_dir, max_seq_len=c, depth=d, cache_mode=m, backend="exllamav2",
                                 model_label=label, **settings)
    prov = results.provenance()
    return results.save_result("speed", f"{name}-{prov.get('gpu') or 'gpu'}", rows, prov=prov,
                               results_dir=results_dir,
                               extra={"what": f"decode/prefill speed of {label}, one fresh process per row",
                                      "settings": settings})


def record_repeatability(model_dir=None, label: str = SYNTH_LABEL, *, processes: int = 3, max_seq_len: int = 4096,
                         depth: int = 128, cache_mode: str = "fp16", results_dir: Path | None = None) -> Path:
    """One configuration in ``processes`` fresh processes: the spread within each run and across runs."""
    gpu.require_cuda("recording run-to-run variation")
    model_dir = model_dir or synthetic_14b_dir()
    rows = []
    for i in progress(range(processes), desc="repeatability", unit="process"):
        for r in bench_subprocess(model_dir, max_seq_len=max_seq_len, depth=depth, cache_mode=cache_mode,
                                  backend="exllamav2", model_label=label, **REC_SETTINGS):
            r["process"] = i
            rows.append(r)
    across = run_to_run([r["decode_tok_s"] for r in rows])
    prov = results.provenance()
    return results.save_result("speed", f"repeatability-{prov.get('gpu') or 'gpu'}", rows, prov=prov,
                               results_dir=results_dir,
                               extra={"what": f"{label}, {cache_mode} cache {max_seq_len}, depth {depth}, "
                                              f"{processes} fresh processes", "run_to_run": across})


def _record_synthetic(mode: str) -> Path:
    gpu.require_cuda("recording the 14B-shaped checkpoint's speed")
    return record_matrix(synthetic_14b_dir(), SYNTH_LABEL, f"speed-qwen2.5-14b-5.5bpw-{mode}", modes=(mode,))


def _record_embedded() -> Path:
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
