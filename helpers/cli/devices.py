"""`python -m helpers devices`: torch/CUDA, NVML, flash-attn and the attention path exllamav2 takes, CPU and RAM
readings, and the path the course takes here."""
from __future__ import annotations

import argparse
import json

from helpers.core.devices import course_path, device_summary, report


def main(argv: list[str]) -> int:
    """`python -m helpers devices [--json]`"""
    ap = argparse.ArgumentParser(prog="python -m helpers devices", description="Device readings.")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.json:
        print(json.dumps(device_summary(), indent=1))
    else:
        print(report())
        path, why = course_path()
        print(f"course path  {path.upper()}: {why}")
    return 0
