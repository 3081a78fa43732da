"""`python -m helpers synth --model NAME|config.json --bpw 5.5 --out DIR`: a shape-faithful random EXL2 checkpoint."""
from __future__ import annotations

import argparse
import sys
import time

from helpers.core.units import GB, GIB
from helpers.format.reader import open_exl2
from helpers.format.synthetic import write_synthetic


def main(argv: list[str] | None = None) -> int:
    """python -m helpers synth --model NAME|config.json --bpw 5.5 --out DIR"""
    ap = argparse.ArgumentParser(prog="python -m helpers synth",
                                 description="Write a shape-faithful random EXL2 checkpoint from a config.json.")
    ap.add_argument("--model", required=True, help="a bundled name (e.g. qwen2.5-14b) or a path to config.json")
    ap.add_argument("--bpw", type=float, default=5.5, help="target bits per weight of the decoder (default 5.5)")
    ap.add_argument("--out", required=True, help="output directory (replaced if it is an EXL2 checkpoint)")
    ap.add_argument("--head-bits", type=int, default=6, help="head bits: 2, 3, 4, 5, 6 or 8 (default 6)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gib", type=float, default=2.0, help="largest shard in GiB (default 2)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = write_synthetic(args.model, args.bpw, args.out, seed=args.seed, head_bits=args.head_bits,
                          progress=not args.no_progress, shard_bytes=int(args.shard_gib * GIB))
    dt = time.perf_counter() - t0
    ckpt = open_exl2(out)
    bb = ckpt.byte_breakdown()
    print(f"wrote {out}: {ckpt.bits_per_weight:.3f} bpw (decoder, head excluded), {bb['disk_bytes'] / GIB:.2f} GiB "
          f"on disk, {bb['vram_bytes'] / GIB:.2f} GiB of weights on the GPU, {dt:.1f} s "
          f"({bb['disk_bytes'] / dt / GB:.2f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
