"""NVIDIA's Windows "sysmem fallback": a model of its speed, and a probe that says whether a machine has it.

**The spill model** (``predict``). A decoded token reads every GPU-resident weight once and the K/V cache of every
layer up to the current depth. On Windows (driver 536.40 and later) an allocation that does not fit in the card's
dedicated VRAM does not fail: the driver places it in system RAM, and the GPU then reads it over PCIe, at a few
percent of VRAM speed. The model

1. walks exllamav2's load order (``memory.load_order``: module by module, each attention module with its cache
   layers, as ``load_autosplit`` allocates them) against the VRAM left after the OS reserve and the allocations
   made before the first module (``fixed``: CUDA context, scratch, RoPE tables, the load-time reserve);
   a module goes to VRAM if it fits in what is left, else to system RAM ("spills"): ``place``;
2. counts the bytes each decoded token reads from each side at a depth: ``read_bytes``;
3. predicts seconds per token = overhead + VRAM bytes / VRAM bandwidth + system-RAM bytes / PCIe bandwidth.

Its parameters come from datasheets or measurements, never from the speed it is meant to predict: bandwidths from
``memory.GPUS`` (datasheet) or measured on the device; the per-token overhead (host work, kernel launches) from a run
that spills nothing: its measured seconds per token minus its bandwidth time (``overhead_from_run``). When a
measured speed is at or above the bandwidth roofline, that difference is negative: the overhead is taken as 0 and
the prediction says so (the seed case: 80 tok/s reported where 736 GB/s allows ~76).

**The probe** (``python -m helpers probe --fallback``, ``run_probe``) reads the driver version and model, the dedicated
VRAM, then (Windows only) allocates bounded chunks up to a little past the free VRAM, always freed again, and
measures how fast the chunks past that point are read. On Linux there is no such policy: an allocation past VRAM
raises CUDA out-of-memory. The decision logic takes its readings through ``Answers`` so that the Windows branch is
tested with faked CUDA/NVML answers on any machine.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Protocol, Sequence

from helpers.memory import accounting as memory
from helpers.core.errors import CourseError

GIB = 2**30
MIB = 2**20

# ------------------------------------------------------------------------------------------------- driver facts
#: NVIDIA driver 536.40 introduced the fallback to shared system memory (NVIDIA support answer 5490, DOMAIN.md s.4)
FALLBACK_DRIVER = (536, 40)
#: 546.01 added the per-application switch "CUDA - Sysmem Fallback Policy" in the NVIDIA Control Panel (DOMAIN.md s.4)
POLICY_DRIVER = (546, 1)

#: PCIe transfer rate per lane in GT/s and its line encoding, by generation (PCI-SIG base specifications)
PCIE_GT_S = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}
PCIE_ENCODING = {1: 8 / 10, 2: 8 / 10, 3: 128 / 130, 4: 128 / 130, 5: 128 / 130, 6: 242 / 256}
#: what a GPU reads over PCIe 4.0 x16 in practice, "~25 GB/s" (DOMAIN.md s.1) of 31.5 GB/s raw. The H100 run in
#: DOMAIN.md s.5 agrees: a kernel reading mapped host memory got 47.7 GB/s of PCIe 5.0 x16's 63.0 (0.76).
PRACTICAL_PCIE_GBS_GEN4_X16 = 25.0


def pcie_raw_bandwidth(gen: int, lanes: int = 16) -> float:
    """One direction's raw PCIe bandwidth in bytes/s: lanes x GT/s x encoding / 8 (gen 4 x16: 31.5 GB/s)."""
    if gen not in PCIE_GT_S:
        raise CourseError(f"PCIe generation {gen} is unknown; use one of {sorted(PCIE_GT_S)}")
    if lanes not in (1, 2, 4, 8, 16):
        raise CourseError(f"a PCIe link has 1, 2, 4, 8 or 16 lanes, not {lanes}")
    return PCIE_GT_S[gen] * 1e9 * PCIE_ENCODING[gen] * lanes / 8


def pcie_practical_bandwidth(gen: int, lanes: int = 16) -> float:
    """What a GPU reads over the link in practice (bytes/s): the raw rate times 25/31.5, the efficiency of the
    PCIe 4.0 x16 figure in DOMAIN.md s.1."""
    return pcie_raw_bandwidth(gen, lanes) * PRACTICAL_PCIE_GBS_GEN4_X16 * 1e9 / pcie_raw_bandwidth(4, 16)


