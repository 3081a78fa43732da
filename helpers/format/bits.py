"""Bit widths and bit mixes: how many input rows of a linear get each width, and what that costs in stored bits.

Torch-free (the memory planner uses it). EXL2 stores input rows in groups of one ``BIT_WIDTHS`` width each, widest
first, for the act-order rows with most weight energy. ``HEAD_MIXES``: exllamav2's head options. Bit mixes::

  int b                      every row at b bits, groups of ``group_size`` rows
  float t                    a target bits per weight: two neighbouring widths, mixed so the stored bits per weight
                             (see helpers.format.reader) come as close to t as whole groups allow
  "0.1:6b_32g/0.9:5b_32g"    exllamav2's own notation (``QParams.get_desc``): fraction:bits b_group g
  [(0.1, 6, 32), (0.9, 5)]   (fraction of rows, bits[, group size])
"""
from __future__ import annotations

import math
import re
from typing import Any, Sequence

from helpers.core.errors import CourseError

#: the average bits per weight an EXL2 quant can target: exllamav2's converter (conversion/convert_exl2.py) warns
#: "target bitrate ... will likely not be attainable" outside 2 to 8. The one range every helper checks a bpw against.
BPW_RANGE = (2.0, 8.0)


def check_bpw(bpw: Any) -> float:
    """A bpw as a float inside ``BPW_RANGE``, or a one-line CourseError."""
    lo, hi = BPW_RANGE
    if isinstance(bpw, bool) or not isinstance(bpw, (int, float)) or bpw != bpw or bpw in (float("inf"), -float("inf")):
        raise CourseError(f"bits per weight must be a number (got {bpw!r}), e.g. --bpw 5.5")
    if bpw <= 0:
        raise CourseError(f"bits per weight must be positive (got {bpw:g}); EXL2 quants are made at {lo:.1f} to "
                          f"{hi:.1f} bpw")
    if not lo <= bpw <= hi:
        raise CourseError(f"bpw {bpw:g} is out of range: exllamav2's converter makes EXL2 quants of "
                          f"{lo:.1f} to {hi:.1f} bits per weight")
    return float(bpw)


BIT_WIDTHS = (8, 6, 5, 4, 3, 2)  #: the widths EXL2 kernels support, in the order groups are stored
#: exllamav2's head options (conversion/qparams.py, ``qparams_headoptions``): head_bits -> mix
#: [(fraction of rows, bits, group size)], widest first
HEAD_MIXES: dict[int, list[tuple[float, int, int]]] = {
    2: [(0.3, 4, 32), (0.7, 2, 32)],
    3: [(0.15, 4, 32), (0.85, 3, 32)],
    4: [(0.15, 6, 32), (0.85, 4, 32)],
    5: [(0.15, 6, 128), (0.85, 5, 128)],
    6: [(0.15, 8, 128), (0.85, 6, 128)],
    8: [(1.0, 8, 128)],
}


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_bits(bits: int, where: str = "") -> int:
    """``bits`` as an int if EXL2 supports that width, else a CourseError naming the supported ones."""
    if int(bits) not in BIT_WIDTHS:
        raise CourseError(f"unsupported bit width {bits}{where}: EXL2 supports {', '.join(map(str, BIT_WIDTHS))}")
    return int(bits)


def packed_rows(rows: int, bits: int) -> int:
    """Packed int32 rows that ``rows`` values of ``bits`` bits take (rounded up)."""
    return ceil_div(rows * bits, 32)


def parse_mix(spec: Any, group_size: int = 32) -> list[tuple[float, int, int]]:
    """A mix spec (string or list) -> [(fraction, bits, group_size)], widest first."""
    if isinstance(spec, str):
        items = []
        for part in spec.split(" ")[0].split("/"):
            m = re.fullmatch(r"\s*([0-9.]+):(\d+)b(?:_(\d+)g)?\s*", part)
            if not m:
                raise CourseError(f"cannot read the bit mix '{spec}': write it like '0.1:6b_32g/0.9:5b_32g'")
            items.append((float(m.group(1)), int(m.group(2)), int(m.group(3) or group_size)))
    elif isinstance(spec, (int,)) and not isinstance(spec, bool):
        items = [(1.0, int(spec), group_size)]
    elif isinstance(spec, (list, tuple)):
        items = []
        for it in spec:
            if not isinstance(it, (list, tuple)) or len(it) not in (2, 3):
                raise CourseError(f"cannot read the bit mix {spec!r}: use [(fraction, bits, group_size), ...]")
            items.append((float(it[0]), int(it[1]), int(it[2]) if len(it) == 3 else group_size))
    else:
        raise CourseError(f"cannot read the bit mix {spec!r}: use bits (int), a target bpw (float), "
                          "'0.1:6b_32g/0.9:5b_32g' or [(fraction, bits, group_size), ...]")
    for frac, bits, gs in items:
        check_bits(bits, f" in the bit mix {spec!r}")
        if frac <= 0 or gs <= 0 or gs % 32:
            raise CourseError(f"bad bit mix {spec!r}: fractions must be > 0 and group sizes multiples of 32 "
                              "(exllamav2's kernels step through rows 32 at a time)")
    if abs(sum(f for f, _, _ in items) - 1) > 1e-3:
        raise CourseError(f"the fractions of the bit mix {spec!r} add up to {sum(f for f, _, _ in items):.3f}, not 1")
    return sorted(items, key=lambda it: BIT_WIDTHS.index(it[1]))


