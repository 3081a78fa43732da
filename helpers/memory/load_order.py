"""exllamav2's allocations in the order it makes them, module by module, on either load path (for the spill model).
"""
from __future__ import annotations

from typing import Any

from helpers.memory.cache_modes import CACHE_CLASSES, check_cache_mode, check_load_path
from helpers.memory.kv_cache import kv_cache_per_layer
from helpers.memory.limits import check_len
from helpers.memory.scratch import DEFAULT_MAX_ATTENTION_SIZE, DEFAULT_MAX_INPUT_LEN, scratch_bytes
from helpers.memory.weights import ModelWeights


def load_order(spec: Any, *, bpw: float | None = None, head_bits: int = 6, max_seq_len: int,
               cache_mode: str = "fp16", batch: int = 1, max_input_len: int = DEFAULT_MAX_INPUT_LEN,
               path: str = "autosplit") -> list[dict]:
    """exllamav2's allocations in the order it makes them, module by module, for the spill model.

    Each entry: {'module', 'kind', 'layer', 'weight_bytes', 'cache_bytes', 'scratch_bytes', 'bytes',
    'device_hint'}. The embedding comes first on the CPU. Then, when the first module lands on the GPU, the device
    context (scratch buffer + RoPE tables). ``path='autosplit'`` (model.py ``load_autosplit_gen`` with a lazy cache):
    for quantized/FP8 caches the FP16 temp K/V layer, then per layer the attention module (its weights and its cache
    layer: ``cache.update_cache_tensors()`` runs just before each attention module loads) and the MLP, then the final
    norm and lm_head. ``path='load'`` (``model.load()``, then ``ExLlamaV2Cache(model)``): every module's weights
    first, then the cache, layer by layer (``create_state_tensors``), the temp layer last. Sums equal
    ``breakdown()``'s weights, cache and scratch terms either way.
    """
    interleave = check_load_path(path) == "autosplit"
    mode = check_cache_mode(cache_mode)
    L = check_len(max_seq_len)
    st = ModelWeights(spec, bpw, head_bits)
    s = st.shape
    per_layer, temp = kv_cache_per_layer(s, L, mode, batch)
    sc = scratch_bytes(s, L, max_input_len, DEFAULT_MAX_ATTENTION_SIZE, batch)
    out: list[dict] = []

    def add(module, kind, layer, w=0, c=0, x=0, hint="gpu", **extra):
        out.append({"module": module, "kind": kind, "layer": layer, "weight_bytes": w, "cache_bytes": c,
                    "scratch_bytes": x, "bytes": w + c + x, "device_hint": hint, **extra})

    emb = st.modules[0]
    add(emb["module"], "embedding", None, w=emb["weight_bytes"], hint="cpu")
    add("device context (scratch + RoPE sin/cos)", "device_context", None,
        x=sc["device_scratch"] + sc["rope_tables"])
    if temp and interleave:
        add(f"cache FP16 temp K/V ({CACHE_CLASSES[mode]})", "cache_temp", None, c=temp)
    for m in st.modules[1:]:
        if m["kind"] == "attention":
            i = m["layer"]
            add(m["module"], "attention", i, w=m["weight_bytes"], c=per_layer[i] if interleave else 0,
                sliding_window=s.sliding_window if i in s.sliding_layers else 0)
        else:
            add(m["module"], m["kind"], m["layer"], w=m["weight_bytes"])
    if not interleave:
        for i, c in enumerate(per_layer):
            add(f"cache layer {i}", "cache", i, c=c)
        if temp:
            add(f"cache FP16 temp K/V ({CACHE_CLASSES[mode]})", "cache_temp", None, c=temp)
    return out
