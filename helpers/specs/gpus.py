"""GPU datasheets: memory, bandwidth and PCIe link of known cards, and ``gpu_spec`` to look one up by name or size.
"""
from __future__ import annotations

import difflib
import math
import re
from typing import Any

from helpers.core.errors import CourseError
from helpers.core.units import GIB

_GEFORCE = "https://www.nvidia.com/en-us/geforce/graphics-cards/"
_DC = "https://www.nvidia.com/en-us/data-center/"
_WS = "https://www.nvidia.com/en-us/design-visualization/"


def _card(gib: float, gbs: float, gen: int, lanes: int, source: str, checked: str = "",
          host: str = "desktop") -> dict:
    return {"vram_gib": gib, "bandwidth_gbs": gbs, "pcie_gen": gen, "pcie_lanes": lanes, "host": host,
            "_source": source,
            "_checked": checked or "not cross-checked: the figure as the NVIDIA page in _source gives it; verify "
                                   "there"}


#: known cards: memory (GiB as marketed: GDDR/HBM capacities are binary), datasheet bandwidth (GB/s = 10**9 B/s), PCIe
#: link, and the host it usually sits in (``host``: data-centre cards in servers, whose host time per layer the speed
#: model fits apart). ``_source``: NVIDIA's product page or datasheet with the figures it gives; ``_checked``: where the
#: figure was cross-checked (a public review or listing), or that it was not. NVML reports a total slightly below the
#: marketed memory (the driver keeps some); the planner's reserve term covers that.
GPUS: dict[str, dict] = {
    # --- GeForce RTX 20 (Turing, PCIe 3.0)
    "RTX 2060": _card(6, 336, 3, 16, f"{_GEFORCE}rtx-2060/ (6 GB GDDR6, 192-bit, 14 Gbps)"),
    "RTX 2060 12GB": _card(12, 336, 3, 16, f"{_GEFORCE}rtx-2060/ (12 GB GDDR6, 192-bit, 14 Gbps)"),
    "RTX 2070": _card(8, 448, 3, 16, f"{_GEFORCE}rtx-2070/ (8 GB GDDR6, 256-bit, 14 Gbps)"),
    "RTX 2080": _card(8, 448, 3, 16, f"{_GEFORCE}rtx-2080/ (8 GB GDDR6, 256-bit, 14 Gbps)",
                      "windowscentral.com 'Leaked NVIDIA GeForce RTX 2080 series specs' (8GB 256-bit, 448 GB/s)"),
    "RTX 2080 Ti": _card(11, 616, 3, 16, f"{_GEFORCE}rtx-2080-ti/ (11 GB GDDR6, 352-bit, 14 Gbps)",
                         "newyorkmetropolitan.com RTX 2080 Ti review spec table (11GB GDDR6, 352-bit, 616GB/s)"),
    # --- GeForce RTX 30 (Ampere)
    "RTX 3060 8GB": _card(8, 240, 4, 16, f"{_GEFORCE}30-series/rtx-3060-3060ti/ (8 GB GDDR6, 128-bit, 15 Gbps)"),
    "RTX 3060 12GB": _card(12, 360, 4, 16, f"{_GEFORCE}30-series/rtx-3060-3060ti/ (12 GB GDDR6, 192-bit, 15 Gbps)"),
    "RTX 3060 Ti": _card(8, 448, 4, 16, f"{_GEFORCE}30-series/rtx-3060-3060ti/ (8 GB GDDR6, 256-bit, 14 Gbps; the "
                                         "later GDDR6X version: 608 GB/s)"),
    "RTX 3070": _card(8, 448, 4, 16, f"{_GEFORCE}30-series/rtx-3070-3070ti/ (8 GB GDDR6, 256-bit, 14 Gbps)",
                      "tomshardware.com RTX 3080 Ti article's spec table (RTX 3070: 8GB GDDR6, 256-bit, 448 GBps)"),
    "RTX 3070 Ti": _card(8, 608, 4, 16, f"{_GEFORCE}30-series/rtx-3070-3070ti/ (8 GB GDDR6X, 256-bit, 19 Gbps)"),
    "RTX 3080": _card(10, 760, 4, 16, f"{_GEFORCE}30-series/rtx-3080-3080ti/ (10 GB GDDR6X, 320-bit, 19 Gbps)",
                      "tweaktown.com 'NVIDIA GeForce RTX 3080 specs' (10GB GDDR6X, 320-bit, 760GB/s)"),
    "RTX 3080 12GB": _card(12, 912, 4, 16, f"{_GEFORCE}30-series/rtx-3080-3080ti/ (12 GB GDDR6X, 384-bit, 19 Gbps)",
                           "droix.net gives 912 GB/s, atizone.it 936 GB/s (19.5 Gbps): secondary sources disagree"),
    "RTX 3080 Ti": _card(12, 912, 4, 16, f"{_GEFORCE}30-series/rtx-3080-3080ti/ (12 GB GDDR6X, 384-bit, 19 Gbps)"),
    "RTX 3090": _card(24, 936, 4, 16, f"{_GEFORCE}30-series/rtx-3090-3090ti/ (24 GB GDDR6X, 384-bit, 19.5 Gbps)",
                      "tomshardware.com RTX 3080 Ti article's spec table (RTX 3090: 24GB, 384-bit, 936 GBps)"),
    "RTX 3090 Ti": _card(24, 1008, 4, 16, f"{_GEFORCE}30-series/rtx-3090-3090ti/ (24 GB GDDR6X, 384-bit, 21 Gbps)"),
    # --- GeForce RTX 40 (Ada)
    "RTX 4060": _card(8, 272, 4, 8, f"{_GEFORCE}40-series/rtx-4060-4060ti/ (8 GB GDDR6, 128-bit, 17 Gbps, PCIe 4.0 "
                                     "x8)"),
    "RTX 4060 Ti 8GB": _card(8, 288, 4, 8, f"{_GEFORCE}40-series/rtx-4060-4060ti/ (8 GB GDDR6, 128-bit, 18 Gbps, "
                                           "PCIe 4.0 x8)"),
    "RTX 4060 Ti 16GB": _card(16, 288, 4, 8, f"{_GEFORCE}40-series/rtx-4060-4060ti/ (16 GB GDDR6, 128-bit, 18 Gbps, "
                                             "PCIe 4.0 x8)"),
    "RTX 4070": _card(12, 504, 4, 16, f"{_GEFORCE}40-series/rtx-4070-family/ (12 GB GDDR6X, 192-bit, 21 Gbps)",
                      "thefpsreview.com 'NVIDIA GeForce RTX 4070 GPU family specifications' (504 GB/s)"),
    "RTX 4070 Super": _card(12, 504, 4, 16, f"{_GEFORCE}40-series/rtx-4070-family/ (12 GB GDDR6X, 192-bit, 21 Gbps)"),
    "RTX 4070 Ti": _card(12, 504, 4, 16, f"{_GEFORCE}40-series/rtx-4070-family/ (12 GB GDDR6X, 192-bit, 21 Gbps)"),
    "RTX 4070 Ti Super": _card(16, 672, 4, 16, f"{_GEFORCE}40-series/rtx-4070-family/ (16 GB GDDR6X, 256-bit, "
                                               "21 Gbps)"),
    "RTX 4080": _card(16, 717, 4, 16, f"{_GEFORCE}40-series/rtx-4080-family/ (16 GB GDDR6X, 256-bit, 22.4 Gbps)"),
    "RTX 4080 Super": _card(16, 736, 4, 16, f"{_GEFORCE}40-series/rtx-4080-family/ (16 GB GDDR6X, 256-bit, 23 Gbps)",
                            "docs/FACTS.md (the course's seed case)"),
    "RTX 4090": _card(24, 1008, 4, 16, f"{_GEFORCE}40-series/rtx-4090/ (24 GB GDDR6X, 384-bit, 21 Gbps)"),
    # --- GeForce RTX 50 (Blackwell, PCIe 5.0)
    "RTX 5070 Ti": _card(16, 896, 5, 16, f"{_GEFORCE}50-series/rtx-5070-family/ (16 GB GDDR7, 256-bit, 28 Gbps)"),
    "RTX 5080": _card(16, 960, 5, 16, f"{_GEFORCE}50-series/rtx-5080/ (16 GB GDDR7, 256-bit, 30 Gbps)"),
    "RTX 5090": _card(32, 1792, 5, 16, f"{_GEFORCE}50-series/rtx-5090/ (32 GB GDDR7, 512-bit, 28 Gbps)"),
    # --- workstation (RTX A / Ada)
    "RTX A4000": _card(16, 448, 4, 16, f"{_WS}rtx-a4000/ datasheet (16 GB GDDR6 with ECC, 256-bit, 448 GB/s)",
                       "ecer.com listing reproducing the datasheet (16GB GDDR6, 256-bit, 448 GB/s, PCIe 4.0 x16)"),
    "RTX A5000": _card(24, 768, 4, 16, f"{_WS}rtx-a5000/ datasheet (24 GB GDDR6 with ECC, 384-bit, 768 GB/s)"),
    "RTX A6000": _card(48, 768, 4, 16, f"{_WS}rtx-a6000/ datasheet (48 GB GDDR6 with ECC, 384-bit, 768 GB/s)",
                       "techbriefly.com 'RTX A6000 and RTX A40' (48GB GDDR6, 384-bit, 768GB/s)"),
    "RTX 6000 Ada": _card(48, 960, 4, 16, f"{_WS}rtx-6000/ datasheet (48 GB GDDR6 with ECC, 384-bit, 960 GB/s)"),
    # --- data centre
    "T4": _card(16, 320, 3, 16, f"{_DC}tesla-t4/ datasheet (16 GB GDDR6, 320+ GB/s)", host="server"),
    "A10": _card(24, 600, 4, 16, f"{_DC}products/a10-gpu/ datasheet (24 GB GDDR6, 600 GB/s)", host="server"),
    "L4": _card(24, 300, 4, 16, f"{_DC}l4/ datasheet (24 GB GDDR6, 300 GB/s)", host="server"),
    "L40S": _card(48, 864, 4, 16, f"{_DC}l40s/ datasheet (48 GB GDDR6 with ECC, 864 GB/s)", host="server"),
    "A100 40GB PCIe": _card(40, 1555, 4, 16, f"{_DC}a100/ datasheet (A100 40GB PCIe: HBM2, 1,555 GB/s)", host="server"),
    "A100 80GB PCIe": _card(80, 1935, 4, 16, f"{_DC}a100/ datasheet (A100 80GB PCIe: HBM2e, 1,935 GB/s)",
                            host="server"),
    "A100 80GB SXM": _card(80, 2039, 4, 16, f"{_DC}a100/ datasheet (A100 80GB SXM: HBM2e, 2,039 GB/s)", host="server"),
    "H100 80GB PCIe": _card(80, 2000, 5, 16, f"{_DC}h100/ datasheet (H100 PCIe: 80 GB HBM2e, 2 TB/s)", host="server"),
    "H100 80GB SXM": _card(80, 3350, 5, 16, f"{_DC}h100/ datasheet (H100 SXM: 80 GB HBM3, 3.35 TB/s)", host="server"),
    "H200": _card(141, 4800, 5, 16, f"{_DC}h200/ datasheet (H200 SXM: 141 GB HBM3e, 4.8 TB/s)", host="server"),
}
_GPU_ALIASES = {"4080s": "RTX 4080 Super", "4070tis": "RTX 4070 Ti Super", "3060": "RTX 3060 12GB",
                "4070s": "RTX 4070 Super", "4060ti16gb": "RTX 4060 Ti 16GB", "a6000": "RTX A6000",
                "a5000": "RTX A5000", "a4000": "RTX A4000", "6000ada": "RTX 6000 Ada", "a10040gb": "A100 40GB PCIe",
                "a100": "A100 80GB SXM", "h100": "H100 80GB SXM",
                "h100sxm": "H100 80GB SXM", "h100pcie": "H100 80GB PCIe", "a1006": "RTX A6000",
                # names the driver (NVML, torch) reports that differ from the datasheet's
                "NVIDIA H100 80GB HBM3": "H100 80GB SXM", "NVIDIA A100-SXM4-80GB": "A100 80GB SXM"}
