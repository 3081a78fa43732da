"""Where NVIDIA's Windows driver puts an allocation when VRAM is over-committed: ONE documented assumption, two values.

NVIDIA documents that its Windows driver lets CUDA allocations use shared system memory once VRAM is nearly exhausted
(the fallback exists since driver 536.40; the policy switch ("CUDA - Sysmem Fallback Policy") since 546.01;
docs/FACTS.md §4). It does not document *which* allocations end up there. Two readings bound the answer, and the
course carries both, as a parameter named ``placement`` that the spill model (``fallback.spill``) and the probe
(``fallback.probe``) share:

- ``"first_come"``: first come, first placed. Every allocation takes VRAM when it is made, written or not, so the ones
  made after VRAM is full land in system RAM and stay there. exllamav2's ``load_autosplit`` then loses VRAM to its
  never-written ``torch.empty`` reserve while it loads, and the last modules it loads (the last layers, the
  ``lm_head``: weights every decoded token reads) spill.
- ``"first_touch"``: placed at first touch, kept where used. An allocation takes VRAM when a kernel first touches it,
  and the driver keeps in VRAM what decoding touches, demoting what it does not: the buffers a one-token decode never
  uses (``load_autosplit``'s reserve, never written; the lm_head dequantization scratch, used only by prompt chunks;
  the prompt's transient attention buffers) are the ones in system RAM. Only when they are too small does something
  decoding reads go there too (the tail of the load order).

Which one holds is an observation on the machine (``python -m helpers probe --fallback`` reports whether an untouched
allocation lowers the free VRAM; the speed at a short depth tells them apart for the case), never a fit.
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
