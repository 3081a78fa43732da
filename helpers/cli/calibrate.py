"""`python -m helpers calibrate`: refit the speed model's constants on results/field/calibration.json, validate them
leaving each source out, and write helpers/speed/constants.json (``--check``: only compare with the file)."""
from __future__ import annotations

import argparse
import json
import math

from helpers.core.errors import CourseError
from helpers.speed import calibration as cal
from helpers.speed.model import CONSTANTS_PATH, constants_from_dict


def report(doc: dict, rows: list[dict] | None = None) -> str:
    """The constants, the range, and the leave-one-source-out figures per source, per path and per depth slope."""
    c = constants_from_dict(doc)
    lines = [f"fitted on {doc['n_points']} points from {doc['n_sources']} sources (data sha256 "
             f"{doc['data_sha256'][:12]}...)", f"{'constant':<20}{'symbol':<11}{'value':>10} {'unit':<4} how"]
    for r in c.table():
        lines.append(f"{r['constant']:<20}{r['symbol']:<11}{r['value']:>10g} {r['unit']:<4} {c.how(r['constant'])}")
    lines.append(f"range: x{c.range_low:.2f} to x{c.range_high:.2f} ({doc['range']['from']})")
    v = doc["validation"]

    def row(name, s):
        if not s.get("n"):
            return f"{name:<28}{0:>4}"
        return (f"{name:<28}{s['n']:>4}{s['median_ratio']:>9.2f}{s['within_15pct']:>9.0%}{s['within_25pct']:>9.0%}"
                f"{s['inside_range']:>9.0%}")

    lines += ["", "leave one source out: measured / predicted", f"{'':<28}{'n':>4}{'median':>9}{'+-15%':>9}"
              f"{'+-25%':>9}{'in range':>9}", row("all points", v["leave_one_source_out"])]
    lines += [row(f"  source {k}", s) for k, s in v["per_source"].items()]
    lines += [row(f"  path {k}", s) for k, s in v["per_path"].items()]
    if v["depth_slopes"]:
        lines += ["", "depth slopes (seconds per position, measured / predicted out of source):"]
        lines += [f"  {s['source']} ({s['path']}, {s['from_depth']:,} -> {s['to_depth']:,} deep): {s['ratio']:.2f}"
                  for s in v["depth_slopes"]]
    if rows:
        lines += ["", f"{'point':<62}{'measured':>9}{'predicted':>10}{'ratio':>7}"]
        lines += [f"{r['id'][:61]:<62}{r['measured_tok_s']:>9.1f}{r['predicted_tok_s']:>10.1f}{r['ratio']:>7.2f}"
                  for r in rows]
    return "\n".join(lines)


def same(a: dict, b: dict, rel: float = 1e-3) -> bool:
    """Do two constants documents agree (the data hash exactly, every number within ``rel``)?"""
    if a.get("data_sha256") != b.get("data_sha256"):
        return False
    ca, cb = constants_from_dict(a), constants_from_dict(b)
    pairs = [(ca.values[k], cb.values[k]) for k in ca.values] + [(ca.range_low, cb.range_low),
                                                                 (ca.range_high, cb.range_high)]
    return all(math.isclose(x, y, rel_tol=rel, abs_tol=1e-12) for x, y in pairs)


def main(argv: list[str]) -> int:
    """`python -m helpers calibrate [--check] [--points] [--data FILE]`"""
    ap = argparse.ArgumentParser(prog="python -m helpers calibrate", description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=str(cal.DATA_PATH), help="the calibration set (default: results/field/...)")
    ap.add_argument("--check", action="store_true", help="refit and compare with helpers/speed/constants.json; "
                                                         "exit 1 if they differ, write nothing")
    ap.add_argument("--points", action="store_true", help="also print every point's out-of-source prediction")
    args = ap.parse_args(argv)
    doc = cal.calibrate(args.data)
    rows = cal.leave_one_source_out(cal.load_points(args.data)[1]) if args.points else None
    print(report(doc, rows))
    if args.check:
        try:
            shipped = json.loads(CONSTANTS_PATH.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise CourseError(f"{CONSTANTS_PATH} cannot be read: run `python -m helpers calibrate`") from None
        if not same(doc, shipped):
            print(f"\n{CONSTANTS_PATH.name} is out of date with {args.data}: run `python -m helpers calibrate`")
            return 1
        print(f"\n{CONSTANTS_PATH.name} agrees with the data")
        return 0
    cal.write_constants(doc)
    print(f"\nwrote {CONSTANTS_PATH}")
    return 0
