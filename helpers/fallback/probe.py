"""Does this machine's NVIDIA driver spill into system RAM when VRAM is full (Windows "sysmem fallback")? The probe.

``run_probe`` reads the driver, the GPU and its dedicated VRAM, then (Windows only) allocates bounded chunks to a
little past the free VRAM, always freed, and times reads of those past it (each written first). One chunk made
WITHOUT writing it, with free VRAM read before, after making and after writing it, shows which
``fallback.placement`` reading the driver follows (``placement_observed``). On Linux an allocation past VRAM raises
CUDA out-of-memory. Readings come through ``Answers`` so the Windows branch is tested with faked CUDA/NVML answers
anywhere; ``SystemAnswers`` asks the real ones. ``helpers.cli.probe`` runs it (``python -m helpers probe --fallback``).
"""
from __future__ import annotations

import gc
import platform
import sys
from dataclasses import dataclass, field
from typing import Any, Protocol

from helpers.core import devices as gpu_mod
from helpers.core.errors import CourseError
from helpers.core.units import GIB, MIB
from helpers.fallback.placement import DEFAULT_PLACEMENT, PLACEMENTS, check_placement

# ------------------------------------------------------------------------------------------------- driver facts
#: the fallback to shared system memory exists since driver 536.40 (NVIDIA support answer 5490; docs/FACTS.md §4)
FALLBACK_DRIVER = (536, 40)
#: the per-application policy switch "CUDA - Sysmem Fallback Policy" (NVIDIA Control Panel) since 546.01
POLICY_DRIVER = (546, 1)
#: the one phrasing the course uses for both (docs/FACTS.md §4)
DRIVER_WORDING = ('the fallback exists since driver 536.40; the policy switch ("CUDA - Sysmem Fallback Policy") '
                  'since 546.01')


class Answers(Protocol):
    """What the probe asks CUDA and NVML. ``SystemAnswers`` asks the real ones; tests pass fakes.

    ``gpu()`` -> None without an NVIDIA GPU, else a dict: name, driver (e.g. '551.86'), driver_model ('WDDM', 'TCC'
    or None on Linux), dedicated_bytes, free_bytes. ``allocate(nbytes, touch=True)`` returns a handle or raises (an
    exception whose type name contains 'OutOfMemory', or MemoryError, means the allocation was refused); with
    ``touch=False`` nothing is written to it until ``touch(handle)``; ``free_vram_bytes()`` reads the free VRAM now;
    ``read_bandwidth`` times reads of one allocation (bytes/s); ``free`` and ``release`` give the memory back."""

    system: str
    release_name: str

    def gpu(self) -> dict | None: ...
    def ram_available_bytes(self) -> int: ...
    def allocate(self, nbytes: int, touch: bool = True) -> Any: ...
    def touch(self, handle: Any) -> None: ...
    def free_vram_bytes(self) -> int: ...
    def read_bandwidth(self, handle: Any) -> float: ...
    def free(self, handle: Any) -> None: ...
    def release(self) -> None: ...


def parse_driver_version(text: str | None) -> tuple[int, int] | None:
    """'551.86' -> (551, 86); '580.159.03' -> (580, 159); None or garbage -> None."""
    if not text:
        return None
    parts = str(text).strip().split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return None


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "OutOfMemory" in type(exc).__name__ or "out of memory" in str(exc)


@dataclass
class ProbeReport:
    """What ``run_probe`` found. ``verdict`` is one of: 'no-gpu', 'not-windows', 'tcc', 'fallback-active',
    'fallback-off', 'inconclusive'."""

    system: str
    verdict: str
    gpu: dict | None = None
    driver_has_fallback: bool | None = None
    driver_has_policy_switch: bool | None = None
    chunk_bytes: int = 0
    allocated_bytes: int = 0           # the most held at once
    past_free_bytes: int = 0           # of which beyond the free VRAM reading
    refused_at_bytes: int | None = None
    vram_read_gbs: float | None = None
    past_read_gbs: float | None = None
    freed: bool = True
    placement_assumed: str = DEFAULT_PLACEMENT
    placement_observed: str | None = None      # 'first_come', 'first_touch', or None (not tried / inconclusive)
    lines: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(self.lines)


