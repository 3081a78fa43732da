"""The recording command: discovery works without a GPU, refuses to record without one, resumes with its ledger."""
import json
import types
from pathlib import Path

import pytest

from helpers.cli import record as record_cli
from helpers.core.errors import CourseError
from helpers.recordings import registry as record


def test_every_recording_is_discoverable_on_cpu():
    targets = record.discover()
    assert all(":" in t and t.split(":")[0] in record.MODULES for t in targets)
    assert {t.split(":")[0] for t in targets} == set(record.MODULES)   # every room exists and records something


def test_a_missing_room_fails_loudly(monkeypatch):
    monkeypatch.setattr(record, "MODULES", record.MODULES + ("helpers.recordings.no_such_room",))
    with pytest.raises(ModuleNotFoundError, match="no_such_room"):
        record.discover()


def test_record_without_gpu_is_one_line(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(record, "discover", lambda: ["helpers.fake:x"])
    with pytest.raises(CourseError, match="recording GPU results needs a CUDA GPU"):
        record_cli.main([])


def test_unknown_only_pattern(monkeypatch):
    monkeypatch.setattr(record, "discover", lambda: ["helpers.fake:x"])
    with pytest.raises(CourseError, match="no recording matches"):
        record_cli.main(["--only", "nothing*"])


@pytest.fixture
def fake_gpu_session(monkeypatch, tmp_path):
    """record_all on a faked CUDA machine: three fake recordings with estimates a 30 s, b 60 s, c 10 s, and a fake
    clock that each fake child advances by its recording's ``took`` seconds. Returns what the test reads."""
    from helpers.core import devices as gpu

    monkeypatch.setattr(record, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(gpu, "require_cuda", lambda what="": None)
    monkeypatch.setattr(gpu, "device_summary", lambda: {"gpu_name": "NVIDIA H200"})
    order = (record.Planned("helpers.fake:a", 30, "test"), record.Planned("helpers.fake:b", 60, "test"),
             record.Planned("helpers.fake:c", 10, "test"))
    monkeypatch.setattr(record, "ORDER", order)
    monkeypatch.setattr(record, "discover", lambda: [p.target for p in order])
    monkeypatch.setattr(record, "_available", lambda need: (True, True))
    clock = [1000.0]
    monkeypatch.setattr(record.time, "monotonic", lambda: clock[0])
    s = types.SimpleNamespace(calls=[], limits=[], took={"helpers.fake:a": 30, "helpers.fake:b": 60,
                                                         "helpers.fake:c": 10}, clock=clock, tmp=tmp_path)

    def fake_child(cmd, timeout):
        target = cmd[-1]
        s.calls.append(target)
        s.limits.append(timeout)
        if s.took[target] > timeout:   # runs past its limit: stopped there
            clock[0] += timeout
            return None, ""
        clock[0] += s.took[target]
        out = tmp_path / f"{target.split(':')[1]}.json"
        out.write_text("{}")
        return 0, f"some output\n{out}\n"

    monkeypatch.setattr(record, "_run_child", fake_child)
    s.ledger = record._ledger_path("NVIDIA H200")
    return s


def test_skips_what_the_ledger_holds_and_resumes(fake_gpu_session, capsys):
    s = fake_gpu_session
    done_file = s.tmp / "a.json"
    done_file.write_text("{}")
    s.ledger.parent.mkdir(parents=True)
    s.ledger.write_text(json.dumps({"helpers.fake:a": str(done_file)}))    # an older ledger: the path alone
    assert record_cli.main(["--no-notebooks"]) == 0
    assert s.calls == ["helpers.fake:b", "helpers.fake:c"]  # a was skipped
    book = json.loads(s.ledger.read_text())
    assert book["helpers.fake:b"]["path"].endswith("b.json") and book["helpers.fake:b"]["seconds"] == 60
    out = capsys.readouterr().out
    assert "skip     helpers.fake:a" in out and "done     helpers.fake:c in 10 s (~10 s estimated)" in out


def test_a_budget_starts_only_what_fits_and_a_second_call_resumes(fake_gpu_session, capsys):
    s = fake_gpu_session
    # 100 s: a (30 + 20 margin) starts with 100 left; b (60 + 20) with 70 left does not; c (10 + 20) does
    assert record_cli.main(["--no-notebooks", "--budget-s", "100"]) == 0
    assert s.calls == ["helpers.fake:a", "helpers.fake:c"]
    assert s.limits == [100, 70]                     # a running recording may not outlast the budget
    out = capsys.readouterr().out
    assert "left     helpers.fake:b: ~60 s estimated (+20 s margin), 70 s of the budget left" in out
    assert "left: 1 recording(s), ~60 s estimated; the same command again resumes here" in out
    assert "not measurements" in out                 # says the estimates are estimates
    assert set(json.loads(s.ledger.read_text())) == {"helpers.fake:a", "helpers.fake:c"}   # after each one
    # the second call (the ledger exists) runs only what is left
    assert record_cli.main(["--no-notebooks", "--budget-s", "100"]) == 0
    assert s.calls[2:] == ["helpers.fake:b"]
    assert set(json.loads(s.ledger.read_text())) == {"helpers.fake:a", "helpers.fake:b", "helpers.fake:c"}
    out = capsys.readouterr().out
    assert "skip     helpers.fake:a" in out and "skip     helpers.fake:c" in out and "left:" not in out


def test_a_recording_running_past_the_budget_is_stopped_and_left(fake_gpu_session, capsys):
    s = fake_gpu_session
    s.took["helpers.fake:a"] = 95                    # the estimate said 30: it overruns
    assert record_cli.main(["--no-notebooks", "--budget-s", "90", "--margin-s", "0"]) == 0
    assert s.calls == ["helpers.fake:a"] and s.limits == [90]
    out = capsys.readouterr().out
    assert "stopped  helpers.fake:a after 90 s: the budget ended" in out
    assert "left     helpers.fake:b" in out and "left     helpers.fake:c" in out
    assert not s.ledger.exists()                     # nothing recorded, nothing in the ledger


def test_a_recording_whose_model_cannot_be_had_is_left_with_one_line(fake_gpu_session, monkeypatch, capsys):
    s = fake_gpu_session
    order = (record.Planned("helpers.fake:a", 30, "test", ("embedded",)), *record.ORDER[1:])
    monkeypatch.setattr(record, "ORDER", order)
    monkeypatch.setattr(record, "_available", lambda need: (need != "embedded", False))
    assert record_cli.main(["--no-notebooks"]) == 0
    assert s.calls == ["helpers.fake:b", "helpers.fake:c"]
    assert "cannot   helpers.fake:a: needs the embedded model" in capsys.readouterr().out


def test_one_time_costs_are_charged_to_the_first_recording_that_needs_them(monkeypatch):
    order = (record.Planned("x:a", 30, "t", ("synthetic_14b",)), record.Planned("x:b", 60, "t", ("synthetic_14b",)))
    monkeypatch.setattr(record, "ORDER", order)
    monkeypatch.setattr(record, "_available", lambda need: (True, False))
    est = record.estimate_with_setup(["x:a", "x:b"])
    assert est == {"x:a": (30 + record.ONE_TIME_S["synthetic_14b"], ["synthetic_14b"]), "x:b": (60, [])}
    assert record.estimate_with_setup(["x:a", "x:b"], done={"x:a"})["x:b"][1] == ["synthetic_14b"]


def test_the_ledger_stores_paths_inside_the_checkout_relative_to_it():
    from helpers.core.paths import REPO_DIR

    assert record._portable(str(REPO_DIR / "results" / "speed" / "x.json")) == "results/speed/x.json"
    assert record._entry_path({"path": "results/speed/x.json"}) == REPO_DIR / "results" / "speed" / "x.json"
    assert record._portable("/elsewhere/x.json") == "/elsewhere/x.json"


def test_the_order_is_explicit_and_most_valuable_first():
    names = [p.target.split(":")[1] for p in record.ORDER]
    first = ["exl2-exllamav2-check", "capital-answer", "agreement"]
    assert names[:3] == first
    idx = {n: i for i, n in enumerate(names)}
    assert idx["agreement"] < idx["memory_predicted_vs_measured_14b"] < idx["decode_depth_fp16"] \
        < idx["decode_depth_q4"] < idx["speed_repeatability"] < idx["emulated_4k"]
    assert record.discover() == [p.target for p in record.ORDER]
    assert all(p.estimate_s > 0 and p.basis for p in record.ORDER)
    assert {n for p in record.ORDER for n in p.needs} <= set(record.ONE_TIME_S)


def test_a_recording_left_out_of_the_order_fails_loudly(monkeypatch):
    monkeypatch.setattr(record, "ORDER", record.ORDER[1:])
    monkeypatch.setattr(record, "MODULES", record.MODULES)
    with pytest.raises(CourseError, match="exl2-exllamav2-check is defined but not in ORDER"):
        record.discover()


def test_plan_needs_no_gpu_and_shows_order_estimates_and_the_ledger(monkeypatch, tmp_path, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(record, "RESULTS_DIR", tmp_path)
    first = record.ORDER[0]
    result = tmp_path / "exl2" / "check.json"
    result.parent.mkdir()
    result.write_text("{}")
    book = record._ledger_path("NVIDIA H200", tmp_path)
    book.parent.mkdir()
    book.write_text(json.dumps({first.target: {"path": str(result), "seconds": 41.0}}))
    assert record_cli.main(["--plan"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert first.target in lines[1] and f"~{first.estimate_s:.0f} s" in lines[1]
    assert "nvidia-h200" in lines[1] and "41 s" in lines[1]
    assert [ln.split()[1] for ln in lines[1:-1]] == [p.target for p in record.ORDER]
    assert "not yet" in lines[2] or "cannot run here" in lines[2]
    assert lines[-1].startswith("total ~") and "not measurements" in lines[-1]


def test_the_budget_must_be_positive():
    with pytest.raises(CourseError, match="--budget-s must be a positive"):
        record_cli.main(["--budget-s", "0"])


def test_a_child_past_its_limit_is_killed_with_its_own_children(tmp_path):
    """A recording starts fresh bench processes: stopping it at the budget must stop them too."""
    import os
    import sys
    import time

    pid_file = tmp_path / "grandchild.pid"
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    t0 = time.monotonic()
    rc, out = record._run_child([sys.executable, "-c", code], timeout=3)
    assert rc is None and time.monotonic() - t0 < 30
    pid = int(pid_file.read_text())
    for _ in range(50):
        try:
            state = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            break
        if "\nState:\tZ" in state:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail("the recording's own child outlived it")
    assert record._run_child([sys.executable, "-c", "print('x'); print('/r.json')"], timeout=30) == (0, "x\n/r.json\n")


def test_notebooks_are_re_executed_with_the_gpu_hidden(tmp_path, monkeypatch):
    """Stored outputs must be the CPU path's (CI checks them with nbval on a machine without a GPU)."""
    for name in ("01_b.ipynb", "00_a.ipynb", "scratch.ipynb"):
        (tmp_path / name).write_text("{}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    seen = []

    def fake_run(cmd, **kw):
        seen.append((cmd[-1], kw["cwd"], kw["env"]["CUDA_VISIBLE_DEVICES"]))
        return types.SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(record.subprocess, "run", fake_run)
    record.execute_notebooks(tmp_path)
    assert seen == [("00_a.ipynb", tmp_path, ""), ("01_b.ipynb", tmp_path, "")]

    def failing(cmd, **kw):
        return types.SimpleNamespace(returncode=1, stderr="Traceback...\nCellExecutionError: boom")

    monkeypatch.setattr(record.subprocess, "run", failing)
    with pytest.raises(CourseError, match="00_a.ipynb failed to execute: CellExecutionError: boom"):
        record.execute_notebooks(tmp_path)


def test_notebooks_only_re_executes_and_records_nothing(monkeypatch):
    seen = []
    monkeypatch.setattr(record, "execute_notebooks", lambda: seen.append("notebooks"))
    monkeypatch.setattr(record, "record_all", lambda *a, **k: pytest.fail("nothing is recorded"))
    assert record_cli.main(["--notebooks-only"]) == 0 and seen == ["notebooks"]


def test_the_gpu_session_script_packs_the_device_folder(tmp_path):
    """scripts/gpu_session.sh: its usage, and `pack` copying wheels and the extension into .gpu/ (in a copy)."""
    import shutil
    import subprocess

    from helpers.core.paths import REPO_DIR

    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(REPO_DIR / "scripts" / "gpu_session.sh", repo / "scripts")
    dev = tmp_path / "device"
    dev.mkdir()
    for name in ("exllamav2-0.3.2-py3-none-any.whl", "exllamav2_ext-0.3.2-torch2.11.0-cu130-sm90.so.gz", "README.md"):
        (dev / name).write_text("x")
    r = subprocess.run(["bash", "scripts/gpu_session.sh"], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 2 and "scripts/gpu_session.sh device [BUDGET_S" in r.stdout
    r = subprocess.run(["bash", "scripts/gpu_session.sh", "pack", str(dev)], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (repo / ".gpu").iterdir()) == ["exllamav2-0.3.2-py3-none-any.whl",
                                                                 "exllamav2_ext-0.3.2-torch2.11.0-cu130-sm90.so.gz"]
