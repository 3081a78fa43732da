"""K and V stored the way each exllamav2 0.3.2 cache mode stores them, on the CPU, for the reference decoder.

``fp8`` keeps each fp16 value's high byte (e5m2 by truncation); ``q8``/``q6``/``q4`` rotate each 64 values with a
32-point Hadamard transform, then store round-to-nearest codes with one fp16 scale per ``GROUP`` values (bits in
``CACHE_BITS``). The kernels step by step, read from exllamav2's sources (never imported here), and what is not
reproduced: docs/FACTS.md §2. ``QuantizedKVCache`` plugs this into ``helpers.engines.reference``: earlier positions
read back dequantized, each token's own K/V exact, as in an exllamav2 decode step.

Public names: ``CACHE_BITS``, ``GROUP``, ``sylvester``, ``hadamard32``, ``fp8_encode``, ``fp8_decode``, ``quantize``,
``dequantize``, ``pack``, ``roundtrip``, ``store_roundtrip``, ``QuantizedKVCache``.
"""
from __future__ import annotations

import math

import torch

from helpers.core.errors import CourseError
from helpers.engines.reference import KVCache, causal_mask
from helpers.memory.cache_modes import check_cache_mode

#: mode -> (bits of K, bits of V) for the quantized modes (cache.cu, array_fp16_to_q_kv_cuda's dispatch)
CACHE_BITS = {"q8": (8, 8), "q6": (8, 4), "q4": (4, 4)}
#: stored values per fp16 scale
GROUP = 32
#: fp16 values per rotation block (two interleaved 32-point Hadamard transforms)
BLOCK = 64


