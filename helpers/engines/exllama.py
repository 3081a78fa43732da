"""The one front door to exllamav2 0.3.2: import it, configure it, build its cache, load a model, count cache bytes.

Every part of the course that runs exllamav2 comes through here, so its traps are avoided in one place:

- ``import_exllamav2()`` imports it only after ``devices.require_cuda()`` (a CPU machine never imports it; the first
  import compiles its CUDA extension, minutes) and turns every failure into one line saying what to do.
- ``make_config()`` sets ``no_sdpa = True`` (0.3.2's SDPA attention without flash-attn computes a non-causal
  prefill: docs/FACTS.md §3), copies a ``rope_theta`` kept only under ``rope_parameters`` (transformers 5)
  to the config (0.3.2 reads only the top-level key) and sets ``max_seq_len``: the cache length asked for, not the
  config.json's ``max_position_embeddings`` exllamav2 would take by default.
- ``make_cache()`` picks the cache class of a cache mode (``fp16``, ``fp8``, ``q8``, ``q6``, ``q4``).
- ``load()`` follows one of the two load paths: ``'autosplit'`` makes the cache lazily and lets
  ``model.load_autosplit(cache)`` allocate each module's weights together with its cache layer; ``'load'`` runs
  ``model.load()`` (every module's weights) and then makes the cache. ``on_module(i, n)`` is called before module
  ``i`` of ``n`` is loaded and once more with ``(n, n)`` at the end (exllamav2's own per-module callback): a progress
  bar, or the emulator routing each module's allocations.
- ``cache_bytes(cache)``: every tensor a cache allocated.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from helpers.core import devices
from helpers.core.errors import CourseError
from helpers.format.config import load_config, rope_theta_of
from helpers.memory.cache_modes import CACHE_CLASSES, check_cache_mode, check_load_path

#: the exllamav2 version the course's traps and byte counts were checked against
EXLLAMAV2_VERSION = "0.3.2"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:200]


def import_exllamav2(*, alternative: str | None = None):
    """The exllamav2 module (its first import compiles its CUDA extension, minutes), or one CourseError line.

    ``alternative``: what else the reader can do (e.g. "use backend='reference'"), appended to every message."""
    devices.require_cuda("exllamav2")
    tail = f", or {alternative}" if alternative else ""
    try:
        import exllamav2  # noqa: F401  (loads or JIT-builds exllamav2_ext)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "exllamav2":
            raise CourseError(f"exllamav2 is not installed: `pip install exllamav2=={EXLLAMAV2_VERSION}` (or a "
                              "prebuilt wheel matching your torch, CUDA and Python from its GitHub releases)"
                              f"{tail}") from None
        raise CourseError(f"exllamav2 failed to import ({_first_line(exc)}): install its missing dependency"
                          f"{tail}") from None
    except Exception as exc:  # a failed JIT build raises RuntimeError/OSError/CalledProcessError/ImportError
        import torch

        raise CourseError(f"exllamav2's CUDA extension failed to build or load ({_first_line(exc)}): install the CUDA "
                          f"toolkit matching torch's CUDA {torch.version.cuda} and a C++ compiler (MSVC Build Tools on "
                          "Windows), or a prebuilt exllamav2 wheel for your torch/CUDA/Python"
                          f"{'; or ' + alternative if alternative else ''}") from None
    return sys.modules.get("exllamav2", exllamav2)


def check_max_seq_len(max_seq_len: Any) -> int:
    """The cache length in tokens as a positive int, or one CourseError line."""
    try:
        n = int(max_seq_len)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise CourseError(f"max_seq_len must be a positive number of tokens, not {max_seq_len}")
    return n


def make_config(model_dir: str | Path, *, max_seq_len: int, max_input_len: int | None = None, ex=None):
    """An ``ExLlamaV2Config`` for ``model_dir`` with the course's settings (module docstring).

    ``max_input_len``: the longest chunk one forward pass takes (exllamav2's default 2048), capped at max_seq_len.
    ``ex``: the exllamav2 module (imported here if None)."""
    ex = ex if ex is not None else import_exllamav2()
    max_seq_len = check_max_seq_len(max_seq_len)
    hf = load_config(Path(model_dir))
    config = ex.ExLlamaV2Config(str(model_dir))
    config.no_sdpa = True              # docs/FACTS.md §3: 0.3.2's SDPA prefill without flash-attn is not causal
    config.max_seq_len = max_seq_len
    if max_input_len is not None:
        config.max_input_len = min(int(max_input_len), max_seq_len)
    theta = rope_theta_of(hf)
    if hf.get("rope_theta") is None and theta is not None:
        config.rotary_embedding_base = float(theta)   # 0.3.2 reads only the top-level key (docs/FACTS.md §3)
    return config


def cache_class_name(cache_mode: str) -> str:
    """exllamav2's cache class for a cache mode ('q4' -> 'ExLlamaV2Cache_Q4')."""
    return CACHE_CLASSES.get(cache_mode) or CACHE_CLASSES[check_cache_mode(cache_mode)]


def make_cache(model, cache_mode: str, max_seq_len: int, *, lazy: bool, ex=None):
    """The cache of ``cache_mode`` for ``model``: ``lazy`` makes no tensor yet (``load_autosplit`` makes each layer
    with its attention module); not lazy allocates every layer now, on the devices ``model.load()`` chose."""
    ex = ex if ex is not None else import_exllamav2()
    cls = getattr(ex, cache_class_name(cache_mode))
    return cls(model, max_seq_len=check_max_seq_len(max_seq_len), lazy=lazy)


def cache_bytes(cache) -> int:
    """Every tensor an exllamav2 cache allocated: K/V (and scales) of all layers, plus the FP16 staging tensors of
    the quantized modes."""
    total = sum(t.numel() * t.element_size() for t in cache.all_tensors() if t is not None)
    for pair in getattr(cache, "temp_tensors", {}).values():
        total += sum(t.numel() * t.element_size() for t in pair)
    return total


@dataclass
class Exl2Loaded:
    """What ``prepare``/``load`` return: the exllamav2 module, config, model and cache (None when loaded without)."""

    ex: Any
    config: Any
    model: Any
    cache: Any
    max_seq_len: int
    cache_mode: str | None


def prepare(model_dir: str | Path, *, max_seq_len: int, cache_mode: str | None = "fp16",
            max_input_len: int | None = None, alternative: str | None = None,
            lazy_cache: bool = True) -> Exl2Loaded:
    """Config, model and (``lazy_cache``) a lazy cache, nothing on the GPU yet: the first half of ``load``, for
    callers that load the modules themselves (the emulator makes a 'load'-path cache layer by layer)."""
    ex = import_exllamav2(alternative=alternative)
    config = make_config(model_dir, max_seq_len=max_seq_len, max_input_len=max_input_len, ex=ex)
    model = ex.ExLlamaV2(config)
    cache = None
    if cache_mode is not None and lazy_cache:
        cache = make_cache(model, cache_mode, config.max_seq_len, lazy=True, ex=ex)
    return Exl2Loaded(ex, config, model, cache, int(config.max_seq_len), cache_mode)


def load_modules(loaded: Exl2Loaded, load_path: str = "autosplit", *,
                 on_module: Callable[[int, int], None] | None = None, cache_after_load: bool = True) -> Exl2Loaded:
    """Load the weights of a prepared model (and its cache) along ``load_path``.

    'autosplit': ``model.load_autosplit(cache)``, each attention module's cache layer made with it (a cache is
    required). 'load': ``model.load()``, then, with ``cache_after_load``, the cache made anew, not lazy (every layer
    at once, as ``ExLlamaV2Cache(model)`` does after a manual load). ``on_module(i, n)``: exllamav2's per-module
    callback (before module i; (n, n) at the end)."""
    check_load_path(load_path)
    if load_path == "autosplit":
        if loaded.cache is None:
            raise CourseError("load_path='autosplit' loads the model together with its cache: give a cache_mode")
        loaded.model.load_autosplit(loaded.cache, callback=on_module)
    else:
        loaded.model.load(callback=on_module)
        if cache_after_load and loaded.cache_mode is not None:
            loaded.cache = make_cache(loaded.model, loaded.cache_mode, loaded.max_seq_len, lazy=False, ex=loaded.ex)
    return loaded


def load(model_dir: str | Path, *, max_seq_len: int, cache_mode: str | None = "fp16", load_path: str = "autosplit",
         on_module: Callable[[int, int], None] | None = None, max_input_len: int | None = None,
         alternative: str | None = None) -> Exl2Loaded:
    """exllamav2 with ``model_dir`` loaded along ``load_path`` ('autosplit' or 'load') and a ``cache_mode`` cache of
    ``max_seq_len`` tokens (``cache_mode=None``: no cache, 'load' path only). See ``prepare`` and ``load_modules``."""
    check_load_path(load_path)
    loaded = prepare(model_dir, max_seq_len=max_seq_len, cache_mode=cache_mode, max_input_len=max_input_len,
                     alternative=alternative, lazy_cache=load_path == "autosplit")
    return load_modules(loaded, load_path, on_module=on_module)
