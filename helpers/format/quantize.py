"""Quantizing one linear to EXL2 by round-to-nearest (no calibration data): ``quantize_linear``.

The input rows are ordered by weight energy (act-order, largest first) so the widest groups hold the most important
rows; each group of rows gets per-column 4-bit scale codes under one fp16 ``q_scale_max``, chosen and rounded as
exllamav2's kernels compute them. The result is packed byte-exactly as exllamav2's converter packs it.
"""
from __future__ import annotations

from typing import Any

import torch

from helpers.core.errors import CourseError
from helpers.format.bits import resolve_groups
from helpers.format.packing import few_threads, pack_linear, scale_values


def _fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    """The smallest fp16 values >= x (positive x), so that a rounded q_scale_max never clips the widest column."""
    h = x.clamp_min(2.0**-14).to(torch.float16)
    up = (h.view(torch.int16) + 1).view(torch.float16)  # next fp16 up (positive numbers: next bit pattern)
    return torch.where(h.to(torch.float32) < x, up, h)


def _rtn_groups(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest a batch of equally sized groups x (G, rows, N) float32.

    Per column the ideal scale maps the column's largest magnitude onto the codes; the group's q_scale_max is the
    largest ideal scale (rounded up to fp16), and each column takes the 4-bit scale code just above or just below
    its ideal scale, whichever leaves the smaller squared error. Scales are rounded as exllamav2 rounds them.
    Returns codes uint8 (G, rows, N), scale codes uint8 (G, N), q_scale_max fp16 (G,).
    """
    zero, maxq = 2 ** (bits - 1), 2 ** bits - 1
    want = x.abs().amax(1) / (maxq / 2)  # (G, N)
    smax16 = _fp16_at_least(want.amax(1))  # (G,)
    table = scale_values(torch.arange(16, dtype=torch.uint8).expand(len(smax16), 16), smax16)  # (G, 16)
    hi = torch.searchsorted(table.contiguous(), want.contiguous()).clamp(0, 15)
    lo = (hi - 1).clamp(0, 15)
    best = None
    for c in (hi, lo):
        sc = torch.gather(table, 1, c).clamp_min(1e-30)[:, None, :]  # (G, 1, N)
        q = torch.clamp(torch.round(x / sc) + zero, 0, maxq)
        err = ((q - zero) * sc - x).pow(2).sum(1)  # (G, N)
        if best is None:
            best = (q, c, err)
        else:
            take = err < best[2]
            best = (torch.where(take[:, None, :], q, best[0]), torch.where(take, c, best[1]), None)
    return best[0].to(torch.uint8), best[1].to(torch.uint8), smax16


def act_order_perm(weight: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest has no calibration Hessian; this orders input features by the energy of their weights
    (sum of squares over outputs), largest first, so that the widest groups hold the most important rows."""
    return torch.argsort(weight.float().pow(2).sum(0), descending=True, stable=True)


def quantize_linear(weight: torch.Tensor, bits_mix: Any, *, act_order: bool = True,
                    perm: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    group_size: int = 32) -> dict[str, torch.Tensor]:
    """Quantize one nn.Linear weight (out, in) to EXL2 by round-to-nearest.

    bits_mix: int, float target bpw, '0.1:6b_32g/0.9:5b_32g' or [(fraction, bits, group_size)]; see parse_mix.
    act_order: permute input rows by :func:`act_order_perm` (or by ``perm``) before grouping; False keeps the order.
    Returns q_weight, q_scale, q_scale_max, q_groups, q_invperm (and bias, fp16, when given), packed byte-exactly
    as exllamav2's converter packs them; output columns are padded to a multiple of 32.
    """
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2 or not weight.is_floating_point():
        raise CourseError("quantize_linear needs a 2-D float weight (out_features, in_features)")
    with few_threads(weight.numel()):
        return _quantize_linear(weight, bits_mix, act_order=act_order, perm=perm, bias=bias, group_size=group_size)


def _quantize_linear(weight, bits_mix, *, act_order, perm, bias, group_size):
    n, k = weight.shape
    groups = resolve_groups(bits_mix, k, n, group_size)
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise CourseError("the weight holds inf or NaN values: it cannot be quantized")
    if perm is None:
        perm = act_order_perm(w) if act_order else torch.arange(k)
    perm = perm.to(torch.int64)
    if perm.shape != (k,) or not torch.equal(torch.sort(perm).values, torch.arange(k)):
        raise CourseError(f"perm must be a permutation of range({k})")
    npad = n + (-n % 32)
    wt = torch.zeros((k, npad), dtype=torch.float32)
    wt[:, :n] = w.T[perm]
    codes = torch.empty((k, npad), dtype=torch.uint8)
    scodes = torch.full((len(groups), npad), 15, dtype=torch.uint8)  # exllamav2 pads scale codes with 15
    smax = torch.empty(len(groups), dtype=torch.float16)
    row = g = 0
    while g < len(groups):  # runs of equal groups are quantized together (fewer, larger tensor ops)
        bits, rows = groups[g]
        run = 1
        while g + run < len(groups) and groups[g + run] == (bits, rows):
            run += 1
        x = wt[row:row + run * rows, :n].reshape(run, rows, n)
        c, sc, sm = _rtn_groups(x, bits)
        codes[row:row + run * rows, :n] = c.reshape(run * rows, n)
        codes[row:row + run * rows, n:] = 2 ** (bits - 1)  # padding columns dequantize to zero, as exllamav2 pads
        scodes[g:g + run, :n] = sc
        smax[g:g + run] = sm
        row += run * rows
        g += run
    if bias is not None and tuple(bias.shape) != (n,):
        raise CourseError(f"bias has shape {list(bias.shape)}, expected [{n}]")
    return pack_linear(codes, scodes, smax, groups, torch.argsort(perm), bias)
