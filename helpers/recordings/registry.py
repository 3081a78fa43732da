"""The registry of every GPU recording, and the runner behind `python -m helpers record` (helpers.cli.record).

Each room that measures something on a GPU lists its recordings in a module-level ``GPU_RECORDINGS`` dict
({name: callable}); each callable checks for CUDA, measures, writes ``results/<topic>/<name>.json`` through
``helpers.core.results.save_result`` (provenance included) and returns that path. ``record_all`` runs every recording
in a fresh process (so allocations of one never colour the next), in the order of ``MODULES``, and keeps a ledger per
GPU in the cache folder: what is already recorded for this GPU is skipped, an interrupted run resumes where it
stopped, and ``force`` records again. Afterwards ``execute_notebooks`` re-runs the notebooks so that their stored
outputs show the new records.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from helpers.core import devices
from helpers.core.atomic import atomic_write_text
from helpers.core.errors import CourseError
from helpers.core.paths import REPO_DIR, cache_dir
from helpers.core.progress import progress
from helpers.core.results import slug

#: rooms that may hold GPU recordings, in the order they run (cheap format checks first, the emulator last)
MODULES = ("helpers.recordings.format_check", "helpers.recordings.capital", "helpers.recordings.agreement",
           "helpers.recordings.memory", "helpers.recordings.speed", "helpers.recordings.fallback")


def discover() -> list[str]:
    """Every recording as 'module:name', in run order. Importing a room never needs a GPU; a room that does not
    exist (a typo in ``MODULES``) fails here, loudly."""
    found = []
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        found += [f"{mod_name}:{name}" for name in getattr(mod, "GPU_RECORDINGS", {})]
    return found


def run_one(target: str) -> Path:
    """Run one recording in this process (the child side of `record`)."""
    mod_name, name = target.split(":")
    fn = importlib.import_module(mod_name).GPU_RECORDINGS[name]
    return Path(fn())


def _ledger_path(gpu_name: str) -> Path:
    return cache_dir() / "record" / f"{slug(gpu_name)}.json"


def _load_ledger(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def execute_notebooks(notebooks_dir: Path = REPO_DIR / "notebooks") -> None:
    """Re-run every notebook in place so its stored outputs show the records just made.

    The GPU is hidden from them (``CUDA_VISIBLE_DEVICES=""``): stored outputs are what CI checks with nbval on a
    machine without one, so they must come from the CPU path, with the recorded figures read from results/. A
    reader's own run on a GPU shows live figures beside them."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    for nb in progress(sorted(notebooks_dir.glob("[0-9][0-9]_*.ipynb")), desc="re-executing notebooks", unit="nb"):
        r = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                            "--inplace", "--ExecutePreprocessor.timeout=900", str(nb.name)], cwd=notebooks_dir,
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise CourseError(f"{nb.name} failed to execute: {r.stderr.strip().splitlines()[-1] if r.stderr else '?'}")


def record_all(targets: list[str], *, force: bool = False, timeout: int = 1200,
               say: Callable[[str], None] = print) -> list[str]:
    """(CUDA) Record each of ``targets`` ('module:name') in a fresh process (``python -m helpers record --run-one``),
    skipping what this GPU's ledger already holds (unless ``force``) and writing the ledger after every recording.
    ``say`` gets one line per recording. Returns the failures, one line each ('target: why')."""
    devices.require_cuda("recording GPU results")
    gpu_name = devices.device_summary()["gpu_name"]
    ledger_path = _ledger_path(gpu_name)
    ledger = {} if force else _load_ledger(ledger_path)
    started = time.monotonic()
    failures = []
    for target in targets:
        done = ledger.get(target)
        if done and Path(done).exists():
            say(f"skip     {target}: recorded for {gpu_name} in {done}")
            continue
        say(f"record   {target} ...")
        t0 = time.monotonic()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            r = subprocess.run([sys.executable, "-m", "helpers", "record", "--run-one", target], env=env,
                               timeout=timeout, stdout=subprocess.PIPE, text=True)
        except subprocess.TimeoutExpired:
            failures.append(f"{target}: over {timeout} s")
            continue
        if r.returncode != 0:
            failures.append(f"{target}: exit {r.returncode}")
            continue
        path = r.stdout.strip().splitlines()[-1]
        ledger[target] = path
        atomic_write_text(ledger_path, json.dumps(ledger, indent=1))  # resume point after every recording
        say(f"done     {target} in {time.monotonic() - t0:.0f} s -> {path}")
    say(f"recordings took {time.monotonic() - started:.0f} s")
    return failures
