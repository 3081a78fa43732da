"""What ``python -m helpers inspect`` shows: per-layer bits and groups, and where an EXL2 checkpoint's bytes go.

``inspect_summary`` gives the totals as a dict, ``inspect_text`` the table and totals as text; every number comes
from ``Exl2Checkpoint.layer_table()`` / ``byte_breakdown()``, so notebooks and the command agree.
"""
from __future__ import annotations

from helpers.core.units import MIB, fmt_gib, gib
from helpers.format.config import config_get
from helpers.format.reader import Exl2Checkpoint


def _fmt(n_bytes: float) -> str:
    """Bytes as GiB with three decimals; small sizes get MiB in brackets so they do not read as zero."""
    return fmt_gib(n_bytes, 3, small_in_mib=True)


def inspect_summary(ckpt: Exl2Checkpoint) -> dict:
    """The totals ``inspect`` prints (every number from layer_table()/byte_breakdown(), so notebooks match)."""
    bb = ckpt.byte_breakdown()
    hist = bb["bits_histogram"]
    total_w = sum(hist.values())
    return {
        "dir": str(ckpt.dir),
        "architecture": (ckpt.config.get("architectures") or ["?"])[0],
        "layers": config_get(ckpt.config, "num_hidden_layers"),
        "quantized_linears": len(ckpt.linears),
        "bits_per_weight": round(bb["bits_per_weight"], 4),
        "bits_per_weight_with_head": round(bb["bits_per_weight_with_head"], 4),
        "bits_share": {str(b): round(n / total_w, 4) for b, n in hist.items()},
        "head": bb["head"],
        "vram_gib": round(gib(bb["vram_bytes"]), 4),
        "system_ram_gib": round(gib(bb["system_ram_bytes"]), 4),
        "disk_gib": round(gib(bb["disk_bytes"]), 4),
        "bytes": {k: v for k, v in bb.items() if k.endswith("_bytes")} | {"by_kind": bb["by_kind"]},
    }


def inspect_text(ckpt: Exl2Checkpoint, *, table: bool = True) -> str:
    """The per-layer table and the totals, as ``python -m helpers inspect`` prints them."""
    rows = ckpt.layer_table()
    s = inspect_summary(ckpt)
    lines = [f"EXL2 checkpoint {s['dir']}",
             f"{s['architecture']}, {s['layers']} layers, {s['quantized_linears']} quantized linears"]
    if table:
        lines.append("")
        lines.append(f"{'linear':<34} {'in':>6} {'out':>7}  {'bit mix (share of input rows)':<30} {'groups':>6} "
                     f"{'bpw':>6} {'GPU MiB':>8}")
        for r in rows:
            lines.append(f"{r['name']:<34} {r['in']:>6} {r['out']:>7}  {r['mix']:<30} {r['groups']:>6} "
                         f"{r['bpw']:>6.3f} {r['vram_bytes'] / MIB:>8.2f}")
    b = s["bytes"]
    share = ", ".join(f"{k}-bit {v * 100:.1f}%" for k, v in s["bits_share"].items())
    lines += [
        "",
        f"bits per weight: {s['bits_per_weight']:.3f} (decoder linears, head excluded; with the head "
        f"{s['bits_per_weight_with_head']:.3f}). Counted: all stored bits of q_weight, q_scale, q_scale_max, "
        "q_groups and q_invperm over in x out.",
        f"weights by bit width: {share}",
        f"GPU (VRAM), weights as exllamav2 loads them: {_fmt(b['vram_bytes'])} "
        f"(decoder linears {_fmt(b['decoder_linear_bytes'])}, head {_fmt(b['head_bytes'])} [{s['head']}], "
        f"norms {_fmt(b['norm_bytes'])}); KV cache and scratch come on top",
        f"system RAM (input embedding, fp16, kept on the CPU by exllamav2): {_fmt(b['system_ram_bytes'])}",
        f"disk (*.safetensors): {_fmt(b['disk_bytes'])}",
    ]
    return "\n".join(lines)
