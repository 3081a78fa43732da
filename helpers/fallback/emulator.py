"""The Windows sysmem fallback, emulated on Linux with CUDA: a VRAM budget for a smaller card, and a pool of mapped
host memory for what does not fit in it.

``budget_for``: a card's GiB less an OS reserve and the CUDA context. As exllamav2 loads module by module
(``helpers.fallback.routed_load``), ``VramEmulator`` puts a module that would not fit in what is left into a
``torch.cuda.MemPool`` over pinned host memory (``helpers.fallback.hostalloc``), read over PCIe like Windows'
"shared GPU memory"; all else stays in VRAM. Closing (also on an error or Ctrl-C) drops the model and the pool and
checks no pinned bytes remain. Why only spilled modules are routed: docs/FACTS.md §6.
``measure_host_read_bandwidth`` times reads from the pool.
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from helpers.core import devices as gpu
from helpers.core.errors import CourseError, CourseWarning
from helpers.core.units import GIB, MIB
from helpers.fallback.hostalloc import ALLOC_FN, FREE_FN, HostAllocLib
from helpers.memory.setup import LoadSetup

#: the seed case: a 16 GB card (RTX 4080 Super)
CARD_GIB = 16.0
#: what the emulated card keeps for the OS and other programs. The seed's Windows run filled 15.8 of 16 GB
#: (the user's report, docs/FACTS.md §1): the driver spilled with ~0.2 GB still shown free.
RESERVE_GIB = 0.2


def budget_for(card_gib: float, reserve_gib: float, context_bytes: int = 0) -> int:
    """The emulated VRAM the loads may take: the card less the OS reserve less what CUDA itself took."""
    b = int(card_gib * GIB) - int(reserve_gib * GIB) - int(context_bytes)
    if b <= 0:
        raise CourseError(f"a {card_gib} GiB card less a {reserve_gib} GiB reserve and {context_bytes / GIB:.2f} GiB "
                          "of CUDA context leaves nothing for the model; use a larger --card-gib")
    return b


def emulated_setup(model_dir, *, card_gib: float = CARD_GIB, reserve_gib: float = RESERVE_GIB,
                   context_bytes: int = 0, **settings) -> LoadSetup:
    """The ``LoadSetup`` of a load on the emulated card: ``card_gib`` as its GPU, the OS reserve, the CUDA context
    this process measured, and the load's own settings (``max_seq_len``, ``cache_mode``)."""
    return LoadSetup(model_dir, gpus=(float(card_gib),), reserve_gib=float(reserve_gib),
                     cuda_context_gib=int(context_bytes) / GIB, **settings)


def emulated_card(setup: LoadSetup) -> dict:
    """The emulated card of a setup, as result rows name it."""
    return {"card_gib": setup.gpu["vram_bytes"] / GIB, "reserve_gib": setup.reserve_gib_of(0) or 0.0,
            "context_bytes": setup.bytes_of(setup.cuda_context_gib) or 0}


def budget_of(setup: LoadSetup) -> int:
    """What loads may take on ``setup``'s emulated card (``budget_for`` of ``emulated_card``)."""
    return budget_for(**emulated_card(setup))


def context_bytes_now(nvml_before: int | None) -> int:
    """VRAM this process took for CUDA itself: used now (after a first allocation) minus NVML's reading taken
    before CUDA started (0 when NVML was not there to read)."""
    import torch

    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return max(0, int(total - free) - int(nvml_before)) if nvml_before is not None else 0


