"""Progress bars for anything that takes more than a few seconds.

``tqdm.auto``: in a Jupyter kernel the notebook's own bar (a widget), elsewhere plain text on stderr. nbval's
sanitizer config replaces a bar's text with PROGRESS. Set EXL2_COURSE_NO_PROGRESS=1 to hide them.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T] | None = None, *, desc: str = "", total: int | None = None,
             unit: str = "it", unit_scale: bool = False, leave: bool = True):
    """A tqdm bar over ``iterable`` (or a manual one with ``total`` and ``.update(n)``)."""
    from tqdm.auto import tqdm

    text = not any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)   # a terminal, or no ipywidgets
    look = dict(file=sys.stderr, dynamic_ncols=False, ncols=90) if text else {}
    return tqdm(iterable, desc=desc, total=total, unit=unit, unit_scale=unit_scale, leave=leave, mininterval=0.5,
                disable=os.environ.get("EXL2_COURSE_NO_PROGRESS") == "1", **look)
