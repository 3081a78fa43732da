"""The set-up behind `make lab` / `make test` fails with a message that says what to do."""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "scripts" / "setup.sh"


def run_setup(tmp_path, **env):
    full = {**os.environ, "VENV": str(tmp_path / "venv"), "SKIP_MODEL": "1", **env}
    return subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, env=full, timeout=300)


def test_missing_python_says_what_to_install(tmp_path):
    r = run_setup(tmp_path, PYTHON="/nonexistent/python3")
    assert r.returncode == 1
    assert "setup error: no '/nonexistent/python3' on PATH. Install Python 3.10 or newer" in r.stderr
    assert not (tmp_path / "venv").exists()


def test_old_python_is_refused(tmp_path):
    fake = tmp_path / "python3.8"
    fake.write_text("#!/bin/sh\n[ \"$1\" = -V ] && { echo 'Python 3.8.10'; exit 0; }\nexit 1\n")
    fake.chmod(0o755)
    r = run_setup(tmp_path, PYTHON=str(fake))
    assert r.returncode == 1
    assert "is Python 3.8.10; the course needs Python 3.10 or newer" in r.stderr
    assert not (tmp_path / "venv").exists()


def test_no_network_for_packages_fails_with_advice(tmp_path):
    # pip with no configuration and an index nobody answers on: what a machine without network sees.
    r = run_setup(tmp_path, PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple",
                  PIP_RETRIES="0", PIP_TIMEOUT="2", PIP_NO_CACHE_DIR="1")
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("setup error: pip could not install torch==2.13.0")
    assert "network" in last
    # the stamp that marks a finished install is never written by a failed one
    assert not (tmp_path / "venv" / ".course-installed").exists()


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    assert "make test" in ci and "make test" in readme and "make lab" in readme