POLICY_STEPS = [
    "To make an overflow fail loudly instead of crawling (" + DRIVER_WORDING + "):",
    "  1. Right-click the desktop > NVIDIA Control Panel > 3D Settings > Manage 3D settings.",
    "  2. Tab 'Program Settings' > 'Add' > Browse... and pick the python.exe that runs your model:",
    "       {python}",
    "  3. Set 'CUDA - Sysmem Fallback Policy' to 'Prefer No Sysmem Fallback' and press Apply.",
    "  4. Restart Python (and Jupyter). An overflow now raises CUDA out-of-memory, and exllamav2's",
    "     load_autosplit stops with 'Insufficient VRAM' instead of loading into system RAM.",
    "  (To cover every program: tab 'Global Settings' instead. WSL2 reportedly ignores the policy.)",
]

LINUX_LINES = [
    "The sysmem fallback exists only in NVIDIA's Windows (WDDM) driver: " + DRIVER_WORDING + ".",
    "On Linux there is no such fallback: an allocation past the GPU's VRAM raises CUDA out-of-memory",
    "(torch.cuda.OutOfMemoryError; exllamav2's load_autosplit then stops with 'Insufficient VRAM for model and",
    "cache'), so a configuration that does not fit fails at load time instead of silently slowing down.",
    "To see the Windows behaviour here, `python -m helpers emulate` (Linux + CUDA) places what overflows an",
    "emulated VRAM budget in mapped system RAM that the GPU reads over PCIe.",
]


def run_probe(answers: Answers, *, past_bytes: int = GIB, chunk_bytes: int = 256 * MIB,
              ram_fraction: float = 0.25, slow_ratio: float = 0.5, python: str | None = None,
              placement: str = DEFAULT_PLACEMENT) -> ProbeReport:
    """Decide whether this machine's driver spills into system RAM, with bounded allocations that are always freed.

    Windows + WDDM: allocate ``chunk_bytes`` chunks (each written once) until ``past_bytes`` beyond the free VRAM
    reading are held, or an allocation is refused; never more than ``ram_fraction`` of the available system RAM beyond
    the free VRAM. Time reads of the first chunk (VRAM) and of the last one (past the free VRAM): past chunks read at
    less than ``slow_ratio`` of VRAM speed mean the fallback is active. Everything is freed in a ``finally`` (also on
    Ctrl-C, which Python raises as KeyboardInterrupt between calls). Elsewhere nothing is allocated. Before that, one
    chunk made without writing it tells which ``placement`` reading this driver follows (``_placement_check``);
    ``placement`` is the one the spill model assumes, reported beside it.
    """
    if chunk_bytes <= 0 or past_bytes < 0:
        raise CourseError("the probe's chunk must be positive and the bytes past VRAM not negative")
    system = answers.system
    g = answers.gpu()
    rep = ProbeReport(system=system, verdict="no-gpu", gpu=g, chunk_bytes=int(chunk_bytes),
                      placement_assumed=check_placement(placement))
    L = rep.lines
    wsl = system == "Linux" and "microsoft" in (answers.release_name or "").lower()
    if g is None:
        L.append(f"{system}: no NVIDIA GPU is visible here (no CUDA device, no NVML): nothing to probe.")
    else:
        L.append(f"GPU             {g.get('name')}")
        L.append(f"driver          {g.get('driver') or 'unknown'}"
                 + (f" ({g['driver_model']} driver model)" if g.get("driver_model") else ""))
        L.append(f"dedicated VRAM  {g['dedicated_bytes'] / GIB:.2f} GiB, {g['free_bytes'] / GIB:.2f} GiB free")
        ver = parse_driver_version(g.get("driver"))
        if ver is not None and system == "Windows":
            rep.driver_has_fallback = ver >= FALLBACK_DRIVER
            rep.driver_has_policy_switch = ver >= POLICY_DRIVER
    if system != "Windows":
        if g is not None:
            rep.verdict = "not-windows"
        if wsl:
            L.append("WSL2: the GPU is driven by the Windows host's driver; the sysmem fallback policy is reported to "
                     "be ignored under WSL2 (set it on the Windows side and test an overflow yourself).")
        L += LINUX_LINES if system == "Linux" else [
            f"{system}: the sysmem fallback is a feature of NVIDIA's Windows driver only; nothing to probe here."]
        return rep
    if g is None:
        return rep
    if str(g.get("driver_model") or "").upper() == "TCC":
        rep.verdict = "tcc"
        L.append("TCC driver model: the sysmem fallback is a WDDM feature, so an overflow raises out-of-memory here.")
        return rep
    if rep.driver_has_fallback is False:
        L.append(f"driver {g.get('driver')} predates 536.40 ({DRIVER_WORDING}): expect out-of-memory.")
    elif rep.driver_has_fallback:
        L.append("driver 536.40 or later: the fallback exists"
                 + ("; 546.01 or later: the policy switch exists" if rep.driver_has_policy_switch else
                    "; the policy switch needs 546.01 or later (update the driver to turn it off)"))
    _placement_check(answers, rep, chunk_bytes)
    _allocate_and_time(answers, rep, past_bytes=past_bytes, chunk_bytes=chunk_bytes, ram_fraction=ram_fraction,
                       slow_ratio=slow_ratio)
    L.append("")
    L += [s.format(python=python or sys.executable) for s in POLICY_STEPS]
    return rep


