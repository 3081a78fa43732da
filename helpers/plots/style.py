"""The one way every figure gets matplotlib: the Agg backend outside a Jupyter kernel, so tests and CI draw headless;
``figure(ax, figsize)`` gives a plot function its axes (the caller's, or a new figure), ``CACHE_LINESTYLES`` the line
style of each cache mode.

Every plot function in this package returns the matplotlib Figure (so a notebook cell shows it) and labels sizes in
GiB (2**30 bytes).
"""
from __future__ import annotations

import sys


def pyplot():
    """matplotlib.pyplot, imported on first use (matplotlib is heavy), with Agg chosen when no kernel draws inline."""
    import matplotlib

    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


#: one line style per cache mode, the same in every figure that draws cache modes side by side
CACHE_LINESTYLES = {"fp16": "-", "fp8": (0, (1, 1)), "q8": "--", "q6": "-.", "q4": ":"}


def figure(ax=None, figsize=(8, 4.5)):
    """(fig, ax): ``ax`` and its figure when the caller passes one, else a new single-axes figure of ``figsize``."""
    if ax is not None:
        return ax.figure, ax
    return pyplot().subplots(figsize=figsize)
