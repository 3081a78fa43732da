"""Memory measured on a GPU (predicted vs measured, the CUDA context), read back from results/memory for display.

The recordings themselves live in helpers.recordings.memory; this side only reads what they saved. Figures measured
outside the course (``external`` rows, imported by scripts/import_external.py) are shown beside the course's own
prediction for exactly their configuration, labelled external by ``core.results.label``.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from helpers.core import results
from helpers.core.units import fmt_gib, gib
from helpers.memory.breakdown import Breakdown, breakdown
from helpers.memory.setup import LoadSetup

#: the row kind of an allocator count measured outside the course (helpers.recordings.memory writes it)
EXTERNAL_KIND = "external_torch_allocated"


def recorded_rows(kind: str | None = None, results_dir: Path | None = None) -> list[tuple[dict, dict]]:
    """(row, provenance) of every recorded memory result (optionally of one kind), oldest first."""
    out = []
    for doc in results.load_results("memory", results_dir):
        for row in doc["rows"]:
            if kind is None or row.get("kind") == kind:
                out.append((row, doc["provenance"]))
    return out


NOT_RECORDED = "not recorded yet: run `make gpu-results` on a CUDA machine"


def predicted_torch_bytes(row: dict) -> Breakdown:
    """The course's breakdown of the configuration a measured row names, without the CUDA context and the desktop/OS
    reserve: its ``exllamav2_resident_bytes`` (weights + KV cache + scratch and RoPE) is what exllamav2 allocates
    through torch, the only part an allocator count can see."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return breakdown(LoadSetup(row["model_config"], bpw=row["bpw"], head_bits=row["head_bits"],
                                   max_seq_len=row["max_seq_len"], cache_mode=row["cache_mode"],
                                   max_input_len=row["max_input_len"], max_attention_size=row["max_attention_size"],
                                   flash_attn=row["flash_attn"], cuda_context_gib=0, reserve_gib=0))


def external_points(results_dir: Path | None = None) -> list[dict]:
    """Each external memory figure beside the course's prediction: {'row', 'provenance', 'label', 'external',
    'measured_gib', 'predicted' (a Breakdown), 'predicted_gib', 'ratio' (measured / predicted), 'ratio_rounding'
    (what the figure's two decimals leave open in the ratio, +-)}."""
    out = []
    for row, prov in recorded_rows(EXTERNAL_KIND, results_dir):
        bd = predicted_torch_bytes(row)
        pred = gib(bd.exllamav2_resident_bytes)
        measured = float(row["torch_allocated_gib"])
        out.append({"row": row, "provenance": prov, "label": results.label(prov),
                    "external": results.is_external(prov), "measured_gib": measured, "predicted": bd,
                    "predicted_gib": pred, "ratio": measured / pred, "ratio_rounding": 0.005 / pred})
    return out


def external_report(results_dir: Path | None = None) -> list[str]:
    """Lines for each external figure: its label, configuration, the measured and predicted GiB and their ratio."""
    lines = []
    for p in external_points(results_dir):
        r, bd = p["row"], p["predicted"]
        lines += [p["label"] + ":",
                  f"  {r['model']}, head {r['head_bits']} bits, {r['cache_mode']} cache of {r['max_seq_len']:,} "
                  f"tokens, max_input_len {r['max_input_len']:,}, {r['load']}",
                  f"  measured:  {p['measured_gib']:<6.2f} GiB  every tensor exllamav2 allocated while loading, "
                  "counted by an allocator",
                  f"  predicted: {p['predicted_gib']:<6.3f} GiB  = weights {gib(bd.weights_bytes):.3f} + KV cache "
                  f"{gib(bd.kv_cache_bytes):.3f} + scratch {gib(bd.scratch_bytes):.3f} (helpers.memory.breakdown)",
                  f"  measured / predicted = {p['ratio']:.4f} (+-{p['ratio_rounding']:.4f} from the figure's two "
                  "decimals); the CUDA context and the desktop are in neither"]
    return lines


def recorded_report(results_dir: Path | None = None) -> str:
    """Recorded predicted-vs-measured rows and CUDA-context measurements as text, each labelled with where and when,
    or a line saying the course has recorded nothing yet; then any external figure beside its prediction."""
    lines = []
    recorded_context = recorded_rows("cuda_context", results_dir)
    if recorded_context:
        prov = recorded_context[-1][1]
        vals = [r.get("cuda_context_bytes") for r, _ in recorded_context
                if isinstance(r.get("cuda_context_bytes"), int)]
        libs = [r.get("cuda_libraries_bytes") for r, _ in recorded_context
                if isinstance(r.get("cuda_libraries_bytes"), int)]
        lines.append(f"CUDA context ({results.label(prov)}): "
                     + ", ".join(fmt_gib(v, 3) for v in vals)
                     + (f"; + cuBLAS init {', '.join(fmt_gib(v, 3) for v in libs)}" if libs else ""))
    rows = recorded_rows("predicted_vs_measured", results_dir)
    if rows:
        lines.append(f"predicted vs measured ({results.label(rows[-1][1])}), each configuration in a fresh process:")
        lines.append(f"{'model':<30}{'cache':>6}{'max_seq_len':>12}{'pred GiB':>10}{'torch GiB':>10}{'err %':>7}"
                     f"{'NVML GiB':>10}{'err %':>7}")
        for r, _ in rows:
            if "error" in r:
                lines.append(f"{r['model']:<30}{r['cache_mode']:>6}{r['max_seq_len']:>12}  failed: {r['error']}")
                continue
            lines.append(f"{r['model']:<30}{r['cache_mode']:>6}{r['max_seq_len']:>12}"
                         f"{gib(r['predicted_torch_bytes']):>10.3f}{gib(r['torch_allocated_no_cublas_bytes']):>10.3f}"
                         f"{r.get('torch_error_pct', float('nan')):>7.2f}"
                         f"{gib(r.get('nvml_used_delta_bytes', 0)):>10.3f}"
                         f"{r.get('nvml_error_pct', float('nan')):>7.2f}")
    external = external_report(results_dir)
    if not lines:
        lines.append(("the course's own recordings: " if external else "") + NOT_RECORDED)
    return "\n".join(lines + external)

