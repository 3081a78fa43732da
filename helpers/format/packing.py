"""How EXL2 packs one quantized linear into tensors, bit for bit (byte-exact with exllamav2 0.3.2).

The layout (``q_invperm``, ``q_groups``, ``q_weight``, ``q_scale``, ``q_scale_max``, column padding, bias) and the
dequantization, with the exllamav2 sources they were read from, are in docs/FACTS.md §3; they were checked against
checkpoints made by exllamav2's own converter. Nothing in helpers.format imports exllamav2 (the GPU check against it
is helpers.recordings.format_check).

Public names: ``pack_columns`` / ``unpack_columns`` (q_weight's bit streams), ``pack_scales`` / ``unpack_scales``,
``scale_values``, ``groups_from_q_groups``, ``q_groups_tensor``, ``pack_linear``, ``few_threads``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from helpers.core.errors import CourseError
from helpers.format.bits import BIT_WIDTHS, check_bits, packed_rows


@contextlib.contextmanager
def few_threads(numel: int) -> Iterator[None]:
    """One torch thread for small matrices: on a busy machine, waking a thread pool for tensors this small costs
    ten times the work itself (measured on the course's 2-core box). Large matrices keep every thread."""
    before = torch.get_num_threads()
    if numel < 2**22 and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 values -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_columns(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (rows, N) of ``bits`` bits into int32 words (ceil(rows*bits/32), N), column-wise.

    Each column is a little-endian bit stream: value ``i`` starts at bit ``i*bits``. This is exllamav2's
    ``pack_columns`` layout; the GPU reorders ("shuffles") the words at load time, the file does not.
    """
    bits = check_bits(bits)
    rows, n = codes.shape
    q = packed_rows(rows, bits)
    v = codes.to(torch.int64)
    start = torch.arange(rows, dtype=torch.int64) * bits
    word, shift = start // 32, (start % 32)[:, None]
    out = torch.zeros((q + 1, n), dtype=torch.int64)
    out.index_add_(0, word, (v << shift) & 0xFFFFFFFF)
    out.index_add_(0, word + 1, v >> (32 - shift))  # the part that spills into the next word (0 when none)
    return _to_int32(out[:q])


def unpack_columns(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_columns`: int32 (packed_rows, N) -> codes uint8 (rows, N)."""
    bits = check_bits(bits)
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros((1, w.shape[1]), dtype=torch.int64)])
    start = torch.arange(rows, dtype=torch.int64) * bits
    word, shift = start // 32, (start % 32)[:, None]
    lo = w[word] >> shift
    hi = w[word + 1] << (32 - shift)
    return ((lo | hi) & ((1 << bits) - 1)).to(torch.uint8)