# -------------------------------------------------------------------------------------------- the spill model
@dataclass
class Prediction:
    """What the spill model says about one configuration. Bytes, seconds, tokens/s; ``placement`` per module."""

    spilled_bytes: int            # module bytes (weights + cache layers + scratch) placed in system RAM
    spilled_weight_bytes: int
    spilled_cache_bytes: int
    vram_read_bytes: int          # read from VRAM per decoded token at ``depth``
    sysmem_read_bytes: int        # read from system RAM over PCIe per decoded token at ``depth``
    tok_s: float
    seconds_per_token: float
    overhead_s_per_token: float
    vram_bandwidth: float         # bytes/s
    pcie_bandwidth: float         # bytes/s
    budget_bytes: int             # VRAM the process may use (card less the OS reserve)
    fixed_bytes: int              # VRAM taken before the first module loads
    depth: int
    max_seq_len: int
    cache_mode: str
    placement: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def spilled_gib(self) -> float:
        return self.spilled_bytes / GIB

    @property
    def roofline_tok_s(self) -> float:
        """The same reads with nothing spilled and no overhead: VRAM bandwidth / bytes per token."""
        total = self.vram_read_bytes + self.sysmem_read_bytes
        return self.vram_bandwidth / total if total else math.inf

    def time_split_ms(self) -> dict[str, float]:
        """Where a token's time goes (ms): overhead, VRAM reads, PCIe reads."""
        return {"overhead_ms": 1e3 * self.overhead_s_per_token,
                "vram_ms": 1e3 * self.vram_read_bytes / self.vram_bandwidth,
                "pcie_ms": 1e3 * self.sysmem_read_bytes / self.pcie_bandwidth}

    def at_depth(self, depth: int) -> "Prediction":
        """The same placement and parameters, evaluated at another cache depth."""
        return evaluate(self.placement, depth=depth, max_seq_len=self.max_seq_len, cache_mode=self.cache_mode,
                        overhead_s_per_token=self.overhead_s_per_token, vram_bandwidth=self.vram_bandwidth,
                        pcie_bandwidth=self.pcie_bandwidth, budget_bytes=self.budget_bytes,
                        fixed_bytes=self.fixed_bytes, notes=self.notes)

    def spilled_modules(self) -> list[str]:
        return [p["module"] for p in self.placement if p["where"] == "sysmem"]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(spilled_gib=self.spilled_gib, roofline_tok_s=self.roofline_tok_s, **self.time_split_ms())
        return d

    def summary(self) -> str:
        t = self.time_split_ms()
        spilled = self.spilled_modules()
        where = (f"{len(spilled)} modules in system RAM ({_span(spilled)})" if spilled else "nothing spilled")
        return (f"cache {self.max_seq_len} ({self.cache_mode}), depth {self.depth}: {where}; "
                f"spilled {self.spilled_bytes / GIB:.2f} GiB ({self.spilled_weight_bytes / GIB:.2f} GiB weights, "
                f"{self.spilled_cache_bytes / GIB:.2f} GiB cache); per token {self.vram_read_bytes / 1e9:.2f} GB from "
                f"VRAM + {self.sysmem_read_bytes / 1e9:.3f} GB over PCIe = {t['overhead_ms']:.1f} + {t['vram_ms']:.1f} "
                f"+ {t['pcie_ms']:.1f} ms -> {self.tok_s:.1f} tok/s")


def _span(names: Sequence[str]) -> str:
    if len(names) <= 3:
        return ", ".join(names)
    return f"{names[0]} ... {names[-1]}"


def _get(d: Any, key: str, default=None):
    return d.get(key, default) if isinstance(d, dict) else getattr(d, key, default)


def place(order: Iterable[dict], budget_bytes: int, fixed_bytes: int = 0) -> list[dict]:
    """Walk the load order against the VRAM budget: first fit, module by module.

    ``order``: dicts with ``module``, ``weight_bytes``, ``cache_bytes`` (the cache layers allocated with it) and
    ``device_hint`` ('cpu' for what exllamav2 keeps in system RAM anyway, the input embedding), optionally
    ``scratch_bytes`` (buffers that take VRAM but are not read per token: the device context). Each GPU module goes
    to 'vram' if its bytes fit in what is left of ``budget_bytes - fixed_bytes``, otherwise to 'sysmem' (the driver
    cannot place it in VRAM; on Windows it lands in shared system memory). Returns one dict per module with ``where``
    and ``vram_left_bytes`` after it.
    """
    left = int(budget_bytes) - int(fixed_bytes)
    out = []
    for m in order:
        w, c = int(_get(m, "weight_bytes", 0) or 0), int(_get(m, "cache_bytes", 0) or 0)
        x = int(_get(m, "scratch_bytes", 0) or 0)
        hint = str(_get(m, "device_hint", "gpu") or "gpu").lower()
        if hint == "cpu" or _get(m, "where") == "cpu":
            where = "cpu"
        elif w + c + x <= left:
            where, left = "vram", left - (w + c + x)
        else:
            where = "sysmem"
        out.append({"module": str(_get(m, "module", f"module{len(out)}")), "kind": _get(m, "kind", ""),
                    "weight_bytes": w, "cache_bytes": c, "scratch_bytes": x, "where": where,
                    "vram_left_bytes": left})
    return out


def read_bytes(placement: Iterable[dict], depth: int, max_seq_len: int) -> tuple[int, int]:
    """(VRAM bytes, system-RAM bytes) one decoded token reads at ``depth``: all weights of each GPU module and the
    first ``depth`` of its cache layers' ``max_seq_len`` positions. Modules on the CPU ('cpu') are not GPU reads."""
    if max_seq_len <= 0:
        raise CourseError(f"max_seq_len must be positive, got {max_seq_len}")
    if not 0 <= depth <= max_seq_len:
        raise CourseError(f"depth {depth} must be between 0 and the cache's {max_seq_len} tokens")
    vram = sysmem = 0
    for p in placement:
        b = int(p["weight_bytes"]) + int(round(int(p["cache_bytes"]) * depth / max_seq_len))
        if p["where"] == "vram":
            vram += b
        elif p["where"] == "sysmem":
            sysmem += b
    return vram, sysmem