#: a name sold with two memory sizes picks neither: a 16 GB plan for an 8 GB card would say "fits"
_AMBIGUOUS = {"rtx4060ti": ("RTX 4060 Ti 8GB", "RTX 4060 Ti 16GB")}
#: PCIe usable GB/s per lane, by generation (after 128b/130b encoding): gen3 0.985, gen4 1.969, gen5 3.938
PCIE_GBS_PER_LANE = {3: 0.985, 4: 1.969, 5: 3.938}


def _gpu_key(name: str) -> str:
    return re.sub(r"(nvidia|geforce|\s|-|_)", "", str(name).lower())


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
        both = _AMBIGUOUS.get(key) or _AMBIGUOUS.get("rtx" + key)
        if both and key not in table:
            raise CourseError(f"'{text}' comes with two memory sizes: name one, {both[0]!r} or {both[1]!r}")
        hit = table.get(key) or table.get("rtx" + key) or table.get(key.replace("rtx", ""))
        if hit is None:
            number = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(gib|gb)?", text.lower())
            if number:
                return gpu_spec(float(number.group(1)), bandwidth_gbs, pcie_gbs)
            names = _closest(key, table)
            hint = f" Did you mean {', '.join(repr(n) for n in names)}?" if names else ""
            raise CourseError(f"unknown GPU '{text}'.{hint} Known: {', '.join(GPUS)}; or give its memory, "
                              "e.g. --gpu-gib 16")
        spec = {"name": hit, **GPUS[hit]}
    spec.setdefault("host", "desktop")
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


