"""Writing EXL2 checkpoints: ``write_exl2`` quantizes a float state dict into a folder exllamav2 loads.

The pieces are reusable (the synthetic writer uses them too): ``TensorSpec`` (a tensor whose data is made only when
written), ``write_safetensors`` / ``write_shards`` (streaming, one tensor in memory at a time, sharded with a Hugging
Face index above a size), ``exl2_config`` (the config.json exllamav2 needs), ``copy_tokenizer`` and
``exl2_output_dir`` (the folder appears whole or not at all).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch

from helpers.core.atomic import atomic_output_dir
from helpers.core.errors import CourseError
from helpers.core.progress import progress as bar
from helpers.core.units import GIB
from helpers.format.bits import HEAD_MIXES
from helpers.format.config import expected_linear_shapes, is_exl2_dir, rope_theta_of
from helpers.format.names import LINEAR_KINDS, layer_of, natural_key
from helpers.format.quantize import quantize_linear
from helpers.format.reader import SAFETENSORS_DTYPES

WRITER_VERSION = 1  #: bump when the writer's output changes, so cached models (helpers.models.embedded) are rebuilt
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
                   "chat_template.json")
_ST_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass
class TensorSpec:
    """A tensor to write: its name, shape and dtype up front, its data made only when it is written."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        size = torch.empty((), dtype=self.dtype).element_size()
        return math.prod(self.shape) * size

    @staticmethod
    def of(name: str, tensor: torch.Tensor) -> "TensorSpec":
        return TensorSpec(name, tuple(tensor.shape), tensor.dtype, lambda: tensor)


def write_safetensors(path: Path, specs: Sequence[TensorSpec], metadata: dict[str, str] | None = None) -> int:
    """Write a .safetensors file tensor by tensor (only one tensor's data in memory at a time). Returns its size."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for s in specs:
        if s.dtype not in _ST_NAMES:
            raise CourseError(f"cannot store {s.name} with dtype {s.dtype} in safetensors")
        header[s.name] = {"dtype": _ST_NAMES[s.dtype], "shape": list(s.shape),
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for s in specs:
            t = s.make()
            if tuple(t.shape) != tuple(s.shape) or t.dtype != s.dtype:
                raise CourseError(f"tensor {s.name} came out {tuple(t.shape)} {t.dtype}, planned {s.shape} {s.dtype}")
            t = t.detach().cpu().contiguous()
            data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
            fh.write(memoryview(data) if t.numel() else data)
        fh.flush()
        os.fsync(fh.fileno())
    return len(raw) + 8 + offset


def exl2_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = True) -> ContextManager[Path]:
    """``atomic_output_dir`` for a checkpoint: an existing ``out_dir`` is replaced only if it is empty or an EXL2
    checkpoint (:func:`helpers.format.config.is_exl2_dir`)."""
    return atomic_output_dir(out_dir, overwrite=overwrite, replaceable=_replaceable, what="an EXL2 checkpoint")


def _replaceable(folder: Path) -> bool:
    try:
        return is_exl2_dir(folder)
    except CourseError:  # a corrupt *.safetensors: not known to be ours, so not replaced
        return False


def write_shards(folder: Path, specs: Sequence[TensorSpec], *, shard_bytes: int = 4 * GIB,
                 metadata: dict[str, str] | None = None, on_tensor: Callable[[TensorSpec], None] | None = None) \
        -> list[Path]:
    """Write tensors into ``output.safetensors`` or, above ``shard_bytes``, ``output-00001-of-0000N.safetensors``
    plus a Hugging Face style ``model.safetensors.index.json``. Returns the files."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    n = len(shards)
    names = ["output.safetensors"] if n == 1 else [f"output-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    files = []
    for name, group in zip(names, shards):
        if on_tensor is not None:
            group = [TensorSpec(s.name, s.shape, s.dtype, _tick(s, on_tensor)) for s in group]
        write_safetensors(folder / name, group, metadata)
        files.append(folder / name)
    if n > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: name for name, group in zip(names, shards) for s in group}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    return files


def _tick(spec: TensorSpec, fn: Callable[[TensorSpec], None]) -> Callable[[], torch.Tensor]:
    def make():
        t = spec.make()
        fn(spec)
        return t
    return make


def exl2_config(config: Mapping, *, bits_per_weight: float, head_bits: Any, tied: bool,
                extra: Mapping | None = None) -> dict:
    """config.json for an EXL2 checkpoint: the source config plus a TOP-LEVEL rope_theta (exllamav2 0.3.2 reads
    only that key and silently falls back to its default; transformers 5 nests it in rope_parameters), the tie flag
    and a ``quantization_config`` like exllamav2's converter writes (quant_method exl2, bits, head_bits)."""
    cfg = json.loads(json.dumps(dict(config)))
    theta = rope_theta_of(cfg)
    if theta is not None:
        cfg["rope_theta"] = theta
    if tied:
        cfg["tie_word_embeddings"] = True
    qc = {"quant_method": "exl2", "bits": round(float(bits_per_weight), 4), "head_bits": head_bits,
          "quantizer": "helpers.format.exl2 round-to-nearest (exl2-course)"}
    qc.update(extra or {})
    cfg["quantization_config"] = qc
    return cfg