def seconds_per_token(vram_bytes: float, sysmem_bytes: float, *, overhead_s_per_token: float,
                      vram_bandwidth: float, pcie_bandwidth: float) -> float:
    """overhead + VRAM bytes / VRAM bandwidth + system-RAM bytes / PCIe bandwidth."""
    if vram_bandwidth <= 0 or pcie_bandwidth <= 0:
        raise CourseError("bandwidths must be positive (bytes/s)")
    if overhead_s_per_token < 0:
        raise CourseError(f"the per-token overhead cannot be negative, got {overhead_s_per_token}")
    return overhead_s_per_token + vram_bytes / vram_bandwidth + sysmem_bytes / pcie_bandwidth


def overhead_from_run(tok_s: float, bytes_per_token: float, vram_bandwidth: float) -> tuple[float, str | None]:
    """Per-token overhead of a run that spills nothing: its seconds per token minus its bandwidth time.

    Returns (overhead seconds, note). When the measured speed is at or above the roofline the difference is not
    positive: the overhead is 0 and the note says that the measurement is at or above what the memory allows."""
    if tok_s <= 0:
        raise CourseError(f"a measured speed must be positive, got {tok_s} tok/s")
    band = bytes_per_token / vram_bandwidth
    over = 1.0 / tok_s - band
    if over <= 0:
        roof = vram_bandwidth / bytes_per_token
        return 0.0, (f"the measured {tok_s:g} tok/s is at or above the roofline of {roof:.1f} tok/s "
                     f"({bytes_per_token / 1e9:.2f} GB per token at {vram_bandwidth / 1e9:.0f} GB/s): it leaves no "
                     "time for overhead, so the overhead is taken as 0")
    return over, None


def evaluate(placement: list[dict], *, depth: int, max_seq_len: int, cache_mode: str = "fp16",
             overhead_s_per_token: float, vram_bandwidth: float, pcie_bandwidth: float, budget_bytes: int = 0,
             fixed_bytes: int = 0, notes: Sequence[str] = ()) -> Prediction:
    """The prediction for a given placement (from ``place``, or the one an emulator really made)."""
    vram, sysmem = read_bytes(placement, depth, max_seq_len)
    s = seconds_per_token(vram, sysmem, overhead_s_per_token=overhead_s_per_token, vram_bandwidth=vram_bandwidth,
                          pcie_bandwidth=pcie_bandwidth)
    sp = [p for p in placement if p["where"] == "sysmem"]
    sw, sc = sum(p["weight_bytes"] for p in sp), sum(p["cache_bytes"] for p in sp)
    sx = sum(int(p.get("scratch_bytes", 0) or 0) for p in sp)
    return Prediction(spilled_bytes=sw + sc + sx, spilled_weight_bytes=sw, spilled_cache_bytes=sc, vram_read_bytes=vram,
                      sysmem_read_bytes=sysmem, tok_s=1.0 / s, seconds_per_token=s,
                      overhead_s_per_token=overhead_s_per_token, vram_bandwidth=float(vram_bandwidth),
                      pcie_bandwidth=float(pcie_bandwidth), budget_bytes=int(budget_bytes),
                      fixed_bytes=int(fixed_bytes), depth=int(depth), max_seq_len=int(max_seq_len),
                      cache_mode=cache_mode, placement=list(placement), notes=list(notes))


# ------------------------------------------------------------------------------------------------------ the probe
class Answers(Protocol):
    """What the probe asks CUDA and NVML. ``SystemAnswers`` asks the real ones; tests pass fakes.

    ``gpu()`` -> None without an NVIDIA GPU, else a dict: name, driver (e.g. '551.86'), driver_model ('WDDM', 'TCC'
    or None on Linux), dedicated_bytes, free_bytes. ``allocate(nbytes)`` returns a handle or raises (an exception
    whose type name contains 'OutOfMemory', or MemoryError, means the allocation was refused); ``read_bandwidth``
    times reads of one allocation (bytes/s); ``free`` and ``release`` give the memory back."""

    system: str
    release_name: str

    def gpu(self) -> dict | None: ...
    def ram_available_bytes(self) -> int: ...
    def allocate(self, nbytes: int) -> Any: ...
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
    lines: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(self.lines)


POLICY_STEPS = [
    "To make an overflow fail loudly instead of crawling (driver 546.01 or later):",
    "  1. Right-click the desktop > NVIDIA Control Panel > 3D Settings > Manage 3D settings.",
    "  2. Tab 'Program Settings' > 'Add' > Browse... and pick the python.exe that runs your model:",
    "       {python}",
    "  3. Set 'CUDA - Sysmem Fallback Policy' to 'Prefer No Sysmem Fallback' and press Apply.",
    "  4. Restart Python (and Jupyter). An overflow now raises CUDA out-of-memory, and exllamav2's",
    "     load_autosplit stops with 'Insufficient VRAM' instead of loading into system RAM.",
    "  (To cover every program: tab 'Global Settings' instead. WSL2 reportedly ignores the policy.)",
]

