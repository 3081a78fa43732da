"""The one front door to exllamav2 0.3.2: import it, build its config and cache from a ``LoadSetup``, load a model.

Its traps are avoided here once: exllamav2 is imported only after ``devices.require_cuda()`` (the first import
compiles its CUDA extension) with every failure turned into one line; the config sets ``no_sdpa`` and copies a
``rope_theta`` kept under ``rope_parameters`` (docs/FACTS.md §3, the traps); ``max_seq_len`` is the cache asked for,
not the config.json's ``max_position_embeddings``. ``load`` follows one of exllamav2's two load paths, 'autosplit' or
'load' (docs/FACTS.md §2).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

from helpers.core import devices
from helpers.core.errors import CourseError
from helpers.format.config import load_config, rope_theta_of
from helpers.memory.cache_modes import CACHE_CLASSES, check_cache_mode, check_load_path
from helpers.memory.setup import LoadSetup

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


def make_config(setup: LoadSetup, *, ex=None):
    """The ``ExLlamaV2Config`` of ``setup``: its folder, cache length, prompt chunk and attention size, with the
    course's two fixes (module docstring). ``ex``: the exllamav2 module (imported here if None)."""
    ex = ex if ex is not None else import_exllamav2()
    hf = load_config(setup.model_dir)
    config = ex.ExLlamaV2Config(str(setup.model_dir))
    config.no_sdpa = True              # 0.3.2's SDPA prefill without flash-attn is not causal
    config.max_seq_len = setup.max_seq_len
    config.max_input_len = min(setup.max_input_len, setup.max_seq_len)
    config.max_attention_size = setup.max_attention_size
    theta = rope_theta_of(hf)
    if hf.get("rope_theta") is None and theta is not None:
        config.rotary_embedding_base = float(theta)   # 0.3.2 reads only the top-level key
    return config


def cache_class_name(cache_mode: str) -> str:
    """exllamav2's cache class for a cache mode ('q4' -> 'ExLlamaV2Cache_Q4')."""
    return CACHE_CLASSES.get(cache_mode) or CACHE_CLASSES[check_cache_mode(cache_mode)]


def make_cache(model, setup: LoadSetup, *, lazy: bool, ex=None):
    """The cache of ``setup`` for ``model``: ``lazy`` makes no tensor yet (``load_autosplit`` makes each layer
    with its attention module); not lazy allocates every layer now, on the devices ``model.load()`` chose."""
    ex = ex if ex is not None else import_exllamav2()
    cls = getattr(ex, cache_class_name(setup.cache_mode))
    return cls(model, max_seq_len=setup.max_seq_len, batch_size=setup.batch, lazy=lazy)


def cache_bytes(cache) -> int:
    """Every tensor an exllamav2 cache allocated: K/V (and scales) of all layers, plus the FP16 staging tensors of
    the quantized modes."""
    total = sum(t.numel() * t.element_size() for t in cache.all_tensors() if t is not None)
    for pair in getattr(cache, "temp_tensors", {}).values():
        total += sum(t.numel() * t.element_size() for t in pair)
    return total


@dataclass
class Exl2Loaded:
    """What ``prepare``/``load`` return: the setup, the exllamav2 module, config, model and cache (None when loaded
    without one)."""

    setup: LoadSetup
    ex: Any
    config: Any
    model: Any
    cache: Any
    with_cache: bool = True


def prepare(setup: LoadSetup, *, with_cache: bool = True, lazy_cache: bool = True,
            alternative: str | None = None) -> Exl2Loaded:
    """Config, model and (``lazy_cache``) a lazy cache, nothing on the GPU yet: the first half of ``load``, for
    callers that load the modules themselves (the emulator makes a 'load'-path cache layer by layer)."""
    ex = import_exllamav2(alternative=alternative)
    config = make_config(setup, ex=ex)
    model = ex.ExLlamaV2(config)
    cache = make_cache(model, setup, lazy=True, ex=ex) if with_cache and lazy_cache else None
    return Exl2Loaded(setup, ex, config, model, cache, with_cache)


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
            raise CourseError("load_path='autosplit' loads the model together with its cache: load with a cache")
        loaded.model.load_autosplit(loaded.cache, callback=on_module)
    else:
        loaded.model.load(callback=on_module)
        if cache_after_load and loaded.with_cache:
            loaded.cache = make_cache(loaded.model, loaded.setup, lazy=False, ex=loaded.ex)
    return loaded


def load(setup: LoadSetup, *, load_path: str = "autosplit", with_cache: bool = True,
         on_module: Callable[[int, int], None] | None = None, alternative: str | None = None) -> Exl2Loaded:
    """exllamav2 with ``setup``'s model loaded along ``load_path`` ('autosplit' or 'load') and its cache
    (``with_cache=False``: weights only, 'load' path only). See ``prepare`` and ``load_modules``."""
    check_load_path(load_path)
    loaded = prepare(setup, with_cache=with_cache, lazy_cache=load_path == "autosplit", alternative=alternative)
    return load_modules(loaded, load_path, on_module=on_module)
