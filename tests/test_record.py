"""The recording command: discovery works without a GPU, refuses to record without one, resumes with its ledger."""
import json
import types

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


def test_skips_what_the_ledger_holds_and_resumes(monkeypatch, tmp_path, capsys):
    from helpers.core import devices as gpu

    monkeypatch.setenv("EXL2_COURSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(record, "discover", lambda: ["helpers.fake:a", "helpers.fake:b"])
    monkeypatch.setattr(gpu, "require_cuda", lambda what="": None)
    monkeypatch.setattr(gpu, "device_summary", lambda: {"gpu_name": "NVIDIA H100 80GB HBM3"})
    done_file = tmp_path / "a.json"
    done_file.write_text("{}")
    ledger = record._ledger_path("NVIDIA H100 80GB HBM3")
    ledger.parent.mkdir(parents=True)
    ledger.write_text(json.dumps({"helpers.fake:a": str(done_file)}))
    calls = []

    def fake_run(cmd, **kw):
        calls.append(cmd[-1])
        return types.SimpleNamespace(returncode=0, stdout=str(tmp_path / "b.json") + "\n")

    monkeypatch.setattr(record.subprocess, "run", fake_run)
    assert record_cli.main(["--no-notebooks"]) == 0
    assert calls == ["helpers.fake:b"]  # a was skipped
    assert json.loads(ledger.read_text())["helpers.fake:b"].endswith("b.json")
    assert "skip     helpers.fake:a" in capsys.readouterr().out


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