class TorchDevice:
    """What the emulator needs from torch.cuda; tests pass a fake with the same methods."""

    def __init__(self, index: int = 0):
        import torch

        self.torch, self.index = torch, index

    def used_bytes(self) -> int:
        free, total = self.torch.cuda.mem_get_info(self.index)
        return int(total - free)

    def total_bytes(self) -> int:
        return int(self.torch.cuda.mem_get_info(self.index)[1])

    def make_pool(self, lib: HostAllocLib):
        alloc = self.torch.cuda.memory.CUDAPluggableAllocator(str(lib.path), ALLOC_FN, FREE_FN)
        return self.torch.cuda.MemPool(alloc.allocator())

    def use_pool(self, pool):
        return self.torch.cuda.use_mem_pool(pool, device=self.index)

    def settle(self) -> None:
        """Collect garbage, wait for the GPU, give torch's cached blocks back (before and after a run)."""
        gc.collect()
        self.torch.cuda.synchronize(self.index)
        self.torch.cuda.empty_cache()

    def trim(self) -> None:
        """Give torch's cached blocks back, so that the next reading counts live tensors (between modules)."""
        self.torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ the emulator
@dataclass
class Decision:
    index: int
    module: str
    kind: str
    weight_bytes: int         # as exllamav2 counts them (weight_footprint)
    cache_bytes: int          # the cache layers allocated with this module
    used_before_bytes: int    # VRAM taken since the emulator started, before this module
    where: str                # 'vram', 'sysmem' or 'cpu'
    vram_delta_bytes: int | None = None   # measured once the module has loaded
    host_delta_bytes: int | None = None
    host_before_bytes: int = 0

    @property
    def need_bytes(self) -> int:
        return self.weight_bytes + self.cache_bytes


