"""exllamav2's allocations in the order it makes them, module by module, on either load path (for the spill model).
"""
from __future__ import annotations

from helpers.memory.cache_modes import CACHE_CLASSES, check_load_path
from helpers.memory.kv_cache import kv_cache_per_layer
from helpers.memory.scratch import scratch_bytes
from helpers.memory.setup import LoadSetup


def load_order(setup: LoadSetup, path: str = "autosplit") -> list[dict]:
    """exllamav2's allocations in the order it makes them, module by module, for the spill model.

    Each entry: {'module', 'kind', 'layer', 'weight_bytes', 'cache_bytes', 'scratch_bytes', 'bytes',
    'device_hint'}. The embedding comes first on the CPU, then the device context (scratch + RoPE tables).
    ``path='autosplit'`` (``load_autosplit_gen`` with a lazy cache): a quantized cache's FP16 temp layer, then per
    layer the attention module with its cache layer (``cache.update_cache_tensors()`` runs just before it loads) and
    the MLP, then the final norm and lm_head. ``path='load'`` (``model.load()``, then ``ExLlamaV2Cache(model)``):
    every module's weights first, then the cache, layer by layer, the temp layer last. Sums equal ``breakdown()``'s.
    """
    interleave = check_load_path(path) == "autosplit"
    st, s, mode = setup.weights, setup.shape, setup.cache_mode
    per_layer, temp = kv_cache_per_layer(setup)
    sc = scratch_bytes(setup)
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
