"""`python -m helpers record` (or `make gpu-results`): every GPU figure the course shows, recorded by one command.

The recordings, their ledger and the notebook re-execution are helpers.recordings.registry's; this is the command
line over them: which recordings (``--only``, ``--list``), ``--force``, ``--timeout``, ``--no-notebooks``, and the
hidden ``--run-one`` each recording's fresh process runs.
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
    ap.add_argument("--list", action="store_true", help="list the recordings and exit (works without a GPU)")
    ap.add_argument("--only", default="*", help="glob over 'module:name', e.g. '*bench*'")
    ap.add_argument("--force", action="store_true", help="record again what is already recorded for this GPU")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds allowed for one recording (default 1200)")
    ap.add_argument("--no-notebooks", action="store_true", help="do not re-execute the notebooks afterwards")
    ap.add_argument("--run-one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.run_one:
        print(registry.run_one(args.run_one))
        return 0
    targets = [t for t in registry.discover() if fnmatch.fnmatch(t, args.only)]
    if args.list:
        print("\n".join(targets) if targets else "no GPU recordings are defined")
        return 0
    if not targets:
        raise CourseError(f"no recording matches --only '{args.only}'; see `python -m helpers record --list`")

    failures = registry.record_all(targets, force=args.force, timeout=args.timeout, say=_say)
    if not args.no_notebooks:
        registry.execute_notebooks()
    if failures:
        raise CourseError(f"{len(failures)} recording(s) failed: " + "; ".join(failures))
    return 0