def _placement_check(answers: Answers, rep: ProbeReport, chunk_bytes: int) -> None:
    """Make one chunk without writing it, then write it, reading the free VRAM before and after each: a drop when
    it is made means "first_come", a drop only when it is written means "first_touch" (``fallback.placement``)."""
    L = rep.lines
    h = None
    try:
        f0 = answers.free_vram_bytes()
        h = answers.allocate(chunk_bytes, touch=False)
        f1 = answers.free_vram_bytes()
        answers.touch(h)
        f2 = answers.free_vram_bytes()
    except Exception as exc:
        if not _is_oom(exc):
            raise
        L.append("placement: not tried (the first chunk was refused)")
        return
    finally:
        if h is not None:
            answers.free(h)
    made, written = f0 - f1, f1 - f2
    if made >= chunk_bytes // 2:
        rep.placement_observed = "first_come"
    elif written >= chunk_bytes // 2:
        rep.placement_observed = "first_touch"
    seen = rep.placement_observed or "inconclusive (other programs changed the free VRAM meanwhile?)"
    L.append(f"placement: an unwritten {chunk_bytes / MIB:.0f} MiB chunk lowered the free VRAM by {made / MIB:.0f} "
             f"MiB when made, {written / MIB:.0f} MiB more when written -> {seen}")
    L.append(f"           the spill model assumes {rep.placement_assumed}: {PLACEMENTS[rep.placement_assumed]}"
             + ("" if rep.placement_observed in (None, rep.placement_assumed) else
                f"; this driver looks like {rep.placement_observed}: use placement='{rep.placement_observed}'"))


