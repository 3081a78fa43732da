"""GPU recording: decode speed against context depth on the 14B-shaped checkpoint, FP16 and Q4 caches, no flash-attn,
with what the speed model predicts for each row and the per-position cost the measured slope implies.

It tests ``helpers.speed.model`` directly: without flash-attn every decoded token copies K and V of every position
from the KV heads to the query heads (``repeat_kv``), and a Q4 cache is first dequantized into an FP16 temp layer,
so the seconds each position adds (the slope of 1 / tok/s against depth) should be ``position_bytes`` / bandwidth,
and a Q4 cache should cost MORE per position than FP16 although it stores fewer bytes.

One cache mode per recording (each in its own fresh process, ``python -m helpers record``): the model loads once
through the front door (``helpers.engines.backend`` -> ``helpers.engines.exllama``) with a cache of ``MAX_SEQ_LEN``
tokens, and the speed harness (``helpers.speed.harness.bench_matrix``) measures every depth on it. Rows go to
``results/speed/decode-depth-<mode>-<gpu>.json`` (read back with the other speed rows by
``helpers.speed.report.load_recorded``; ``kind`` is ``"decode_vs_depth"``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from helpers.core import devices as gpu
from helpers.core import results
from helpers.core.errors import CourseError
from helpers.models.synthetic_dirs import synthetic_14b_dir
from helpers.speed.harness import bench_matrix, flash_attn_installed
from helpers.speed.model import decode_estimate
from helpers.speed.report import SYNTH_LABEL

KIND = "decode_vs_depth"
#: depths in tokens already in the cache, one cache of 32k tokens (the deepest leaves room for the decoded tokens)
DEPTHS = (128, 4096, 16384, 30000)
MAX_SEQ_LEN = 32768
MODES = ("fp16", "q4")
#: decode only (no prefill), a short profile per depth; one load per recording
SETTINGS = dict(repeats=3, warmup=1, decode_tokens=32, prefill_tokens=0, profile_steps=2)


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
    for r in rows:
        sheet = r.get("datasheet_bandwidth_gbs")
        est = decode_estimate(model, weight_bytes=r["weights_bytes"], bandwidth_gbs=sheet or r["bandwidth_gbs"],
                              depth=r["depth"], cache_mode=r["cache_mode"], flash_attn=bool(r["flash_attn"]),
                              host=r.get("host") or "desktop")
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


def record_decode_depth(cache_mode: str, *, model_dir=None, depths=DEPTHS, max_seq_len: int = MAX_SEQ_LEN,
                        settings: dict | None = None, results_dir: Path | None = None) -> Path:
    """(CUDA) Decode speed at each of ``depths`` with one ``cache_mode`` cache of ``max_seq_len`` tokens, on the
    14B-shaped checkpoint, without flash-attn; saved as results/speed/decode-depth-<mode>-<gpu>.json."""
    gpu.require_cuda("recording decode speed against depth")
    if flash_attn_installed():
        raise CourseError("flash-attn is installed, and exllamav2 would attend with it: this recording measures the "
                          "torch attention path (repeat_kv); run it in a Python without flash-attn")
    settings = {**SETTINGS, **(settings or {})}
    model_dir = Path(model_dir) if model_dir is not None else synthetic_14b_dir()
    measured = bench_matrix(model_dir, max_seq_lens=[max_seq_len], depths=list(depths), cache_modes=[cache_mode],
                            backend="exllamav2", progress=False, skip_unfit=False, model_label=SYNTH_LABEL,
                            **settings)
    rows, summary = annotate(measured, model_dir)
    prov = results.provenance()
    return results.save_result(
        "speed", f"decode-depth-{cache_mode}-{prov.get('gpu') or 'gpu'}", rows, prov=prov, results_dir=results_dir,
        extra={"what": f"{SYNTH_LABEL}: decode speed at depths {', '.join(map(str, depths))} with a {cache_mode} "
                       f"cache of {max_seq_len} tokens, no flash-attn, one load, through helpers.engines.exllama "
                       "and helpers.speed.harness", "settings": settings, "slope": summary})


#: one fresh process per cache mode (``python -m helpers record`` runs each in its own)
GPU_RECORDINGS: dict[str, Callable[[], Path]] = {f"decode_depth_{m}": (lambda m=m: record_decode_depth(m))
                                                 for m in MODES}
