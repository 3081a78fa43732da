"""The Windows sysmem fallback, emulated on Linux with CUDA; and Linux's own answer to the same overflow.

**The emulator.** A budget stands for a smaller card (e.g. 16 GiB less an OS reserve). exllamav2 is loaded the way
the course always loads it (``backend.load`` -> ``load_autosplit``: module by module, each attention module with
its cache layers). Before each module the emulator reads how much VRAM the process has taken since it started
(``torch.cuda.mem_get_info``) and, if the module and its cache layers would not fit in what is left of the budget,
loads that module inside ``torch.cuda.use_mem_pool(pool)``, where ``pool`` is a ``torch.cuda.MemPool`` over the
course's own allocator (``helpers/csrc/hostalloc.c``: ``cudaHostAlloc(..., cudaHostAllocMapped)`` and
``cudaHostGetDevicePointer``). Those tensors live in pinned system RAM, and every GPU kernel that reads them pulls
the bytes over PCIe, as the Windows driver's "shared GPU memory" does. Every other allocation of the process (the
other modules, activations, scratch) keeps torch's caching allocator in VRAM. At the end (also after an error or
Ctrl-C) the model is unloaded, the pool is dropped, and the allocator's own count of pinned bytes must be zero.

The allocator is compiled on first use, only on a CUDA machine, into the course's cache folder: with a C compiler
(``cc``/``gcc``) against the libcudart torch already loaded, or with ``nvcc -shared -cudart shared``.

What did not work (DOMAIN.md s.6): replacing torch's allocator for the whole process (every temporary allocation
then synchronises: decode fell from ~60 to 25 tok/s with nothing spilled); cudaMallocAsync (hung); managed memory
beyond free VRAM (never requested here).

**Linux's own behaviour** (``linux_oom_demo``): the same overflow without the emulator. The process's VRAM is capped
with ``torch.cuda.set_per_process_memory_fraction`` to what the smaller card would give it; loading then raises CUDA
out-of-memory (exllamav2's ``load_autosplit`` turns it into "Insufficient VRAM for model and cache"), which is caught,
explained, and the cap lifted.

``python -m helpers emulate`` runs both; ``GPU_RECORDINGS`` records them into ``results/fallback/``.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from helpers.memory import accounting as memory
from helpers.core.errors import CourseError, CourseWarning
from helpers.core.paths import PACKAGE_DIR, cache_dir

GIB = 2**30
MIB = 2**20
SOURCE = PACKAGE_DIR / "csrc" / "hostalloc.c"
ALLOC_FN, FREE_FN = "hostalloc_alloc", "hostalloc_free"
TOPIC = "fallback"

#: the seed case: a 16 GB card (RTX 4080 Super)
CARD_GIB = 16.0
#: what the emulated card keeps for the OS and other programs. The seed's Windows run filled 15.8 of 16 GB
#: (DOMAIN.md s.1): the driver spilled with ~0.2 GB still shown free.
RESERVE_GIB = 0.2


# ------------------------------------------------------------------------------------------ building the allocator
def _find_loaded_cudart() -> Path | None:
    """The libcudart this process has loaded (torch's), from /proc/self/maps; None if torch linked it statically."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            for line in fh:
                path = line.rsplit(" ", 1)[-1].strip()
                if "/libcudart.so" in path and os.path.exists(path):
                    return Path(path)
    except OSError:
        return None
    return None


def _candidate_cudarts() -> list[Path]:
    """Other places a libcudart may be: next to torch, the nvidia-* wheels, CUDA_HOME."""
    out: list[Path] = []
    try:
        import torch

        roots = [Path(torch.__file__).parent / "lib"]
        site = Path(torch.__file__).parent.parent
        roots += sorted(site.glob("nvidia/*/lib"))
    except ImportError:
        roots = []
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        roots += [Path(home) / "lib64", Path(home) / "lib"]
    roots += [Path("/usr/local/cuda/lib64")]
    for r in roots:
        out += sorted(r.glob("libcudart.so*"))
    return out


def _find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def compile_hostalloc(out: Path, *, cudart: Path | None = None, cc: str | None = None, nvcc: str | None = None,
                      source: Path = SOURCE) -> Path:
    """Compile ``source`` into the shared library ``out`` (written under a temporary name, then renamed).

    With ``cc`` (a C compiler) it links ``cudart`` by path (and records its folder as the run path); otherwise with
    ``nvcc -shared -cudart shared``. One clear error if neither can be used."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    if cc and cudart:
        cmd = [cc, "-O2", "-shared", "-fPIC", "-o", tmp, str(source), str(cudart), f"-Wl,-rpath,{Path(cudart).parent}"]
    elif nvcc:
        cmd = [nvcc, "-O2", "-shared", "-Xcompiler", "-fPIC", "-cudart", "shared", "-o", tmp, str(source)]
    else:
        os.unlink(tmp)
        raise CourseError("building the emulator's host-memory allocator needs a C compiler and the CUDA runtime "
                          "(libcudart), or nvcc: install gcc (apt install build-essential) or the CUDA toolkit, "
                          "then run again")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            last = (proc.stderr or proc.stdout).strip().splitlines()
            raise CourseError(f"compiling {source.name} failed ({last[-1] if last else 'no message'}); command: "
                              f"{' '.join(cmd)}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def build_hostalloc(*, force: bool = False) -> Path:
    """The compiled allocator for this machine, built once into the cache folder (CUDA machines only)."""
    from helpers.core import devices as gpu

    gpu.require_cuda("the sysmem-fallback emulator")
    import torch

    torch.cuda.init()
    cudart = _find_loaded_cudart()
    cands = [cudart] if cudart else _candidate_cudarts()
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    nvcc = _find_nvcc()
    chosen = cands[0] if cands else None
    key = hashlib.sha256(SOURCE.read_bytes() + str(chosen).encode() + str(bool(cc)).encode()).hexdigest()[:12]
    out = cache_dir() / "csrc" / f"hostalloc-{key}.so"
    if out.exists() and not force:
        return out
    return compile_hostalloc(out, cudart=chosen, cc=cc if chosen else None, nvcc=nvcc)


class HostAllocLib:
    """The compiled allocator seen through ctypes: what it holds now, at most, and how to free it all."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            self._lib = ctypes.CDLL(str(self.path))
        except OSError as exc:
            raise CourseError(f"cannot load the emulator's allocator {self.path} ({exc}); delete it and run again "
                              "to rebuild it") from None
        for name in ("hostalloc_outstanding_bytes", "hostalloc_outstanding_count", "hostalloc_peak_bytes",
                     "hostalloc_total_allocs", "hostalloc_failed_allocs", "hostalloc_free_all"):
            getattr(self._lib, name).restype = ctypes.c_size_t
            getattr(self._lib, name).argtypes = []
        self._lib.hostalloc_last_error.restype = ctypes.c_int
        self._lib.hostalloc_reset_peak.restype = None
        self._lib.hostalloc_alloc.restype = ctypes.c_void_p
        self._lib.hostalloc_alloc.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        self._lib.hostalloc_free.restype = None
        self._lib.hostalloc_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]

    def outstanding_bytes(self) -> int:
        return int(self._lib.hostalloc_outstanding_bytes())

    def outstanding_count(self) -> int:
        return int(self._lib.hostalloc_outstanding_count())

    def peak_bytes(self) -> int:
        return int(self._lib.hostalloc_peak_bytes())

    def total_allocs(self) -> int:
        return int(self._lib.hostalloc_total_allocs())

    def failed_allocs(self) -> int:
        return int(self._lib.hostalloc_failed_allocs())

    def last_error(self) -> int:
        return int(self._lib.hostalloc_last_error())

    def reset_peak(self) -> None:
        self._lib.hostalloc_reset_peak()

    def free_all(self) -> int:
        return int(self._lib.hostalloc_free_all())

    # direct use (tests, and a smoke check of the build)
    def alloc(self, nbytes: int) -> int | None:
        return self._lib.hostalloc_alloc(int(nbytes), 0, None)

    def free(self, ptr: int, nbytes: int = 0) -> None:
        self._lib.hostalloc_free(ptr, int(nbytes), 0, None)