LINUX_LINES = [
    "The 'CUDA - Sysmem Fallback Policy' exists only in NVIDIA's Windows (WDDM) driver, 536.40 and later.",
    "On Linux there is no such fallback: an allocation past the GPU's VRAM raises CUDA out-of-memory",
    "(torch.cuda.OutOfMemoryError; exllamav2's load_autosplit then stops with 'Insufficient VRAM for model and",
    "cache'), so a configuration that does not fit fails at load time instead of silently slowing down.",
    "To see the Windows behaviour here, `python -m helpers emulate` (Linux + CUDA) places what overflows an",
    "emulated VRAM budget in mapped system RAM that the GPU reads over PCIe.",
]


def run_probe(answers: Answers, *, past_bytes: int = GIB, chunk_bytes: int = 256 * MIB,
              ram_fraction: float = 0.25, slow_ratio: float = 0.5, python: str | None = None) -> ProbeReport:
    """Decide whether this machine's driver spills into system RAM, with bounded allocations that are always freed.

    Windows + WDDM: allocate ``chunk_bytes`` chunks (each written once) until ``past_bytes`` beyond the free VRAM
    reading are held, or an allocation is refused; never more than ``ram_fraction`` of the available system RAM beyond
    the free VRAM. Time reads of the first chunk (VRAM) and of the last one (past the free VRAM): past chunks read at
    less than ``slow_ratio`` of VRAM speed mean the fallback is active. Everything is freed in a ``finally`` (also on
    Ctrl-C, which Python raises as KeyboardInterrupt between calls). Elsewhere nothing is allocated.
    """
    if chunk_bytes <= 0 or past_bytes < 0:
        raise CourseError("the probe's chunk must be positive and the bytes past VRAM not negative")
    system = answers.system
    g = answers.gpu()
    rep = ProbeReport(system=system, verdict="no-gpu", gpu=g, chunk_bytes=int(chunk_bytes))
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
        L.append(f"driver {g.get('driver')} predates 536.40, which introduced the fallback: expect out-of-memory.")
    elif rep.driver_has_fallback:
        L.append("driver 536.40 or later: the fallback exists"
                 + ("; 546.01 or later: the policy switch exists" if rep.driver_has_policy_switch else
                    "; the policy switch needs 546.01 or later (update the driver to turn it off)"))
    _allocate_and_time(answers, rep, past_bytes=past_bytes, chunk_bytes=chunk_bytes, ram_fraction=ram_fraction,
                       slow_ratio=slow_ratio)
    L.append("")
    L += [s.format(python=python or sys.executable) for s in POLICY_STEPS]
    return rep


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
            L.append("verdict: INCONCLUSIVE. Allocations past the free-VRAM reading succeeded at VRAM speed (memory was "
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
                     f"free {free / GIB:.2f} GiB (fragmentation or another program): close other GPU programs and rerun.")
    else:
        rep.verdict = "inconclusive"
        L.append("verdict: INCONCLUSIVE. Nothing past the free VRAM was tried (no system RAM to spare, or --max-gib 0).")
    L.append(f"freed everything: {rep.allocated_bytes / GIB:.2f} GiB given back")


class SystemAnswers:
    """The real answers: torch.cuda for allocations and timings, NVML (helpers.core.devices) for the driver."""

    def __init__(self):
        self.system = platform.system()
        self.release_name = platform.release()

    def gpu(self) -> dict | None:
        from helpers.core import devices as gpu_mod

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

    def allocate(self, nbytes: int):
        import torch

        t = torch.empty(int(nbytes), dtype=torch.uint8, device="cuda")
        t.fill_(1)  # touch it: a WDDM allocation is placed when it is first used
        torch.cuda.synchronize()
        return t

    def read_bandwidth(self, handle) -> float:
        import torch

        x = handle.view(torch.float16) if handle.numel() % 2 == 0 else handle
        from helpers.core.devices import timed_reads

        return handle.numel() / min(timed_reads(x, 3))

    def free(self, handle) -> None:
        del handle

    def release(self) -> None:
        import gc

        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        except Exception:
            pass


def main_probe(argv: list[str], answers: Answers | None = None) -> int:
    """`python -m helpers probe --fallback [--max-gib N] [--chunk-mib M] [--json]`"""
    ap = argparse.ArgumentParser(prog="python -m helpers probe",
                                 description="Does this GPU spill into system RAM when VRAM is full (Windows sysmem "
                                             "fallback), and how fast is memory past that point?")
    ap.add_argument("--fallback", action="store_true", help="probe NVIDIA's sysmem fallback (the only probe)")
    ap.add_argument("--max-gib", type=float, default=1.0,
                    help="GiB to try past the free VRAM (default 1; at most a quarter of the free system RAM)")
    ap.add_argument("--chunk-mib", type=int, default=256, help="size of each allocation in MiB (default 256)")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = ap.parse_args(argv)
    if not args.fallback:
        raise CourseError("say what to probe: `python -m helpers probe --fallback`")
    if not 0 <= args.max_gib <= 64:
        raise CourseError(f"--max-gib must be between 0 and 64, got {args.max_gib}")
    if not 1 <= args.chunk_mib <= 4096:
        raise CourseError(f"--chunk-mib must be between 1 and 4096, got {args.chunk_mib}")
    rep = run_probe(answers or SystemAnswers(), past_bytes=int(args.max_gib * GIB), chunk_bytes=args.chunk_mib * MIB)
    if args.json:
        print(json.dumps(asdict(rep), indent=1))
    else:
        print(rep.text())
    return 0