def plan_groups(in_features: int, mix: Sequence[tuple[float, int, int]]) -> list[tuple[int, int]]:
    """Split K input rows into groups [(bits, rows)] for a mix, like exllamav2's converter: each width takes
    ceil(fraction * K / group_size) whole groups while rows remain; the last group takes what is left."""
    k = in_features
    if k % 32:
        raise CourseError(f"in_features={k} is not a multiple of 32, which exllamav2's EXL2 kernels require")
    groups: list[tuple[int, int]] = []
    remaining = k
    for frac, bits, gs in mix:
        n = math.ceil(min(k * frac, remaining) / gs - 1e-9) if remaining > 0 else 0
        for _ in range(n):
            if remaining <= 0:
                break
            rows = min(gs, remaining)
            groups.append((bits, rows))
            remaining -= rows
    while remaining > 0:  # fractions that round down leave rows: the narrowest width takes them
        bits, gs = mix[-1][1], mix[-1][2]
        rows = min(gs, remaining)
        groups.append((bits, rows))
        remaining -= rows
    return groups


def stored_bits(in_features: int, out_features: int, groups: Sequence[tuple[int, int]]) -> int:
    """Bits the file stores for a linear with these groups (q_weight with padded columns, q_scale, q_scale_max,
    q_groups, q_invperm): the numerator of bits per weight."""
    npad = out_features + (-out_features % 32)
    g = len(groups)
    qrows = sum(packed_rows(r, b) for b, r in groups)
    return 32 * qrows * npad + 4 * g * npad + 16 * g + 32 * g + 32 * in_features


def auto_mix(in_features: int, out_features: int, target_bpw: float, group_size: int = 32) \
        -> list[tuple[int, int]]:
    """Groups [(bits, rows)] of two neighbouring widths whose stored bits per weight come closest to the target
    (the wider width first, in whole groups of ``group_size`` rows; the last group may be shorter)."""
    if not 2.0 <= target_bpw <= 9.0:
        raise CourseError(f"target of {target_bpw} bits per weight is out of range: EXL2 stores 2 to 8 bits "
                          "per weight (plus ~0.1-0.2 for scales)")
    k, n = in_features, out_features
    if k % 32:
        raise CourseError(f"in_features={k} is not a multiple of 32, which exllamav2's EXL2 kernels require")
    if group_size % 32:
        raise CourseError(f"group size {group_size} is not a multiple of 32")
    n_groups = ceil_div(k, group_size)
    npad = n + (-n % 32)
    # everything but q_weight is the same for any choice of widths (same number of groups)
    fixed = 4 * n_groups * npad + 48 * n_groups + 32 * k

    def groups_for(hi: int, lo: int, n_hi: int) -> list[tuple[int, int]]:
        sizes = [group_size] * (n_groups - 1) + [k - group_size * (n_groups - 1)]
        return [(hi if i < n_hi else lo, r) for i, r in enumerate(sizes)]

    def bpw(hi: int, lo: int, n_hi: int) -> float:
        rows_hi = min(k, n_hi * group_size)
        return ((rows_hi * hi + (k - rows_hi) * lo) * npad + fixed) / (k * n)

    widths = sorted(BIT_WIDTHS)
    if target_bpw <= bpw(2, 2, 0):
        return groups_for(2, 2, 0)
    for lo, hi in zip(widths, widths[1:]):
        if target_bpw <= bpw(hi, lo, n_groups):
            best = min(range(n_groups + 1), key=lambda m: abs(bpw(hi, lo, m) - target_bpw))
            return groups_for(hi, lo, best) if best < n_groups else groups_for(hi, hi, n_groups)
    return groups_for(8, 8, n_groups)


def resolve_groups(spec: Any, in_features: int, out_features: int, group_size: int = 32) -> list[tuple[int, int]]:
    """Any accepted bit spec -> groups [(bits, rows)] for one linear."""
    if isinstance(spec, float):
        return auto_mix(in_features, out_features, spec, group_size)
    return plan_groups(in_features, parse_mix(spec, group_size))
