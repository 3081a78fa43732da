"""exllamav2 loaded module by module, each module's allocations routed through a ``VramEmulator`` (``Exl2Model``), and
what each module will allocate when the loader reaches it (``module_need``, ``cache_layer_bytes``).

exllamav2 is configured and loaded through ``helpers.engines.exllama``, the one front door to it.
"""
from __future__ import annotations

import gc
from typing import Callable

from helpers.core.errors import CourseError
from helpers.engines import exllama
from helpers.fallback.emulator import VramEmulator
from helpers.memory.cache_modes import check_load_path
from helpers.memory.setup import LoadSetup


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def cache_layer_bytes(cache) -> int:
    """Bytes exllamav2 allocates for one layer of ``cache`` (K and V, plus scales for the Q caches)."""
    import torch

    el = torch.empty((), dtype=cache.dtype).element_size()
    b = (_numel(cache.shape_wk) + _numel(cache.shape_wv)) * el
    if getattr(cache, "has_scales", False):
        b += 2 * _numel(cache.shape_s) * 2
    return b


def _first_layer_extra(cache) -> int:
    """The FP16 staging K/V a quantized cache allocates when it first touches a device (0 once made, or for FP16)."""
    temps = getattr(cache, "temp_tensors", None)
    return 2 * _numel(cache.shape_basic) * 2 if temps is not None and not temps else 0


def module_need(model, cache, index: int, *, with_cache: bool = True) -> dict:
    """What module ``index`` of an exllamav2 model will allocate when ``load_autosplit`` reaches it: its weights
    (``weight_footprint``, read from the file headers) and, for an attention module, its cache layer (plus the FP16
    staging tensors a quantized cache allocates on a device's first layer). ``with_cache=False``: the weights only,
    as ``model.load()`` allocates them (the cache comes afterwards)."""
    m = model.modules[index]
    kind = type(m).__name__
    weights = int(m.weight_footprint())
    cache_b = 0
    if with_cache and kind in ("ExLlamaV2Attention", "ExLlamaV2ParallelDecoder"):
        cache_b = cache_layer_bytes(cache) + _first_layer_extra(cache)
    return {"module": str(m.key), "kind": kind, "weight_bytes": weights, "cache_bytes": cache_b,
            "on_cpu": index == 0}  # load_autosplit keeps module 0, the input embedding, on the CPU


class Exl2Model:
    """exllamav2 loaded one of two ways (``load_path``, as ``memory.load_order``), optionally routed allocation by
    allocation through a ``VramEmulator``: 'autosplit' is ``load_autosplit`` with a lazy cache (module by module, each
    attention module with its cache layer); 'load' is ``model.load()`` (every module's weights) and then the cache,
    created layer by layer in layer order as ``ExLlamaV2Cache`` creates it (a quantized cache's FP16 staging tensors
    come with the first layer here, after all of them there: 2 layers of FP16 at most). The first forward's
    transients are not routed on either path.

    It offers what ``bench.measure_loaded`` times (``decode_step``, ``fill_cache``, ``synchronize``, ``memory``...),
    so native and emulated runs are measured by the same code. ``fill_cache(depth)`` only sets the cache's length:
    a decode step reads ``depth`` positions whatever values they hold."""

    name = "exllamav2"

    def __init__(self, setup: LoadSetup, *, emulator: VramEmulator | None = None,
                 on_module: Callable[[int, int], None] | None = None, load_path: str = "autosplit"):
        import torch

        self.load_path = check_load_path(load_path)
        self.torch = torch
        self.setup, self.device = setup, "cuda"
        self.model_dir, self.max_seq_len, self.cache_mode = setup.model_dir, setup.max_seq_len, setup.cache_mode
        self.emulator = emulator
        # a lazy cache on both paths: 'load' makes its layers below, one at a time, after the weights
        loaded = exllama.prepare(setup)
        self.config, self.model, self.cache = loaded.config, loaded.model, loaded.cache
        self.vocab_size = int(self.config.vocab_size)
        self.needs: list[dict] = []

        autosplit = load_path == "autosplit"

        def callback(i: int, n: int) -> None:
            if i < n:
                need = module_need(self.model, self.cache, i, with_cache=autosplit)
                self.needs.append(need)
                if emulator is not None:
                    emulator.decide(i, need["module"], need["weight_bytes"], need["cache_bytes"], kind=need["kind"],
                                    on_cpu=need["on_cpu"])
            elif emulator is not None and autosplit:
                emulator.finish()
            if on_module is not None:
                on_module(i, n)

        try:
            exllama.load_modules(loaded, self.load_path, on_module=callback, cache_after_load=False)
            if not autosplit:
                self._create_cache_layer_by_layer(emulator, on_module)
        finally:
            if emulator is not None:
                emulator.leave()

    def _create_cache_layer_by_layer(self, emulator: VramEmulator | None, on_module) -> None:
        """After ``model.load()``: make the cache's layers one at a time (``update_cache_tensors`` makes every layer
        in ``model.cache_map`` that is not made yet, so the map grows by one layer per step), each routed."""
        full = dict(self.model.cache_map)
        n0, layers = len(self.model.modules), sorted(full)
        try:
            for j, k in enumerate(layers):
                b = cache_layer_bytes(self.cache) + _first_layer_extra(self.cache)
                need = {"module": f"cache layer {k}", "kind": "cache", "weight_bytes": 0, "cache_bytes": b,
                        "on_cpu": False}
                self.needs.append(need)
                if emulator is not None:
                    emulator.decide(n0 + j, need["module"], 0, b, kind="cache")
                if on_module is not None:
                    on_module(n0 + j, n0 + len(layers))
                self.model.cache_map = {i: full[i] for i in layers[: j + 1]}
                self.cache.update_cache_tensors()
        finally:
            self.model.cache_map = full
        if emulator is not None:
            emulator.finish()

    # -- what bench.measure_loaded calls
    def fill_cache(self, depth: int, *, seed: int = 0) -> None:
        if not 0 <= depth < self.max_seq_len:
            raise CourseError(f"depth {depth} must be below the cache's {self.max_seq_len} tokens")
        self.cache.current_seq_len = int(depth)

    def decode_step(self, token_id: int | None = None):
        ids = self.torch.tensor([[int(token_id or 0)]], dtype=self.torch.long)
        return self.model.forward(ids, self.cache).float()[0, -1]

    def forward(self, ids, *, reset: bool = True):
        if reset:
            self.cache.current_seq_len = 0
        return self.model.forward(ids, self.cache).float()

    def synchronize(self) -> None:
        self.torch.cuda.synchronize()

    def memory(self) -> dict:
        t = self.torch.cuda
        free, total = t.mem_get_info()
        out = {"device": "cuda", "torch_allocated_bytes": int(t.memory_allocated()),
               "torch_reserved_bytes": int(t.memory_reserved()), "device_used_bytes": int(total - free)}
        if self.emulator is not None:
            out["pinned_host_bytes"] = self.emulator.host_bytes()
        return out

    def weight_bytes(self) -> int:
        """GPU weights (VRAM or mapped host memory): every module but the CPU-side embedding."""
        return sum(n["weight_bytes"] for n in self.needs if not n["on_cpu"])

    def cache_bytes(self) -> int:
        return exllama.cache_bytes(self.cache)

    def unload(self) -> None:
        try:
            if self.model is not None:
                self.model.unload()
        finally:
            self.model = self.cache = None
            gc.collect()
