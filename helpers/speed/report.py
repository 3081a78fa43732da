"""Bench rows as a reader sees them: tables of measured speed and of where the time goes, and the recorded
GPU results (results/speed/, written by ``helpers.recordings.speed``) read back for notebook 03.
"""
from __future__ import annotations

from pathlib import Path

from helpers.core import results
from helpers.core.tables import table
from helpers.memory.recorded import NOT_RECORDED

#: decode repeats whose (max - min) / median is below this are called repeatable on a GPU
GPU_SPREAD_TARGET = 0.03
#: the ``model`` column of the recorded rows: the 14B-shaped checkpoint (``models.synthetic_dirs``) and the
#: embedded model
SYNTH_LABEL = "Qwen2.5-14B-shaped 5.5 bpw (random weights)"
EMBEDDED_LABEL = "SmolLM2-135M-Instruct (embedded)"


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def _spread(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_rows(rows: list[dict], *, where: bool = False) -> str:
    """A plain table of bench rows (``where``: add the model and the device or GPU each row was measured on)."""
    head = (f"{'cache':<5} {'max_seq_len':>11} {'depth':>6} {'prefill':>8} {'decode tok/s (min-max)':>23} "
            f"{'spread':>6} {'roofline':>8} {'fraction':>8} {'cache GiB':>9}")
    if where:
        head = f"{'model':<26} {'measured on':<22} " + head
    lines = [head]
    for r in rows:
        dec = f"{_fmt(r['decode_tok_s'])} ({_fmt(r['decode_tok_s_min'])}-{_fmt(r['decode_tok_s_max'])})"
        line = (f"{r['cache_mode']:<5} {r['max_seq_len']:>11} {r['depth']:>6} {_fmt(r.get('prefill_tok_s')):>8} "
                f"{dec:>23} {_spread(r.get('decode_spread')):>6} "
                f"{_fmt(r.get('roofline_tok_s')):>8} {_fmt(r.get('roofline_fraction'), '.3f'):>8} "
                f"{_fmt(r.get('cache_gib'), '.3f'):>9}")
        if where:
            model = str(r.get("model", "?")).split(" (")[0][:26]
            line = f"{model:<26} {str(r.get('gpu') or r.get('device', '?'))[:22]:<22} " + line
        lines.append(line)
    if rows and not where:
        r = rows[0]
        lines.append(f"roofline = {r['bandwidth_gbs']:.1f} GB/s measured on {r['device']} / bytes read per decoded "
                     "token (weights + KV cache at the depth); fraction = decode / roofline")
    return "\n".join(lines)


def rows_table(rows: list[dict], *, where: bool = False):
    """Bench rows as a table (``core.tables.table``), the cell's last value in notebook 03: decode tok/s (median
    and the repeats' min-max), spread, roofline tok/s and the fraction of it, prefill, cache size (a column no row
    measured is left out); ``where``: the model and the device or GPU each row was measured on first, "(external)"
    beside a figure measured outside the course's harness."""
    cells = [{"model": str(r.get("model", "?")).split(" (")[0],
              "measured on": str(r.get("gpu") or r.get("device", "?")).removeprefix("NVIDIA ")
              + (" (external)" if r.get("external") else ""),
              "cache": r["cache_mode"], "max_seq_len": r["max_seq_len"], "depth": r["depth"],
              "decode tok/s": r["decode_tok_s"],
              "min-max": f"{_fmt(r['decode_tok_s_min'])}-{_fmt(r['decode_tok_s_max'])}",
              "spread": None if r.get("decode_spread") is None else _spread(r["decode_spread"]),
              "roofline": r.get("roofline_tok_s"),
              "fraction": r.get("roofline_fraction"), "prefill tok/s": r.get("prefill_tok_s"),
              "cache GiB": r.get("cache_gib")} for r in rows]
    keys = [k for k in (cells[0] if cells else []) if any(c[k] is not None for c in cells)]   # none unmeasured
    return table(cells, keys if where else keys[2:],
                 digits={"decode tok/s": 1, "roofline": 1, "fraction": 3, "prefill tok/s": 1, "cache GiB": 3})


def load_recorded(results_dir: Path | None = None, *, include_repeatability: bool = False) -> list[dict]:
    """Every recorded speed row, each with its ``label`` (where and when it was measured; "external: ..." for figures
    measured outside the course's harness, ``external`` True), ``gpu`` and ``source`` file. The repeatability runs
    (one configuration in several processes) are left out unless asked for."""
    out = []
    for doc in results.load_results("speed", results_dir=results_dir):
        if "run_to_run" in doc and not include_repeatability:
            continue
        lab = results.label(doc["provenance"])
        for r in doc["rows"]:
            out.append({**r, "label": lab, "source": Path(doc["path"]).name, "gpu": doc["provenance"].get("gpu"),
                        "external": results.is_external(doc["provenance"])})
    return out


def load_run_to_run(results_dir: Path | None = None) -> list[dict]:
    """The recorded run-to-run documents: [{'label', 'what', 'run_to_run', 'within_spreads'}]."""
    out = []
    for doc in results.load_results("speed", results_dir=results_dir):
        if "run_to_run" in doc:
            out.append({"label": results.label(doc["provenance"]), "what": doc.get("what"),
                        "run_to_run": doc["run_to_run"],
                        "within_spreads": [r["decode_spread"] for r in doc["rows"]]})
    return out


def describe_repeatability(results_dir: Path | None = None) -> str:
    """Within-run spread of each process and the spread across processes, per recorded repeatability run."""
    docs = load_run_to_run(results_dir)
    if not docs:
        return f"repeatability: {NOT_RECORDED}"
    lines = []
    for d in docs:
        within = ", ".join(f"{100 * s:.1f}%" for s in d["within_spreads"])
        rr = d["run_to_run"]
        ok = all(s < GPU_SPREAD_TARGET for s in d["within_spreads"])
        lines.append(f"{d['what']} ({d['label']}):\n  within each run (max-min)/median of the decode repeats: {within} "
                     f"({'all' if ok else 'NOT all'} under {100 * GPU_SPREAD_TARGET:.0f}%)\n  across "
                     f"{rr['processes']} processes: medians {rr['min_tok_s']:.1f}-{rr['max_tok_s']:.1f} tok/s, "
                     f"(max-min)/median {100 * rr['spread']:.1f}%")
    return "\n".join(lines)


def format_time_split(rows: list[dict]) -> str:
    """Per decoded token: wall time, and where it went (GPU busy vs idle; on a CPU, inside torch operators or not)."""
    head = (f"{'measured on':<22} {'model':<22} {'cache':<5} {'max_seq_len':>11} {'depth':>6} {'ms/token':>9} "
            f"{'GPU busy':>9} {'GPU idle':>8} {'launches':>8} {'host ms':>8} {'in torch ops':>12}")
    lines = [head]
    for r in rows:
        idle = f"{100 * r['gpu_idle_fraction']:.0f}%" if r.get("gpu_idle_fraction") is not None else "-"
        ops = r.get("torch_ops_ms_per_token")
        share = f"{100 * ops / r['profiled_ms_per_token']:.0f}%" if ops and r.get("profiled_ms_per_token") else "-"
        lines.append(f"{str(r.get('gpu') or r.get('device'))[:22]:<22} {str(r.get('model', '?'))[:22]:<22} "
                     f"{r['cache_mode']:<5} {r['max_seq_len']:>11} {r['depth']:>6} {_fmt(r['step_ms'], '.2f'):>9} "
                     f"{_fmt(r.get('gpu_ms_per_token'), '.2f'):>9} {idle:>8} "
                     f"{_fmt(r.get('kernel_launches_per_token'), '.0f'):>8} "
                     f"{_fmt(r.get('cpu_ms_per_token'), '.2f'):>8} "
                     f"{share:>12}")
    return "\n".join(lines)
