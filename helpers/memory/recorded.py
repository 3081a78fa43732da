"""Memory measured on a GPU (predicted vs measured, the CUDA context), read back from results/memory for display.

The recordings themselves live in helpers.recordings.memory; this side only reads what they saved.
"""
from __future__ import annotations

from helpers.core import results
from helpers.core.units import fmt_gib, gib


def recorded_rows(kind: str | None = None) -> list[tuple[dict, dict]]:
    """(row, provenance) of every recorded memory result (optionally of one kind), oldest first."""
    out = []
    for doc in results.load_results("memory"):
        for row in doc["rows"]:
            if kind is None or row.get("kind") == kind:
                out.append((row, doc["provenance"]))
    return out


NOT_RECORDED = "not recorded yet: run `make gpu-results` on a CUDA machine"


def recorded_report() -> str:
    """Recorded predicted-vs-measured rows and CUDA-context measurements as text, each labelled with where and when;
    or one line saying nothing is recorded yet."""
    lines = []
    ctx = recorded_rows("cuda_context")
    if ctx:
        prov = ctx[-1][1]
        vals = [r.get("cuda_context_bytes") for r, _ in ctx if isinstance(r.get("cuda_context_bytes"), int)]
        libs = [r.get("cuda_libraries_bytes") for r, _ in ctx if isinstance(r.get("cuda_libraries_bytes"), int)]
        lines.append(f"CUDA context ({results.label(prov)}): "
                     + ", ".join(fmt_gib(v, 3) for v in vals)
                     + (f"; + cuBLAS init {', '.join(fmt_gib(v, 3) for v in libs)}" if libs else ""))
    rows = recorded_rows("predicted_vs_measured")
    if rows:
        lines.append(f"predicted vs measured ({results.label(rows[-1][1])}), each configuration in a fresh process:")
        lines.append(f"{'model':<30}{'cache':>6}{'ctx':>7}{'pred GiB':>10}{'torch GiB':>10}{'err %':>7}"
                     f"{'NVML GiB':>10}{'err %':>7}")
        for r, _ in rows:
            if "error" in r:
                lines.append(f"{r['model']:<30}{r['cache_mode']:>6}{r['max_seq_len']:>7}  failed: {r['error']}")
                continue
            lines.append(f"{r['model']:<30}{r['cache_mode']:>6}{r['max_seq_len']:>7}"
                         f"{gib(r['predicted_torch_bytes']):>10.3f}{gib(r['torch_allocated_no_cublas_bytes']):>10.3f}"
                         f"{r.get('torch_error_pct', float('nan')):>7.2f}"
                         f"{gib(r.get('nvml_used_delta_bytes', 0)):>10.3f}"
                         f"{r.get('nvml_error_pct', float('nan')):>7.2f}")
    return "\n".join(lines) if lines else NOT_RECORDED