# ------------------------------------------------------------------------------------- the model on a planned load
#: what ``load_autosplit`` holds while it loads (``memory.LOAD_AUTOSPLIT_RESERVE_BYTES``: 192 + 256 MiB). Every spill
#: decision is made with it in VRAM; it is freed when the load ends, too late to bring anything back.
LOAD_RESERVE_BYTES = memory.LOAD_AUTOSPLIT_RESERVE_BYTES


@dataclass
class SpillModel:
    """The spill model for one GPU: its bandwidths, the per-token overhead, and what is taken before the model loads.

    ``gpu``: a name or GiB (``memory.gpu_spec``) or a spec dict. Bandwidths in bytes/s; None takes the datasheet's
    memory bandwidth and ``pcie_practical_bandwidth`` of its link. ``reserve_gib``/``cuda_context_gib``: None takes
    the planner's documented defaults (``memory.breakdown``). ``flash_attn``: the attention path does not materialise
    the attention matrix while a prompt chunk runs (flash-attn or SDPA; the course's own exllamav2 runs use
    ``no_sdpa`` and do). ``load_path``: how the front end loads (``memory.LOAD_PATHS``): 'autosplit'
    (``load_autosplit(cache)``: a test forward per module, so the transients exist from the first module, and its
    load-time reserve is held) or 'load' (``model.load()`` then the cache: no test forward and no reserve; the first
    forward's transients come after the cache). ``load_reserve_bytes``: None takes the path's own (448 MiB / 0).
    """

    gpu: Any
    vram_bandwidth: float | None = None
    pcie_bandwidth: float | None = None
    overhead_s_per_token: float = 0.0
    reserve_gib: float | None = None
    cuda_context_gib: float | None = None
    flash_attn: bool = False
    load_reserve_bytes: int | None = None
    head_bits: int = 6
    load_path: str = "autosplit"

    def reserve_while_loading(self) -> int:
        if self.load_reserve_bytes is not None:
            return int(self.load_reserve_bytes)
        return LOAD_RESERVE_BYTES if self.load_path == "autosplit" else 0

    def spec(self) -> dict:
        g = self.gpu
        return g if isinstance(g, dict) and "vram_bytes" in g else memory.gpu_spec(g)

    def bandwidths(self) -> tuple[float, float]:
        g = self.spec()
        vram = self.vram_bandwidth or (float(g["bandwidth_gbs"]) * 1e9 if g.get("bandwidth_gbs") else None)
        pcie = self.pcie_bandwidth or (pcie_practical_bandwidth(int(g["pcie_gen"]), int(g["pcie_lanes"]))
                                       if g.get("pcie_gen") and g.get("pcie_lanes") else None)
        if not vram or not pcie:
            raise CourseError(f"the spill model needs {g.get('name')}'s memory and PCIe bandwidths: pass "
                              "vram_bandwidth= and pcie_bandwidth= (bytes/s), or pick a GPU from memory.GPUS")
        return float(vram), float(pcie)

    def layout(self, spec: Any, *, bpw: float | None, max_seq_len: int, cache_mode: str = "fp16") -> dict:
        """The load order and the fixed VRAM before it (CUDA context, transients, the load-time reserve), from the
        planner's breakdown; and the budget: the card less the OS reserve."""
        g = self.spec()
        res = None if self.reserve_gib is None else int(round(self.reserve_gib * GIB))
        ctx = None if self.cuda_context_gib is None else int(round(self.cuda_context_gib * GIB))
        bd = memory.breakdown(spec, bpw=bpw, head_bits=self.head_bits, max_seq_len=max_seq_len,
                              cache_mode=cache_mode, flash_attn=self.flash_attn, cuda_context_bytes=ctx,
                              reserve_bytes=res)
        order = memory.load_order(spec, bpw=bpw, head_bits=self.head_bits, max_seq_len=max_seq_len,
                                  cache_mode=cache_mode, path=self.load_path)
        load_res = self.reserve_while_loading()
        fixed = bd.cuda_context_bytes + int(load_res)
        if self.load_path == "autosplit":
            fixed += bd.transient_bytes
        else:
            order = order + [{"module": "first forward's transients", "kind": "transient", "layer": None,
                              "weight_bytes": 0, "cache_bytes": 0, "scratch_bytes": bd.transient_bytes,
                              "bytes": bd.transient_bytes, "device_hint": "gpu"}]
        budget = int(g["vram_bytes"]) - bd.reserve_bytes
        terms = {"cuda_context_bytes": bd.cuda_context_bytes, "transient_bytes": bd.transient_bytes,
                 "load_reserve_bytes": int(load_res), "os_reserve_bytes": bd.reserve_bytes,
                 "card_bytes": int(g["vram_bytes"])}
        when = "while loading" if self.load_path == "autosplit" else "at the first forward, after the cache"
        notes = [f"load path: {memory.LOAD_PATHS[self.load_path]}",
                 f"CUDA context {bd.cuda_context_bytes / GIB:.2f} GiB ({bd.cuda_context_source.split(':')[0]})",
                 f"OS reserve {bd.reserve_bytes / GIB:.2f} GiB ({bd.reserve_source.split(':')[0]})",
                 f"transients {when} {bd.transient_bytes / GIB:.2f} GiB "
                 f"({'flash-attn/SDPA' if self.flash_attn else 'attention matrix materialised'})",
                 f"reserve held while loading {load_res / MIB:.0f} MiB"]
        return {"order": order, "fixed_bytes": fixed, "budget_bytes": budget, "terms": terms, "notes": notes,
                "breakdown": bd}

    def predict(self, spec: Any, *, bpw: float | None = None, max_seq_len: int, cache_mode: str = "fp16",
                depth: int = 0) -> Prediction:
        """Place exllamav2's load order on this card and predict decode speed at ``depth``."""
        lay = self.layout(spec, bpw=bpw, max_seq_len=max_seq_len, cache_mode=cache_mode)
        vram_bw, pcie_bw = self.bandwidths()
        placement = place(lay["order"], lay["budget_bytes"], lay["fixed_bytes"])
        return evaluate(placement, depth=depth, max_seq_len=max_seq_len, cache_mode=cache_mode,
                        overhead_s_per_token=self.overhead_s_per_token, vram_bandwidth=vram_bw,
                        pcie_bandwidth=pcie_bw, budget_bytes=lay["budget_bytes"], fixed_bytes=lay["fixed_bytes"],
                        notes=lay["notes"])

    def spill_needed_for(self, tok_s: float, spec: Any, *, bpw: float | None = None, max_seq_len: int,
                         cache_mode: str = "fp16", depth: int = 0) -> dict:
        """How much must have spilled to decode at ``tok_s``: the bytes per token that must come over PCIe, and the
        tail of the load order (lm_head first, then the last layers backwards) that reads that much; the last module
        counted in part."""
        if tok_s <= 0:
            raise CourseError(f"a target speed must be positive, got {tok_s}")
        lay = self.layout(spec, bpw=bpw, max_seq_len=max_seq_len, cache_mode=cache_mode)
        vram_bw, pcie_bw = self.bandwidths()
        gpu_mods = [{**m, "where": "vram"} for m in lay["order"] if str(m.get("device_hint")) != "cpu"]
        total, _ = read_bytes(gpu_mods, depth, max_seq_len)
        extra = 1.0 / tok_s - self.overhead_s_per_token - total / vram_bw
        per_byte = 1.0 / pcie_bw - 1.0 / vram_bw
        need = max(0.0, extra / per_byte)
        out = {"tok_s": tok_s, "sysmem_read_bytes": need, "spilled_bytes": 0.0, "spilled_weight_bytes": 0.0,
               "modules": [], "possible": True}
        got = 0.0
        for m in reversed(gpu_mods):
            if got >= need:
                break
            r, _ = read_bytes([m], depth, max_seq_len)
            size = m["weight_bytes"] + m["cache_bytes"] + int(m.get("scratch_bytes", 0) or 0)
            frac = 1.0 if r == 0 or got + r <= need else (need - got) / r
            got += r * frac
            out["spilled_bytes"] += size * frac
            out["spilled_weight_bytes"] += m["weight_bytes"] * frac
            out["modules"].append((m["module"], round(frac, 3)))
        out["possible"] = got >= need - 1
        return out


