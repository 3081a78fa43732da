"""Where NVIDIA's Windows driver puts an allocation when VRAM is over-committed: ONE documented assumption, two values.

NVIDIA documents the fallback but not *which* allocations go to system RAM (docs/FACTS.md §4, with what each
reading spills for exllamav2). The course carries both readings as ``placement``, shared by the spill model
(``fallback.spill``) and the probe (``fallback.probe``): ``"first_come"`` (an allocation takes VRAM when made; what
comes after VRAM is full spills) and ``"first_touch"`` (the driver keeps in VRAM what decoding touches; the kinds in
``UNTOUCHED_BY_DECODE`` leave first). Which one holds is observed on the machine (``python -m helpers probe
--fallback``), never fitted.

Public names: ``PLACEMENTS``, ``DEFAULT_PLACEMENT``, ``UNTOUCHED_BY_DECODE``, ``check_placement``,
``touched_by_decode``.
"""
from __future__ import annotations

from helpers.core.errors import CourseError

PLACEMENTS = {
    "first_come": "first come, first placed: an allocation takes VRAM when it is made, written or not; what is made "
                  "after VRAM is full goes to system RAM and stays there",
    "first_touch": "placed at first touch: an allocation takes VRAM when first used, and the driver keeps in VRAM what "
                   "decoding touches; buffers a one-token decode never touches go to system RAM first",
}
#: the spill model's default: the reading under which the most of what a token reads can spill (the worse case)
DEFAULT_PLACEMENT = "first_come"
#: kinds of allocation a one-token decode never touches (the first to leave VRAM under "first_touch")
UNTOUCHED_BY_DECODE = {"load_reserve": "load_autosplit's reserve (torch.empty, never written)",
                       "dequant_scratch": "the dequantization scratch (only prompt chunks of many rows use it)",
                       "transient": "the prompt's transient attention buffers"}


def check_placement(placement: str) -> str:
    """One of ``PLACEMENTS``, or a one-line error."""
    if placement not in PLACEMENTS:
        raise CourseError(f"unknown placement {placement!r}: use one of {', '.join(PLACEMENTS)}")
    return placement


def touched_by_decode(kind: str) -> bool:
    """Does a one-token decode touch an allocation of this kind (``load_order``'s kinds, ``UNTOUCHED_BY_DECODE``)?"""
    return kind not in UNTOUCHED_BY_DECODE
