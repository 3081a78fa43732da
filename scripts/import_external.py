"""Import figures measured outside the course (a standalone script on a GPU) into results/speed/ as records labelled
external: `python scripts/import_external.py [FILE.json ...]` (default: every JSON file in the shared measurements
folder, $EXL2_COURSE_MEASUREMENTS or /work/shared/measurements). Re-running rewrites the same files."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.recordings.speed import import_external  # noqa: E402


def main(argv: list[str]) -> int:
    folder = Path(os.environ.get("EXL2_COURSE_MEASUREMENTS", "/work/shared/measurements"))
    files = [Path(a) for a in argv] or sorted(folder.glob("*.json"))
    if not files:
        print(f"error: no measurement files given and none in {folder}", file=sys.stderr)
        return 2
    for f in files:
        print(f"{f.name} -> {import_external(f)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
