"""`python -m helpers emulate`: the Windows sysmem fallback emulated on Linux + CUDA (native vs emulated decode on a
smaller emulated card), or with ``--oom`` Linux's own out-of-memory for the same overflow."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from helpers.core import devices as gpu
from helpers.core import results
from helpers.core.errors import CourseError
from helpers.core.units import parse_token_list
from helpers.fallback.compare import COMPARE_MEASURE, compare, resolve_model_dir
from helpers.fallback.emulated_report import TOPIC, format_summary, result_name
from helpers.fallback.emulator import CARD_GIB, RESERVE_GIB, context_bytes_now, emulated_setup
from helpers.fallback.linux_oom import linux_oom_demo
from helpers.memory.cache_modes import CACHE_MODES, LOAD_PATHS, check_cache_mode


def main(argv: list[str]) -> int:
    """`python -m helpers emulate [--max-seq-len 4096,32768] [--oom] [--record] ...` (Linux + CUDA; ``--ctx`` is the
    same as ``--max-seq-len``)."""
    ap = argparse.ArgumentParser(prog="python -m helpers emulate",
                                 description="Emulate NVIDIA's Windows sysmem fallback on Linux + CUDA: load a model "
                                             "on an emulated smaller card, spill what does not fit into mapped "
                                             "system RAM, and compare decode speed with a native load.")
    ap.add_argument("--model", default=None, help="EXL2 model directory (default: the 14B-shaped 5.5 bpw checkpoint)")
    ap.add_argument("--max-seq-len", "--ctx", dest="max_seq_len", default="4096,32768", type=parse_token_list,
                    help="cache lengths, comma-separated (4k = 4096; --ctx: the same)")
    ap.add_argument("--cache", default="fp16", help=f"cache mode: {', '.join(CACHE_MODES)}")
    ap.add_argument("--depth", type=int, default=128, help="tokens already in the cache while decoding")
    ap.add_argument("--load-path", default="autosplit", choices=tuple(LOAD_PATHS),
                    help="load_autosplit(cache) with a lazy cache (default), or model.load() then the cache")
    ap.add_argument("--card-gib", type=float, default=CARD_GIB, help=f"emulated card (default {CARD_GIB:g} GiB)")
    ap.add_argument("--reserve-gib", type=float, default=RESERVE_GIB, help=f"OS reserve (default {RESERVE_GIB} GiB)")
    ap.add_argument("--rounds", type=int, default=4, help="alternating native/emulated rounds")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--oom", action="store_true", help="instead: show Linux's out-of-memory for the same overflow")
    ap.add_argument("--record", action="store_true", help="save into results/fallback/ (one run per process is "
                                                          "cleaner: `python -m helpers record --only '*emulate*'`)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.decode_tokens < 1 or args.depth < 0:
        raise CourseError("--rounds and --decode-tokens must be at least 1, --depth at least 0")
    max_seq_lens = parse_token_list(args.max_seq_len, "cache length")
    check_cache_mode(args.cache)  # a typo says so before CUDA is asked for
    nvml_before = gpu.nvml_used_bytes()
    gpu.require_cuda("`python -m helpers emulate`")
    setup = emulated_setup(resolve_model_dir(args.model), card_gib=args.card_gib, reserve_gib=args.reserve_gib,
                           context_bytes=context_bytes_now(nvml_before), max_seq_len=max(max_seq_lens),
                           cache_mode=args.cache)
    if args.oom:
        r = linux_oom_demo(setup)
        print(r["explanation"] if not args.json else json.dumps(r, indent=1))
        return 0
    measure = dataclasses.replace(COMPARE_MEASURE, decode_tokens=args.decode_tokens)
    for c in max_seq_lens:
        res = compare(setup.with_(max_seq_len=c), depth=args.depth, rounds=args.rounds, measure=measure,
                      load_path=args.load_path)
        s = res["summary"]
        if args.json:
            print(json.dumps(res, indent=1))
        else:
            print(format_summary(s))
        if args.record:
            path = results.save_result(TOPIC, result_name(c, args.load_path, results.provenance()), [s],
                                       extra={"measurements": res["measurements"], "decisions": res["decisions"]})
            print(f"recorded {path}", file=sys.stderr)
    return 0
