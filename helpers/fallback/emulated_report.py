"""Emulated runs as a reader sees them: one run's summary in two lines, and the recorded runs (results/fallback/,
written by ``helpers.recordings.fallback``) read back and reported for notebook 04.
"""
from __future__ import annotations

from pathlib import Path

from helpers.core import results
from helpers.memory.recorded import NOT_RECORDED

TOPIC = "fallback"


def result_name(max_seq_len: int, load_path: str, prov: dict) -> str:
    """The results/fallback/ file name of one emulated run: cache length, load path (when not autosplit), GPU."""
    tag = "" if load_path == "autosplit" else f"-{load_path}"
    return f"emulated-{max_seq_len}{tag}-{prov.get('gpu') or 'gpu'}"


def load_recorded(results_dir: Path | None = None) -> dict[str, list[dict]]:
    """Recorded emulator runs and out-of-memory demonstrations: {'emulated': [...], 'oom': [...]}, each row with its
    ``label`` (where and when) and, for emulated runs, its ``measurements`` and ``decisions``."""
    out: dict[str, list[dict]] = {"emulated": [], "oom": []}
    for doc in results.load_results(TOPIC, results_dir=results_dir):
        name = Path(doc["path"]).name
        lab = results.label(doc["provenance"])
        kind = "oom" if name.startswith("linux-oom") else "emulated" if name.startswith("emulated") else None
        if kind is None:
            continue
        for r in doc["rows"]:
            out[kind].append({**r, "label": lab, "source": name, "measurements": doc.get("measurements", []),
                              "decisions": doc.get("decisions", [])})
    for k in out:
        out[k].sort(key=lambda r: r.get("max_seq_len", 0))
    return out


def format_summary(s: dict) -> str:
    """Two lines about one emulated cache length."""
    spill = (f"spilled {s['spilled_gib']:.2f} GiB ({len(s['spilled_modules'])} modules)" if s["spilled_bytes"]
             else "spilled nothing")
    how = "" if s.get("load_path", "autosplit") == "autosplit" else f", {s['load_path']} path, {s['depth']} deep"
    return (f"cache {s['max_seq_len']} ({s['cache_mode']}{how}) on an emulated {s['card_gib']:g} GiB card: {spill}; "
            "native "
            f"{s['native_tok_s']:.1f} tok/s, emulated {s['emulated_tok_s']:.1f} tok/s, slowdown "
            f"{s['slowdown']:.2f}x (spill model {s['predicted_slowdown']:.2f}x)\n"
            f"  PCIe reads {s['pcie_read_gbs']:.1f} GB/s, VRAM {s['vram_bandwidth_gbs']:.0f} GB/s, overhead "
            f"{s['overhead_ms']:.1f} ms/token; pinned memory left after the run: {s['pinned_left_bytes']} bytes")


def report_recorded(results_dir: Path | None = None) -> str:
    """The recorded emulator runs and out-of-memory demonstrations as text, each labelled with where and when it
    was measured; says so when nothing is recorded yet."""
    rec = load_recorded(results_dir)
    if not rec["emulated"] and not rec["oom"]:
        return f"{NOT_RECORDED} (Linux), or `python -m helpers record --only '*emulate*'`"
    lines = []
    for r in rec["emulated"]:
        lines += [f"[{r['label']}]", format_summary(r)]
        if r["max_seq_len"] <= 4096:
            lines.append(f"  emulated/native = {r['emulated_over_native']:.3f} (target: within 5%)")
        else:
            lines.append(f"  measured slowdown / predicted = {r['prediction_ratio']:.2f} (target: within 25%)")
        for what in ("error", "interrupt"):
            if r.get(f"pinned_left_after_{what}_bytes") is not None:
                lines.append(f"  pinned bytes left after an injected {what} mid-load: "
                             f"{r[f'pinned_left_after_{what}_bytes']}")
    for r in rec["oom"]:
        lines += [f"[{r['label']}]", f"Linux, no emulator, cache {r['max_seq_len']}: {r['outcome']}"
                  + (f" ({r.get('error_type')}: {r.get('error')})" if r.get("error") else ""), "  " + r["explanation"]]
    return "\n".join(lines)
