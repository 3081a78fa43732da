"""Import figures measured outside the course (a standalone script on a GPU) as records labelled external: decode
speed into results/speed/, the allocator count of exllamav2's memory into results/memory/.
`python scripts/import_external.py FILE.json ...` (or a folder of them in $EXL2_COURSE_MEASUREMENTS). Re-running
rewrites the same files: the records name their source file and its SHA-256, so anyone holding it can check them."""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.recordings.memory import import_external_memory  # noqa: E402
from helpers.recordings.speed import import_external  # noqa: E402


def main(argv: list[str]) -> int:
    folder = os.environ.get("EXL2_COURSE_MEASUREMENTS")
    files = [Path(a) for a in argv] or (sorted(Path(folder).glob("*.json")) if folder else [])
    if not files:
        print("error: give the measurement files to import (python scripts/import_external.py FILE.json ...) or "
              "set EXL2_COURSE_MEASUREMENTS to their folder", file=sys.stderr)
        return 2
    for f in files:
        print(f"{f.name} -> {import_external(f)}")
        print(f"{f.name} -> {import_external_memory(f)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