def _closest(key: str, table: dict[str, str]) -> list[str]:
    """Up to three known names for a typo, nearest first: names that start with what was typed (an 'RTX 4060' typed
    for the 'RTX 4060 Ti 16GB'), then difflib's closest keys; the model number counts most, so '4060' never suggests
    '4090' before '4060 Ti'."""
    bare = key.removeprefix("rtx")
    digits = "".join(ch for ch in bare if ch.isdigit())
    starts = [k for k in table if k.removeprefix("rtx").startswith(bare)] if bare else []
    same_number = [k for k in table if digits and digits in k]
    close = difflib.get_close_matches(key, list(table), n=6, cutoff=0.5)
    ranked = starts + [k for k in close if k in same_number] + close
    return list(dict.fromkeys(table[k] for k in ranked))[:3]


def gpu_label(spec: dict, short: bool = False) -> str:
    """How a plan names a card: 'RTX 4080 Super (16 GiB, 736 GB/s)', or 'a GPU with 16 GiB' for a size given by the
    user (never '16 GiB GPU, 16 GiB'). ``short``: the name alone ('RTX 4080 Super', 'a GPU with 16 GiB')."""
    size = f"{float(spec['vram_gib']):g} GiB"
    if spec.get("name") in GPUS:
        if short:
            return spec["name"]
        bw = f", {float(spec['bandwidth_gbs']):g} GB/s" if spec.get("bandwidth_gbs") else ""
        return f"{spec['name']} ({size}{bw})"
    name = spec.get("name") or ""
    base = f"a GPU with {size}" if name.endswith("GiB GPU") or name in ("", "custom") else f"{name} ({size})"
    if short or not spec.get("bandwidth_gbs"):
        return base
    return f"{base}, {float(spec['bandwidth_gbs']):g} GB/s"


def known_gpus() -> list[str]:
    """Every known card, in the table's order (RTX 20 -> data centre)."""
    return list(GPUS)
