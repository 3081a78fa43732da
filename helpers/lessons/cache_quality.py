"""What a quantized KV cache costs in quality, measured on the CPU with the embedded model.

``cache_quality`` stores K and V as each exllamav2 cache mode does (``helpers.engines.kv_quant``) and scores a fixed
text, teacher-forced: the first ``SCORED`` tokens (short) and the ``SCORED`` after a ``LONG_DEPTH`` prefix run once
with an exact cache, then stored in the mode (long: reading a quantized cache that deep). Each scored token sees
earlier positions dequantized and its own K/V exact, as in an exllamav2 decode step. Per mode and depth:
perplexity, greedy agreement with FP16 and the mean KL divergence from FP16's next-token distribution (steadier: on
so few tokens perplexity moves a few percent by chance). ``format_cache_quality`` prints the table.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from helpers.core.progress import progress
from helpers.engines.kv_quant import CACHE_BITS, QuantizedKVCache
from helpers.engines.reference import ReferenceModel
from helpers.lessons.quality import encode_text, fixed_text
from helpers.memory import kv_cache
from helpers.memory.cache_modes import CACHE_MODES, CACHE_RULES
from helpers.models import embedded as models
from helpers.specs.shapes import model_shape

#: scored tokens per depth and the long depth: small enough that the whole table takes seconds on 2 cores
SCORED = 48
LONG_DEPTH = 512


def _bits(mode: str) -> str:
    if mode in CACHE_BITS:
        k, v = CACHE_BITS[mode]
        return f"K{k}/V{v} + scales"
    return {"fp16": "fp16", "fp8": "e5m2 (truncated)"}.get(mode, mode)


def _score(model: ReferenceModel, ids, start: int, mode: str, prefix=None):
    """(logits (n, vocab), nll per scored token) of ids[start:start+n] with a ``mode`` cache."""
    import torch
    import torch.nn.functional as F

    cfg = model.config.shape
    cache = QuantizedKVCache(cfg.n_layers, int(ids.numel()), cfg.n_kv_heads, cfg.head_dim,
                             dtype=model.dtype, device=model.device, mode=mode)
    if prefix is not None:
        cache.load_exact(*prefix)
    saved, model.cache = model.cache, cache
    try:
        with torch.inference_mode():
            logits = model.forward(ids[None, start:-1], reset=prefix is None)[0]
    finally:
        model.cache = saved
    return logits, F.cross_entropy(logits.float(), ids[start + 1:], reduction="none")


def cache_quality(modes=CACHE_MODES, *, model: ReferenceModel | str | os.PathLike | None = None,
                  scored: int = SCORED, long_depth: int = LONG_DEPTH, show_progress: bool = True) -> list[dict]:
    """One row per cache mode: ``mode``, ``cls``, ``bits``, ``bytes_per_token`` (exllamav2's, this model's shape),
    and per depth ``short``/``long``: ``ppl``, ``ppl_vs_fp16`` (ratio), ``agree`` (share of positions with FP16's
    top token), plus ``depths`` {'short': (first, last), 'long': (first, last)} of the scored positions."""
    import torch

    if model is None or isinstance(model, (str, os.PathLike)):
        folder = Path(model) if model is not None else models.embedded_model_dir()
        model = ReferenceModel.from_dir(folder, max_seq_len=long_depth + scored + 1)
    folder = model.model_dir
    ids = encode_text(fixed_text(), folder)[: long_depth + scored + 1]
    short_ids = ids[: scored + 1]
    modes = ["fp16"] + [m for m in modes if m != "fp16"]
    # the long prefix, once, with an exact cache: its K/V are what every mode then stores
    with torch.inference_mode():
        model.forward(ids[None, :long_depth])
    prefix = ([k[:, :long_depth].clone() for k in model.cache.key_states],
              [v[:, :long_depth].clone() for v in model.cache.value_states])
    shape = model_shape(folder)
    results, base = [], {}
    steps = progress(modes, desc="cache quality (2 passes per mode)", unit="mode") if show_progress else modes
    for mode in steps:
        row = {"mode": mode, "cls": CACHE_RULES[mode].cls, "bits": _bits(mode),
               "bytes_per_token": kv_cache.kv_bytes_per_token(shape, mode)}
        for depth, (start, pre, these) in {"short": (0, None, short_ids), "long": (long_depth, prefix, ids)}.items():
            logits, nll = _score(model, these, start, mode, pre)
            top, logp = logits.argmax(-1), torch.log_softmax(logits.float(), -1)
            if mode == "fp16":
                base[depth] = (top, float(nll.mean()), logp)
            kl = (base[depth][2].exp() * (base[depth][2] - logp)).sum(-1).mean()
            row[depth] = {"ppl": math.exp(float(nll.mean())),
                          "ppl_vs_fp16": math.exp(float(nll.mean()) - base[depth][1]),
                          "agree": float((top == base[depth][0]).float().mean()), "kl": max(0.0, float(kl))}
        results.append(row)
    for r in results:
        r["depths"] = {"short": (0, scored - 1), "long": (long_depth, long_depth + scored - 1)}
    return results


def format_cache_quality(rows: list[dict]) -> str:
    """The table as the notebook prints it (perplexity to 2 decimals, agreement in %, KL in millinats)."""
    d = rows[0]["depths"]
    head = (f"{'':<34}{'short: positions ' + str(d['short'][0]) + '-' + str(d['short'][1]):<33}"
            f"long: positions {d['long'][0]}-{d['long'][1]}")
    cols = f"{'ppl':>7}{'vs fp16':>8}{'agree':>7}{'KL mnat':>9}  "
    lines = [head, f"{'mode':<5} {'stores':<18} {'B/token':>8} " + cols + cols]
    for r in rows:
        cells = "".join(f"{x['ppl']:>7.2f}{x['ppl_vs_fp16']:>8.3f}{x['agree']:>7.0%}{1000 * x['kl']:>9.1f}  "
                        for x in (r["short"], r["long"]))
        lines.append(f"{r['mode']:<5} {r['bits']:<18} {r['bytes_per_token']:>8,.0f} " + cells.rstrip())
    return "\n".join(lines)
