"""exllamav2's KV cache modes (cache.py) and its two ways to load a model with a cache.

One table, ``CACHE_RULES``, says for each mode which exllamav2 class implements it and how it lays out a layer;
``check_cache_mode`` is the one place a mode name is validated. ``LOAD_PATHS`` names the two load paths.
"""
from __future__ import annotations

from dataclasses import dataclass

from helpers.core.errors import CourseError
from helpers.core.units import MIB

CACHE_MODES = ("fp16", "fp8", "q8", "q6", "q4")


@dataclass(frozen=True)
class CacheRule:
    """How one exllamav2 cache class lays out a layer (cache.py, ``ExLlamaV2CacheBase.__init__``).

    K is stored as ``head_dim // weights_per_element_k`` elements of ``elem_bytes`` per head and token (V likewise);
    ``scales``: fp16 K and V scales of shape ``(..., head_dim // 32)``; ``temp``: one full-length FP16 K and V per
    device (``touch_device``) that quantized modes decode into.
    """

    mode: str
    cls: str
    elem_bytes: int
    weights_per_element_k: int   # values packed per stored element (exllamav2's ``weights_per_element_k``)
    weights_per_element_v: int
    scales: bool
    temp: bool
    note: str


CACHE_RULES = {
    "fp16": CacheRule("fp16", "ExLlamaV2Cache", 2, 1, 1, False, False, "K and V in fp16"),
    "fp8": CacheRule("fp8", "ExLlamaV2Cache_8bit", 1, 1, 1, False, True,
                     "K and V truncated to FP8 (e5m2), no scales; the dynamic generator rejects it"),
    "q8": CacheRule("q8", "ExLlamaV2Cache_Q8", 1, 1, 1, True, True, "8-bit K and V, fp16 scale per 32 values"),
    "q6": CacheRule("q6", "ExLlamaV2Cache_Q6", 1, 1, 2, True, True,
                    "K stored in 8 bits, V in 4 bits, fp16 scale per 32 values"),
    "q4": CacheRule("q4", "ExLlamaV2Cache_Q4", 1, 2, 2, True, True, "4-bit K and V, fp16 scale per 32 values"),
}

#: mode -> the exllamav2 cache class that implements it (``getattr(exllamav2, CACHE_CLASSES[mode])``)
CACHE_CLASSES = {mode: rule.cls for mode, rule in CACHE_RULES.items()}

_MODE_ALIASES = {"fp16": "fp16", "f16": "fp16", "half": "fp16", "16": "fp16", "exllamav2cache": "fp16",
                 "fp8": "fp8", "8bit": "fp8", "exllamav2cache_8bit": "fp8",
                 "q8": "q8", "exllamav2cache_q8": "q8", "q6": "q6", "exllamav2cache_q6": "q6",
                 "q4": "q4", "exllamav2cache_q4": "q4"}


def check_cache_mode(mode: str) -> str:
    """Normalise a cache mode ('FP16', 'Q4', 'ExLlamaV2Cache_Q8', ...) to one of CACHE_MODES."""
    key = str(mode).strip().lower()
    if key in _MODE_ALIASES:
        return _MODE_ALIASES[key]
    raise CourseError(f"unknown cache mode '{mode}': use one of {', '.join(CACHE_MODES)} "
                      f"({', '.join(CACHE_CLASSES[m] for m in CACHE_MODES)})")


#: exllamav2 model.py ``load_autosplit_gen``: ``reserve_vram = [192 MiB] + [64 MiB] * (num_devices - 1)`` by default
AUTOSPLIT_RESERVE_FIRST = 192 * MIB
AUTOSPLIT_RESERVE_OTHERS = 64 * MIB
#: model.py ``load_autosplit_gen``: ``minimum_reserve_vram = 256 * 1024**2`` on the device being filled
AUTOSPLIT_MINIMUM_RESERVE = 256 * MIB
#: exllamav2 model.py ``load_autosplit_gen`` holds two tensors on a device while it loads: ``reserve_vram`` (default
#: 192 MiB on the first device) and ``minimum_reserve_vram`` (256 MiB). They are freed when the load ends, so a plan
#: that fits once loaded by less than this runs out of VRAM during an autosplit load. ``model.load()`` holds neither.
LOAD_AUTOSPLIT_RESERVE_BYTES = AUTOSPLIT_RESERVE_FIRST + AUTOSPLIT_MINIMUM_RESERVE
#: how exllamav2 can load a model with its cache: ``load_autosplit(cache)`` with a lazy cache (each attention
#: module's cache layer is created just before the module loads) or ``load()`` then ``ExLlamaV2Cache(model)`` (all
#: weights first, the whole cache after them). Name -> what a reader calls.
LOAD_PATHS = {"autosplit": "model.load_autosplit(cache)", "load": "model.load(), then ExLlamaV2Cache(model)"}


def check_load_path(path: str) -> str:
    """One of LOAD_PATHS, or a one-line error."""
    if path not in LOAD_PATHS:
        raise CourseError(f"unknown load path '{path}': use 'autosplit' (model.load_autosplit(cache) with a lazy "
                          "cache) or 'load' (model.load(), then the cache)")
    return path
