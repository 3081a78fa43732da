"""`python -m helpers plan`: will a model, context and cache mode fit on one GPU or several, and how fast will it
decode at a depth? Every byte, in GiB; every speed an estimate with its assumptions."""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import warnings

from helpers.core.errors import CourseError
from helpers.core.paths import MODEL_ENV
from helpers.core.units import parse_tokens
from helpers.memory.cache_modes import CACHE_MODES
from helpers.memory.scratch import DEFAULT_MAX_INPUT_LEN
from helpers.memory.setup import LoadSetup
from helpers.planning.multi import plan_multi
from helpers.planning.planner import plan
from helpers.planning.table import all_gpus, format_table, table_json
from helpers.specs.gpus import GPUS, gpu_spec
from helpers.specs.shapes import bundled_models


def _tokens(what: str):
    def parse(text: str) -> int:
        return parse_tokens(text, what)
    return parse


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m helpers plan",
        description="Will a model, context and cache mode fit on a GPU (or several)? Every byte of exllamav2's "
                    "allocation, in GiB, and the estimated decode speed at a depth.")
    ap.add_argument("model_dir", nargs="?", default=None, help="an EXL2 folder (the same as --model DIR)")
    ap.add_argument("--model", default=None,
                    help=f"bundled name ({', '.join(bundled_models())}), a config.json, or an EXL2 folder "
                         f"(default: ${MODEL_ENV} if set)")
    ap.add_argument("--bpw", type=float, default=None, help="bits per weight (needed unless the model is an EXL2 "
                                                             "folder)")
    ap.add_argument("--head-bits", type=int, default=6, help="lm_head bits (exllamav2 default 6; 16 = fp16)")
    ap.add_argument("--max-seq-len", "--ctx", dest="max_seq_len", type=_tokens("--max-seq-len"), default=4096,
                    help="max_seq_len in tokens: 32768 or 32k (--ctx is an alias)")
    ap.add_argument("--depth", type=_tokens("--depth"), default=None,
                    help="tokens already in the cache for the decode estimate (default: a full cache)")
    ap.add_argument("--cache", default="fp16", help=f"cache mode: {', '.join(CACHE_MODES)}")
    ap.add_argument("--gpu", action="append", default=None,
                    help="a known card; repeat it for several GPUs, or write a count: --gpu 2x'RTX 3090'")
    ap.add_argument("--gpu-gib", type=float, default=None, help="the GPU's memory in GiB instead of a card name")
    ap.add_argument("--split", default=None, help="GiB per GPU as model.load(gpu_split=...) takes it, e.g. 20,24")
    ap.add_argument("--tp", action="store_true", help="tensor parallel (model.load_tp) across the GPUs")
    ap.add_argument("--all-gpus", action="store_true", help="plan on every known GPU: fits, longest contexts, speed")
    ap.add_argument("--bandwidth-gbs", type=float, default=None, help="memory bandwidth, GB/s (overrides datasheet)")
    ap.add_argument("--pcie-gbs", type=float, default=None, help="PCIe bandwidth, GB/s")
    ap.add_argument("--reserve-gib", default=None,
                    help="desktop/OS reserve in GiB: one number for the display (first) GPU, the others 0 (default "
                         "0.5), or one per GPU separated by commas, e.g. 1.0,0.2")
    ap.add_argument("--cuda-context-gib", type=float, default=None,
                    help="CUDA context in GiB (default: measured or 0.5)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--max-input-len", type=_tokens("--max-input-len"), default=DEFAULT_MAX_INPUT_LEN)
    ap.add_argument("--flash-attn", action=argparse.BooleanOptionalAction, default=False,
                    help="flash-attn installed (smaller attention transient, far less traffic at depth); "
                         "--no-flash-attn: exllamav2's torch attention with repeat_kv (the default)")
    ap.add_argument("--host", choices=("desktop", "server"), default=None,
                    help="the machine the GPU sits in, for the host time per layer (default: data-centre cards "
                         "'server', others 'desktop')")
    ap.add_argument("--json", action="store_true", help="print one JSON object (helpers/planning/plan.schema.json)")
    ap.add_argument("--list", action="store_true", help="list bundled models and known GPUs")
    return ap


def expand_gpus(values: list[str]) -> list[str]:
    """['2x RTX 3090', 'RTX 4090'] -> ['RTX 3090', 'RTX 3090', 'RTX 4090'] (counts '2x', '2 x', '2*')."""
    out = []
    for v in values:
        m = re.fullmatch(r"\s*(\d+)\s*[x×*]\s*['\"]?(.+?)['\"]?\s*", v)
        if m and not re.fullmatch(r"\s*\d+\s*(gib|gb)?\s*", v, re.I):
            n = int(m.group(1))
            if not 1 <= n <= 16:
                raise CourseError(f"'{v}': give 1 to 16 GPUs")
            out += [m.group(2)] * n
        else:
            out.append(v)
    return out


