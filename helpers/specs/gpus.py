"""GPU datasheets: memory, bandwidth and PCIe link of known cards, and ``gpu_spec`` to look one up by name or size.
"""
from __future__ import annotations

import difflib
import math
import re
from typing import Any

from helpers.core.errors import CourseError
from helpers.core.units import GIB

_NV = "NVIDIA datasheet / product page"
#: known cards: memory (GiB as marketed: GDDR/HBM capacities are binary), datasheet bandwidth, PCIe link.
#: NVML reports a total slightly below (the driver keeps some); the reserve term covers that.
GPUS: dict[str, dict] = {
    "RTX 4080 Super": {"vram_gib": 16, "bandwidth_gbs": 736, "pcie_gen": 4, "pcie_lanes": 16,
                       "_source": f"{_NV}: GeForce RTX 4080 family specs (16 GB GDDR6X, 256-bit, 23 Gbps)"},
    "RTX 4080": {"vram_gib": 16, "bandwidth_gbs": 717, "pcie_gen": 4, "pcie_lanes": 16,
                 "_source": f"{_NV}: GeForce RTX 4080 family specs (16 GB GDDR6X, 256-bit, 22.4 Gbps)"},
    "RTX 4090": {"vram_gib": 24, "bandwidth_gbs": 1008, "pcie_gen": 4, "pcie_lanes": 16,
                 "_source": f"{_NV}: GeForce RTX 4090 specs (24 GB GDDR6X, 384-bit, 21 Gbps)"},
    "RTX 4070 Ti Super": {"vram_gib": 16, "bandwidth_gbs": 672, "pcie_gen": 4, "pcie_lanes": 16,
                          "_source": f"{_NV}: GeForce RTX 4070 family specs (16 GB GDDR6X, 256-bit, 21 Gbps)"},
    "RTX 4070 Ti": {"vram_gib": 12, "bandwidth_gbs": 504, "pcie_gen": 4, "pcie_lanes": 16,
                    "_source": f"{_NV}: GeForce RTX 4070 family specs (12 GB GDDR6X, 192-bit, 21 Gbps)"},
    "RTX 4070": {"vram_gib": 12, "bandwidth_gbs": 504, "pcie_gen": 4, "pcie_lanes": 16,
                 "_source": f"{_NV}: GeForce RTX 4070 family specs (12 GB GDDR6X, 192-bit, 21 Gbps)"},
    "RTX 4060 Ti 16GB": {"vram_gib": 16, "bandwidth_gbs": 288, "pcie_gen": 4, "pcie_lanes": 8,
                         "_source": f"{_NV}: GeForce RTX 4060 family specs (16 GB GDDR6, 128-bit, 18 Gbps, "
                                    "PCIe 4.0 x8)"},
    "RTX 3090": {"vram_gib": 24, "bandwidth_gbs": 936, "pcie_gen": 4, "pcie_lanes": 16,
                 "_source": f"{_NV}: GeForce RTX 3090 specs (24 GB GDDR6X, 384-bit, 19.5 Gbps)"},
    "RTX 3090 Ti": {"vram_gib": 24, "bandwidth_gbs": 1008, "pcie_gen": 4, "pcie_lanes": 16,
                    "_source": f"{_NV}: GeForce RTX 3090 Ti specs (24 GB GDDR6X, 384-bit, 21 Gbps)"},
    "RTX 3060 12GB": {"vram_gib": 12, "bandwidth_gbs": 360, "pcie_gen": 4, "pcie_lanes": 16,
                      "_source": f"{_NV}: GeForce RTX 3060 family specs (12 GB GDDR6, 192-bit, 15 Gbps)"},
    "RTX 5090": {"vram_gib": 32, "bandwidth_gbs": 1792, "pcie_gen": 5, "pcie_lanes": 16,
                 "_source": f"{_NV}: GeForce RTX 5090 specs (32 GB GDDR7, 512-bit, 28 Gbps)"},
    "RTX 5080": {"vram_gib": 16, "bandwidth_gbs": 960, "pcie_gen": 5, "pcie_lanes": 16,
                 "_source": f"{_NV}: GeForce RTX 5080 specs (16 GB GDDR7, 256-bit, 30 Gbps)"},
    "RTX A6000": {"vram_gib": 48, "bandwidth_gbs": 768, "pcie_gen": 4, "pcie_lanes": 16,
                  "_source": f"{_NV}: NVIDIA RTX A6000 datasheet (48 GB GDDR6)"},
    "RTX 6000 Ada": {"vram_gib": 48, "bandwidth_gbs": 960, "pcie_gen": 4, "pcie_lanes": 16,
                     "_source": f"{_NV}: NVIDIA RTX 6000 Ada Generation datasheet (48 GB GDDR6)"},
    "L4": {"vram_gib": 24, "bandwidth_gbs": 300, "pcie_gen": 4, "pcie_lanes": 16,
           "_source": f"{_NV}: NVIDIA L4 datasheet (24 GB GDDR6)"},
    "L40S": {"vram_gib": 48, "bandwidth_gbs": 864, "pcie_gen": 4, "pcie_lanes": 16,
             "_source": f"{_NV}: NVIDIA L40S datasheet (48 GB GDDR6 with ECC)"},
    "A100 80GB SXM": {"vram_gib": 80, "bandwidth_gbs": 2039, "pcie_gen": 4, "pcie_lanes": 16,
                      "_source": f"{_NV}: NVIDIA A100 datasheet (80 GB HBM2e, SXM)"},
    "A100 80GB PCIe": {"vram_gib": 80, "bandwidth_gbs": 1935, "pcie_gen": 4, "pcie_lanes": 16,
                       "_source": f"{_NV}: NVIDIA A100 datasheet (80 GB HBM2e, PCIe)"},
    "H100 80GB SXM": {"vram_gib": 80, "bandwidth_gbs": 3350, "pcie_gen": 5, "pcie_lanes": 16,
                      "_source": f"{_NV}: NVIDIA H100 datasheet (H100 SXM: 80 GB HBM3, 3.35 TB/s)"},
    "H100 80GB PCIe": {"vram_gib": 80, "bandwidth_gbs": 2000, "pcie_gen": 5, "pcie_lanes": 16,
                       "_source": f"{_NV}: NVIDIA H100 datasheet (H100 PCIe/NVL: 80 GB HBM2e, 2 TB/s)"},
    "H200": {"vram_gib": 141, "bandwidth_gbs": 4800, "pcie_gen": 5, "pcie_lanes": 16,
             "_source": f"{_NV}: NVIDIA H200 datasheet (141 GB HBM3e, 4.8 TB/s)"},
}
_GPU_ALIASES = {"4080s": "RTX 4080 Super", "4070tis": "RTX 4070 Ti Super", "3060": "RTX 3060 12GB",
                "4060ti": "RTX 4060 Ti 16GB", "a100": "A100 80GB SXM", "h100": "H100 80GB SXM",
                "h100sxm": "H100 80GB SXM", "h100pcie": "H100 80GB PCIe", "a1006": "RTX A6000",
                # names the driver (NVML, torch) reports that differ from the datasheet's
                "NVIDIA H100 80GB HBM3": "H100 80GB SXM", "NVIDIA A100-SXM4-80GB": "A100 80GB SXM"}
