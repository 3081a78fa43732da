"""Units: sizes are bytes in code and shown in GiB (2**30) with the unit; bandwidths are bytes per second.

The one place the course defines GiB and MiB and formats a byte count for a reader.
"""
from __future__ import annotations

GIB = 2**30
MIB = 2**20
GB = 10**9  #: datasheets quote bandwidth in GB/s (10**9 bytes per second)


def gib(n_bytes: float) -> float:
    """Bytes -> GiB (2**30) as a float."""
    return float(n_bytes) / GIB


def fmt_gib(n_bytes: float, digits: int = 2, *, small_in_mib: bool = False) -> str:
    """'12.34 GiB': a byte count shown in GiB with its unit.

    ``small_in_mib``: below 0.1 GiB, show five decimals and the MiB in brackets, so a small tensor does not read as
    zero ('0.00049 GiB (0.50 MiB)'); ``digits`` is then ignored for such sizes.
    """
    g = gib(n_bytes)
    if small_in_mib and g < 0.1:
        return f"{g:.5f} GiB ({n_bytes / MIB:.2f} MiB)"
    return f"{g:.{digits}f} GiB"