def predict(spec: Any, gpu: Any, *, bpw: float | None = None, max_seq_len: int, cache_mode: str = "fp16",
            depth: int = 0, reserve_gib: float | None = None, overhead_s_per_token: float = 0.0,
            vram_bandwidth: float | None = None, pcie_bandwidth: float | None = None, **kw) -> Prediction:
    """``SpillModel(gpu, ...).predict(spec, ...)`` in one call (extra keywords go to ``SpillModel``)."""
    return SpillModel(gpu, vram_bandwidth=vram_bandwidth, pcie_bandwidth=pcie_bandwidth,
                      overhead_s_per_token=overhead_s_per_token, reserve_gib=reserve_gib, **kw).predict(
        spec, bpw=bpw, max_seq_len=max_seq_len, cache_mode=cache_mode, depth=depth)


def spill_needed_for(tok_s: float, spec: Any, gpu: Any, *, bpw: float | None = None, max_seq_len: int,
                     cache_mode: str = "fp16", depth: int = 0, **kw) -> dict:
    """``SpillModel(gpu, **kw).spill_needed_for(tok_s, spec, ...)``."""
    return SpillModel(gpu, **kw).spill_needed_for(tok_s, spec, bpw=bpw, max_seq_len=max_seq_len,
                                                  cache_mode=cache_mode, depth=depth)


# ------------------------------------------------------------------------------------------------- the seed case
#: what the user reported (DOMAIN.md s.1): Qwen2.5-14B-Instruct EXL2 5.5 bpw, ExLlamaV2, RTX 4080 Super, Windows
SEED = {"model": "qwen2.5-14b", "bpw": 5.5, "gpu": "RTX 4080 Super", "tok_s_4k": 80.0, "tok_s_32k": 25.0,
        "used_4k_gib": 12.0, "full_gib": 15.8, "source": "DOMAIN.md section 1 (the user's report)"}