#: PCIe usable GB/s per lane, by generation (after 128b/130b encoding): gen3 0.985, gen4 1.969, gen5 3.938
PCIE_GBS_PER_LANE = {3: 0.985, 4: 1.969, 5: 3.938}


def _gpu_key(name: str) -> str:
    k = re.sub(r"(nvidia|geforce|\s|-|_)", "", str(name).lower())
    return k.replace("super", "super").replace("gb", "gb")


def gpu_spec(name_or_gib: Any, bandwidth_gbs: float | None = None, pcie_gbs: float | None = None) -> dict:
    """A card's facts: a known name ('RTX 4080 Super', '4090', 'H100') or its memory in GiB (a number).

    Returns {'name', 'vram_gib', 'vram_bytes', 'bandwidth_gbs', 'pcie_gbs', 'pcie_gen', 'pcie_lanes', '_source'};
    bandwidths given here override the datasheet's.
    """
    if isinstance(name_or_gib, dict):
        spec = dict(name_or_gib)
        spec.setdefault("name", "custom")
    elif isinstance(name_or_gib, (int, float)) and not isinstance(name_or_gib, bool):
        v = float(name_or_gib)
        if not math.isfinite(v) or v <= 0:
            raise CourseError(f"GPU memory must be a positive number of GiB (got {name_or_gib})")
        if v > 2048:
            raise CourseError(f"{v:g} GiB of GPU memory is absurd (no single GPU has that); give it in GiB, e.g. 16")
        spec = {"name": f"{v:g} GiB GPU", "vram_gib": v, "bandwidth_gbs": None, "pcie_gen": None,
                "pcie_lanes": None, "_source": "memory size given by the user"}
    else:
        text = str(name_or_gib).strip()
        key = _gpu_key(text)
        table = {_gpu_key(n): n for n in GPUS}
        table.update({_gpu_key(a): n for a, n in _GPU_ALIASES.items()})
        hit = table.get(key) or table.get("rtx" + key) or table.get(key.replace("rtx", ""))
        if hit is None:
            number = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(gib|gb)?", text.lower())
            if number:
                return gpu_spec(float(number.group(1)), bandwidth_gbs, pcie_gbs)
            close = difflib.get_close_matches(key, list(table), n=3, cutoff=0.5)
            names = sorted({table[c] for c in close})
            hint = f" Did you mean {', '.join(repr(n) for n in names)}?" if names else ""
            raise CourseError(f"unknown GPU '{text}'.{hint} Known: {', '.join(GPUS)}; or give its memory, "
                              "e.g. --gpu-gib 16")
        spec = {"name": hit, **GPUS[hit]}
    spec["vram_bytes"] = int(round(float(spec["vram_gib"]) * GIB))
    for what, val in (("bandwidth", bandwidth_gbs), ("PCIe bandwidth", pcie_gbs)):
        if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float)) or val <= 0 or val > 1e5):
            raise CourseError(f"{what} must be a positive number of GB/s (got {val!r})")
    if bandwidth_gbs is not None:
        spec["bandwidth_gbs"] = float(bandwidth_gbs)
    if pcie_gbs is not None:
        spec["pcie_gbs"] = float(pcie_gbs)
    elif spec.get("pcie_gen") and spec.get("pcie_lanes"):
        spec["pcie_gbs"] = round(PCIE_GBS_PER_LANE[spec["pcie_gen"]] * spec["pcie_lanes"], 1)
    else:
        spec.setdefault("pcie_gbs", None)
    return spec