def pack_scales(codes: torch.Tensor) -> torch.Tensor:
    """4-bit scale codes (G, N), N a multiple of 8, -> int32 (G, N/8), low nibble first (exllamav2 pack_rows_4)."""
    g, n = codes.shape
    if n % 8:
        raise CourseError(f"scale codes need a multiple of 8 columns, got {n}")
    v = codes.to(torch.int64).reshape(g, n // 8, 8) & 0xF
    shifts = torch.arange(8, dtype=torch.int64) * 4
    return _to_int32((v << shifts).sum(-1))


def unpack_scales(words: torch.Tensor) -> torch.Tensor:
    """int32 (G, N/8) -> 4-bit scale codes uint8 (G, N)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(8, dtype=torch.int64) * 4
    return ((w[:, :, None] >> shifts) & 0xF).reshape(w.shape[0], -1).to(torch.uint8)


def scale_values(scale_codes: torch.Tensor, scale_max: torch.Tensor) -> torch.Tensor:
    """Effective scales (G, N) = (code + 1)^2 * q_scale_max / 256, rounded as exllamav2 rounds them.

    exllamav2 multiplies the fp16 ``q_scale_max`` by 1/256 in fp16 when it loads a matrix (ext.py
    ``make_q_matrix``) and forms ``(code + 1)^2 * that`` in fp16 (qdq_util.cuh ``dq_scale``); its converter picks
    the codes against the very same fp16 products (adaptivegptq.py ``find_params``). Small scales become fp16
    subnormals there and lose precision (up to ~1% of the largest weight for 8-bit groups), so the reader rounds the
    same way: the format means what the kernels compute. Returned as float32.
    """
    smax = scale_max.to(torch.float16) * torch.tensor(1 / 256, dtype=torch.float16)
    c = scale_codes.to(torch.int32) + 1
    return ((c * c).to(torch.float16) * smax[:, None]).to(torch.float32)


def groups_from_q_groups(q_groups: Sequence[int], in_features: int, n_packed_rows: int, where: str = "") \
        -> list[tuple[int, int, int]]:
    """Decode ``q_groups`` into [(bits, n_rows, first_packed_row)], checking it against K and q_weight's rows."""
    vals = [int(x) for x in q_groups]
    if len(vals) < 2 or len(vals) % 2:
        raise CourseError(f"{where}q_groups has {len(vals)} entries; it must hold (bits, row) pairs")
    out = []
    row = 0
    n = len(vals) // 2
    for i in range(n):
        bits, start = vals[2 * i], vals[2 * i + 1]
        check_bits(bits, f" in {where}q_groups")
        end = vals[2 * i + 3] if i < n - 1 else n_packed_rows
        if end <= start:
            raise CourseError(f"{where}q_groups is corrupt: group {i} starts at packed row {start}, next at {end}")
        if i < n - 1:
            if ((end - start) * 32) % bits:
                raise CourseError(f"{where}q_groups is corrupt: group {i} has a fractional number of rows")
            rows = (end - start) * 32 // bits
        else:
            rows = in_features - row
            if rows <= 0 or packed_rows(rows, bits) != end - start:
                raise CourseError(f"{where}q_weight has {n_packed_rows} packed rows, which does not match "
                                  f"q_groups and in_features={in_features} (wrong shape or corrupt file)")
        out.append((bits, rows, start))
        row += rows
    order = [BIT_WIDTHS.index(b) for b, _, _ in out]
    if order != sorted(order):
        raise CourseError(f"{where}q_groups is not ordered by bits 8, 6, 5, 4, 3, 2 as exllamav2 requires")
    return out


def q_groups_tensor(groups: Sequence[tuple[int, int]]) -> torch.Tensor:
    """[(bits, rows)] -> the int16 ``q_groups`` tensor (bits, first packed row) exllamav2 stores."""
    vals, start = [], 0
    for bits, rows in groups:
        vals += [check_bits(bits), start]
        start += packed_rows(rows, bits)
    return torch.tensor(vals, dtype=torch.int16)


def pack_linear(codes: torch.Tensor, scale_codes: torch.Tensor, scale_max: torch.Tensor,
                groups: Sequence[tuple[int, int]], invperm: torch.Tensor, bias: torch.Tensor | None = None) \
        -> dict[str, torch.Tensor]:
    """Assemble one EXL2 linear from its decoded parts (all in stored, i.e. permuted, row order).

    codes: (K, Npad) weight codes; scale_codes: (G, Npad) 4-bit codes; scale_max: (G,) fp16; groups: [(bits, rows)];
    invperm: (K,) int. Returns the tensors exllamav2 reads (q_weight, q_scale, q_scale_max, q_groups, q_invperm
    [, bias]).
    """
    k = codes.shape[0]
    if sum(r for _, r in groups) != k:
        raise CourseError(f"group rows sum to {sum(r for _, r in groups)}, but the weight has {k} rows")
    parts, row = [], 0
    for bits, rows in groups:
        parts.append(pack_columns(codes[row:row + rows], bits))
        row += rows
    out = {
        "q_weight": torch.cat(parts).contiguous(),
        "q_scale": pack_scales(scale_codes).contiguous(),
        "q_scale_max": scale_max.to(torch.float16).contiguous(),
        "q_groups": q_groups_tensor(groups),
        "q_invperm": invperm.to(torch.int32).contiguous(),
    }
    if bias is not None:
        out["bias"] = bias.to(torch.float16).contiguous()
    return out
