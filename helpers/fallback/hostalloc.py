"""The emulator's host-memory allocator (``helpers/fallback/hostalloc.c``): ``cudaHostAlloc(..., cudaHostAllocMapped)``
and ``cudaHostGetDevicePointer``, so that a GPU kernel reads the bytes over PCIe, with its own count of what it holds.

It is compiled on first use, only on a CUDA machine, into the course's cache folder: with a C compiler
(``cc``/``gcc``) against the libcudart torch already loaded, or with ``nvcc -shared -cudart shared``
(``build_hostalloc``); ``HostAllocLib`` is the compiled library seen through ctypes.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from helpers.core import devices as gpu
from helpers.core.errors import CourseError
from helpers.core.paths import cache_dir

SOURCE = Path(__file__).with_name("hostalloc.c")
#: the allocate and free functions a ``torch.cuda.memory.CUDAPluggableAllocator`` calls
ALLOC_FN, FREE_FN = "hostalloc_alloc", "hostalloc_free"


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
