"""`python -m helpers record` (or `make gpu-results`): every GPU figure the course shows, recorded by one command.

The recordings, their order and estimates, their ledger and the notebook re-execution are
helpers.recordings.registry's; this is the command line over them: which recordings (``--only``, ``--list``),
``--plan`` (the order, each estimate and what is recorded, without CUDA), ``--budget-s`` (start nothing that cannot
finish in time; run it again to resume), ``--force``, ``--timeout``, ``--no-notebooks``, ``--notebooks-only`` (after
records came back from a GPU machine), and the hidden ``--run-one`` each recording's fresh process runs.
"""
from __future__ import annotations

import argparse
import fnmatch

from helpers.core.errors import CourseError
from helpers.recordings import registry


def _say(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m helpers record", description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the recordings in run order and exit (no GPU needed)")
    ap.add_argument("--plan", "--dry-run", dest="plan", action="store_true",
                    help="print the run order, each recording's estimated seconds and what is already recorded for "
                         "each GPU, and exit (no GPU needed)")
    ap.add_argument("--only", default="*", help="glob over 'module:name', e.g. '*decode_depth*'")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds this run may take: a recording whose estimate does not fit in what is left is not "
                         "started, one still running when it ends is stopped; run again to resume")
    ap.add_argument("--margin-s", type=float, default=registry.MARGIN_S,
                    help=f"seconds kept free beyond each estimate under --budget-s (default {registry.MARGIN_S:g})")
    ap.add_argument("--force", action="store_true", help="record again what is already recorded for this GPU")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds allowed for one recording (default 1200)")
    ap.add_argument("--no-notebooks", action="store_true", help="do not re-execute the notebooks afterwards")
    ap.add_argument("--notebooks-only", action="store_true",
                    help="only re-execute the notebooks on the CPU path (after records came back from a GPU machine)")
    ap.add_argument("--run-one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.run_one:
        print(registry.run_one(args.run_one))
        return 0
    if args.notebooks_only:
        registry.execute_notebooks()
        return 0
    targets = [t for t in registry.discover() if fnmatch.fnmatch(t, args.only)]
    if args.list:
        print("\n".join(targets) if targets else "no GPU recordings are defined")
        return 0
    if not targets:
        raise CourseError(f"no recording matches --only '{args.only}'; see `python -m helpers record --list`")
    if args.plan:
        print("\n".join(registry.plan_lines(targets)))
        return 0
    if args.budget_s is not None and args.budget_s <= 0:
        raise CourseError(f"--budget-s must be a positive number of seconds, got {args.budget_s:g}")

    failures, left = registry.record_all(targets, force=args.force, timeout=args.timeout, budget_s=args.budget_s,
                                         margin_s=args.margin_s, say=_say)
    if not args.no_notebooks:
        registry.execute_notebooks()
    if failures:
        raise CourseError(f"{len(failures)} recording(s) failed: " + "; ".join(failures))
    return 0