# --------------------------------------------------------------------------------------------------- the device
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


# ------------------------------------------------------------------------------------- exllamav2, module by module
#: exllamav2's cache class per cache mode (exllamav2/cache.py)
CACHE_CLASSES = memory.CACHE_CLASSES


def _import_exllamav2():
    from helpers.core import devices as gpu

    gpu.require_cuda("exllamav2")
    try:
        import exllamav2  # noqa: F401  (loads or JIT-builds its CUDA extension)
    except Exception as exc:  # noqa: BLE001
        raise CourseError(f"exllamav2 could not be imported ({type(exc).__name__}: {str(exc).strip()[:160]}); "
                          "install exllamav2==0.3.2 and the CUDA toolkit matching torch (README: 'GPU set-up')") from None
    return exllamav2


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def cache_layer_bytes(cache) -> int:
    """Bytes exllamav2 allocates for one layer of ``cache`` (K and V, plus scales for the Q caches)."""
    import torch

    el = torch.empty((), dtype=cache.dtype).element_size()
    b = (_numel(cache.shape_wk) + _numel(cache.shape_wv)) * el
    if getattr(cache, "has_scales", False):
        b += 2 * _numel(cache.shape_s) * 2
    return b


def _first_layer_extra(cache) -> int:
    """The FP16 staging K/V a quantized cache allocates when it first touches a device (0 once made, or for FP16)."""
    temps = getattr(cache, "temp_tensors", None)
    return 2 * _numel(cache.shape_basic) * 2 if temps is not None and not temps else 0


