"""Device readings: torch/CUDA, NVML, CPU and RAM. Every reading degrades to "not available" with a reason.

Nothing here raises because a GPU, a driver or NVML is missing: the course runs on laptops without NVIDIA GPUs.
Functions that *need* a GPU call ``require_cuda()``, which raises a one-line ``CourseError`` saying what to do.
"""
from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from helpers.core.errors import CourseError
from helpers.core.units import GIB

NOT_AVAILABLE = "not available"


@dataclass
class NvmlReading:
    available: bool
    reason: str = ""
    driver: str | None = None
    nvml_version: str | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)


def _torch():
    try:
        import torch  # noqa: WPS433
    except ImportError:
        return None
    return torch


def cuda_status() -> dict[str, Any]:
    """Whether torch sees a CUDA device, and if not, why."""
    torch = _torch()
    if torch is None:
        return {"available": False, "reason": "torch is not installed", "torch": None}
    out: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if torch.version.cuda is None:
        out.update(available=False, reason="this torch is a CPU-only build")
        return out
    try:
        ok = torch.cuda.is_available()
    except Exception as exc:  # a broken driver install can raise here
        ok, out["reason"] = False, f"CUDA init failed: {exc}"
    out["available"] = bool(ok)
    if not ok:
        out.setdefault("reason", "torch has CUDA but finds no GPU (no driver, or CUDA_VISIBLE_DEVICES hides it)")
        return out
    out["devices"] = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out["devices"].append({"index": i, "name": p.name, "total_gib": p.total_memory / GIB,
                               "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count})
    return out


def require_cuda(what: str = "this step") -> None:
    """Raise a clear error when there is no usable CUDA GPU."""
    st = cuda_status()
    if not st["available"]:
        raise CourseError(f"{what} needs a CUDA GPU, but {st['reason']}. Run it on a machine with an NVIDIA GPU "
                          "and a CUDA build of torch (README: 'GPU set-up'), or use the CPU path.")


def _s(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def nvml_reading() -> NvmlReading:
    """Name, driver, memory and PCIe link of every GPU through NVML (package nvidia-ml-py, module pynvml)."""
    try:
        import pynvml  # noqa: WPS433
    except ImportError:
        return NvmlReading(False, "pynvml is missing: pip install nvidia-ml-py")
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return NvmlReading(False, f"NVML could not start ({_s(exc) or type(exc).__name__}): no NVIDIA driver here")
    try:
        reading = NvmlReading(True, driver=_s(pynvml.nvmlSystemGetDriverVersion()),
                              nvml_version=_s(pynvml.nvmlSystemGetNVMLVersion()))
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            g: dict[str, Any] = {"index": i, "name": _s(pynvml.nvmlDeviceGetName(h)),
                                 "total_gib": mem.total / GIB, "used_gib": mem.used / GIB, "free_gib": mem.free / GIB}
            for key, fn in (("pcie_gen", "nvmlDeviceGetCurrPcieLinkGeneration"),
                            ("pcie_gen_max", "nvmlDeviceGetMaxPcieLinkGeneration"),
                            ("pcie_width", "nvmlDeviceGetCurrPcieLinkWidth"),
                            ("pcie_width_max", "nvmlDeviceGetMaxPcieLinkWidth")):
                try:
                    g[key] = int(getattr(pynvml, fn)(h))
                except Exception:
                    g[key] = None
            try:
                g["driver_model"] = "WDDM" if pynvml.nvmlDeviceGetDriverModel(h)[0] == 0 else "TCC"
            except Exception:
                g["driver_model"] = None  # only Windows has driver models
            reading.gpus.append(g)
        return reading
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def nvml_used_bytes(index: int = 0) -> int | None:
    """NVML's used-memory counter for one GPU in bytes, or None without NVML."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
    finally:
        pynvml.nvmlShutdown()


def timed_reads(buf, repeats: int) -> list[float]:
    """Seconds for each of ``repeats`` full reads of a CUDA tensor (a float32-accumulated sum), timed with CUDA events
    after one untimed warm-up read. Bandwidth = bytes read / a statistic of these times."""
    import torch

    times = []
    for i in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        buf.sum(dtype=torch.float32)
        end.record()
        end.synchronize()
        if i:
            times.append(start.elapsed_time(end) / 1e3)
    return times


def cpu_reading() -> dict[str, Any]:
    """CPU model, cores, RAM and this process's resident memory."""
    import psutil

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    vm = psutil.virtual_memory()
    return {"cpu": name, "cores": os.cpu_count(), "ram_total_gib": vm.total / GIB,
            "ram_available_gib": vm.available / GIB, "process_rss_gib": psutil.Process().memory_info().rss / GIB}


def process_rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def device_summary() -> dict[str, Any]:
    """One flat dict for provenance and the setup notebook: which device the course will use and its facts."""
    cu, nv, cpu = cuda_status(), nvml_reading(), cpu_reading()
    out: dict[str, Any] = {"cpu": cpu["cpu"], "cores": cpu["cores"], "ram_total_gib": round(cpu["ram_total_gib"], 1)}
    if cu["available"]:
        d = cu["devices"][0]
        out.update(device="cuda", gpu_name=d["name"], gpu_total_gib=round(d["total_gib"], 2), cuda=cu["torch_cuda"])
    else:
        out.update(device="cpu", gpu_name=None, cuda=None, cuda_reason=cu.get("reason"))
    out["driver"] = nv.driver if nv.available else None
    if nv.available and nv.gpus:
        g = nv.gpus[0]
        out.update(pcie_gen=g.get("pcie_gen"), pcie_width=g.get("pcie_width"), driver_model=g.get("driver_model"))
        if out["gpu_name"] is None:
            out["gpu_name"] = g["name"]
    else:
        out["nvml_reason"] = nv.reason
    att = attention_path()
    out.update(flash_attn=att["flash_attn"], attention_path=att["path"])
    return out


def report() -> str:
    """A human-readable multi-line report (notebook 00 and `python -m helpers devices`)."""
    cu, nv, cpu = cuda_status(), nvml_reading(), cpu_reading()
    lines = [f"torch        {cu.get('torch') or NOT_AVAILABLE} (CUDA build: {cu.get('torch_cuda') or 'no'})"]
    if cu["available"]:
        for d in cu["devices"]:
            lines.append(f"CUDA GPU {d['index']}   {d['name']}, {d['total_gib']:.2f} GiB, compute {d['capability']}")
    else:
        lines.append(f"CUDA         {NOT_AVAILABLE}: {cu['reason']}")
    if nv.available:
        lines.append(f"NVML         driver {nv.driver}")
        for g in nv.gpus:
            link = (f"PCIe gen {g['pcie_gen']} x{g['pcie_width']} (max gen {g['pcie_gen_max']} x{g['pcie_width_max']})"
                    if g.get("pcie_gen") else "PCIe link not reported")
            lines.append(f"NVML GPU {g['index']}   {g['name']}: "
                         f"{g['used_gib']:.2f} of {g['total_gib']:.2f} GiB used, {link}")
    else:
        lines.append(f"NVML         {NOT_AVAILABLE}: {nv.reason}")
    att = attention_path()
    lines.append(f"flash-attn   {att['flash_attn_note']}")
    lines.append(f"attention    exllamav2 0.3.2 takes {att['path']}: {att['why']}")
    lines.append(f"             {att['applies']}")
    lines.append(f"CPU          {cpu['cpu']}, {cpu['cores']} logical cores")
    lines.append(f"RAM          {cpu['ram_total_gib']:.1f} GiB total, {cpu['ram_available_gib']:.1f} GiB available")
    return "\n".join(lines)


def _installed(module: str, dist: str) -> str | None:
    """The installed version of ``dist`` when its module ``module`` can be found (importlib.util.find_spec: nothing
    is imported), else None."""
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown version"


def _version_tuple(version: str) -> list[int]:
    return [int(t) for t in version.split("+")[0].split(".") if t.isdigit()]


def attention_path() -> dict[str, Any]:
    """Whether flash-attn (and xformers) are installed, and which attention exllamav2 0.3.2 takes here, worked out
    without importing exllamav2, flash-attn or xformers.

    The logic is exllamav2 0.3.2's own. ``exllamav2/attn.py``, at import: ``has_flash_attn`` when ``import flash_attn``
    works and its version is 2.2.1 or newer (2.5.7 or newer also gives ``has_flash_attn_with_paged``:
    ``flash_attn_with_kvcache``, which the dynamic generator's paged cache needs), unless ``EXLLAMA_NO_FLASH_ATTN`` is
    set; ``has_xformers`` when ``xformers.ops`` imports, unless ``EXLLAMA_NO_XFORMERS``; ``has_lower_right_sdpa`` when
    torch has ``torch.nn.attention.bias.causal_lower_right``. ``ExLlamaV2Attention.forward`` then picks
    ``_attn_flash`` if has_flash_attn and not ``config.no_flash_attn``, else ``_attn_xformers`` if has_xformers and not
    ``config.no_xformers``, else ``_attn_torch``: SDPA if has_lower_right_sdpa and not ``config.no_sdpa``, else plain
    matmul + softmax (``repeat_kv`` first). The course sets ``no_sdpa = True`` (``engines/exllama.make_config``,
    docs/FACTS.md §3), so without flash-attn or xformers its exllamav2 runs take the matmul path. flash-attn on a GPU
    older than compute capability 8.0 is still picked (0.3.2 only prints a warning) and fails when it runs.
    """
    fa = _installed("flash_attn", "flash-attn")
    xf = _installed("xformers", "xformers")
    out: dict[str, Any] = {"flash_attn": fa, "xformers": xf}
    if fa is None:
        out["flash_attn_note"] = "not installed"
    elif "EXLLAMA_NO_FLASH_ATTN" in os.environ:
        out["flash_attn_note"] = f"{fa}, switched off by EXLLAMA_NO_FLASH_ATTN"
        fa = None
    elif fa != "unknown version" and _version_tuple(fa) < [2, 2, 1]:
        out["flash_attn_note"] = f"{fa}, older than 2.2.1: exllamav2 0.3.2 ignores it"
        fa = None
    elif fa != "unknown version" and _version_tuple(fa) < [2, 5, 7]:
        out["flash_attn_note"] = f"{fa}: used, but no paged attention (2.5.7 or newer has flash_attn_with_kvcache)"
    else:
        out["flash_attn_note"] = f"{fa}: used, with paged attention (flash_attn_with_kvcache)"
    if xf is not None and "EXLLAMA_NO_XFORMERS" in os.environ:
        xf = None
    if fa is not None:
        out["path"], out["why"] = "flash-attn", "flash_attn_func / flash_attn_with_kvcache (_attn_flash)"
    elif xf is not None:
        out["path"], out["why"] = "xformers", "xformers memory_efficient_attention (_attn_xformers)"
    else:
        out["path"], out["why"] = "matmul", ("torch.matmul + softmax in _attn_torch (no flash-attn or xformers, "
                                             "and the course switches SDPA off)")
    cu = cuda_status()
    if not cu["available"]:
        out["applies"] = "not used here: no CUDA GPU, the reference decoder runs instead"
    else:
        caps = [float(d["capability"]) for d in cu.get("devices", [])]
        old = fa is not None and caps and min(caps) < 8.0
        out["applies"] = ("flash-attn needs compute capability 8.0 or newer: exllamav2 still picks it here and it "
                          "fails; uninstall flash-attn or set EXLLAMA_NO_FLASH_ATTN=1" if old
                          else "used by the course's exllamav2 runs on this machine")
    return out


def course_path() -> tuple[str, str]:
    """('gpu' or 'cpu', why): which path the course takes on this machine. exllamav2 is not imported here."""
    cu = cuda_status()
    if not cu["available"]:
        return "cpu", f"no CUDA GPU ({cu['reason']}): the pure-PyTorch reference runs the EXL2 files on the CPU"
    try:
        metadata.version("exllamav2")
    except Exception:
        return "cpu", "a CUDA GPU is here but exllamav2 is not installed: the reference runs on the GPU instead"
    return "gpu", f"CUDA GPU {cu['devices'][0]['name']} and exllamav2 installed: exllamav2 runs the model"


def as_dict(reading: NvmlReading) -> dict[str, Any]:
    return asdict(reading)
