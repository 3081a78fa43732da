"""The one way every figure gets matplotlib: the Agg backend outside a Jupyter kernel, so tests and CI draw headless.

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
