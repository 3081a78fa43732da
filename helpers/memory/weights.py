"""Weight bytes on the GPU when exllamav2 0.3.2 loads a model: read from a real EXL2 folder, or estimated from a
config and a bits-per-weight figure.

From a folder every tensor is sized as exllamav2 keeps it on the GPU (module.py ``load_weight``, ext.py
``make_q_matrix``, torch-rounded); from a config, ``numel x bpw`` plus what the GPU layout adds. The lm_head is
exact for each of exllamav2's head options. The input embedding stays in system RAM (model.py
``load_autosplit_gen`` loads module 0 on the CPU).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from helpers.core.errors import CourseError, CourseWarning
from helpers.format.bits import HEAD_MIXES, check_bpw
from helpers.format.header import TensorInfo, exl2_tensors, read_i16
from helpers.memory.allocation import alloc_bytes, pad32
from helpers.specs.shapes import HEAD_IS_EMBEDDING, ModelShape, model_shape


def _group_map_rows(q_groups: list[int], packed_rows: int) -> int:
    """Rows of the row->group map exllamav2 builds (ext_qmatrix.cpp ``make_group_map``): sum of qrows*32//bits."""
    n = len(q_groups) // 2
    rows = 0
    for i in range(n):
        bits = q_groups[2 * i]
        qrows = (q_groups[2 * i + 3] - q_groups[2 * i + 1]) if i < n - 1 else packed_rows - q_groups[2 * i + 1]
        rows += (qrows * 32) // bits
    return rows


def _linear_from_file(tensors: dict[str, TensorInfo], key: str, *, drop_perm: bool, out_features: int,
                      alt_key: str | None = None) -> tuple[int, str]:
    """GPU bytes (torch-rounded) of one linear as exllamav2 loads it; and how it is stored ('exl2' or 'fp16').

    Follows module.py ``load_weight`` (EXL2: q_weight, q_invperm, q_scale, q_scale_max, q_groups, bias; q_perm is
    rebuilt), ext.py ``make_q_matrix`` (perms cast to int16, ``q_group_map`` built), mlp.py ``load``
    (``down_proj`` loaded with ``unmap=True``: its q_perm/q_invperm are dropped) and linear.py ``load`` (an fp16
    weight is padded to a multiple of 32 output rows).
    """
    for k in [key] + ([alt_key] if alt_key else []):
        if f"{k}.q_weight" in tensors:
            t = lambda s, k=k: tensors[f"{k}.{s}"]  # noqa: E731
            need = ["q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups"]
            lost = [s for s in need if f"{k}.{s}" not in tensors]
            if lost:
                raise CourseError(f"EXL2 checkpoint is missing {', '.join(k + '.' + s for s in lost)}: the folder is "
                                  "incomplete; re-download or rebuild it")
            sizes = [t(s).nbytes for s in ("q_weight", "q_scale", "q_scale_max", "q_groups")]
            if f"{k}.bias" in tensors:
                sizes.append(t("bias").nbytes)
            K = t("q_invperm").numel
            if not drop_perm:
                sizes += [2 * K, 2 * K]  # q_perm and q_invperm as int16
            rows = _group_map_rows(read_i16(t("q_groups")), t("q_weight").shape[0])
            sizes.append(2 * 2 * rows)  # q_group_map: (group, rows left) pairs, int16
            return sum(alloc_bytes(s) for s in sizes), "exl2"
        if f"{k}.weight" in tensors:
            w = tensors[f"{k}.weight"]
            rows = w.shape[0] if w.shape else 0
            cols = w.numel // max(rows, 1)
            pad = pad32(out_features) - rows if rows == out_features else 0
            total = alloc_bytes((rows + pad) * cols * 2)
            if f"{k}.bias" in tensors:
                total += alloc_bytes((rows + pad) * 2)
            return total, "fp16"
    raise CourseError(f"EXL2 checkpoint has no tensors for '{key}' (neither .q_weight nor .weight): the folder is "
                      "incomplete or not an EXL2 model of this config")


def _norm_bytes(tensors: dict[str, TensorInfo], key: str, default_numel: int) -> int:
    info = tensors.get(f"{key}.weight")
    numel = info.numel if info else default_numel
    extra = alloc_bytes(tensors[f"{key}.bias"].numel * 2) if f"{key}.bias" in tensors else 0
    return alloc_bytes(numel * 2) + extra


