"""Validate the speed model on its public calibration set without writing anything: leave each source out, fit on
the rest, predict it; print median measured/predicted, the share within +-15% and +-25% and inside the printed range,
per source and per attention path, the decode-vs-depth slopes, and (--points) every point.

    .venv/bin/python scripts/validate_speed_model.py [--points] [--data results/field/calibration.json]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.cli.calibrate import report  # noqa: E402
from helpers.speed import calibration as cal  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(cal.DATA_PATH))
    ap.add_argument("--points", action="store_true", help="every point's out-of-source prediction")
    args = ap.parse_args()
    doc = cal.calibrate(args.data)
    rows = cal.leave_one_source_out(cal.load_points(args.data)[1]) if args.points else None
    print(report(doc, rows))
