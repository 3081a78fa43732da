"""`python -m helpers bench`: prefill and decode tokens/s at cache lengths and depths, with the roofline."""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from helpers.core import results
from helpers.core.atomic import atomic_write_text
from helpers.core.errors import CourseError, CourseWarning
from helpers.core.units import parse_token_list
from helpers.speed.harness import Measure, bench_matrix
from helpers.speed.matrix import check_modes, unfit
from helpers.speed.report import format_rows


def main(argv: list[str] | None = None) -> int:
    """`python -m helpers bench --max-seq-len 4096,32768 --depth 128,30000 [--cache fp16,q4] [--model DIR] [--json]`
    (``--ctx`` is the same as ``--max-seq-len``)"""
    ap = argparse.ArgumentParser(prog="python -m helpers bench",
                                 description="Prefill and decode tokens/s at cache lengths and context depths, "
                                             "with the memory-bandwidth roofline.")
    ap.add_argument("--max-seq-len", "--ctx", dest="max_seq_len", default="4096,32768",
                    help="cache lengths (max_seq_len), comma-separated; 4k = 4096 (--ctx: the same)")
    ap.add_argument("--depth", default="128", help="context depths: tokens already in the cache, comma-separated")
    ap.add_argument("--cache", default="fp16", help="cache modes, comma-separated: fp16, q8, q6, q4 (quantized: "
                                                    "exllamav2 on CUDA only)")
    ap.add_argument("--model", default=None, help="EXL2 model directory (default: $EXL2_COURSE_MODEL, else the "
                                                  "embedded model)")
    ap.add_argument("--backend", default="auto", choices=["auto", "exllamav2", "reference"])
    ap.add_argument("--device", default=None, help="cpu or cuda (reference backend)")
    ap.add_argument("--repeats", type=int, default=5, help="kept repeats (median, min, max)")
    ap.add_argument("--warmup", type=int, default=2, help="repeats run first and thrown away")
    ap.add_argument("--decode-tokens", type=int, default=32, help="decoded tokens per repeat")
    ap.add_argument("--prefill-tokens", type=int, default=512, help="prompt tokens per prefill (0: skip)")
    ap.add_argument("--label", default=None, help="the model's name in the results")
    ap.add_argument("--json", action="store_true", help="print one JSON object {provenance, rows}")
    ap.add_argument("--out", default=None, help="also write the JSON object {provenance, rows} to this file")
    ap.add_argument("--record", action="store_true", help="also save it under results/speed/")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise CourseError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    if args.repeats < 1:
        raise CourseError(f"--repeats must be at least 1, got {args.repeats}")
    if args.warmup < 0 or args.decode_tokens < 1 or args.prefill_tokens < 0:
        raise CourseError("--warmup and --prefill-tokens must be 0 or more, --decode-tokens 1 or more")
    measure = Measure(backend=args.backend, device=args.device, repeats=args.repeats, warmup=args.warmup,
                      decode_tokens=args.decode_tokens, prefill_tokens=args.prefill_tokens)
    max_seq_lens = parse_token_list(args.max_seq_len, "cache length")
    depths = parse_token_list(args.depth, "depth")
    modes = check_modes([m.strip().lower() for m in args.cache.split(",") if m.strip()])
    single = len(max_seq_lens) == 1 and len(depths) == 1
    if not single:  # say what the matrix leaves out, one line each, before anything is loaded
        for line in unfit(max_seq_lens, depths, decode_tokens=args.decode_tokens):
            print(line, file=sys.stderr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CourseWarning)
        rows = bench_matrix(args.model, max_seq_lens=max_seq_lens, depths=depths, cache_modes=modes,
                            measure=measure, progress=not args.no_progress, skip_unfit=not single,
                            model_label=args.label)
    for msg in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, CourseWarning)):
        print(f"warning: {msg}", file=sys.stderr)  # one line each, no Python source line
    for w in caught:  # anything else is passed on as it came
        if not issubclass(w.category, CourseWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    prov = results.provenance(["python", "-m", "helpers", "bench", *(argv if argv is not None else sys.argv[1:])])
    if args.record:
        where = prov.get("gpu") or prov.get("cpu") or prov["device"]
        path = results.save_result("speed", f"bench-{rows[0]['model']}-{where}-{prov['date'][:19]}", rows, prov=prov)
        print(f"recorded {path}", file=sys.stderr)
    doc = json.dumps({"provenance": prov, "rows": rows}, indent=1)
    if args.out:
        atomic_write_text(Path(args.out), doc + "\n")
    if args.json:
        print(doc)
    else:
        print(format_rows(rows))
    return 0
