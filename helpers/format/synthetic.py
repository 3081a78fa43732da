"""Shape-faithful synthetic EXL2 checkpoints: a model's exact tensor shapes and a realistic bit mix, random data.

Memory and speed depend on shapes and bytes, not on what the weights say. ``write_synthetic`` takes a config.json
(a dict, a path or a bundled name such as ``"qwen2.5-14b"``) and a target bpw and writes a checkpoint exllamav2
loads like the real one: ``plan_bits`` mixes two neighbouring widths per linear around seeded per-layer targets
(``layer_targets``) that hit the target (head excluded; the head gets exllamav2's head mix); ``synthetic_specs``
fills in random words, ``q_scale_max`` scaled (``WEIGHT_GAIN``) so activations keep their size. Seeded, written a
tensor at a time: little memory, the same bytes on any machine.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from helpers.core.errors import CourseError
from helpers.core.progress import progress as bar
from helpers.core.units import GIB
from helpers.format.bits import HEAD_MIXES, auto_mix, check_bpw, packed_rows, plan_groups, stored_bits
from helpers.format.config import config_get, expected_linear_shapes, resolve_config
from helpers.format.names import LINEAR_KINDS, linear_order
from helpers.format.packing import q_groups_tensor
from helpers.format.writer import TensorSpec, exl2_config, exl2_output_dir, write_shards

_CHUNK = 1 << 22  # uint64 words per generator chunk (32 MiB); fixed, so output does not depend on thread count
#: E[((c+1)^2/256)^2]^0.5 for a uniform 4-bit scale code c, times 1/sqrt(12) for a uniform code
_SPREAD = math.sqrt(sum((c + 1) ** 4 for c in range(16)) / 16) / 256 / math.sqrt(12)
WEIGHT_GAIN = 0.5


def _norm_names(config: Mapping) -> list[str]:
    arch = " ".join(config.get("architectures", []))
    names = ["input_layernorm", "post_attention_layernorm"]
    if "Gemma2" in arch or "Gemma3" in arch:
        names += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    return names


class _Words:
    """Seeded random 32-bit words, generated in fixed chunks on a thread pool into one reused buffer.

    Reusing the buffer matters: touching fresh pages costs more than generating the numbers (measured: 400 MB took
    2.2 s into new memory and 0.3 s into memory already touched, on the course's 2-core VM). Each tensor is written
    to disk before the next one is made, so one buffer serves them all.
    """

    def __init__(self, pool: cf.Executor):
        self.pool = pool
        self.buf = np.empty(0, dtype=np.uint64)

    def __call__(self, shape: tuple[int, ...], key: tuple[int, ...]) -> np.ndarray:
        n = math.prod(shape)
        n64 = (n + 1) // 2
        if self.buf.size < n64:
            self.buf = np.empty(n64, dtype=np.uint64)
        out = self.buf[:n64]

        def fill(i: int) -> None:
            a = i * _CHUNK
            b = min(n64, a + _CHUNK)
            out[a:b] = np.random.SFC64(np.random.SeedSequence(list(key) + [i])).random_raw(b - a)

        list(self.pool.map(fill, range((n64 + _CHUNK - 1) // _CHUNK)))
        return out.view(np.uint32)[:n].reshape(shape)


def layer_targets(n_layers: int, bpw: float, seed: int) -> list[dict[str, float]]:
    """Per layer, per kind, a target bpw wandering around ``bpw`` (attention a little wider than the MLP, as
    exllamav2's optimizer tends to choose)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_layers):
        base = bpw + rng.uniform(-0.3, 0.3)
        out.append({k: base + (0.15 if k in ("q_proj", "k_proj", "v_proj", "o_proj") else -0.05)
                    + rng.uniform(-0.1, 0.1) for k in LINEAR_KINDS})
    return out


def plan_bits(config: Mapping, bpw: float, *, seed: int = 0, head_bits: int | None = 6) \
        -> dict[str, list[tuple[int, int]]]:
    """{linear prefix: groups [(bits, rows)]} for every quantized linear, the decoder hitting ``bpw`` overall."""
    shapes = expected_linear_shapes(config)
    missing = [k for k in LINEAR_KINDS if k not in shapes]
    if missing or "lm_head" not in shapes:
        raise CourseError("the config lacks hidden_size / num_attention_heads / intermediate_size / vocab_size: "
                          "it is not a decoder config.json that exllamav2 reads")
    n_layers = config_get(config, "num_hidden_layers")
    if not n_layers:
        raise CourseError("the config has no num_hidden_layers")
    targets = layer_targets(n_layers, bpw, seed)
    shift = 0.0
    plan: dict[str, list[tuple[int, int]]] = {}
    for _ in range(6):  # nudge every layer by the same amount until the whole hits the target
        plan, bits_sum, w_sum = {}, 0, 0
        for i in range(n_layers):
            for kind in LINEAR_KINDS:
                k, n = shapes[kind]
                sub = "self_attn" if kind in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                t = min(8.2, max(2.05, targets[i][kind] + shift))
                groups = auto_mix(k, n, t)
                plan[f"model.layers.{i}.{sub}.{kind}"] = groups
                bits_sum += stored_bits(k, n, groups)
                w_sum += k * n
        got = bits_sum / w_sum
        if abs(got - bpw) < 0.005:
            break
        shift += bpw - got
    if head_bits is not None and not config.get("tie_word_embeddings"):
        if head_bits not in HEAD_MIXES:
            raise CourseError(f"head_bits must be one of {sorted(HEAD_MIXES)} (exllamav2's head options)")
        k, _ = shapes["lm_head"]
        plan["lm_head"] = plan_groups(k, HEAD_MIXES[head_bits])
    return plan


def _scale_max(bits: int, in_features: int) -> float:
    return WEIGHT_GAIN / (math.sqrt(in_features) * 2**bits * _SPREAD)


def synthetic_specs(config: Mapping, plan: Mapping[str, list[tuple[int, int]]], *, seed: int,
                    pool: cf.Executor) -> list[TensorSpec]:
    """Every tensor of the checkpoint, shapes up front, data made when written."""
    shapes = expected_linear_shapes(config)
    h, vocab = config_get(config, "hidden_size"), config_get(config, "vocab_size")
    arch = " ".join(config.get("architectures", []))
    qwen = "Qwen2" in arch or str(config.get("model_type", "")).startswith("qwen2")
    gemma = "Gemma" in arch
    bias_qkv = qwen or bool(config.get("attention_bias"))
    specs: list[TensorSpec] = []
    counter = [0]
    source = _Words(pool)

    def words(shape, tag):
        counter[0] += 1
        key = (seed, counter[0], tag)
        return lambda: torch.from_numpy(source(shape, key).view(np.int32))

    def embed():
        w = source(((vocab * h + 1) // 2,), (seed, 0, 1)).view(np.uint16)[: vocab * h]
        # sign, 2 random exponent bits above a fixed one, random mantissa: |x| in [2^-7, 2^-3)
        w &= 0x8FFF
        w |= 0x2000
        return torch.from_numpy(w.view(np.float16).reshape(vocab, h))

    specs.append(TensorSpec("model.embed_tokens.weight", (vocab, h), torch.float16, embed))
    norm_value = 0.0 if gemma else 1.0
    for name, groups in plan.items():
        kind = name.rsplit(".", 1)[-1]
        k, n = shapes[kind]
        npad = n + (-n % 32)
        qrows = sum(packed_rows(r, b) for b, r in groups)
        g = len(groups)
        smax = torch.tensor([_scale_max(b, k) for b, _ in groups], dtype=torch.float32).to(torch.float16)
        qgroups = q_groups_tensor(groups)
        ikey = seed * 1_000_003 + len(specs)
        specs += [
            TensorSpec(f"{name}.q_groups", tuple(qgroups.shape), torch.int16, lambda t=qgroups: t),
            TensorSpec(f"{name}.q_invperm", (k,), torch.int32,
                            lambda k=k, s=ikey: torch.randperm(k, generator=torch.Generator().manual_seed(s))
                            .to(torch.int32)),
            TensorSpec(f"{name}.q_scale", (g, npad // 8), torch.int32, words((g, npad // 8), 2)),
            TensorSpec(f"{name}.q_scale_max", (g,), torch.float16, lambda t=smax: t),
            TensorSpec(f"{name}.q_weight", (qrows, npad), torch.int32, words((qrows, npad), 3)),
        ]
        if bias_qkv and kind in ("q_proj", "k_proj", "v_proj"):
            specs.append(TensorSpec(f"{name}.bias", (n,), torch.float16,
                                         lambda n=n, s=ikey: (0.02 * torch.randn(
                                             n, generator=torch.Generator().manual_seed(s + 1))).half()))
    for i in range(config_get(config, "num_hidden_layers")):
        for norm in _norm_names(config):
            specs.append(TensorSpec(f"model.layers.{i}.{norm}.weight", (h,), torch.float16,
                                         lambda: torch.full((h,), norm_value, dtype=torch.float16)))
    specs.append(TensorSpec("model.norm.weight", (h,), torch.float16,
                                 lambda: torch.full((h,), norm_value, dtype=torch.float16)))
    specs.sort(key=lambda s: linear_order(s.name))  # layer by layer, so shards follow the model
    return specs


def write_synthetic(config: Mapping | str | os.PathLike, bpw: float, out_dir: str | os.PathLike, *, seed: int = 0,
                    head_bits: int | None = 6, progress: bool = True, shard_bytes: int = 2 * GIB,
                    threads: int | None = None, overwrite: bool = True) -> Path:
    """Write a synthetic EXL2 checkpoint with the config's exact shapes at ``bpw`` (decoder, head excluded).
    Returns the directory. Atomic: built beside ``out_dir`` and renamed into place."""
    cfg = resolve_config(config)
    bpw = check_bpw(bpw)
    plan = plan_bits(cfg, bpw, seed=seed, head_bits=head_bits)
    workers = threads or min(32, os.cpu_count() or 1)
    with cf.ThreadPoolExecutor(workers) as pool:
        specs = synthetic_specs(cfg, plan, seed=seed, pool=pool)
        total = sum(s.nbytes for s in specs)
        decoder = [(stored_bits(*expected_linear_shapes(cfg)[p.rsplit(".", 1)[-1]], g),
                    math.prod(expected_linear_shapes(cfg)[p.rsplit(".", 1)[-1]]))
                   for p, g in plan.items() if p != "lm_head"]
        measured = sum(b for b, _ in decoder) / sum(w for _, w in decoder)
        out_cfg = exl2_config(cfg, bits_per_weight=measured, head_bits=head_bits if "lm_head" in plan else None,
                                   tied="lm_head" not in plan,
                                   extra={"synthetic": True, "seed": seed, "target": bpw})
        pbar = bar(total=total, desc="synthetic", unit="B", unit_scale=True) if progress else None
        with exl2_output_dir(out_dir, overwrite=overwrite) as tmp:
            write_shards(tmp, specs, shard_bytes=shard_bytes,
                              on_tensor=(lambda s: pbar.update(s.nbytes)) if pbar is not None else None)
            (tmp / "config.json").write_text(json.dumps(out_cfg, indent=2) + "\n", encoding="utf-8")
        if pbar is not None:
            pbar.close()
    return Path(out_dir).expanduser().absolute()
