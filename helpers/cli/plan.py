"""`python -m helpers plan`: will a model, context and cache mode fit on a GPU? Every byte, in GiB."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from helpers.core.errors import CourseError
from helpers.core.paths import MODEL_ENV
from helpers.memory.cache_modes import CACHE_MODES
from helpers.memory.planner import plan
from helpers.memory.scratch import DEFAULT_MAX_INPUT_LEN
from helpers.specs.gpus import GPUS, gpu_spec
from helpers.specs.shapes import bundled_models


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m helpers plan",
        description="Will a model, context and cache mode fit on a GPU? Every byte of exllamav2's allocation, in GiB.")
    ap.add_argument("--model", default=None,
                    help=f"bundled name ({', '.join(bundled_models())}), a config.json, or an EXL2 folder "
                         f"(default: ${MODEL_ENV} if set)")
    ap.add_argument("--bpw", type=float, default=None, help="bits per weight (needed unless --model is an EXL2 folder)")
    ap.add_argument("--head-bits", type=int, default=6, help="lm_head bits (exllamav2 default 6; 16 = fp16)")
    ap.add_argument("--max-seq-len", "--ctx", dest="max_seq_len", type=int, default=4096,
                    help="max_seq_len in tokens (--ctx is an alias)")
    ap.add_argument("--cache", default="fp16", help=f"cache mode: {', '.join(CACHE_MODES)}")
    ap.add_argument("--gpu", default=None, help=f"a known card ({', '.join(GPUS)})")
    ap.add_argument("--gpu-gib", type=float, default=None, help="the GPU's memory in GiB instead of a card name")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth, GB/s (overrides datasheet)")
    ap.add_argument("--pcie-gbs", type=float, default=None, help="PCIe bandwidth, GB/s")
    ap.add_argument("--reserve-gib", type=float, default=None, help="desktop/OS reserve in GiB (default 0.5)")
    ap.add_argument("--cuda-context-gib", type=float, default=None,
                    help="CUDA context in GiB (default: measured or 0.5)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-input-len", type=int, default=DEFAULT_MAX_INPUT_LEN)
    ap.add_argument("--flash-attn", action="store_true", help="flash-attn installed (smaller attention transient)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (bytes)")
    ap.add_argument("--list", action="store_true", help="list bundled models and known GPUs")
    return ap


def main(argv: list[str]) -> int:
    """`python -m helpers plan --model qwen2.5-14b --bpw 5.5 --max-seq-len 32768 --cache fp16 --gpu-gib 16 [--json]`"""
    args = _parser().parse_args(argv)
    if args.list:
        print("bundled models: " + ", ".join(bundled_models()))
        for n, g in GPUS.items():
            print(f"  {n:<18} {g['vram_gib']:>4g} GiB  {g['bandwidth_gbs']:>5g} GB/s  "
                  f"PCIe {g['pcie_gen']}.0 x{g['pcie_lanes']}")
        return 0
    model = args.model or os.environ.get(MODEL_ENV)
    if not model:
        raise CourseError(f"give --model (a bundled name: {', '.join(bundled_models())}; a config.json; or an EXL2 "
                          f"folder), or set {MODEL_ENV}")
    if args.gpu is None and args.gpu_gib is None:
        raise CourseError("give --gpu NAME (e.g. 'RTX 4080 Super') or --gpu-gib N (its memory in GiB)")
    gpu = gpu_spec(args.gpu if args.gpu is not None else args.gpu_gib, args.bandwidth_gbs, args.pcie_gbs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = plan(model, gpu, bpw=args.bpw, head_bits=args.head_bits, max_seq_len=args.max_seq_len,
                 cache_mode=args.cache,
                 reserve_gib=args.reserve_gib, cuda_context_gib=args.cuda_context_gib, batch=args.batch,
                 max_input_len=args.max_input_len, flash_attn=args.flash_attn)
    for msg in dict.fromkeys(str(w.message) for w in caught):
        print(f"warning: {msg}", file=sys.stderr)
    print(p.to_json() if args.json else p.summary())
    return 0
