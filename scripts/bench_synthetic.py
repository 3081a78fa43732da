"""How fast does helpers.format.synthetic build a checkpoint? Prints build time and GB/s, extrapolated to all layers.

    python scripts/bench_synthetic.py                          # 4 layers of Qwen2.5-14B at 5.5 bpw, extrapolated
    python scripts/bench_synthetic.py --layers 0               # the full model (~11 GB; use a big machine)
    python scripts/bench_synthetic.py --model smollm2-135m --bpw 4.5 --layers 0
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from helpers.format import synthetic
from helpers.format.config import resolve_config
from helpers.format.reader import open_exl2


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-14b", help="bundled name or path to config.json")
    ap.add_argument("--bpw", type=float, default=5.5)
    ap.add_argument("--layers", type=int, default=4, help="build only this many layers (0 = all) and extrapolate")
    ap.add_argument("--dir", default=None, help="where to build (default: a temporary folder, deleted after)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    cfg = resolve_config(args.model)
    full_layers = cfg["num_hidden_layers"]
    if args.layers:
        cfg["num_hidden_layers"] = min(args.layers, full_layers)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-synth-"))
    out = base / "synthetic"
    try:
        t0 = time.perf_counter()
        synthetic.write_synthetic(cfg, args.bpw, out, progress=True, threads=args.threads)
        dt = time.perf_counter() - t0
        ckpt = open_exl2(out)
        disk = ckpt.byte_breakdown()["disk_bytes"]
        layer_bytes = sum(r["file_bytes"] for r in ckpt.layer_table() if r["layer"] is not None)
        n = cfg["num_hidden_layers"]
        print(f"{args.model}: {n} of {full_layers} layers at {ckpt.bits_per_weight:.3f} bpw: {disk / 1e9:.2f} GB in "
              f"{dt:.1f} s = {disk / 1e9 / dt:.2f} GB/s")
        if n < full_layers:
            full = disk + layer_bytes / n * (full_layers - n)
            print(f"extrapolated to all {full_layers} layers: {full / 1e9:.2f} GB, about {full / (disk / dt):.0f} s "
                  "at this rate")
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