def module_need(model, cache, index: int, *, with_cache: bool = True) -> dict:
    """What module ``index`` of an exllamav2 model will allocate when ``load_autosplit`` reaches it: its weights
    (``weight_footprint``, read from the file headers) and, for an attention module, its cache layer (plus the FP16
    staging tensors a quantized cache allocates on a device's first layer). ``with_cache=False``: the weights only,
    as ``model.load()`` allocates them (the cache comes afterwards)."""
    m = model.modules[index]
    kind = type(m).__name__
    weights = int(m.weight_footprint())
    cache_b = 0
    if with_cache and kind in ("ExLlamaV2Attention", "ExLlamaV2ParallelDecoder"):
        cache_b = cache_layer_bytes(cache) + _first_layer_extra(cache)
    return {"module": str(m.key), "kind": kind, "weight_bytes": weights, "cache_bytes": cache_b,
            "on_cpu": index == 0}  # load_autosplit keeps module 0, the input embedding, on the CPU


class Exl2Model:
    """exllamav2 loaded one of two ways (``load_path``, as ``memory.load_order``), optionally routed allocation by
    allocation through a ``VramEmulator``: 'autosplit' is ``load_autosplit`` with a lazy cache (module by module, each
    attention module with its cache layer); 'load' is ``model.load()`` (every module's weights) and then the cache,
    created layer by layer in layer order as ``ExLlamaV2Cache`` creates it (a quantized cache's FP16 staging tensors
    come with the first layer here, after all of them there: 2 layers of FP16 at most). The first forward's
    transients are not routed on either path.

    It offers what ``bench.measure_loaded`` times (``decode_step``, ``fill_cache``, ``synchronize``, ``memory``...),
    so native and emulated runs are measured by the same code. ``fill_cache(depth)`` only sets the cache's length:
    a decode step reads ``depth`` positions whatever values they hold."""

    name = "exllamav2"

    def __init__(self, model_dir: Path, *, max_seq_len: int, cache_mode: str = "fp16",
                 emulator: VramEmulator | None = None, on_module: Callable[[int, int], None] | None = None,
                 load_path: str = "autosplit"):
        import json as _json

        import torch

        ex = _import_exllamav2()
        if cache_mode not in CACHE_CLASSES:
            raise CourseError(f"cache mode '{cache_mode}' is unknown; use one of {', '.join(CACHE_CLASSES)}")
        self.load_path = memory.check_load_path(load_path)
        self.torch = torch
        self.model_dir, self.device = Path(model_dir), "cuda"
        self.max_seq_len, self.cache_mode = int(max_seq_len), cache_mode
        self.emulator = emulator
        config = ex.ExLlamaV2Config(str(model_dir))
        config.no_sdpa = True            # DOMAIN.md s.3: 0.3.2's SDPA prefill without flash-attn is not causal
        config.max_seq_len = self.max_seq_len
        hf = _json.loads((self.model_dir / "config.json").read_text(encoding="utf-8"))
        theta = (hf.get("rope_parameters") or {}).get("rope_theta")
        if "rope_theta" not in hf and theta is not None:
            config.rotary_embedding_base = float(theta)   # DOMAIN.md s.3: 0.3.2 reads only the top-level key
        self.config = config
        self.vocab_size = int(config.vocab_size)
        self.model = ex.ExLlamaV2(config)
        self.cache = getattr(ex, CACHE_CLASSES[cache_mode])(self.model, max_seq_len=self.max_seq_len, lazy=True)
        self.needs: list[dict] = []

        autosplit = load_path == "autosplit"

        def callback(i: int, n: int) -> None:
            if i < n:
                need = module_need(self.model, self.cache, i, with_cache=autosplit)
                self.needs.append(need)
                if emulator is not None:
                    emulator.decide(i, need["module"], need["weight_bytes"], need["cache_bytes"], kind=need["kind"],
                                    on_cpu=need["on_cpu"])
            elif emulator is not None and autosplit:
                emulator.finish()
            if on_module is not None:
                on_module(i, n)

        try:
            if autosplit:
                self.model.load_autosplit(self.cache, callback=callback)
            else:
                self.model.load(callback=callback)
                self._create_cache_layer_by_layer(emulator, on_module)
        finally:
            if emulator is not None:
                emulator.leave()

    def _create_cache_layer_by_layer(self, emulator: VramEmulator | None, on_module) -> None:
        """After ``model.load()``: make the cache's layers one at a time (``update_cache_tensors`` makes every layer
        in ``model.cache_map`` that is not made yet, so the map grows by one layer per step), each routed."""
        full = dict(self.model.cache_map)
        n0, layers = len(self.model.modules), sorted(full)
        try:
            for j, k in enumerate(layers):
                b = cache_layer_bytes(self.cache) + _first_layer_extra(self.cache)
                need = {"module": f"cache layer {k}", "kind": "cache", "weight_bytes": 0, "cache_bytes": b,
                        "on_cpu": False}
                self.needs.append(need)
                if emulator is not None:
                    emulator.decide(n0 + j, need["module"], 0, b, kind="cache")
                if on_module is not None:
                    on_module(n0 + j, n0 + len(layers))
                self.model.cache_map = {i: full[i] for i in layers[: j + 1]}
                self.cache.update_cache_tensors()
        finally:
            self.model.cache_map = full
        if emulator is not None:
            emulator.finish()

    # -- what bench.measure_loaded calls
    def fill_cache(self, depth: int, *, seed: int = 0) -> None:
        if not 0 <= depth < self.max_seq_len:
            raise CourseError(f"depth {depth} must be below the cache's {self.max_seq_len} tokens")
        self.cache.current_seq_len = int(depth)

    def decode_step(self, token_id: int | None = None):
        ids = self.torch.tensor([[int(token_id or 0)]], dtype=self.torch.long)
        return self.model.forward(ids, self.cache).float()[0, -1]

    def forward(self, ids, *, reset: bool = True):
        if reset:
            self.cache.current_seq_len = 0
        return self.model.forward(ids, self.cache).float()

    def synchronize(self) -> None:
        self.torch.cuda.synchronize()

    def memory(self) -> dict:
        t = self.torch.cuda
        free, total = t.mem_get_info()
        out = {"device": "cuda", "torch_allocated_bytes": int(t.memory_allocated()),
               "torch_reserved_bytes": int(t.memory_reserved()), "device_used_bytes": int(total - free)}
        if self.emulator is not None:
            out["pinned_host_bytes"] = self.emulator.host_bytes()
        return out

    def weight_bytes(self) -> int:
        """GPU weights (VRAM or mapped host memory): every module but the CPU-side embedding."""
        return sum(n["weight_bytes"] for n in self.needs if not n["on_cpu"])

    def cache_bytes(self) -> int:
        from helpers.engines.backend import exllamav2_cache_bytes

        return exllamav2_cache_bytes(self.cache)

    def unload(self) -> None:
        try:
            if self.model is not None:
                self.model.unload()
        finally:
            self.model = self.cache = None
            gc.collect()


