"""`python -m helpers <command> ...`: the course's command line.

Each command lives in the module that owns its idea and is imported only when called, so `python -m helpers plan`
never loads torch models and nothing ever imports exllamav2 on a machine without CUDA. Every user mistake ends in
one line, ``error: ...``, and exit status 2; so does a package missing from the Python that runs the command (the
usual cause: ``python -m helpers`` outside the course's .venv), which names the package and the way out.
"""
from __future__ import annotations

import difflib
import importlib
import sys

from helpers.core.errors import CourseError

# command -> ("module:function", one-line help). Each function takes argv (list[str]) and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "devices": ("helpers.cli.devices:main",
                "torch/CUDA, NVML, CPU and RAM readings, and the path the course takes here"),
    "plan": ("helpers.cli.plan:main", "will a model, context and cache mode fit on a GPU? (memory breakdown)"),
    "inspect": ("helpers.cli.inspect:main", "per-layer bits, groups and byte totals of an EXL2 checkpoint"),
    "synth": ("helpers.cli.synth:main", "write a shape-faithful random EXL2 checkpoint from a config and a bpw"),
    "model": ("helpers.cli.model:main", "build or locate the course's embedded EXL2 model; prints its directory last"),
    "generate": ("helpers.cli.generate:main", "generate text with exllamav2 (CUDA) or the reference (anywhere)"),
    "calibrate": ("helpers.cli.calibrate:main",
                  "refit the speed model's constants on the public measurements and validate them by source"),
    "bench": ("helpers.cli.bench:main", "prefill/decode tokens/s at a cache length and depth, with its roofline"),
    "probe": ("helpers.cli.probe:main", "probe --fallback: does this GPU spill into system RAM, and how fast?"),
    "emulate": ("helpers.cli.emulate:main", "(Linux+CUDA) emulate the Windows sysmem fallback with mapped host memory"),
    "record": ("helpers.cli.record:main", "(CUDA) record every GPU figure the course shows into results/, resumable"),
}


def missing_dependency(package: str) -> str:
    """One line for a package this Python lacks: which interpreter ran, and the two ways out."""
    return (f"the package '{package}' is not installed for this Python ({sys.executable}): run the course's own "
            f"interpreter (.venv/bin/python -m helpers ..., in a notebook !{{sys.executable}} -m helpers ...) or "
            f"install the requirements into this one (python -m pip install -r requirements.txt)")


def _usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    return (f"usage: python -m helpers <command> [options]\n\ncommands:\n{rows}\n\n"
            "'python -m helpers <command> -h' for options.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"error: unknown command '{name}'.{hint} Run 'python -m helpers --help' for the list.", file=sys.stderr)
        return 2
    target, _ = COMMANDS[name]
    mod_name, fn_name = target.split(":")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
        return int(fn(rest) or 0)
    except CourseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        if missing.split(".")[0] == "helpers" or not missing:
            raise          # a bug in the course itself: keep the traceback
        print(f"error: {missing_dependency(missing.split('.')[0])}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing half-written was kept. Run the command again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
