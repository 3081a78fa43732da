"""pytest for the whole repository: the notebooks are executed on the CPU path, also on a machine with a GPU.

Their stored outputs are the CPU path's (CI has no GPU, and `python -m helpers record` re-executes them with the GPU
hidden), and nbval compares every cell not marked NBVAL_IGNORE_OUTPUT against them. So the kernel nbval starts for a
notebook gets ``CUDA_VISIBLE_DEVICES=""``; the GPU paths are tested by the tests marked ``gpu`` under tests/ and
measured by `make gpu-results`. ``EXL2_COURSE_NOTEBOOK_GPU=1`` runs the notebooks on the GPU anyway (cells whose
output differs there then fail, as they should).
"""
from __future__ import annotations

import os

import pytest

_UNSET = object()
_saved: dict[str, object] = {}


def _hide_gpu(item) -> bool:
    return item.path.suffix == ".ipynb" and os.environ.get("EXL2_COURSE_NOTEBOOK_GPU") != "1"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # before nbval's file-level setup starts the notebook's kernel, which copies this process's environment
    if _hide_gpu(item):
        _saved.setdefault("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", _UNSET))
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    # give the GPU back to whatever runs after the last notebook cell
    if _saved and (nextitem is None or nextitem.path.suffix != ".ipynb"):
        old = _saved.pop("CUDA_VISIBLE_DEVICES")
        if old is _UNSET:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


def pytest_collectstart(collector):
    # a table's HTML (a DataFrame as JupyterLab draws it) varies with the pandas version; its text/plain, which says
    # the same, is compared
    path = getattr(collector, "path", None)
    if path is not None and path.suffix == ".ipynb" and hasattr(collector, "skip_compare"):
        collector.skip_compare += ("text/html",)