@dataclass
class VramEmulator:
    """A context manager: an emulated VRAM budget, with a pool of mapped host memory for what does not fit.

    ``budget_bytes`` counts every byte of VRAM the process takes after ``__enter__`` (``device.used_bytes()`` minus
    its value then). ``decide`` routes one module (first fit: a module that fits in what is left goes to VRAM, one
    that does not goes to the host pool); ``host()`` is the routing context itself. ``own(obj, drop)`` hands an
    object (a loaded backend) to the emulator, which drops it first when it closes. Closing (normally, on an error or
    on KeyboardInterrupt) drops what it owns, clears the frames of a traceback in flight (they hold tensors), drops
    the pool, and checks the allocator's own count: anything still pinned is freed with ``free_all`` and reported
    with a warning. ``leftover_bytes`` says how much that was (0 after a clean run)."""

    budget_bytes: int
    lib: HostAllocLib
    device: Any = None
    decisions: list[Decision] = field(default_factory=list)
    baseline_bytes: int = 0
    leftover_bytes: int = 0
    forced_free_blocks: int = 0
    closed: bool = False

    def __post_init__(self):
        if self.budget_bytes <= 0:
            raise CourseError(f"the emulated VRAM budget must be positive, got {self.budget_bytes / GIB:.2f} GiB; "
                              "lower the reserve or raise the card size")
        self.device = self.device or TorchDevice()
        self._owned: list[tuple[Any, Callable[[Any], None]]] = []
        self._route = contextlib.ExitStack()
        self._routing = False
        self.pool = None
        self._host_start = 0

    # -- lifetime
    def __enter__(self) -> "VramEmulator":
        self.device.settle()
        self.baseline_bytes = self.device.used_bytes()
        self._host_start = self.lib.outstanding_bytes()
        self.lib.reset_peak()
        self.pool = self.device.make_pool(self.lib)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if tb is not None:
            traceback.clear_frames(tb)
        self.close()
        return False

    def own(self, obj: Any, drop: Callable[[Any], None] | None = None) -> Any:
        self._owned.append((obj, drop or (lambda o: getattr(o, "unload", lambda: None)())))
        return obj

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        errors = []
        try:
            self.leave()
        except Exception as exc:  # noqa: BLE001 (cleanup goes on)
            errors.append(exc)
        while self._owned:
            obj, drop = self._owned.pop()
            try:
                drop(obj)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
            del obj
        self.device.settle()
        self.pool = None
        self.device.settle()
        left = self.lib.outstanding_bytes() - self._host_start
        self.leftover_bytes = max(0, left)
        if left > 0:
            self.forced_free_blocks = self.lib.free_all()
            warnings.warn(f"{left / MIB:.1f} MiB of pinned host memory was still referenced after the emulated run; "
                          f"freed {self.forced_free_blocks} blocks by force (a tensor of the emulated model outlived "
                          "it: do not use it any more)", CourseWarning, stacklevel=2)
        if errors:
            raise CourseError(f"cleaning up the emulated model raised {type(errors[0]).__name__}: {errors[0]}")

    # -- routing
    def vram_used(self) -> int:
        return max(0, self.device.used_bytes() - self.baseline_bytes)

    def host_bytes(self) -> int:
        return self.lib.outstanding_bytes() - self._host_start

    def decide(self, index: int, module: str, weight_bytes: int, cache_bytes: int = 0, *, kind: str = "",
               on_cpu: bool = False) -> Decision:
        """Route the next module: 'cpu' (exllamav2 keeps it in system RAM anyway), 'vram' or 'sysmem'."""
        self._finish_last()
        self.device.trim()
        used = self.vram_used()
        need = int(weight_bytes) + int(cache_bytes)
        if on_cpu:
            where = "cpu"
        else:
            where = "vram" if used + need <= self.budget_bytes else "sysmem"
        d = Decision(index=index, module=module, kind=kind, weight_bytes=int(weight_bytes),
                     cache_bytes=int(cache_bytes), used_before_bytes=used, where=where,
                     host_before_bytes=self.host_bytes())
        self.decisions.append(d)
        if where == "sysmem":
            self.enter()
        else:
            self.leave()
        return d

    def _finish_last(self) -> None:
        if self.decisions and self.decisions[-1].vram_delta_bytes is None:
            d = self.decisions[-1]
            self.leave()
            self.device.trim()
            d.vram_delta_bytes = self.vram_used() - d.used_before_bytes
            d.host_delta_bytes = self.host_bytes() - d.host_before_bytes

    def finish(self) -> None:
        """After the last module: measure it and stop routing."""
        self._finish_last()
        self.leave()

    def enter(self) -> None:
        if not self._routing:
            if self.pool is None:
                raise CourseError("the emulator is not open: use it as `with VramEmulator(...) as emu:`")
            self._route.enter_context(self.device.use_pool(self.pool))
            self._routing = True

    def leave(self) -> None:
        if self._routing:
            self._routing = False
            self._route.close()
            self._route = contextlib.ExitStack()

    @contextlib.contextmanager
    def host(self) -> Iterator[None]:
        """Allocate in mapped host memory for the duration (e.g. a buffer to time PCIe reads)."""
        self.enter()
        try:
            yield
        finally:
            self.leave()

    # -- what happened
    def spilled_bytes(self) -> int:
        return sum(d.need_bytes for d in self.decisions if d.where == "sysmem")

    def placement(self) -> list[dict]:
        """The decisions in the spill model's form (``fallback.evaluate``)."""
        return [{"module": d.module, "weight_bytes": d.weight_bytes, "cache_bytes": d.cache_bytes, "where": d.where}
                for d in self.decisions]

    def rows(self) -> list[dict]:
        return [{"index": d.index, "module": d.module, "kind": d.kind, "weight_bytes": d.weight_bytes,
                 "cache_bytes": d.cache_bytes, "used_before_bytes": d.used_before_bytes, "where": d.where,
                 "vram_delta_bytes": d.vram_delta_bytes, "host_delta_bytes": d.host_delta_bytes}
                for d in self.decisions]


def measure_host_read_bandwidth(emu: VramEmulator, *, nbytes: int = GIB, repeats: int = 5) -> float:
    """bytes/s a GPU kernel reads from the emulator's mapped host memory (a sum over a buffer allocated there)."""
    import torch

    with emu.host():
        buf = torch.ones(int(nbytes) // 2, dtype=torch.float16, device="cuda")
    try:
        return buf.numel() * 2 / statistics.median(gpu.timed_reads(buf, repeats))
    finally:
        del buf
