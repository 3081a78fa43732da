"""`python -m helpers record` (or `make gpu-results`): every GPU figure the course shows, recorded by one command.

Each room that measures something on a GPU lists its recordings in a module-level ``GPU_RECORDINGS`` dict
({name: callable}); each callable checks for CUDA, measures, writes ``results/<topic>/<name>.json`` through
``helpers.core.results.save_result`` (provenance included) and returns that path. This command runs every recording in a
fresh process (so allocations of one never colour the next), in the order of ``MODULES``, and keeps a ledger per GPU in
the cache folder: what is already recorded for this GPU is skipped, an interrupted run resumes where it stopped, and
``--force`` records again. Afterwards the notebooks are re-executed so that their stored outputs show the new records.
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers.core.errors import CourseError
from helpers.core.paths import REPO_DIR, cache_dir
from helpers.core.results import atomic_write_text, slug

#: rooms that may hold GPU recordings, in the order they run (cheap format checks first, the emulator last)
MODULES = ("helpers.format.exl2", "helpers.models.embedded", "helpers.engines.backend", "helpers.memory.accounting", "helpers.speed.bench",
           "helpers.fallback.spill", "helpers.fallback.emulator")


def discover() -> list[str]:
    """Every recording as 'module:name', in run order. Importing a room never needs a GPU."""
    found = []
    for mod_name in MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name == mod_name:
                continue
            raise
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
    from helpers.core.progress import progress

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    for nb in progress(sorted(notebooks_dir.glob("[0-9][0-9]_*.ipynb")), desc="re-executing notebooks", unit="nb"):
        r = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute",
                            "--inplace", "--ExecutePreprocessor.timeout=900", str(nb.name)], cwd=notebooks_dir,
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise CourseError(f"{nb.name} failed to execute: {r.stderr.strip().splitlines()[-1] if r.stderr else '?'}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m helpers record", description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the recordings and exit (works without a GPU)")
    ap.add_argument("--only", default="*", help="glob over 'module:name', e.g. '*bench*'")
    ap.add_argument("--force", action="store_true", help="record again what is already recorded for this GPU")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds allowed for one recording (default 1200)")
    ap.add_argument("--no-notebooks", action="store_true", help="do not re-execute the notebooks afterwards")
    ap.add_argument("--run-one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.run_one:
        print(run_one(args.run_one))
        return 0
    targets = [t for t in discover() if fnmatch.fnmatch(t, args.only)]
    if args.list:
        print("\n".join(targets) if targets else "no GPU recordings are defined")
        return 0
    if not targets:
        raise CourseError(f"no recording matches --only '{args.only}'; see `python -m helpers record --list`")

    from helpers.core import devices as gpu

    gpu.require_cuda("recording GPU results")
    gpu_name = gpu.device_summary()["gpu_name"]
    ledger_path = _ledger_path(gpu_name)
    ledger = {} if args.force else _load_ledger(ledger_path)
    started = time.monotonic()
    failures = []
    for target in targets:
        done = ledger.get(target)
        if done and Path(done).exists():
            print(f"skip     {target}: recorded for {gpu_name} in {done}")
            continue
        print(f"record   {target} ...", flush=True)
        t0 = time.monotonic()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            r = subprocess.run([sys.executable, "-m", "helpers", "record", "--run-one", target], env=env,
                               timeout=args.timeout, stdout=subprocess.PIPE, text=True)
        except subprocess.TimeoutExpired:
            failures.append(f"{target}: over {args.timeout} s")
            continue
        if r.returncode != 0:
            failures.append(f"{target}: exit {r.returncode}")
            continue
        path = r.stdout.strip().splitlines()[-1]
        ledger[target] = path
        atomic_write_text(ledger_path, json.dumps(ledger, indent=1))  # resume point after every recording
        print(f"done     {target} in {time.monotonic() - t0:.0f} s -> {path}")
    print(f"recordings took {time.monotonic() - started:.0f} s")
    if not args.no_notebooks:
        execute_notebooks()
    if failures:
        raise CourseError(f"{len(failures)} recording(s) failed: " + "; ".join(failures))
    return 0
