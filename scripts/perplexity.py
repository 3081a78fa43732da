#!/usr/bin/env python
"""Perplexity of the EXL2 model against its float source, on the course's fixed text (helpers/data/).

    python scripts/perplexity.py                      # the embedded model (built if missing) vs its float source
    python scripts/perplexity.py --model DIR          # your own EXL2 folder (or set EXL2_COURSE_MODEL)
    python scripts/perplexity.py --float DIR          # ... against your own float (Hugging Face) folder
    python scripts/perplexity.py --sweep              # the embedded model at 3, 4, 5, 6 and 8 bpw (cached)

Runs on the CPU with the course's reference decoder (float32, dequantized weights): it measures what the EXL2
rounding costs, not a GPU kernel. Lower is better; "vs float" is the ratio of the two perplexities.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers.core.errors import CourseError  # noqa: E402
from helpers.core.paths import MODEL_ENV  # noqa: E402
from helpers.core.units import gib  # noqa: E402
from helpers.lessons import quality  # noqa: E402
from helpers.models import embedded as models  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="an EXL2 folder (default: $EXL2_COURSE_MODEL, else the embedded model)")
    ap.add_argument("--float", dest="float_dir", help="float source folder (default: the embedded model's)")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens of the text scored (default 1024)")
    ap.add_argument("--text", help="score this UTF-8 text file instead of the course's fixed passage")
    ap.add_argument("--sweep", action="store_true", help="perplexity and size at 3, 4, 5, 6 and 8 bpw (cached)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, args.threads))
    max_tokens = args.max_tokens or quality.DEFAULT_MAX_TOKENS
    if args.sweep:
        rows = quality.quality_sweep(max_tokens=max_tokens)
        print(f"{'model':<26} {'bpw':>6} {'weights GiB':>12} {'perplexity':>11} {'vs float':>9}")
        for r in rows:
            print(f"{r['label']:<26} {r['bpw']:>6.2f} {gib(r['weights_bytes']):>12.3f} "
                  f"{r['perplexity']:>11.3f} {r['ppl_vs_float']:>9.4f}")
        return 0

    text = None
    if args.text:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CourseError(f"cannot read --text {args.text} ({exc}): pass a UTF-8 text file") from None
    exl2_dir = models.resolve_model_dir(args.model)
    custom = args.model or os.environ.get(MODEL_ENV)
    float_dir = Path(args.float_dir) if args.float_dir else (None if custom else models.float_model_dir())
    source = "the fixed text" if text is None else args.text
    print(f"text: {source} ({'first ' if max_tokens else ''}{max_tokens} tokens at most)")
    results = []
    for label, folder in (("float source", float_dir), ("EXL2", exl2_dir)):
        if folder is None:
            print(f"{label:<13} (skipped: pass --float DIR to compare your own model with its float source)")
            continue
        t0 = time.perf_counter()
        ppl = quality.perplexity(folder, text, max_tokens=max_tokens)
        results.append(ppl)
        print(f"{label:<13} perplexity {ppl:9.3f}   ({time.perf_counter() - t0:.1f} s)   {folder}")
    if len(results) == 2:
        print(f"EXL2 vs float: x{results[1] / results[0]:.4f} ({100 * (results[1] / results[0] - 1):+.2f}%)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CourseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