def _split(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CourseError(f"--split '{text}': give GiB per GPU separated by commas, e.g. 20,24") from None


def _reserve(text: str | None, n: int) -> float | list[float] | None:
    """--reserve-gib: one number (the display GPU; the others 0) or one per GPU ('1.0,0.2'); a one-line error for a
    wrong count or a negative, unreadable or non-finite value."""
    if text is None:
        return None
    parts = [x.strip() for x in str(text).split(",")]
    try:
        vals = [float(x) for x in parts]
    except ValueError:
        raise CourseError(f"--reserve-gib '{text}': give GiB, one number for the display GPU or one per GPU "
                          "separated by commas, e.g. 0.5 or 1.0,0.2") from None
    bad = [x for x, v in zip(parts, vals) if not math.isfinite(v) or v < 0]
    if bad:
        raise CourseError(f"--reserve-gib '{text}': {bad[0]} is not a reserve; each is zero or a positive number of "
                          "GiB (0 for a headless GPU)")
    if len(vals) == 1:
        return vals[0]
    if len(vals) != n:
        raise CourseError(f"--reserve-gib '{text}' gives {len(vals)} reserves for {n} GPU{'s' if n > 1 else ''}: "
                          "give one (the display GPU) or one per GPU")
    return vals


def main(argv: list[str]) -> int:
    """`python -m helpers plan --model qwen2.5-14b --bpw 5.5 --max-seq-len 32k --cache fp16 --gpu "RTX 4080 Super"
    [--depth 30000] [--flash-attn] [--json]`; several GPUs: `--gpu 2x"RTX 3090" [--split 20,24] [--tp]`."""
    args = _parser().parse_args(argv)
    if args.list:
        print("bundled models: " + ", ".join(bundled_models()))
        for n, g in GPUS.items():
            print(f"  {n:<18} {g['vram_gib']:>4g} GiB  {g['bandwidth_gbs']:>5g} GB/s  "
                  f"PCIe {g['pcie_gen']}.0 x{g['pcie_lanes']}")
        return 0
    if args.model_dir and args.model:
        raise CourseError("give the model once: either plan DIR or --model NAME")
    model = args.model_dir or args.model or os.environ.get(MODEL_ENV)
    if not model:
        raise CourseError(f"give --model (a bundled name: {', '.join(bundled_models())}; a config.json; or an EXL2 "
                          f"folder), or set {MODEL_ENV}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _run(args, model)
    for msg in dict.fromkeys(str(w.message) for w in caught):
        if args.json or f"note: {msg}" not in out:  # a note the summary already shows is said once
            print(f"warning: {msg}", file=sys.stderr)
    try:
        print(out)
        sys.stdout.flush()
    except BrokenPipeError:  # `plan ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _run(args, model: str) -> str:
    """The setup from the flags, built once here, then the plan it asks for."""
    names = expand_gpus(args.gpu or [])
    if args.gpu_gib is not None:
        names.append(args.gpu_gib)
    if args.all_gpus and (names or args.split or args.tp):
        raise CourseError("--all-gpus plans on every known card: leave out --gpu, --gpu-gib, --split and --tp")
    if not names and not args.all_gpus:
        raise CourseError("give --gpu NAME (e.g. 'RTX 4080 Super'; repeat it, or 2x'RTX 3090', for several), "
                          "--gpu-gib N (its memory in GiB), or --all-gpus")
    reserve = _reserve(args.reserve_gib, max(1, len(names)))
    setup = LoadSetup(model, bpw=args.bpw, head_bits=args.head_bits, max_seq_len=args.max_seq_len,
                      cache_mode=args.cache, batch=args.batch, max_input_len=args.max_input_len,
                      flash_attn=args.flash_attn, cuda_context_gib=args.cuda_context_gib,
                      reserve_gib=tuple(reserve) if isinstance(reserve, list) else reserve, host=args.host,
                      gpus=tuple(gpu_spec(n, args.bandwidth_gbs, args.pcie_gbs) for n in names))
    if args.all_gpus:
        rows = all_gpus(setup, args.depth)
        return table_json(rows) if args.json else format_table(rows)
    split = _split(args.split)
    if len(names) == 1 and not split and not args.tp:
        p = plan(setup, args.depth)
    else:
        p = plan_multi(setup, split=split, split_mode="tp" if args.tp else None, depth=args.depth)
    return p.to_json() if args.json else p.summary()
