"""`python -m helpers probe --fallback`: does this GPU spill into system RAM when VRAM is full, and how fast?"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from helpers.core.errors import CourseError
from helpers.core.units import GIB, MIB
from helpers.fallback.placement import DEFAULT_PLACEMENT, PLACEMENTS
from helpers.fallback.probe import Answers, SystemAnswers, run_probe


def main(argv: list[str], answers: Answers | None = None) -> int:
    """`python -m helpers probe --fallback [--max-gib N] [--chunk-mib M] [--placement P] [--json]`"""
    ap = argparse.ArgumentParser(prog="python -m helpers probe",
                                 description="Does this GPU spill into system RAM when VRAM is full (Windows sysmem "
                                             "fallback), and how fast is memory past that point?")
    ap.add_argument("--fallback", action="store_true", help="probe NVIDIA's sysmem fallback (the only probe)")
    ap.add_argument("--max-gib", type=float, default=1.0,
                    help="GiB to try past the free VRAM (default 1; at most a quarter of the free system RAM)")
    ap.add_argument("--chunk-mib", type=int, default=256, help="size of each allocation in MiB (default 256)")
    ap.add_argument("--placement", choices=list(PLACEMENTS), default=DEFAULT_PLACEMENT,
                    help="the placement assumption to compare this driver with (helpers/fallback/placement.py; "
                         f"default {DEFAULT_PLACEMENT})")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = ap.parse_args(argv)
    if not args.fallback:
        raise CourseError("say what to probe: `python -m helpers probe --fallback`")
    if not 0 <= args.max_gib <= 64:
        raise CourseError(f"--max-gib must be between 0 and 64, got {args.max_gib}")
    if not 1 <= args.chunk_mib <= 4096:
        raise CourseError(f"--chunk-mib must be between 1 and 4096, got {args.chunk_mib}")
    rep = run_probe(answers or SystemAnswers(), past_bytes=int(args.max_gib * GIB), chunk_bytes=args.chunk_mib * MIB,
                    placement=args.placement)
    if args.json:
        print(json.dumps(asdict(rep), indent=1))
    else:
        print(rep.text())
    return 0