def anchored_reserve_gib(spec: Any, gpu: Any, *, bpw: float | None, used_gib: float, full_gib: float,
                         max_seq_len: int = 4096, cache_mode: str = "fp16", flash_attn: bool = False,
                         cuda_context_gib: float | None = None) -> tuple[float, str]:
    """The VRAM a process could not have, from two readings of a real run: the card's dedicated memory when the
    driver started spilling (``full_gib``: what was left unused) plus what the rest of the system held (the reading
    of a run that fits, ``used_gib``, less what the planner says that run's process holds). Returns (GiB, how)."""
    g = memory.gpu_spec(gpu) if not isinstance(gpu, dict) else gpu
    ctx = None if cuda_context_gib is None else int(round(cuda_context_gib * GIB))
    bd = memory.breakdown(spec, bpw=bpw, max_seq_len=max_seq_len, cache_mode=cache_mode, flash_attn=flash_attn,
                          cuda_context_bytes=ctx, reserve_bytes=0)
    process = bd.vram_total_bytes / GIB
    unused = float(g["vram_gib"]) - full_gib
    others = used_gib - process
    how = (f"{g['vram_gib']:g} GiB card - {full_gib:g} GiB used when full = {unused:.2f} GiB never used; "
           f"{used_gib:g} GiB used at {max_seq_len} tokens - {process:.2f} GiB the planner puts in that process = "
           f"{others:.2f} GiB held by the rest of the system")
    res = unused + others
    if res < 0:
        return 0.0, how + f"; together {res:.2f} GiB, taken as 0"
    return res, how + f"; reserve {res:.2f} GiB"


def seed_case(*, depth: int = 256, pcie_bandwidth: float | None = None, flash_attn: bool = False,
              load_path: str = "autosplit") -> dict:
    """The seed case told with the model, parameters from the datasheet and the user's own readings:

    - VRAM 736 GB/s (datasheet, ``memory.GPUS``); PCIe 4.0 x16 ~25 GB/s in practice (DOMAIN.md s.1);
    - overhead: the 4k run's 80 tok/s minus its bandwidth time (negative: at or above the roofline, so 0);
    - the reserve: from the user's memory readings (12 GB used at 4k, 15.8 of 16 GB when full), not the speeds;
    - ``load_path``: how the front end loaded (the report does not say): ``SpillModel.load_path``.
    Returns the roofline, the predictions at 4k and 32k, the spill needed for 25 tok/s, and the verdict."""
    s = SEED
    base = SpillModel(s["gpu"], pcie_bandwidth=pcie_bandwidth, flash_attn=flash_attn, load_path=load_path)
    vram_bw, pcie_bw = base.bandwidths()
    res, how = anchored_reserve_gib(s["model"], s["gpu"], bpw=s["bpw"], used_gib=s["used_4k_gib"],
                                    full_gib=s["full_gib"], flash_attn=flash_attn)
    base.reserve_gib = res
    p4_raw = base.predict(s["model"], bpw=s["bpw"], max_seq_len=4096, depth=depth)
    bytes_4k = p4_raw.vram_read_bytes + p4_raw.sysmem_read_bytes
    overhead, note = overhead_from_run(s["tok_s_4k"], bytes_4k, vram_bw)
    base.overhead_s_per_token = overhead
    p4 = base.predict(s["model"], bpw=s["bpw"], max_seq_len=4096, depth=depth)
    p32 = base.predict(s["model"], bpw=s["bpw"], max_seq_len=32768, depth=depth)
    need = base.spill_needed_for(s["tok_s_32k"], s["model"], bpw=s["bpw"], max_seq_len=32768, depth=depth)
    ratio = p32.tok_s / s["tok_s_32k"]
    return {"seed": dict(s), "depth": depth, "load_path": load_path, "vram_bandwidth": vram_bw, "pcie_bandwidth": pcie_bw,
            "bytes_per_token_4k": bytes_4k, "roofline_4k_tok_s": vram_bw / bytes_4k,
            "reported_over_roofline": s["tok_s_4k"] / (vram_bw / bytes_4k),
            "overhead_s_per_token": overhead, "overhead_note": note, "reserve_gib": res, "reserve_how": how,
            "prediction_4k": p4, "prediction_32k": p32, "needed_for_reported": need,
            "predicted_over_reported": ratio, "within_20pct": abs(ratio - 1) <= 0.20}


def seed_variants(depth: int = 256) -> list[dict]:
    """The seed's 32k prediction under the two setup details the report does not give: how the front end loaded
    (``load_autosplit`` with a lazy cache, or ``model.load()`` then the cache), and PCIe practical vs raw. (The
    attention path, a third, cancels: its memory is in the 4k reading the reserve is derived from.) None is fitted."""
    rows = []
    for path in memory.LOAD_PATHS:
        for name, bw in (("practical 25 GB/s", None), ("raw 31.5 GB/s", pcie_raw_bandwidth(4, 16))):
            c = seed_case(depth=depth, pcie_bandwidth=bw, load_path=path)
            p = c["prediction_32k"]
            rows.append({"load_path": path, "pcie": name, "reserve_gib": c["reserve_gib"],
                         "spilled_gib": p.spilled_gib, "spilled_weight_gb": p.spilled_weight_bytes / 1e9,
                         "sysmem_read_gb": p.sysmem_read_bytes / 1e9, "tok_s": p.tok_s,
                         "vs_reported": p.tok_s / SEED["tok_s_32k"] - 1})
    return rows


