"""Recorded results: one JSON file per run under ``results/<topic>/``, each with its provenance.

A recorded figure must say where and when it was measured. ``provenance()`` collects the device (GPU name and
driver, or the CPU), CUDA, torch, exllamav2 (the installed version; never imported here), Python, the date and the
exact command. ``save_result`` writes atomically (a temporary file renamed into place), so an interrupted run
never leaves half a file. ``load_results`` is what notebooks call: they never type a GPU number by hand.
"""
from __future__ import annotations

import datetime as _dt
import json
import platform
import re
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

from helpers.core import devices
from helpers.core.atomic import atomic_write_text
from helpers.core.errors import CourseError
from helpers.core.paths import RESULTS_DIR


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def provenance(command: str | Iterable[str] | None = None) -> dict[str, Any]:
    """Where and how a result was made. Reads CUDA/NVML only if they are there; never raises for their absence."""
    info = devices.device_summary()
    if command is None:
        command = sys.argv
    if not isinstance(command, str):
        command = " ".join(shlex.quote(str(a)) for a in command)
    return {
        "device": info["device"],
        "gpu": info.get("gpu_name"),
        "driver": info.get("driver"),
        "cuda": info.get("cuda"),
        "cpu": info.get("cpu"),
        "torch": _version("torch"),
        "exllamav2": _version("exllamav2"),
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


def slug(text: str) -> str:
    """A file-name-safe form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "unknown"


def save_result(topic: str, name: str, rows: list[dict], *, prov: dict | None = None,
                extra: dict | None = None, results_dir: Path | None = None) -> Path:
    """Write ``results/<topic>/<name>.json`` = {provenance, rows, **extra}; returns the path."""
    if not rows:
        raise CourseError(f"refusing to record an empty result for '{topic}/{name}': nothing was measured")
    doc = {"provenance": prov if prov is not None else provenance()}
    if extra:
        doc.update(extra)
    doc["rows"] = rows
    path = Path(results_dir or RESULTS_DIR) / topic / f"{slug(name)}.json"
    atomic_write_text(path, json.dumps(doc, indent=1, sort_keys=False) + "\n")
    return path


#: result-row keys renamed since files were first written: read the old name once, write the new
_RENAMED_KEYS = {"ctx": "max_seq_len", "trained_ctx": "trained_positions",
                 "beyond_trained_ctx": "beyond_trained_positions"}


def _renamed(row):
    if not isinstance(row, dict):
        return row
    return {_RENAMED_KEYS.get(k, k) if _RENAMED_KEYS.get(k) not in row else k: v for k, v in row.items()}


def load_results(topic: str, results_dir: Path | None = None) -> list[dict]:
    """Every recorded file of a topic, oldest first: [{'path', 'provenance', 'rows', ...}]. Empty if none."""
    folder = Path(results_dir or RESULTS_DIR) / topic
    docs = []
    for path in sorted(folder.glob("*.json")):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CourseError(f"recorded result {path} is unreadable ({exc}); delete it or re-record it") from None
        if "provenance" not in doc or "rows" not in doc:
            raise CourseError(f"recorded result {path} has no provenance or rows; re-record it")
        doc["path"] = str(path)
        for key in ("rows", "measurements"):
            if key in doc:
                doc[key] = [_renamed(r) for r in doc[key]]
        docs.append(doc)
    docs.sort(key=lambda d: d["provenance"].get("date", ""))
    return docs


def is_external(prov: dict) -> bool:
    """Whether a record was measured outside the course's harness (imported by scripts/import_external.py)."""
    return bool(prov.get("external")) or str(prov.get("harness", "")).startswith("external")


def label(prov: dict) -> str:
    """How a recorded figure is labelled wherever it is shown: "recorded on ..." for the course's own recordings,
    "external: measured on ..." for figures measured with another script."""
    where = prov.get("gpu") or prov.get("cpu") or prov.get("device", "?")
    if is_external(prov):
        return (f"external: measured on {where}, {str(prov.get('date', '?'))[:10]} with a standalone script, not "
                f"the course's harness (exllamav2 {prov.get('exllamav2') or '-'}, torch {prov.get('torch')})")
    return (f"recorded on {where}, {str(prov.get('date', '?'))[:10]} "
            f"(exllamav2 {prov.get('exllamav2') or '-'}, torch {prov.get('torch')})")
