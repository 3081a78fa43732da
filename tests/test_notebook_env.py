"""The repository's conftest.py: nbval's kernels run with the GPU hidden, and it is given back afterwards."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _notebook(code: str) -> str:
    return json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {},
                       "cells": [{"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {},
                                  "outputs": [], "source": code}]})


def _run(tmp_path: Path, extra_env: dict) -> subprocess.CompletedProcess:
    shutil.copy(ROOT / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "a.ipynb").write_text(_notebook(
        "import os\nassert os.environ.get('CUDA_VISIBLE_DEVICES') == '" + extra_env["expect_kernel"] + "'"))
    (tmp_path / "test_after.py").write_text(
        "import os\n\ndef test_after():\n    assert os.environ.get('CUDA_VISIBLE_DEVICES') == '3'\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3", **extra_env.get("env", {})}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                           "--nbval-current-env", "a.ipynb", "test_after.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_notebook_kernels_get_no_gpu_and_it_is_restored(tmp_path):
    r = _run(tmp_path, {"expect_kernel": ""})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "2 passed" in r.stdout


def test_notebook_gpu_opt_in(tmp_path):
    r = _run(tmp_path, {"expect_kernel": "3", "env": {"EXL2_COURSE_NOTEBOOK_GPU": "1"}})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
