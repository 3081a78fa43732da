"""PCIe bandwidth: what a GPU can read from system RAM over its link, raw (the PCI-SIG rates) and in practice.

Memory that NVIDIA's Windows driver places in system RAM ("sysmem fallback") is read by the GPU over this link.
"""
from __future__ import annotations

from helpers.core.errors import CourseError

#: PCIe transfer rate per lane in GT/s and its line encoding, by generation (PCI-SIG base specifications)
PCIE_GT_S = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}
PCIE_ENCODING = {1: 8 / 10, 2: 8 / 10, 3: 128 / 130, 4: 128 / 130, 5: 128 / 130, 6: 242 / 256}
#: the share of the raw rate a GPU kernel reached reading mapped host memory (zero-copy) on the external H100 record:
#: 47.7 GB/s on PCIe 5.0 x16 (63.0 GB/s raw), results/speed/external-h100-exllamav2-0-3-2-2026-11-25.json. Applied to
#: another link it is an assumption; `python -m helpers probe --fallback` and the Linux emulator measure the real one.
MEASURED_ZERO_COPY_GBS, MEASURED_ON = 47.7, (5, 16)


def pcie_raw_bandwidth(gen: int, lanes: int = 16) -> float:
    """One direction's raw PCIe bandwidth in bytes/s: lanes x GT/s x encoding / 8 (gen 4 x16: 31.5 GB/s)."""
    if gen not in PCIE_GT_S:
        raise CourseError(f"PCIe generation {gen} is unknown; use one of {sorted(PCIE_GT_S)}")
    if lanes not in (1, 2, 4, 8, 16):
        raise CourseError(f"a PCIe link has 1, 2, 4, 8 or 16 lanes, not {lanes}")
    return PCIE_GT_S[gen] * 1e9 * PCIE_ENCODING[gen] * lanes / 8


def pcie_practical_bandwidth(gen: int, lanes: int = 16) -> float:
    """What a GPU reads over the link in practice (bytes/s): the raw rate times the share measured on the external
    H100 record (47.7 of 63.0 GB/s, 76%): 23.9 GB/s on PCIe 4.0 x16, against 31.5 raw by the standard."""
    share = MEASURED_ZERO_COPY_GBS * 1e9 / pcie_raw_bandwidth(*MEASURED_ON)
    return pcie_raw_bandwidth(gen, lanes) * share
