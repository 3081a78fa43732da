"""`python -m helpers inspect DIR [--json] [--totals]`: per-layer bits, groups and byte totals of an EXL2 checkpoint."""
from __future__ import annotations

import argparse
import json

from helpers.format.inspect import inspect_summary, inspect_text
from helpers.format.reader import open_exl2


def main(argv: list[str] | None = None) -> int:
    """python -m helpers inspect DIR [--json] [--totals]"""
    ap = argparse.ArgumentParser(prog="python -m helpers inspect",
                                 description="Per-layer bits, groups and byte totals of an EXL2 checkpoint.")
    ap.add_argument("dir", help="the EXL2 model directory (config.json + *.safetensors)")
    ap.add_argument("--json", action="store_true", help="print {'layers': [...], 'totals': {...}} as JSON")
    ap.add_argument("--totals", action="store_true", help="only the totals, no per-layer table")
    args = ap.parse_args(argv)
    ckpt = open_exl2(args.dir)
    if args.json:
        print(json.dumps({"layers": ckpt.layer_table(), "totals": inspect_summary(ckpt)}, indent=1))
    else:
        print(inspect_text(ckpt, table=not args.totals))
    return 0