def copy_tokenizer(tokenizer_dir: str | os.PathLike, dest: Path) -> list[str]:
    src = Path(tokenizer_dir).expanduser()
    if not src.is_dir():
        raise CourseError(f"tokenizer directory {src} does not exist: pass the folder holding tokenizer.json")
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dest / name)
            copied.append(name)
    if not any(n in copied for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise CourseError(f"{src} holds no tokenizer (tokenizer.json, tokenizer.model or vocab.json)")
    return copied


def _linear_target(name: str, tensor: torch.Tensor) -> str | None:
    """'decoder' / 'head' if write_exl2 quantizes this tensor, else None."""
    if name == "lm_head.weight":
        return "head"
    if name.endswith(".weight") and tensor.ndim == 2 and name.rsplit(".", 2)[-2] in LINEAR_KINDS \
            and layer_of(name) is not None:
        return "decoder"
    return None


def _spec_for(bits: Any, prefix: str, k: int, n: int) -> Any:
    if callable(bits):
        return bits(prefix, k, n)
    if isinstance(bits, Mapping):
        for key in (prefix, prefix.rsplit(".", 1)[-1], "default"):
            if key in bits:
                return bits[key]
        raise CourseError(f"the bits mapping has no entry for {prefix} (add it, its kind, or 'default')")
    return bits


def write_exl2(out_dir: str | os.PathLike, config: Mapping, float_tensors: Mapping[str, torch.Tensor], *,
               bits: Any, head_bits: Any = 6, tokenizer_dir: str | os.PathLike | None = None,
               progress: bool = True, act_order: bool = True, group_size: int = 32, overwrite: bool = True,
               shard_bytes: int = 4 * GIB) -> Path:
    """Quantize a float Hugging Face state dict to an EXL2 checkpoint that exllamav2 loads.

    bits: the decoder linears' mix, any form parse_mix/auto_mix accepts (int width, float target bpw, exllamav2
    string, list of (fraction, bits, group)), or a dict {prefix | kind | 'default': spec}, or a callable
    (prefix, in, out) -> spec. head_bits: 2, 3, 4, 5, 6 or 8 -> exllamav2's head mix (HEAD_MIXES), another spec,
    or None to store an unquantized fp16 head. A tied model (tie_word_embeddings, or no lm_head.weight) gets no
    lm_head: exllamav2 then uses the embedding. Norms, embedding and biases are stored fp16.
    The checkpoint is built in a temporary folder beside out_dir and renamed into place at the end.
    """
    if not isinstance(config, Mapping):
        raise CourseError("config must be a dict (the model's config.json)")
    if not float_tensors:
        raise CourseError("no tensors to write: pass the model's float state dict")
    tied = bool(config.get("tie_word_embeddings")) or "lm_head.weight" not in float_tensors
    shapes = expected_linear_shapes(config)
    work = []
    for name, t in float_tensors.items():
        if not isinstance(t, torch.Tensor):
            raise CourseError(f"{name} is not a torch tensor")
        role = _linear_target(name, t)
        if role == "head" and (tied or head_bits is None):
            continue
        if role:
            prefix = name[: -len(".weight")]
            exp = shapes.get(prefix.rsplit(".", 1)[-1])
            if exp and tuple(t.shape) != (exp[1], exp[0]):
                raise CourseError(f"{name} has shape {list(t.shape)} but config.json says [{exp[1]}, {exp[0]}] "
                                  "(out, in): wrong shapes, or the config is not this model's")
            work.append((prefix, t, role))
    if not work:
        raise CourseError("no quantizable linear found (expected model.layers.N.*_proj.weight tensors)")
    q_out: dict[str, torch.Tensor] = {}
    lin_bits = []
    it = bar(work, desc="quantizing", unit="linear") if progress else work
    for prefix, t, role in it:
        n, k = t.shape
        if role == "head":
            spec = HEAD_MIXES.get(head_bits, head_bits) if isinstance(head_bits, int) else head_bits
        else:
            spec = _spec_for(bits, prefix, k, n)
        bias = float_tensors.get(f"{prefix}.bias")
        try:
            q = quantize_linear(t, spec, act_order=act_order, bias=bias, group_size=group_size)
        except CourseError as exc:
            raise CourseError(f"{prefix}: {exc}") from None
        for s, v in q.items():
            q_out[f"{prefix}.{s}"] = v
        if role == "decoder":
            lin_bits.append((8 * sum(v.numel() * v.element_size() for s, v in q.items() if s != "bias"), k * n))
    quantized = {p for p, _, _ in work}
    specs = []
    for name, t in float_tensors.items():
        if name.rsplit(".", 1)[0] in quantized and name.rsplit(".", 1)[-1] in ("weight", "bias"):
            continue
        if name == "lm_head.weight" and tied:
            continue
        specs.append(TensorSpec.of(name, t.detach().to(torch.float16).contiguous()))
    specs += [TensorSpec.of(n_, v) for n_, v in q_out.items()]
    specs.sort(key=lambda s: natural_key(s.name))
    bpw = sum(b for b, _ in lin_bits) / sum(w for _, w in lin_bits)
    cfg = exl2_config(config, bits_per_weight=bpw, head_bits=None if tied else head_bits, tied=tied,
                      extra={"target": bits if isinstance(bits, (int, float, str)) else "per-layer spec"})
    with exl2_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_shards(tmp, specs, shard_bytes=shard_bytes)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)
    return Path(out_dir).expanduser().absolute()
