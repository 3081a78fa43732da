"""`python -m helpers model [--rebuild] [--bpw X] [--float]`: build (once) or locate the course's embedded model."""
from __future__ import annotations

import argparse
import json
import sys

from helpers.core.units import fmt_gib
from helpers.models.embedded import COMPLETE_MARKER, EMBEDDED_BPW, exl2_model_dir, float_model_dir
from helpers.models.gguf import MODEL_NAME, SOURCE_SPEC


def main(argv: list[str] | None = None) -> int:
    """Build or locate the model (``--float``: its float32 source); its folder is printed last."""
    ap = argparse.ArgumentParser(prog="python -m helpers model",
                                 description="Build (once) or locate the course's embedded EXL2 model "
                                             f"({MODEL_NAME}). The last line of output is its folder.")
    ap.add_argument("--bpw", type=float, default=EMBEDDED_BPW, help=f"bits per weight (default {EMBEDDED_BPW:g})")
    ap.add_argument("--rebuild", action="store_true", help="build again even if the cache holds it")
    ap.add_argument("--float", dest="float_only", action="store_true", help="the float32 source instead")
    args = ap.parse_args(argv)
    if args.float_only:
        folder = float_model_dir(rebuild=args.rebuild)
    else:
        if args.rebuild:
            float_model_dir()
        folder = exl2_model_dir(args.bpw, rebuild=args.rebuild)
    marker = json.loads((folder / COMPLETE_MARKER).read_text(encoding="utf-8"))
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    kind = f"EXL2, {marker['bpw']:g} bpw" if "bpw" in marker else marker.get("dtype", "float")
    print(f"{MODEL_NAME} ({kind}) from {SOURCE_SPEC}: {fmt_gib(size, 3)} on disk")
    print(folder)
    sys.stdout.flush()
    return 0
