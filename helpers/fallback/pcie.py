"""PCIe bandwidth: what a GPU can read from system RAM over its link, raw (the PCI-SIG rates) and in practice.

Memory that NVIDIA's Windows driver places in system RAM ("sysmem fallback") is read by the GPU over this link.
"""
from __future__ import annotations

from helpers.core.errors import CourseError

#: PCIe transfer rate per lane in GT/s and its line encoding, by generation (PCI-SIG base specifications)
PCIE_GT_S = {1: 2.5, 2: 5.0, 3: 8.0, 4: 16.0, 5: 32.0, 6: 64.0}
PCIE_ENCODING = {1: 8 / 10, 2: 8 / 10, 3: 128 / 130, 4: 128 / 130, 5: 128 / 130, 6: 242 / 256}
#: what a GPU reads over PCIe 4.0 x16 in practice: an ASSUMED ~25 GB/s of 31.5 GB/s raw (about 80%; docs/FACTS.md §5),
#: not measured here. `python -m helpers probe --fallback` and the Linux emulator measure the real figure.
PRACTICAL_PCIE_GBS_GEN4_X16 = 25.0


def pcie_raw_bandwidth(gen: int, lanes: int = 16) -> float:
    """One direction's raw PCIe bandwidth in bytes/s: lanes x GT/s x encoding / 8 (gen 4 x16: 31.5 GB/s)."""
    if gen not in PCIE_GT_S:
        raise CourseError(f"PCIe generation {gen} is unknown; use one of {sorted(PCIE_GT_S)}")
    if lanes not in (1, 2, 4, 8, 16):
        raise CourseError(f"a PCIe link has 1, 2, 4, 8 or 16 lanes, not {lanes}")
    return PCIE_GT_S[gen] * 1e9 * PCIE_ENCODING[gen] * lanes / 8


def pcie_practical_bandwidth(gen: int, lanes: int = 16) -> float:
    """What a GPU reads over the link in practice (bytes/s): the raw rate times 25/31.5, the assumed efficiency of
    ``PRACTICAL_PCIE_GBS_GEN4_X16`` (docs/FACTS.md §5)."""
    return pcie_raw_bandwidth(gen, lanes) * PRACTICAL_PCIE_GBS_GEN4_X16 * 1e9 / pcie_raw_bandwidth(4, 16)
