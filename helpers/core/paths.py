"""Where things live: the repository, the results folder, and the local cache for built models.

Built models never go into the tracked files. The cache is ``$EXL2_COURSE_CACHE`` if set, else
``~/.cache/exl2-course``.
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = PACKAGE_DIR.parent
RESULTS_DIR = Path(os.environ.get("EXL2_COURSE_RESULTS", REPO_DIR / "results"))
CONFIGS_DIR = PACKAGE_DIR / "specs" / "configs"

#: environment variable a reader sets to point every tool at their own EXL2 model directory
MODEL_ENV = "EXL2_COURSE_MODEL"


def cache_dir() -> Path:
    """The folder for built models (created on demand)."""
    base = os.environ.get("EXL2_COURSE_CACHE")
    path = Path(base).expanduser() if base else Path.home() / ".cache" / "exl2-course"
    path.mkdir(parents=True, exist_ok=True)
    return path