def depth_for_speed(case: dict, tok_s: float) -> int | None:
    """The cache depth at which ``case``'s 32k prediction (``seed_case``) slows to ``tok_s``: the placement does not
    change with depth and the bytes read grow linearly with it, so the time per token is a line in depth. None if
    that speed is not reached between depth 0 and a full cache."""
    p = case["prediction_32k"]
    L = p.max_seq_len
    t0, t1, target = p.at_depth(0).seconds_per_token, p.at_depth(L).seconds_per_token, 1.0 / tok_s
    if not t0 <= target <= t1:
        return None
    return int(round(L * (target - t0) / (t1 - t0)))


def seed_depth_curves(depths: Sequence[int] | None = None) -> dict:
    """Predicted 32k decode speed against cache depth for each load path (practical PCIe), and the depth at which each
    would decode at the reported 25 tok/s."""
    depths = list(depths) if depths is not None else list(range(0, 32768, 512)) + [32767]
    out = {}
    for path in memory.LOAD_PATHS:
        c = seed_case(depth=0, load_path=path)
        p = c["prediction_32k"]
        tok = [p.at_depth(d).tok_s for d in depths]
        out[path] = {"depths": depths, "tok_s": tok, "spilled_gib": p.spilled_gib,
                     "depth_at_reported": depth_for_speed(c, SEED["tok_s_32k"])}
    return out


def ways_out(spec: Any = None, gpu: Any = None, *, bpw: float | None = None, max_seq_len: int = 32768,
             depth: int = 256, reserve_gib: float | None = None, desktop_extra_gib: float = 1.0,
             overhead_s_per_token: float = 0.0) -> list[dict]:
    """The ways out of a spill, each checked with the planner (``memory.plan``: fits, margin) and the spill model
    (what would spill, with load_autosplit's load-time reserve, and the predicted tok/s). Defaults: the seed case
    with the reserve from the user's readings."""
    spec = spec or SEED["model"]
    gpu = gpu or SEED["gpu"]
    bpw = SEED["bpw"] if bpw is None and spec == SEED["model"] else bpw
    if reserve_gib is None:
        reserve_gib = anchored_reserve_gib(spec, gpu, bpw=bpw, used_gib=SEED["used_4k_gib"],
                                           full_gib=SEED["full_gib"])[0]
    rows = []

    def check(way: str, *, b=bpw, L=max_seq_len, mode="fp16", res=reserve_gib):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl = memory.plan(spec, gpu, bpw=b, max_seq_len=L, cache_mode=mode, reserve_gib=res)
            pr = SpillModel(gpu, reserve_gib=res, overhead_s_per_token=overhead_s_per_token).predict(
                spec, bpw=b, max_seq_len=L, cache_mode=mode, depth=min(depth, L - 1))
        rows.append({"way": way, "bpw": b, "max_seq_len": L, "cache_mode": mode, "reserve_gib": res,
                     "fits": pl.fits, "margin_gib": pl.margin_bytes / GIB, "spilled_gib": pr.spilled_gib,
                     "tok_s": pr.tok_s})
        return pl, pr

    def spills(b, L) -> bool:
        return SpillModel(gpu, reserve_gib=reserve_gib).predict(spec, bpw=b, max_seq_len=L).spilled_bytes > 0

    pl, _ = check("as reported (spills)")
    # the planner's longest context, then down in 1024-token steps until load_autosplit's load-time reserve fits too
    L = pl.longest_context["fp16"]
    while L > 1024 and spills(bpw, L):
        L -= 1024
    check("shorter max_seq_len", L=L)
    for mode in ("q8", "q6", "q4"):
        check(f"{mode.upper()} cache", mode=mode)
    if pl.max_bpw_that_fits is not None:
        b = pl.max_bpw_that_fits
        while b > 2.0 and spills(b, max_seq_len):
            b = round(b - 0.05, 2)
        check("lower bpw", b=b)
    check(f"Q4 cache, {desktop_extra_gib:g} GiB more reserve", mode="q4", res=reserve_gib + desktop_extra_gib)
    return rows


def format_rows(rows: list[dict]) -> str:
    """A text table of ``ways_out`` rows."""
    head = f"{'way out':<32}{'bpw':>5}{'max_seq_len':>12}{'cache':>6}{'fits':>6}{'margin':>11}{'spilled':>11}{'tok/s':>7}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['way']:<32}{r['bpw']:>5g}{r['max_seq_len']:>12,}{r['cache_mode']:>6}"
                     f"{'yes' if r['fits'] else 'NO':>6}{r['margin_gib']:>7.2f} GiB{r['spilled_gib']:>7.2f} GiB"
                     f"{r['tok_s']:>7.1f}")
    lines.append("fits/margin: memory.plan (what the GPU must hold); spilled/tok/s: the spill model (load order, "
                 "load_autosplit's load-time reserve included)")
    return "\n".join(lines)
