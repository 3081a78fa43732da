"""The one setup object: every setting exllamav2 is loaded with, named once and validated once, at the edge.

``LoadSetup`` is built by a notebook cell, the CLI or the widget; the breakdown, the planners, the spill model, the
load order, the speed harness and the exllamav2 front door all take it. What varies inside a sweep (a depth, one GPU
of several) stays an argument of the function that sweeps.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from helpers.core.errors import CourseError
from helpers.core.units import GIB
from helpers.format.bits import HEAD_MIXES, check_bpw
from helpers.memory.cache_modes import check_cache_mode
from helpers.memory.limits import DEFAULT_MAX_ATTENTION_SIZE, DEFAULT_MAX_INPUT_LEN, check_batch, check_len
from helpers.memory.weights import ModelWeights
from helpers.specs.gpus import gpu_spec
from helpers.specs.shapes import ModelShape, model_shape

HOSTS = ("desktop", "server")


def _gib(value: Any, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise CourseError(f"{what} must be zero or a positive number of GiB (got {value!r})")
    if value > 4096:
        raise CourseError(f"{what} of {value:g} GiB is absurd; give it in GiB, e.g. 0.5")
    return float(value)


@dataclass(frozen=True)
class LoadSetup:
    """What exllamav2 is asked to load, as ``ExLlamaV2Config`` and the cache class hold it (config.py, cache.py).

    ``model``: a bundled name, a config.json, an EXL2 folder or a ModelShape (kept as the ModelShape); ``bpw``: bits
    per weight of a config (None for an EXL2 folder, whose tensors decide; what needs the weights of a config without
    it says so in one line); ``reserve_gib``: the desktop/OS's share
    of the first GPU, or one figure per GPU; ``gpus``: names, GiB or spec dicts; ``host``: 'desktop' or 'server'
    (None: where the first GPU usually sits)."""

    model: Any
    bpw: float | None = None
    head_bits: int = 6                          # lm_head bits (exllamav2's default 6; 16 = fp16)
    max_seq_len: int = 4096                     # the cache's length, allocated in full at load
    cache_mode: str = "fp16"                    # fp16, fp8, q8, q6, q4
    batch: int = 1                              # max_batch_size
    max_input_len: int = DEFAULT_MAX_INPUT_LEN  # the prompt chunk exllamav2 forwards at once
    max_attention_size: int = DEFAULT_MAX_ATTENTION_SIZE  # the attention matrix a chunk may make
    flash_attn: bool = False                    # flash-attn installed: no repeat_kv copy, a smaller attention matrix
    cuda_context_gib: float | None = None       # None: measured by a recording, or 0.5 GiB
    reserve_gib: Any = None                     # None: 0.5 GiB on the first GPU, 0 on the others
    gpus: Any = ()
    host: str | None = None

    def __post_init__(self):
        put = object.__setattr__
        put(self, "model", model_shape(self.model))
        put(self, "max_seq_len", check_len(self.max_seq_len))
        put(self, "max_input_len", check_len(self.max_input_len, "max_input_len"))
        put(self, "cache_mode", check_cache_mode(self.cache_mode))
        put(self, "batch", check_batch(self.batch))
        m = self.max_attention_size
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise CourseError(f"max_attention_size must be a positive whole number (got {m!r})")
        put(self, "flash_attn", bool(self.flash_attn))
        put(self, "cuda_context_gib", _gib(self.cuda_context_gib, "CUDA context"))
        res = self.reserve_gib
        put(self, "reserve_gib", tuple(_gib(r, "reserve") for r in res) if isinstance(res, (list, tuple))
            else _gib(res, "reserve"))
        gpus = self.gpus if isinstance(self.gpus, (list, tuple)) else (self.gpus,)
        put(self, "gpus", tuple(g if isinstance(g, dict) and "vram_bytes" in g else gpu_spec(g) for g in gpus))
        if isinstance(self.reserve_gib, tuple) and len(self.reserve_gib) not in (1, len(self.gpus)):
            raise CourseError(f"{len(self.reserve_gib)} reserves for {len(self.gpus)} GPUs: give one (the display "
                              "GPU) or one per GPU")
        if self.host is not None and self.host not in HOSTS:
            raise CourseError(f"unknown host {self.host!r}: use 'desktop' (a PC with the GPU in it) or 'server' (a "
                              "cloud or data-centre machine)")
        if isinstance(self.head_bits, bool) or self.head_bits not in list(HEAD_MIXES) + [16]:
            raise CourseError(f"head bits {self.head_bits!r} is not an exllamav2 head option: use one of "
                              f"{', '.join(map(str, sorted(HEAD_MIXES)))} or 16 (fp16)")
        if self.model.exl2_dir is None and self.bpw is not None:
            put(self, "bpw", check_bpw(self.bpw))

    @property
    def shape(self) -> ModelShape:
        return self.model

    @cached_property
    def weights(self) -> ModelWeights:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            w = ModelWeights(self.model, self.bpw, self.head_bits)
        object.__setattr__(self, "weight_warnings", [str(x.message) for x in caught])
        return w

    @property
    def model_dir(self) -> Path:
        """The folder an engine loads (EXL2, or float safetensors), or one line when the setup names a config only."""
        if self.model.exl2_dir:
            return Path(self.model.exl2_dir)
        source = Path(self.model.source)
        if source.name == "config.json" and any(source.parent.glob("*.safetensors")):
            return source.parent
        raise CourseError(f"{self.model.name} is a config without weights: give the model's folder to load it")

    @property
    def gpu(self) -> dict:
        """The first (or only) GPU."""
        if not self.gpus:
            raise CourseError("no GPU given: name a card (e.g. 'RTX 4080 Super') or its memory in GiB")
        return self.gpus[0]

    @property
    def host_class(self) -> str:
        return self.host or (self.gpus[0].get("host", "desktop") if self.gpus else "desktop")

    def reserve_gib_of(self, index: int = 0) -> float | None:
        """The desktop/OS reserve asked for on GPU ``index`` (None: the default, on the first GPU only)."""
        r = self.reserve_gib
        if isinstance(r, tuple):
            return r[0] if len(r) == 1 and index == 0 else (0.0 if len(r) == 1 else r[index])
        return r if index == 0 else (0.0 if r is not None else None)

    def with_(self, **changes) -> "LoadSetup":
        """The same setup with some settings changed (and validated again); the weights are reused when the model,
        bpw and head bits stay."""
        new = dataclasses.replace(self, **changes)
        if "weights" in self.__dict__ and not {"model", "bpw", "head_bits"} & set(changes):
            new.__dict__["weights"] = self.weights
            new.__dict__["weight_warnings"] = self.__dict__.get("weight_warnings", [])
        return new

    def bytes_of(self, gib: float | None) -> int | None:
        return None if gib is None else int(round(gib * GIB))