def _allocate_and_time(answers: Answers, rep: ProbeReport, *, past_bytes: int, chunk_bytes: int,
                       ram_fraction: float, slow_ratio: float) -> None:
    g, L = rep.gpu, rep.lines
    free = int(g["free_bytes"])
    past = min(int(past_bytes), int(max(0, answers.ram_available_bytes()) * ram_fraction))
    limit = free + past
    L.append(f"allocating {chunk_bytes / MIB:.0f} MiB chunks up to {limit / GIB:.2f} GiB "
             f"({past / GIB:.2f} GiB past the free VRAM), each freed again afterwards")
    held: list[Any] = []
    total = 0
    try:
        while total + chunk_bytes <= limit:
            try:
                held.append(answers.allocate(chunk_bytes))
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                rep.refused_at_bytes = total
                break
            total += chunk_bytes
            if len(held) == 1:
                rep.vram_read_gbs = answers.read_bandwidth(held[0]) / 1e9
        rep.allocated_bytes = total
        rep.past_free_bytes = max(0, total - free)
        if rep.past_free_bytes:
            rep.past_read_gbs = answers.read_bandwidth(held[-1]) / 1e9
    finally:
        rep.freed = False
        while held:
            answers.free(held.pop())
        answers.release()
        rep.freed = True
    vr, pr = rep.vram_read_gbs, rep.past_read_gbs
    if vr is not None:
        L.append(f"read speed in VRAM             {vr:.1f} GB/s")
    if rep.past_free_bytes:
        L.append(f"allocated past the free VRAM   {rep.past_free_bytes / GIB:.2f} GiB: it succeeded")
        L.append(f"read speed past that point     {pr:.1f} GB/s")
        if vr and pr < slow_ratio * vr:
            rep.verdict = "fallback-active"
            L.append(f"verdict: SYSMEM FALLBACK ACTIVE. Memory past the dedicated VRAM is system RAM read over PCIe, "
                     f"{vr / pr:.0f}x slower: a model or cache that overflows will slow down instead of failing.")
        else:
            rep.verdict = "inconclusive"
            L.append("verdict: INCONCLUSIVE. Allocations past the free-VRAM reading succeeded at VRAM speed "
                     "(memory was "
                     "freed meanwhile, or the reading was low); close other GPU programs or raise --max-gib.")
    elif rep.refused_at_bytes is not None:
        if rep.refused_at_bytes >= free - chunk_bytes:
            rep.verdict = "fallback-off"
            L.append(f"verdict: NO FALLBACK. The allocation past {rep.refused_at_bytes / GIB:.2f} GiB raised "
                     "out-of-memory: this process gets an error, not a slowdown, when VRAM is full ('Prefer No Sysmem "
                     "Fallback' is set, or the driver has no fallback).")
        else:
            rep.verdict = "inconclusive"
            L.append(f"verdict: INCONCLUSIVE. Out-of-memory already at {rep.refused_at_bytes / GIB:.2f} GiB, below the "
                     f"free {free / GIB:.2f} GiB (fragmentation or another program): close other GPU programs "
                     "and rerun.")
    else:
        rep.verdict = "inconclusive"
        L.append("verdict: INCONCLUSIVE. Nothing past the free VRAM was tried (no system RAM to spare, or "
                 "--max-gib 0).")
    L.append(f"freed everything: {rep.allocated_bytes / GIB:.2f} GiB given back")


class SystemAnswers:
    """The real answers: torch.cuda for allocations and timings, NVML (helpers.core.devices) for the driver."""

    def __init__(self):
        self.system = platform.system()
        self.release_name = platform.release()

    def gpu(self) -> dict | None:
        cu, nv = gpu_mod.cuda_status(), gpu_mod.nvml_reading()
        nv_gpu = nv.gpus[0] if nv.available and nv.gpus else None
        if not cu["available"] and nv_gpu is None:
            return None
        out = {"name": None, "driver": nv.driver if nv.available else None,
               "driver_model": nv_gpu.get("driver_model") if nv_gpu else None, "cuda": cu["available"]}
        if cu["available"]:
            import torch

            free, total = torch.cuda.mem_get_info(0)
            out.update(name=cu["devices"][0]["name"], dedicated_bytes=int(total), free_bytes=int(free))
        else:
            out.update(name=nv_gpu["name"], dedicated_bytes=int(nv_gpu["total_gib"] * GIB),
                       free_bytes=int(nv_gpu["free_gib"] * GIB))
        return out

    def ram_available_bytes(self) -> int:
        import psutil

        return int(psutil.virtual_memory().available)

    def allocate(self, nbytes: int, touch: bool = True):
        import torch

        t = torch.empty(int(nbytes), dtype=torch.uint8, device="cuda")
        if touch:          # written once: placed under either reading of fallback.placement
            self.touch(t)
        return t

    def touch(self, handle) -> None:
        import torch

        handle.fill_(1)
        torch.cuda.synchronize()

    def free_vram_bytes(self) -> int:
        import torch

        return int(torch.cuda.mem_get_info(0)[0])

    def read_bandwidth(self, handle) -> float:
        import torch

        x = handle.view(torch.float16) if handle.numel() % 2 == 0 else handle
        return handle.numel() / min(gpu_mod.timed_reads(x, 3))

    def free(self, handle) -> None:
        del handle

    def release(self) -> None:
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        except Exception:
            pass
