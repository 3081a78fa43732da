"""Reading a safetensors file's header without torch: which tensors a file holds, their dtype, shape and offset.

A safetensors file starts with an 8-byte little-endian header length, then that many bytes of JSON mapping each
tensor name to ``{"dtype", "shape", "data_offsets"}``; the tensor data follows. Reading the header alone tells the
size of every tensor without loading any of them. The one torch-free header reader of the course.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from helpers.core.errors import CourseError
from helpers.core.units import MIB

#: bytes per element of each safetensors dtype
ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                  "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}

#: a header longer than this is taken as a corrupt file rather than read into memory
MAX_HEADER_BYTES = 256 * MIB


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, as its header describes it."""
    dtype: str
    shape: tuple
    file: str
    begin: int  # absolute file offset of the data

    @property
    def numel(self) -> int:
        return math.prod(self.shape) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * ST_DTYPE_BYTES.get(self.dtype, 4)


def read_header(path: Path) -> tuple[dict, int]:
    """``(header dict, absolute offset where the tensor data starts)``; CourseError if the file is not readable."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("file too short")
            n = struct.unpack("<Q", raw)[0]
            if n <= 0 or n > MAX_HEADER_BYTES:
                raise ValueError(f"header length {n}")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        raise CourseError(f"{path} is not a readable safetensors file ({exc}); re-download or rebuild it") from None
    return header, 8 + n


def exl2_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of every ``*.safetensors`` file in ``folder`` (files in name order), by tensor name."""
    out: dict[str, TensorInfo] = {}
    files = sorted(Path(folder).glob("*.safetensors"))
    for f in files:
        header, base = read_header(f)
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            out[name] = TensorInfo(str(meta["dtype"]), tuple(int(s) for s in meta["shape"]), str(f),
                                   base + int(meta["data_offsets"][0]))
    return out


def read_i16(info: TensorInfo) -> list[int]:
    """The values of a small int16 tensor (such as ``q_groups``), read straight from its file."""
    with open(info.file, "rb") as fh:
        fh.seek(info.begin)
        raw = fh.read(info.nbytes)
    return list(struct.unpack(f"<{info.numel}h", raw))