# ----------------------------------------------------------------------------------------------- measurements
def context_bytes_now(nvml_before: int | None) -> int:
    """VRAM this process took for CUDA itself: used now (after a first allocation) minus NVML's reading taken
    before CUDA started (0 when NVML was not there to read)."""
    import torch

    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return max(0, int(total - free) - int(nvml_before)) if nvml_before is not None else 0


def measure_host_read_bandwidth(emu: VramEmulator, *, nbytes: int = GIB, repeats: int = 5) -> float:
    """bytes/s a GPU kernel reads from the emulator's mapped host memory (a sum over a buffer allocated there)."""
    import torch

    with emu.host():
        buf = torch.ones(int(nbytes) // 2, dtype=torch.float16, device="cuda")
    try:
        from helpers.core.devices import timed_reads

        return buf.numel() * 2 / statistics.median(timed_reads(buf, repeats))
    finally:
        del buf


def budget_for(card_gib: float, reserve_gib: float, context_bytes: int = 0) -> int:
    """The emulated VRAM the loads may take: the card less the OS reserve less what CUDA itself took."""
    b = int(card_gib * GIB) - int(reserve_gib * GIB) - int(context_bytes)
    if b <= 0:
        raise CourseError(f"a {card_gib} GiB card less a {reserve_gib} GiB reserve and {context_bytes / GIB:.2f} GiB "
                          "of CUDA context leaves nothing for the model; use a larger --card-gib")
    return b


def _flatten(rows: list[dict], run: str) -> list[float]:
    return [v for r in rows if r["run"] == run for v in r["decode_tok_s_all"]]


def compare(model_dir, *, ctx: int, cache_mode: str = "fp16", depth: int = 128, card_gib: float = CARD_GIB,
            reserve_gib: float = RESERVE_GIB, context_bytes: int = 0, rounds: int = 4, repeats: int = 3,
            warmup: int = 1, decode_tokens: int = 64, lib: HostAllocLib | None = None,
            progress: bool = True, load_path: str = "autosplit") -> dict:
    """One cache length: the model loaded on the emulated card and natively, decoded in alternating rounds, and the
    spill model's prediction of the slowdown from this GPU's measured bandwidths and a native run's overhead."""

    from helpers.speed import bench
    from helpers.fallback import spill as fallback
    from helpers.core.progress import progress as bar

    lib = lib or HostAllocLib(build_hostalloc())
    budget = budget_for(card_gib, reserve_gib, context_bytes)
    vram_bw = bench.measure_bandwidth("cuda")
    measurements: list[dict] = []
    with VramEmulator(budget, lib) as emu:
        emulated = emu.own(Exl2Model(model_dir, max_seq_len=ctx, cache_mode=cache_mode, emulator=emu,
                                     load_path=load_path))
        decisions, placement = emu.rows(), emu.placement()
        host_bytes_loaded = emu.host_bytes()
        pcie_bw = measure_host_read_bandwidth(emu)
        native = emu.own(Exl2Model(model_dir, max_seq_len=ctx, cache_mode=cache_mode, load_path=load_path))
        jobs = [(r, name) for r in range(rounds)
                for name in (("native", "emulated") if r % 2 == 0 else ("emulated", "native"))]
        for r, name in (bar(jobs, desc=f"cache {ctx}: native/emulated rounds", unit="run") if progress else jobs):
            b = native if name == "native" else emulated
            row = bench.measure_loaded(b, depth, repeats=repeats, warmup=warmup, decode_tokens=decode_tokens,
                                       prefill_tokens=0, profile_steps=0, bandwidth_bytes_s=vram_bw, progress=False)
            keep = {k: row[k] for k in ("decode_tok_s", "decode_tok_s_all", "decode_spread", "bytes_per_token",
                                        "roofline_tok_s", "step_ms") if k in row}
            measurements.append({"ctx": ctx, "run": name, "round": r, **keep})
        pinned_peak = lib.peak_bytes()
    pinned_left = emu.leftover_bytes            # still pinned after cleanup, before any forced free (target 0)
    pinned_outstanding = lib.outstanding_bytes()
    native_all, emu_all = _flatten(measurements, "native"), _flatten(measurements, "emulated")
    nat, emt = statistics.median(native_all), statistics.median(emu_all)
    # the spill model for this GPU: measured bandwidths; overhead from the native run (it spills nothing)
    all_vram = [{**p, "where": "vram" if p["where"] == "sysmem" else p["where"]} for p in placement]
    vram_b, _ = fallback.read_bytes(all_vram, depth, ctx)
    overhead, note = fallback.overhead_from_run(nat, vram_b, vram_bw)
    kw = dict(depth=depth, max_seq_len=ctx, cache_mode=cache_mode, overhead_s_per_token=overhead,
              vram_bandwidth=vram_bw, pcie_bandwidth=pcie_bw, budget_bytes=budget)
    pred_nat = fallback.evaluate(all_vram, **kw)
    pred_emu = fallback.evaluate(placement, **kw)
    # the same model placing the modules itself (first fit from the VRAM taken before the first GPU module)
    fixed = next((d["used_before_bytes"] for d in decisions if d["where"] != "cpu"), 0)
    walk = fallback.evaluate(fallback.place(placement, budget, fixed), fixed_bytes=fixed, **kw)
    slowdown = nat / emt                                            # measured: native tok/s over emulated tok/s
    predicted = pred_emu.seconds_per_token / pred_nat.seconds_per_token
    summary = {
        "ctx": ctx, "cache_mode": cache_mode, "depth": depth, "load_path": load_path, "card_gib": card_gib,
        "reserve_gib": reserve_gib,
        "context_bytes": int(context_bytes), "budget_bytes": budget,
        "spilled_bytes": emu_spilled(placement), "spilled_gib": emu_spilled(placement) / GIB,
        "spilled_weight_bytes": pred_emu.spilled_weight_bytes, "spilled_cache_bytes": pred_emu.spilled_cache_bytes,
        "spilled_modules": pred_emu.spilled_modules(), "pinned_host_bytes_loaded": host_bytes_loaded,
        "pinned_peak_bytes": pinned_peak, "pinned_left_bytes": pinned_left,
        "pinned_outstanding_bytes": pinned_outstanding,
        "native_tok_s": nat, "emulated_tok_s": emt, "native_tok_s_all": native_all, "emulated_tok_s_all": emu_all,
        "slowdown": slowdown, "predicted_slowdown": predicted,
        "prediction_ratio": slowdown / predicted if predicted else None,
        "predicted_slowdown_walk": walk.seconds_per_token / pred_nat.seconds_per_token,
        "walk_spilled_bytes": walk.spilled_bytes,
        "predicted_native_tok_s": pred_nat.tok_s, "predicted_emulated_tok_s": pred_emu.tok_s,
        "vram_bandwidth_gbs": vram_bw / 1e9, "pcie_read_gbs": pcie_bw / 1e9, "overhead_ms": overhead * 1e3,
        "overhead_note": note, "sysmem_read_bytes": pred_emu.sysmem_read_bytes,
        "vram_read_bytes": pred_emu.vram_read_bytes,
        "emulated_over_native": emt / nat,
        "rounds": rounds, "repeats": repeats, "decode_tokens": decode_tokens,
    }
    return {"summary": summary, "measurements": measurements, "decisions": decisions}


def cleanup_checks(model_dir, *, ctx: int, cache_mode: str = "fp16", budget_bytes: int, lib: HostAllocLib,
                   after_spilled: int = 2, load_path: str = "autosplit") -> dict:
    """Interrupt an emulated load twice, once with an error and once with KeyboardInterrupt (as Ctrl-C raises it),
    ``after_spilled`` modules after the spill began; return the pinned bytes cleanup found still held after each
    (0 is the target: everything came back without a forced free)."""
    out = {}
    for name, exc in (("error", RuntimeError), ("interrupt", KeyboardInterrupt)):
        class Injected(exc):  # noqa: N801 (a local marker type)
            pass

        def stop(i: int, n: int, emu_ref: list) -> None:
            emu = emu_ref[0]
            if sum(d.where == "sysmem" for d in emu.decisions) >= after_spilled:
                raise Injected(f"injected {name} at module {i}")

        ref: list = []
        try:
            with VramEmulator(budget_bytes, lib) as emu:
                ref.append(emu)
                emu.own(Exl2Model(model_dir, max_seq_len=ctx, cache_mode=cache_mode, emulator=emu,
                                  on_module=lambda i, n: stop(i, n, ref), load_path=load_path))
            out[f"pinned_left_after_{name}_bytes"] = None          # the spill never began: nothing to interrupt
        except Injected:
            # leftover_bytes: what cleanup found still pinned before any forced free (0 means it all came back by
            # itself); outstanding: what the allocator holds now
            out[f"pinned_left_after_{name}_bytes"] = ref[0].leftover_bytes
            out[f"pinned_outstanding_after_{name}_bytes"] = lib.outstanding_bytes()
            out[f"pinned_peak_before_{name}_bytes"] = lib.peak_bytes()
    return out


def emu_spilled(placement: list[dict]) -> int:
    return sum(p["weight_bytes"] + p["cache_bytes"] for p in placement if p["where"] == "sysmem")


def linux_oom_demo(model_dir, *, ctx: int = 32768, cache_mode: str = "fp16", card_gib: float = CARD_GIB,
                   reserve_gib: float = RESERVE_GIB, context_bytes: int = 0) -> dict:
    """The same overflow without the emulator: cap this process's VRAM to the smaller card, load, catch the error.

    ``torch.cuda.set_per_process_memory_fraction`` limits what torch's allocator may take (every exllamav2 weight
    and cache tensor is a torch tensor). The cap is lifted afterwards, whatever happens."""
    import torch

    from helpers.core import devices as gpu

    gpu.require_cuda("the Linux out-of-memory demonstration")
    total = torch.cuda.mem_get_info()[1]
    cap = budget_for(card_gib, reserve_gib, context_bytes)
    if cap >= total:
        raise CourseError(f"this GPU has {total / GIB:.1f} GiB, not more than the emulated {card_gib} GiB card: "
                          "nothing to cap; use a smaller --card-gib")
    reached: list[int] = []
    out = {"ctx": ctx, "cache_mode": cache_mode, "card_gib": card_gib, "reserve_gib": reserve_gib,
           "context_bytes": int(context_bytes), "cap_bytes": cap, "fraction": cap / total}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.set_per_process_memory_fraction(cap / total)
    model = None
    try:
        model = Exl2Model(model_dir, max_seq_len=ctx, cache_mode=cache_mode, on_module=lambda i, n: reached.append(i))
        out.update(outcome="loaded", error=None)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        text = str(exc).strip().splitlines()
        if not (isinstance(exc, torch.cuda.OutOfMemoryError) or "Insufficient VRAM" in str(exc)
                or "out of memory" in str(exc)):
            raise
        out.update(outcome="out-of-memory", error_type=type(exc).__name__, error=text[0][:300] if text else "")
        traceback.clear_frames(exc.__traceback__)
        del exc
    finally:
        peak = torch.cuda.max_memory_allocated()
        if model is not None:
            model.unload()
        model = None
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
    last = reached[-1] if reached else None
    out.update(peak_allocated_bytes=int(peak), last_module_index=last,
               allocated_after_bytes=int(torch.cuda.memory_allocated()))
    if out["outcome"] == "out-of-memory":
        out["explanation"] = (
            f"Linux has no sysmem fallback: with {cap / GIB:.2f} GiB allowed, loading ran out of VRAM at module "
            f"{last} (torch had {peak / GIB:.2f} GiB allocated at its peak). exllamav2's load_autosplit caught CUDA's "
            "out-of-memory, found no further GPU and stopped ('Insufficient VRAM for model and cache'). The same "
            "load on a Windows driver 536.40+ would not stop: it would put the rest in system RAM and run slowly.")
    else:
        out["explanation"] = f"the model and its {ctx}-token cache fit in {cap / GIB:.2f} GiB: nothing overflowed"
    return out


# ------------------------------------------------------------------------------------------------- recordings
def _model_dir(model_dir=None) -> Path:
    if model_dir is not None:
        p = Path(model_dir).expanduser()
        if not (p / "config.json").exists():
            raise CourseError(f"{p} is not a model directory (no config.json); pass an EXL2 model folder")
        return p
    from helpers.speed import bench

    return bench.synthetic_dir()   # the 14B-shaped 5.5 bpw checkpoint of the seed case, written once


def result_name(ctx: int, load_path: str, prov: dict) -> str:
    """The results/fallback/ file name of one emulated run: cache length, load path (when not autosplit), GPU."""
    tag = "" if load_path == "autosplit" else f"-{load_path}"
    return f"emulated-{ctx}{tag}-{prov.get('gpu') or 'gpu'}"


def record_compare(ctx: int, *, model_dir=None, results_dir: Path | None = None, load_path: str = "autosplit",
                   **kw) -> Path:
    """Record ``compare`` for one cache length and load path into results/fallback/ (run it in a fresh process)."""
    from helpers.core import devices as gpu
    from helpers.core import results

    nvml_before = gpu.nvml_used_bytes()          # before CUDA starts in this process
    gpu.require_cuda("recording the emulated sysmem fallback")
    ctx_bytes = context_bytes_now(nvml_before)
    lib = HostAllocLib(build_hostalloc())
    out = compare(_model_dir(model_dir), ctx=ctx, context_bytes=ctx_bytes, lib=lib, load_path=load_path, **kw)
    s = out["summary"]
    if s["spilled_bytes"]:
        s.update(cleanup_checks(_model_dir(model_dir), ctx=ctx, cache_mode=s["cache_mode"],
                                budget_bytes=s["budget_bytes"], lib=lib, load_path=load_path))
    prov = results.provenance()
    return results.save_result(TOPIC, result_name(ctx, load_path, prov), [out["summary"]], prov=prov,
                               results_dir=results_dir,
                               extra={"what": f"Qwen2.5-14B-shaped 5.5 bpw on an emulated {CARD_GIB:g} GiB card, "
                                              f"cache {ctx}, {load_path} load path, {s['depth']} tokens deep: "
                                              "native vs emulated decode, alternating rounds",
                                      "measurements": out["measurements"], "decisions": out["decisions"]})


def record_oom(*, model_dir=None, results_dir: Path | None = None, **kw) -> Path:
    from helpers.core import devices as gpu
    from helpers.core import results

    nvml_before = gpu.nvml_used_bytes()
    gpu.require_cuda("recording Linux's out-of-memory")
    ctx_bytes = context_bytes_now(nvml_before)
    row = linux_oom_demo(_model_dir(model_dir), context_bytes=ctx_bytes, **kw)
    prov = results.provenance()
    return results.save_result(TOPIC, f"linux-oom-{prov.get('gpu') or 'gpu'}", [row], prov=prov,
                               results_dir=results_dir,
                               extra={"what": "the 32k overflow without the emulator, VRAM capped to the small card"})


GPU_RECORDINGS: dict[str, Callable[[], Path]] = {
    "emulated_4k": lambda: record_compare(4096),
    "emulated_32k": lambda: record_compare(32768),
    # model.load(), then the cache: the last cache layers spill, read only as deep as the context goes
    "emulated_32k_load": lambda: record_compare(32768, load_path="load", depth=16384),
    "linux_oom": lambda: record_oom(),
}


def load_recorded(results_dir: Path | None = None) -> dict[str, list[dict]]:
    """Recorded emulator runs and out-of-memory demonstrations: {'emulated': [...], 'oom': [...]}, each row with its
    ``label`` (where and when) and, for emulated runs, its ``measurements`` and ``decisions``."""
    from helpers.core import results

    out: dict[str, list[dict]] = {"emulated": [], "oom": []}
    for doc in results.load_results(TOPIC, results_dir=results_dir):
        name = Path(doc["path"]).name
        lab = results.label(doc["provenance"])
        kind = "oom" if name.startswith("linux-oom") else "emulated" if name.startswith("emulated") else None
        if kind is None:
            continue
        for r in doc["rows"]:
            out[kind].append({**r, "label": lab, "source": name, "measurements": doc.get("measurements", []),
                              "decisions": doc.get("decisions", [])})
    for k in out:
        out[k].sort(key=lambda r: r.get("ctx", 0))
    return out


# ------------------------------------------------------------------------------------------------------- CLI
def main(argv: list[str]) -> int:
    """`python -m helpers emulate [--ctx 4096,32768] [--oom] [--record] ...` (Linux + CUDA)."""
    ap = argparse.ArgumentParser(prog="python -m helpers emulate",
                                 description="Emulate NVIDIA's Windows sysmem fallback on Linux + CUDA: load a model "
                                             "on an emulated smaller card, spill what does not fit into mapped "
                                             "system RAM, and compare decode speed with a native load.")
    ap.add_argument("--model", default=None, help="EXL2 model directory (default: the 14B-shaped 5.5 bpw checkpoint)")
    ap.add_argument("--ctx", default="4096,32768", help="cache lengths, comma-separated (4k = 4096)")
    ap.add_argument("--cache", default="fp16", choices=sorted(CACHE_CLASSES), help="cache mode")
    ap.add_argument("--depth", type=int, default=128, help="tokens already in the cache while decoding")
    ap.add_argument("--load-path", default="autosplit", choices=tuple(memory.LOAD_PATHS),
                    help="load_autosplit(cache) with a lazy cache (default), or model.load() then the cache")
    ap.add_argument("--card-gib", type=float, default=CARD_GIB, help=f"emulated card (default {CARD_GIB:g} GiB)")
    ap.add_argument("--reserve-gib", type=float, default=RESERVE_GIB, help=f"OS reserve (default {RESERVE_GIB} GiB)")
    ap.add_argument("--rounds", type=int, default=4, help="alternating native/emulated rounds")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--oom", action="store_true", help="instead: show Linux's out-of-memory for the same overflow")
    ap.add_argument("--record", action="store_true", help="save into results/fallback/ (one run per process is "
                                                          "cleaner: `python -m helpers record --only '*emulate*'`)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from helpers.speed import bench
    from helpers.core import devices as gpu

    if args.rounds < 1 or args.decode_tokens < 1 or args.depth < 0:
        raise CourseError("--rounds and --decode-tokens must be at least 1, --depth at least 0")
    ctxs = bench.parse_int_list(args.ctx, "cache length")
    nvml_before = gpu.nvml_used_bytes()
    gpu.require_cuda("`python -m helpers emulate`")
    ctx_bytes = context_bytes_now(nvml_before)
    model_dir = _model_dir(args.model)
    common = dict(card_gib=args.card_gib, reserve_gib=args.reserve_gib, context_bytes=ctx_bytes)
    if args.oom:
        out = [linux_oom_demo(model_dir, ctx=max(ctxs), cache_mode=args.cache, **common)]
        for r in out:
            print(r["explanation"] if not args.json else json.dumps(r, indent=1))
        return 0
    for c in ctxs:
        res = compare(model_dir, ctx=c, cache_mode=args.cache, depth=args.depth, rounds=args.rounds,
                      decode_tokens=args.decode_tokens, load_path=args.load_path, **common)
        s = res["summary"]
        if args.json:
            print(json.dumps(res, indent=1))
        else:
            print(format_summary(s))
        if args.record:
            from helpers.core import results

            path = results.save_result(TOPIC, result_name(c, args.load_path, results.provenance()), [s],
                                       extra={"measurements": res["measurements"], "decisions": res["decisions"]})
            print(f"recorded {path}", file=sys.stderr)
    return 0


def format_summary(s: dict) -> str:
    """Two lines about one emulated cache length."""
    spill = (f"spilled {s['spilled_gib']:.2f} GiB ({len(s['spilled_modules'])} modules)" if s["spilled_bytes"]
             else "spilled nothing")
    how = "" if s.get("load_path", "autosplit") == "autosplit" else f", {s['load_path']} path, {s['depth']} deep"
    return (f"cache {s['ctx']} ({s['cache_mode']}{how}) on an emulated {s['card_gib']:g} GiB card: {spill}; native "
            f"{s['native_tok_s']:.1f} tok/s, emulated {s['emulated_tok_s']:.1f} tok/s, slowdown "
            f"{s['slowdown']:.2f}x (spill model {s['predicted_slowdown']:.2f}x)\n"
            f"  PCIe reads {s['pcie_read_gbs']:.1f} GB/s, VRAM {s['vram_bandwidth_gbs']:.0f} GB/s, overhead "
            f"{s['overhead_ms']:.1f} ms/token; pinned memory left after the run: {s['pinned_left_bytes']} bytes")


def report_recorded(results_dir: Path | None = None) -> str:
    """The recorded emulator runs and out-of-memory demonstrations as text, each labelled with where and when it
    was measured; says so when nothing is recorded yet."""
    rec = load_recorded(results_dir)
    if not rec["emulated"] and not rec["oom"]:
        return ("not recorded yet: run `make gpu-results` on a CUDA machine (Linux), or "
                "`python -m helpers record --only '*emulate*'`")
    lines = []
    for r in rec["emulated"]:
        lines += [f"[{r['label']}]", format_summary(r)]
        if r["ctx"] <= 4096:
            lines.append(f"  emulated/native = {r['emulated_over_native']:.3f} (target: within 5%)")
        else:
            lines.append(f"  measured slowdown / predicted = {r['prediction_ratio']:.2f} (target: within 25%)")
        for what in ("error", "interrupt"):
            if r.get(f"pinned_left_after_{what}_bytes") is not None:
                lines.append(f"  pinned bytes left after an injected {what} mid-load: "
                             f"{r[f'pinned_left_after_{what}_bytes']}")
    for r in rec["oom"]:
        lines += [f"[{r['label']}]", f"Linux, no emulator, cache {r['ctx']}: {r['outcome']}"
                  + (f" ({r.get('error_type')}: {r.get('error')})" if r.get("error") else ""), "  " + r["explanation"]]
    return "\n".join(lines)
