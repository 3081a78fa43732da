"""Progress bars for anything that takes more than a few seconds.

Plain-text tqdm on stderr (no widgets needed), so bars work in a terminal, in JupyterLab and under nbval, whose
sanitizer config replaces a bar's line with PROGRESS. Set EXL2_COURSE_NO_PROGRESS=1 to hide them.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, *, desc: str = "", total: int | None = None,
             unit: str = "it", unit_scale: bool = False, leave: bool = True):
    """A tqdm bar over ``iterable`` (or a manual one with ``total`` and ``.update(n)``)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, unit_scale=unit_scale, leave=leave, file=sys.stderr,
                mininterval=0.5, dynamic_ncols=False, ncols=90,
                disable=os.environ.get("EXL2_COURSE_NO_PROGRESS") == "1")