def sylvester(n: int = 32) -> "torch.Tensor":
    """The unnormalised n x n Hadamard matrix (entries +-1), built as Sylvester's recursion [[H, H], [H, -H]]."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard32(x: torch.Tensor, *, butterfly: bool = False) -> torch.Tensor:
    """The kernels' rotation: x (..., 64) -> fp16 (..., 64); the even and the odd positions each get an unnormalised
    32-point Hadamard transform.

    The kernel computes it as a butterfly of 5 rounds of fp16 additions (``butterfly=True`` does exactly that, with a
    rounding to fp16 after each round); the default computes the same transform as one float32 matrix product rounded
    once to fp16, 5x faster on a CPU and within fp16 rounding of the butterfly (a test checks it)."""
    if x.shape[-1] != BLOCK:
        raise CourseError(f"hadamard32 works on blocks of {BLOCK} values, got {x.shape[-1]}")
    lead = x.shape[:-1]
    w = x.to(torch.float16).float().reshape(-1, 32, 2)      # lane t holds values 2t and 2t+1
    if not butterfly:
        return torch.einsum("ij,njh->nih", sylvester(32), w).half().reshape(*lead, BLOCK)
    for i in (1, 2, 4, 8, 16):
        # lanes t and t + i (bit i of t clear) become (own + partner, own - partner), each rounded to fp16 as
        # __hadd2 rounds; the kernel's lane with bit i set computes partner - own, the same number
        pairs = w.reshape(-1, 32 // (2 * i), 2, i, 2)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        w = torch.stack(((a + b).half().float(), (a - b).half().float()), dim=2).reshape(-1, 32, 2)
    return w.half().reshape(*lead, BLOCK)


def fp8_encode(x: torch.Tensor) -> torch.Tensor:
    """FP8 e5m2 by truncation, as ``fp16_to_fp8``: the high byte of each fp16 value (uint8)."""
    bits = x.to(torch.float16).contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    return (bits >> 8).to(torch.uint8)


def fp8_decode(b: torch.Tensor) -> torch.Tensor:
    """``fp8_to_fp16``: the byte becomes the high byte of an fp16 whose low byte is 0."""
    bits = (b.to(torch.int32) << 8)
    bits = torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16)
    return bits.view(torch.float16)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % BLOCK:
        raise CourseError(f"a quantized cache needs kv_heads x head_dim to be a multiple of {BLOCK} "
                          f"(got {x.shape[-1]}): exllamav2's kernels work on blocks of {BLOCK} values")
    return x.reshape(-1, BLOCK)


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp16_to_q<bits>``: x (..., n), n a multiple of 64 (one token's kv_heads x head_dim) -> (codes uint8
    (..., n), one code per value, unpacked; scales fp16 (..., n // 32))."""
    if bits not in (4, 8):
        raise CourseError(f"exllamav2's Q caches store 4- or 8-bit codes, not {bits}")
    w = hadamard32(_blocks(x)).reshape(-1, GROUP)             # rotated, in scale groups of 32 stored positions
    absmax = w.abs().amax(-1, keepdim=True)
    half = 2 ** (bits - 1)
    norm = (w / absmax).float() * half + half                  # __hfma2: one fp16 rounding of the exact result
    norm = torch.nan_to_num(norm.to(torch.float16).float(), nan=0.0)   # 0/0 in an all-zero group -> code 0
    codes = torch.round(norm).clamp(0, 2 ** bits - 1).to(torch.uint8)
    scales = absmax * torch.tensor(1.0 / half, dtype=torch.float16)
    return codes.reshape(x.shape), scales.reshape(*x.shape[:-1], x.shape[-1] // GROUP)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """``q_to_fp16<bits>``: codes (..., n) and scales (..., n // 32) -> fp16 values (..., n)."""
    half = 2 ** (bits - 1)
    w = (codes.to(torch.int32) - half).to(torch.float16).reshape(-1, GROUP) * scales.reshape(-1, 1)
    x = hadamard32(w.reshape(-1, BLOCK)) * torch.tensor(1.0 / 32, dtype=torch.float16)
    return x.reshape(codes.shape)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The stored bytes: 8-bit codes as they are; 4-bit codes two per byte, value 2k in the low nibble."""
    if bits == 8:
        return codes.to(torch.uint8)
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def roundtrip(x: torch.Tensor, mode: str, *, part: str = "k") -> torch.Tensor:
    """x (..., kv_heads x head_dim) stored in ``mode`` and read back, in x's dtype. ``part``: 'k' or 'v' (Q6 stores
    them at different widths)."""
    mode = check_cache_mode(mode)
    if mode == "fp16":
        y = x.to(torch.float16)
    elif mode == "fp8":
        y = fp8_decode(fp8_encode(x))
    else:
        bits = CACHE_BITS[mode][0 if part == "k" else 1]
        y = dequantize(*quantize(x, bits), bits)
    return y.to(x.dtype)


def store_roundtrip(t: torch.Tensor, mode: str, part: str) -> torch.Tensor:
    """A (batch, n, kv_heads, head_dim) K or V tensor stored in ``mode`` and read back (each token's values flattened,
    as exllamav2's cache lays them out)."""
    flat = t.reshape(*t.shape[:2], -1)
    return roundtrip(flat, mode, part=part).reshape(t.shape)


class QuantizedKVCache(KVCache):
    """The reference decoder's cache, storing K and V as exllamav2's ``mode`` does and reading them back.

    ``store`` keeps the dequantized values (what a later token reads) and the exact K/V of the newest tokens;
    ``attend`` gives each of those tokens its own K/V exact and every earlier position dequantized, as in a decode
    step (a prefill of n tokens here behaves like n decode steps, so one pass measures n decoded tokens)."""

    def __init__(self, *args, mode: str = "fp16", **kwargs):
        super().__init__(*args, **kwargs)
        self.mode = check_cache_mode(mode)
        self._exact: tuple[torch.Tensor, torch.Tensor] | None = None     # the newest tokens' K/V of the last layer

    def store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._exact = (k, v)
        return super().store(layer, start, store_roundtrip(k, self.mode, "k"), store_roundtrip(v, self.mode, "v"))

    def load_exact(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Fill positions [0, depth) from exact per-layer K/V (batch, depth, kv_heads, head_dim), stored in the mode."""
        depth = keys[0].shape[1]
        for layer, (k, v) in enumerate(zip(keys, values)):
            super().store(layer, 0, store_roundtrip(k, self.mode, "k"), store_roundtrip(v, self.mode, "v"))
        self.current_seq_len = depth

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, start: int, causal: bool = True,
               window: int | None = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v over the dequantized cache, with each query's own position exact."""
        kx, vx = self._exact
        b, n, heads, d = q.shape
        group = heads // k.shape[2]

        def rep(t: torch.Tensor) -> torch.Tensor:      # repeat_kv: one copy of each KV head per query head
            return t.repeat_interleave(group, dim=2).transpose(1, 2)

        qt, kt, vt, kxt, vxt = q.transpose(1, 2), rep(k), rep(v), rep(kx), rep(vx)
        end, rows = kt.shape[2], torch.arange(n)
        own = start + rows
        scores = qt @ kt.transpose(-1, -2) / math.sqrt(d)                        # (b, heads, n, end)
        scores[..., rows, own] = (qt * kxt).sum(-1) / math.sqrt(d)             # each token's own key, exact
        allowed = causal_mask(start, n, end, window, q.device) if causal else torch.ones(n, end, dtype=torch.bool)
        probs = torch.softmax(scores.float().masked_fill(~allowed, float("-inf")), dim=-1).to(q.dtype)
        out = probs @ vt + probs[..., rows, own][..., None] * (vxt - vt[..., own, :])
        return out.transpose(1, 2).reshape(b, n, heads * d)
