"""Device readings degrade to 'not available' instead of crashing, and say why."""
import sys
import types

import pytest

from helpers.core import devices as gpu
from helpers.core.errors import CourseError


def test_cuda_status_reports_a_reason_without_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    st = gpu.cuda_status()
    assert st["available"] is False and st["reason"]


def test_require_cuda_is_one_clear_line(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(CourseError) as exc:
        gpu.require_cuda("the bench")
    msg = str(exc.value)
    assert "\n" not in msg and "the bench needs a CUDA GPU" in msg and "CPU path" in msg


def test_nvml_missing_module_is_not_available(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    r = gpu.nvml_reading()
    assert r.available is False and "nvidia-ml-py" in r.reason


def _fake_pynvml(fail_init=False):
    m = types.ModuleType("pynvml")

    class Mem:
        total, used, free = 16 * 2**30, 2 * 2**30, 14 * 2**30

    def init():
        if fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    m.nvmlInit = init
    m.nvmlShutdown = lambda: None
    m.nvmlSystemGetDriverVersion = lambda: "566.36"
    m.nvmlSystemGetNVMLVersion = lambda: "12.566.36"
    m.nvmlDeviceGetCount = lambda: 1
    m.nvmlDeviceGetHandleByIndex = lambda i: object()
    m.nvmlDeviceGetName = lambda h: b"NVIDIA GeForce RTX 4080 SUPER"
    m.nvmlDeviceGetMemoryInfo = lambda h: Mem()
    m.nvmlDeviceGetCurrPcieLinkGeneration = lambda h: 4
    m.nvmlDeviceGetMaxPcieLinkGeneration = lambda h: 4
    m.nvmlDeviceGetCurrPcieLinkWidth = lambda h: 16
    m.nvmlDeviceGetMaxPcieLinkWidth = lambda h: 16
    m.nvmlDeviceGetDriverModel = lambda h: (0, 0)
    return m


def test_nvml_reading_with_a_driver(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    r = gpu.nvml_reading()
    assert r.available and r.driver == "566.36"
    g = r.gpus[0]
    assert g["name"] == "NVIDIA GeForce RTX 4080 SUPER"
    assert g["total_gib"] == 16.0 and g["used_gib"] == 2.0
    assert (g["pcie_gen"], g["pcie_width"], g["driver_model"]) == (4, 16, "WDDM")
    assert "PCIe gen 4 x16" in gpu.report()


def test_nvml_without_driver(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(fail_init=True))
    r = gpu.nvml_reading()
    assert not r.available and "no NVIDIA driver" in r.reason
    assert gpu.nvml_used_bytes() is None


def test_device_summary_and_course_path_on_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    s = gpu.device_summary()
    assert s["device"] == "cpu" and s["cores"] >= 1 and s["ram_total_gib"] > 0
    path, why = gpu.course_path()
    assert path == "cpu" and "reference" in why


def test_devices_cli_prints_the_path(capsys):
    from helpers.__main__ import main

    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "course path" in out and "RAM" in out