def exl2_head_bytes(in_features: int, out_features: int, head_bits: int = 6) -> int:
    """GPU bytes of an lm_head quantized with exllamav2's head options (torch-rounded), or fp16 when head_bits=16.

    Group layout as conversion/qparams.py ``QParams.total_bits`` assigns it (rows per bit width in whole groups,
    the last group taking what remains); tensors as ext.py ``make_q_matrix`` keeps them on the GPU.
    """
    N = pad32(out_features)
    K = in_features
    if head_bits == 16:
        return alloc_bytes(K * N * 2)
    if head_bits not in HEAD_MIXES:
        raise CourseError(f"head bits {head_bits} is not an exllamav2 head option: use one of "
                          f"{', '.join(map(str, sorted(HEAD_MIXES)))} or 16 (fp16)")
    remaining, groups, packed_rows = K, 0, 0
    for p, b, gsz in HEAD_MIXES[head_bits]:
        g = math.ceil(min(K * p, remaining) / gsz)
        rows = min(g * gsz, max(remaining, 0))
        remaining -= g * gsz
        groups += g
        packed_rows += math.ceil(rows * b / 32)
    sizes = [packed_rows * N * 4,  # q_weight int32
             groups * (N // 8) * 4,  # q_scale: 4-bit codes, 8 per int32
             groups * 2,  # q_scale_max fp16
             groups * 2 * 2,  # q_groups int16 pairs
             2 * K, 2 * K,  # q_perm, q_invperm int16
             2 * 2 * K]  # q_group_map int16 pairs
    return sum(alloc_bytes(s) for s in sizes)


def _estimated_modules(shape: ModelShape, bpw: float, head_bits: int) -> list[dict]:
    """Per-module GPU bytes estimated from the config and an average bpw.

    exllamav2's converter spends ``numel x bpw`` bits per layer, counting q_weight, scales, q_groups and the int32
    q_invperm it writes (conversion/qparams.py ``total_bits``; conversion/optimize.py budget). On the GPU the
    permutations become two int16 vectors (the same 4 bytes per input row) and a row->group map adds 4 bytes per
    input row; ``down_proj`` drops its permutations. So: file bytes + 4 x in_features, except down_proj.
    The head is computed exactly from head_bits; norms are fp16.
    """
    mods: list[dict] = [{"module": "model.embed_tokens", "kind": "embedding", "layer": None,
                         "weight_bytes": shape.vocab * shape.hidden * 2, "device_hint": "cpu"}]
    norm = shape.hidden * 2
    for i in range(shape.n_layers):
        att = (shape.norms_per_layer // 2) * norm + (2 * shape.q_dim * 2 + 2 * shape.kv_dim * 2 if shape.qk_norm else 0)
        mlp = (shape.norms_per_layer // 2) * norm
        for mod, lin, fin, fout, _bias in shape.layer_linears():
            b = math.ceil(fin * fout * bpw / 8) + (0 if lin == "down_proj" else 4 * fin)
            if mod == "self_attn":
                att += b
            else:
                mlp += b
        mods.append({"module": f"model.layers.{i}.self_attn", "kind": "attention", "layer": i, "weight_bytes": att,
                     "device_hint": "gpu"})
        mods.append({"module": f"model.layers.{i}.mlp", "kind": "mlp", "layer": i, "weight_bytes": mlp,
                     "device_hint": "gpu"})
    mods.append({"module": "model.norm", "kind": "norm", "layer": None, "weight_bytes": norm, "device_hint": "gpu"})
    mods.append({"module": "lm_head", "kind": "head", "layer": None,
                 "weight_bytes": exl2_head_bytes(shape.hidden, shape.vocab, head_bits), "device_hint": "gpu"})
    return mods


def _file_modules(shape: ModelShape) -> list[dict]:
    """Per-module GPU bytes of a real EXL2 folder, torch-rounded, following exllamav2's loaders (see
    ``_linear_from_file``)."""
    folder = Path(shape.exl2_dir)
    tensors = exl2_tensors(folder)
    emb = tensors.get("model.embed_tokens.weight")
    if emb is None:
        raise CourseError(f"{folder} has no model.embed_tokens.weight: not a complete EXL2 checkpoint")
    mods: list[dict] = [{"module": "model.embed_tokens", "kind": "embedding", "layer": None,
                         "weight_bytes": emb.numel * 2, "device_hint": "cpu"}]
    names_att = (["input_layernorm", "post_attention_layernorm"] if shape.norms_per_layer == 4
                 else ["input_layernorm"])
    names_mlp = (["pre_feedforward_layernorm", "post_feedforward_layernorm"] if shape.norms_per_layer == 4
                 else ["post_attention_layernorm"])
    for i in range(shape.n_layers):
        p = f"model.layers.{i}"
        att = sum(_norm_bytes(tensors, f"{p}.{n}", shape.hidden) for n in names_att)
        if shape.qk_norm:
            att += alloc_bytes(shape.q_dim * 2) + alloc_bytes(shape.kv_dim * 2)
        mlp = sum(_norm_bytes(tensors, f"{p}.{n}", shape.hidden) for n in names_mlp)
        seen = set()
        for mod, lin, _fin, fout, _b in shape.layer_linears():
            if (mod, lin) in seen:
                continue
            seen.add((mod, lin))
            if mod == "self_attn":
                att += _linear_from_file(tensors, f"{p}.self_attn.{lin}", drop_perm=False, out_features=fout)[0]
            else:
                mlp += _linear_from_file(tensors, f"{p}.mlp.{lin}", drop_perm=(lin == "down_proj"),
                                         out_features=fout)[0]
        mods.append({"module": f"{p}.self_attn", "kind": "attention", "layer": i, "weight_bytes": att,
                     "device_hint": "gpu"})
        mods.append({"module": f"{p}.mlp", "kind": "mlp", "layer": i, "weight_bytes": mlp, "device_hint": "gpu"})
    mods.append({"module": "model.norm", "kind": "norm", "layer": None,
                 "weight_bytes": _norm_bytes(tensors, "model.norm", shape.hidden), "device_hint": "gpu"})
    alt = "model.embed_tokens" if (shape.tied_embeddings or shape.architecture in HEAD_IS_EMBEDDING) else None
    head, _ = _linear_from_file(tensors, "lm_head", drop_perm=False, out_features=shape.vocab, alt_key=alt)
    mods.append({"module": "lm_head", "kind": "head", "layer": None, "weight_bytes": head, "device_hint": "gpu"})
    return mods


def weight_modules(shape: ModelShape, bpw: float | None, head_bits: int) -> tuple[list[dict], str]:
    if shape.exl2_dir:
        if bpw is not None:
            warnings.warn(f"{shape.name} is a real EXL2 folder: its tensors decide the weight bytes and bpw={bpw} is "
                          "ignored", CourseWarning, stacklevel=3)
        return _file_modules(shape), f"read from the EXL2 tensors in {shape.exl2_dir}"
    if bpw is None:
        raise CourseError(f"{shape.name} is a config without EXL2 tensors: give the bits per weight (e.g. --bpw 5.5)")
    bpw = check_bpw(bpw)
    head = "fp16" if head_bits == 16 else f"{head_bits}-bit"
    return (_estimated_modules(shape, bpw, head_bits),
            f"estimated from the config at {bpw:g} bpw (decoder layers), {head} lm_head")


def weight_bytes(spec: Any, bpw: float | None = None, head_bits: int = 6) -> dict:
    """``{'vram_bytes', 'system_ram_bytes', 'source', ...}``: GPU weights and the CPU-resident embedding.

    From a real EXL2 folder: every tensor as exllamav2 keeps it on the GPU (torch-rounded). From a config: an
    estimate from ``bpw`` (decoder layers) and ``head_bits`` (lm_head, exact for that option). The embedding
    (fp16, ``vocab x hidden``) stays in system RAM: model.py ``load_autosplit_gen`` loads module 0 on the CPU.
    """
    shape = model_shape(spec)
    mods, source = weight_modules(shape, bpw, head_bits)
    vram = sum(m["weight_bytes"] for m in mods if m["device_hint"] == "gpu")
    ram = sum(m["weight_bytes"] for m in mods if m["device_hint"] == "cpu")
    head = next(m["weight_bytes"] for m in mods if m["kind"] == "head")
    return {"vram_bytes": vram, "system_ram_bytes": ram, "lm_head_bytes": head, "layers_bytes": vram - head,
            "source": source}


class ModelWeights:
    """A model's weights resolved once: its shape, per-module bytes and totals (none depend on the context)."""

    def __init__(self, spec: Any, bpw: float | None, head_bits: int):
        self.shape = model_shape(spec)
        if isinstance(head_bits, bool) or head_bits not in list(HEAD_MIXES) + [16]:
            raise CourseError(f"head bits {head_bits!r} is not an exllamav2 head option: use one of "
                              f"{', '.join(map(str, sorted(HEAD_MIXES)))} or 16 (fp16)")
        self.modules, self.source = weight_modules(self.shape, bpw, head_bits)
        self.bpw = None if self.shape.exl2_dir else bpw
        self.head_bits = head_bits
        self.vram = sum(m["weight_bytes"] for m in self.modules if m["device_hint"] == "gpu")
        self.ram = sum(m["weight_bytes"] for m in self.modules if m["device_hint"] == "cpu")
        self.head = next(m["weight_bytes"] for m in self.modules if m["kind"] == "head")
