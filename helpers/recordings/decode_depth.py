"""GPU recording: decode speed against context depth on the 14B-shaped checkpoint, FP16 and Q4 caches, no flash-attn,
with what the speed model predicts for each row and the per-position cost the measured slope implies.

Without flash-attn every decoded token copies K and V of every position to the query heads (``repeat_kv``), and a
Q4 cache is first dequantized, so a Q4 cache should cost more per position than FP16 although it stores fewer
bytes (docs/FACTS.md §8). One cache mode per recording, each in a fresh process (``python -m helpers record``):
one load, every depth measured on it; rows go to ``results/speed/decode-depth-<mode>-<gpu>.json``.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from helpers.core import devices as gpu
from helpers.core import results
from helpers.core.errors import CourseError
from helpers.memory.setup import LoadSetup
from helpers.models.synthetic_dirs import synthetic_14b_dir
from helpers.speed.harness import Measure, bench_matrix, flash_attn_installed
from helpers.speed.model import decode_estimate
from helpers.speed.report import SYNTH_LABEL

KIND = "decode_vs_depth"
#: depths in tokens already in the cache, one cache of 32k tokens (the deepest leaves room for the decoded tokens)
DEPTHS = (128, 4096, 16384, 30000)
MAX_SEQ_LEN = 32768
MODES = ("fp16", "q4")
#: decode only (no prefill), a short profile per depth; one load per recording
MEASURE = Measure(backend="exllamav2", repeats=3, warmup=1, decode_tokens=32, prefill_tokens=0, profile_steps=2)


def slope(shallow: tuple[int, float], deep: tuple[int, float]) -> float:
    """Seconds per token added by each position of depth between two (depth, tok/s) points."""
    (d0, t0), (d1, t1) = shallow, deep
    if d1 == d0:
        raise CourseError("a slope needs two different depths")
    return (1 / t1 - 1 / t0) / (d1 - d0)


def annotate(rows: list[dict[str, Any]], model: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of one cache mode (any order) with the speed model's prediction and the implied per-position cost.

    Each row gets ``predicted_tok_s`` (``decode_estimate`` with the fitted constants, as the planner predicts it: at
    the card's datasheet bandwidth, or the measured one for a card the course does not know, and its usual host;
    ``predicted_tok_s_low``/``_high`` its likely range) and, from the second depth on, the slope from the previous
    depth: ``slope_s_per_position``, ``implied_position_bytes`` (slope x measured bandwidth) and
    ``implied_over_model`` (over ``position_bytes``). The summary holds the slope from the shallowest to the deepest
    depth, the same way."""
    rows = sorted(rows, key=lambda r: r["depth"])
    base = LoadSetup(model, max_seq_len=rows[0]["max_seq_len"])
    for r in rows:
        sheet = r.get("datasheet_bandwidth_gbs")
        setup = base.with_(cache_mode=r["cache_mode"], flash_attn=bool(r["flash_attn"]),
                           host=r.get("host") or "desktop")
        est = decode_estimate(setup, r["depth"], weight_bytes=r["weights_bytes"],
                              bandwidth_gbs=sheet or r["bandwidth_gbs"])
        if est.position_bytes.total != r["position_bytes"]:
            raise CourseError(f"the harness counted {r['position_bytes']} B per position, the speed model "
                              f"{est.position_bytes.total}: they must be the same model")
        inside = est.tok_s_low <= r["decode_tok_s"] <= est.tok_s_high
        r.update(kind=KIND, predicted_tok_s=est.tok_s, predicted_tok_s_low=est.tok_s_low,
                 predicted_tok_s_high=est.tok_s_high, measured_over_predicted=r["decode_tok_s"] / est.tok_s,
                 inside_predicted_range=inside,
                 prediction=f"helpers.speed.model.decode_estimate, fitted constants, at the "
                            f"{'datasheet' if sheet else 'measured'} bandwidth: " + "; ".join(est.assumptions))
    bw = rows[0]["bandwidth_gbs"] * 1e9
    for prev, r in zip(rows, rows[1:]):
        s = slope((prev["depth"], prev["decode_tok_s"]), (r["depth"], r["decode_tok_s"]))
        r.update(slope_from_depth=prev["depth"], slope_s_per_position=s, implied_position_bytes=s * bw,
                 implied_over_model=s * bw / r["position_bytes"])
    first, last = rows[0], rows[-1]
    summary: dict[str, Any] = {"cache_mode": first["cache_mode"], "attention_path": first["attention_path"],
                               "position_bytes": first["position_bytes"], "bandwidth_gbs": first["bandwidth_gbs"]}
    if len(rows) > 1:
        s = slope((first["depth"], first["decode_tok_s"]), (last["depth"], last["decode_tok_s"]))
        summary.update(depths=[first["depth"], last["depth"]], slope_s_per_position=s,
                       implied_position_bytes=s * bw, implied_over_model=s * bw / first["position_bytes"])
    return rows, summary


def record_decode_depth(setup: LoadSetup, *, depths=DEPTHS, measure: Measure = MEASURE,
                        results_dir: Path | None = None) -> Path:
    """(CUDA) Decode speed of ``setup`` at each of ``depths``, without flash-attn; saved as
    results/speed/decode-depth-<mode>-<gpu>.json."""
    gpu.require_cuda("recording decode speed against depth")
    if flash_attn_installed():
        raise CourseError("flash-attn is installed, and exllamav2 would attend with it: this recording measures the "
                          "torch attention path (repeat_kv); run it in a Python without flash-attn")
    measured = bench_matrix(setup, max_seq_lens=[setup.max_seq_len], depths=list(depths),
                            cache_modes=[setup.cache_mode], measure=measure, progress=False, skip_unfit=False,
                            model_label=SYNTH_LABEL)
    rows, summary = annotate(measured, setup.model_dir)
    prov = results.provenance()
    return results.save_result(
        "speed", f"decode-depth-{setup.cache_mode}-{prov.get('gpu') or 'gpu'}", rows, prov=prov,
        results_dir=results_dir,
        extra={"what": f"{SYNTH_LABEL}: decode speed at depths {', '.join(map(str, depths))} with a "
                       f"{setup.cache_mode} cache of {setup.max_seq_len} tokens, no flash-attn, one load, through "
                       "helpers.engines.exllama and helpers.speed.harness", "settings": asdict(measure),
               "slope": summary})


def _synthetic(cache_mode: str) -> LoadSetup:
    gpu.require_cuda("recording decode speed against depth")   # before the 14B-shaped checkpoint is written
    return LoadSetup(synthetic_14b_dir(), max_seq_len=MAX_SEQ_LEN, cache_mode=cache_mode)


#: one fresh process per cache mode (``python -m helpers record`` runs each in its own)
GPU_RECORDINGS: dict[str, Callable[[], Path]] = {
    f"decode_depth_{m}": (lambda m=m: record_decode_depth(_synthetic(m))) for m in MODES}
