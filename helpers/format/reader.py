"""Reading an EXL2 checkpoint: ``open_exl2(dir)`` -> ``Exl2Checkpoint`` of ``QuantLinear``s, decoded and dequantized.

Tensors are read lazily (memory-mapped) from config.json + *.safetensors, sharded or not; every structural mistake
(missing tensor, wrong shape, corrupt file, not EXL2) is a one-line CourseError. The layout of one linear is in
:mod:`helpers.format.packing`; ``byte_breakdown`` says where the bytes go when exllamav2 loads the checkpoint.

How bits per weight are counted here (``QuantLinear.bits_per_weight``): every stored bit of ``q_weight`` (padding
columns included), ``q_scale``, ``q_scale_max``, ``q_groups`` and ``q_invperm``, divided by ``in * out`` (the logical
shape). Biases are not counted. ``Exl2Checkpoint.bits_per_weight`` is the same sum over all quantized linears of the
decoder layers, *excluding* the head (exllamav2's converter also targets ``bits`` without the head, which has its own
``head_bits``); ``bits_per_weight_with_head`` includes a quantized ``lm_head``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from helpers.core.errors import CourseError, short_reason
from helpers.format.bits import BIT_WIDTHS
from helpers.format.config import config_get, expected_linear_shapes, load_config
from helpers.format.names import Q_SUFFIXES, layer_of, linear_order, natural_key
from helpers.format.packing import few_threads, groups_from_q_groups, scale_values, unpack_columns, unpack_scales

#: files beside a checkpoint that are not part of it (the course's fixtures keep exllamav2's answers there)
IGNORED_FILES = ("exllamav2_truth.safetensors",)
#: safetensors dtype names -> torch dtypes
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
                      "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                      "BOOL": torch.bool}


class QuantLinear:
    """One EXL2-quantized linear of a checkpoint. Tensors are read from disk when first needed."""

    def __init__(self, ckpt: "Exl2Checkpoint", name: str, out_features: int | None = None):
        self._ckpt = ckpt
        self.name = name
        where = f"{name}: "
        self.in_features = ckpt.tensor_shape(f"{name}.q_invperm")[0]
        qw_shape = ckpt.tensor_shape(f"{name}.q_weight")
        if len(qw_shape) != 2:
            raise CourseError(f"{where}q_weight has shape {qw_shape}; expected 2 dimensions (wrong shape)")
        self.padded_out_features = qw_shape[1]
        if self.padded_out_features % 32:
            raise CourseError(f"{where}q_weight has {qw_shape[1]} columns, not a multiple of 32 (wrong shape)")
        bias_name = f"{name}.bias"
        self.has_bias = bias_name in ckpt.tensor_names
        if self.has_bias:
            out_features = ckpt.tensor_shape(bias_name)[0]
        self.out_features = int(out_features or self.padded_out_features)
        if not (self.padded_out_features - 32 < self.out_features <= self.padded_out_features):
            raise CourseError(f"{where}q_weight has {self.padded_out_features} columns but the model needs "
                              f"{self.out_features} outputs (wrong shape, or config.json does not belong here)")
        q_groups = ckpt.tensor(f"{name}.q_groups").tolist()
        self._groups = groups_from_q_groups(q_groups, self.in_features, qw_shape[0], where)
        g = len(self._groups)
        for suffix, shape in (("q_scale", (g, self.padded_out_features // 8)), ("q_scale_max", (g,)),
                              ("q_invperm", (self.in_features,))):
            got = tuple(ckpt.tensor_shape(f"{name}.{suffix}"))
            if got != shape:
                raise CourseError(f"{where}{suffix} has shape {list(got)}, expected {list(shape)} (wrong shape)")

    # -- structure --------------------------------------------------------------------------------------------
    @property
    def groups(self) -> list[tuple[int, int]]:
        """[(bits, n_rows)] in stored order (bits 8, 6, 5, 4, 3, 2)."""
        return [(b, r) for b, r, _ in self._groups]

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def layer(self) -> int | None:
        return layer_of(self.name)

    def rows_per_bits(self) -> dict[int, int]:
        """{bits: rows of K stored at that width}, widest first."""
        out: dict[int, int] = {}
        for b, r in self.groups:
            out[b] = out.get(b, 0) + r
        return out

    def mix(self) -> str:
        """The bit mix in exllamav2's notation of fractions: '0.12:6b/0.88:5b'."""
        return "/".join(f"{r / self.in_features:.3g}:{b}b" for b, r in self.rows_per_bits().items())

    @property
    def mean_bits(self) -> float:
        """Average code width over the rows (data bits only, no scales or permutation)."""
        return sum(b * r for b, r in self.groups) / self.in_features

    def file_bytes(self) -> dict[str, int]:
        """Stored bytes per tensor of this linear."""
        return {s: self._ckpt.tensor_nbytes(f"{self.name}.{s}")
                for s in Q_SUFFIXES + (("bias",) if self.has_bias else ())}

    @property
    def stored_bits(self) -> int:
        """Bits of q_weight + q_scale + q_scale_max + q_groups + q_invperm (bias not counted)."""
        fb = self.file_bytes()
        return 8 * sum(fb[s] for s in Q_SUFFIXES)

    @property
    def bits_per_weight(self) -> float:
        return self.stored_bits / (self.in_features * self.out_features)

    def gpu_bytes(self) -> dict[str, int]:
        """Bytes exllamav2 keeps on the GPU for this linear (linear.py/ext.py ``make_q_matrix``):
        q_weight, q_scale, q_scale_max (fp16), q_groups (int16), the group map (2 int16 per row), q_perm and
        q_invperm as int16 (dropped for an MLP's down_proj, whose permutation exllamav2 folds into gate/up),
        and the fp16 bias."""
        fb = self.file_bytes()
        n_qrows = self._ckpt.tensor_shape(f"{self.name}.q_weight")[0]
        map_rows = 0
        for i, (bits, _rows, start) in enumerate(self._groups):
            end = self._groups[i + 1][2] if i + 1 < len(self._groups) else n_qrows
            map_rows += (end - start) * 32 // bits
        perms = 0 if self.name.endswith("mlp.down_proj") else 2 * 2 * self.in_features
        return {"q_weight": fb["q_weight"], "q_scale": fb["q_scale"],
                "q_meta": 2 * len(self._groups) + 4 * len(self._groups) + 4 * map_rows + perms,
                "bias": 2 * self.out_features if self.has_bias else 0}

    # -- decoded data -------------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The raw stored tensors (q_weight, q_scale, q_scale_max, q_groups, q_invperm[, bias])."""
        names = Q_SUFFIXES + (("bias",) if self.has_bias else ())
        return {s: self._ckpt.tensor(f"{self.name}.{s}") for s in names}

    @property
    def bias(self) -> torch.Tensor | None:
        return self._ckpt.tensor(f"{self.name}.bias") if self.has_bias else None

    @property
    def invperm(self) -> torch.Tensor:
        return self._ckpt.tensor(f"{self.name}.q_invperm").to(torch.int64)

    @property
    def perm(self) -> torch.Tensor:
        """q_perm = argsort(q_invperm): stored row r holds input feature perm[r]."""
        return torch.argsort(self.invperm)

    def codes(self) -> torch.Tensor:
        """Weight codes uint8 (K, Npad) in stored (act-order) row order, padding columns included."""
        with few_threads(self.in_features * self.padded_out_features):
            return self._codes()

    def _codes(self) -> torch.Tensor:
        qw = self._ckpt.tensor(f"{self.name}.q_weight")
        out = torch.empty((self.in_features, self.padded_out_features), dtype=torch.uint8)
        row = 0
        for i, (bits, rows, start) in enumerate(self._groups):
            end = self._groups[i + 1][2] if i + 1 < len(self._groups) else qw.shape[0]
            out[row:row + rows] = unpack_columns(qw[start:end], bits, rows)
            row += rows
        return out

    def scale_codes(self) -> torch.Tensor:
        """4-bit scale codes uint8 (G, Npad)."""
        return unpack_scales(self._ckpt.tensor(f"{self.name}.q_scale"))

    @property
    def scale_max(self) -> torch.Tensor:
        """q_scale_max fp16 (G,)."""
        return self._ckpt.tensor(f"{self.name}.q_scale_max")

    def scales(self) -> torch.Tensor:
        """Effective float32 scales (G, Npad): (code + 1)^2 * q_scale_max / 256."""
        return scale_values(self.scale_codes(), self.scale_max)

    def group_of_row(self) -> torch.Tensor:
        """Group index (int64, K) of each stored row."""
        return torch.repeat_interleave(torch.arange(len(self._groups)), torch.tensor([r for _, r in self.groups]))

    def dequantize_stored(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W transposed (K, Npad) in stored (permuted) row order: what the codes and scales say, row by row."""
        with few_threads(self.in_features * self.padded_out_features):
            return self._dequantize_stored(dtype)

    def _dequantize_stored(self, dtype: torch.dtype) -> torch.Tensor:
        qw = self._ckpt.tensor(f"{self.name}.q_weight")
        scales = self.scales()
        out = torch.empty((self.in_features, self.padded_out_features), dtype=torch.float32)
        row = 0
        for i, (bits, rows, start) in enumerate(self._groups):
            end = self._groups[i + 1][2] if i + 1 < len(self._groups) else qw.shape[0]
            q = unpack_columns(qw[start:end], bits, rows).to(torch.float32) - 2 ** (bits - 1)
            out[row:row + rows] = q * scales[i]
            row += rows
        return out.to(dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as an nn.Linear holds it: (out_features, in_features), the file's logical order."""
        w_t = self.dequantize_stored(torch.float32)
        with few_threads(w_t.numel()):
            return w_t[self.invperm][:, :self.out_features].T.contiguous().to(dtype)

    def __repr__(self) -> str:
        return (f"QuantLinear({self.name}, in={self.in_features}, out={self.out_features}, mix={self.mix()}, "
                f"bpw={self.bits_per_weight:.3f})")


class Exl2Checkpoint:
    """An EXL2 model directory: config.json plus one or more *.safetensors files, read lazily."""

    def __init__(self, model_dir: Path, config: dict, files: list[Path]):
        from safetensors import safe_open

        self.dir = Path(model_dir)
        self.config = config
        self.files = files
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[list[int], str]] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
                keys = list(h.keys())
                for k in keys:
                    sl = h.get_slice(k)
                    self._meta[k] = (list(sl.get_shape()), sl.get_dtype())
            except Exception as exc:  # safetensors raises its own error types for a bad header / truncation
                raise CourseError(f"{f} is not a readable safetensors file ({short_reason(exc)}); it is corrupt or "
                                  "truncated: re-download or rebuild the checkpoint") from None
            self._handles[f] = h
            for k in keys:
                if k in self._where:
                    raise CourseError(f"tensor {k} is in both {self._where[k].name} and {f.name}; "
                                      "remove the stray file from the model directory")
                self._where[k] = f
        self._cache: dict[str, torch.Tensor] = {}
        self._linears: dict[str, QuantLinear] | None = None

    # -- tensors ----------------------------------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        return sorted(self._where)

    def tensor_shape(self, name: str) -> list[int]:
        if name not in self._meta:
            raise CourseError(f"tensor {name} is missing from {self.dir}: the checkpoint is incomplete; "
                              "re-download or rebuild it")
        return self._meta[name][0]

    def tensor_dtype(self, name: str) -> torch.dtype:
        self.tensor_shape(name)
        return SAFETENSORS_DTYPES.get(self._meta[name][1], torch.uint8)

    def tensor_nbytes(self, name: str) -> int:
        shape = self.tensor_shape(name)
        return math.prod(shape) * (torch.finfo(self.tensor_dtype(name)).bits // 8
                                   if self.tensor_dtype(name).is_floating_point
                                   else torch.iinfo(self.tensor_dtype(name)).bits // 8)

    def tensor(self, name: str) -> torch.Tensor:
        """Load one tensor (memory-mapped read; small index tensors are cached)."""
        if name in self._cache:
            return self._cache[name]
        self.tensor_shape(name)
        try:
            t = self._handles[self._where[name]].get_tensor(name)
        except Exception as exc:
            raise CourseError(f"could not read tensor {name} from {self._where[name]} ({short_reason(exc)}); the file "
                              "is corrupt: re-download or rebuild the checkpoint") from None
        if t.numel() <= 1 << 16:
            self._cache[name] = t
        return t

    # -- structure --------------------------------------------------------------------------------------------
    @property
    def linears(self) -> dict[str, QuantLinear]:
        """{prefix: QuantLinear}, e.g. 'model.layers.0.self_attn.q_proj', 'lm_head', in layer order."""
        if self._linears is None:
            shapes = expected_linear_shapes(self.config)
            prefixes = sorted({n[: -len(".q_weight")] for n in self._where if n.endswith(".q_weight")},
                              key=linear_order)
            out = {}
            for p in prefixes:
                for s in Q_SUFFIXES:
                    if f"{p}.{s}" not in self._where:
                        raise CourseError(f"tensor {p}.{s} is missing from {self.dir}: the checkpoint is "
                                          "incomplete; re-download or rebuild it")
                kind = p.rsplit(".", 1)[-1]
                exp = shapes.get(kind)
                ql = QuantLinear(self, p, out_features=exp[1] if exp else None)
                if exp and (ql.in_features, ql.out_features) != exp:
                    raise CourseError(f"{p} is {ql.in_features}x{ql.out_features} (in x out) but config.json says "
                                      f"{exp[0]}x{exp[1]}: wrong shapes, or the config is not this model's")
                out[p] = ql
            self._linears = out
        return self._linears

    @property
    def head(self) -> QuantLinear | None:
        return self.linears.get("lm_head")

    @property
    def tied_head(self) -> bool:
        """True when the checkpoint has no lm_head: exllamav2 then uses the embedding (fp16) as the head."""
        return not any(n.startswith("lm_head.") for n in self._where)

    def decoder_linears(self) -> list[QuantLinear]:
        return [q for p, q in self.linears.items() if p != "lm_head"]

    @property
    def bits_per_weight(self) -> float:
        """Stored bits of the decoder layers' quantized linears over their weights (head excluded)."""
        lins = self.decoder_linears()
        return sum(q.stored_bits for q in lins) / max(1, sum(q.in_features * q.out_features for q in lins))

    @property
    def bits_per_weight_with_head(self) -> float:
        lins = list(self.linears.values())
        return sum(q.stored_bits for q in lins) / max(1, sum(q.in_features * q.out_features for q in lins))

    def float_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Hugging Face names and nn.Linear layouts: every quantized linear dequantized (file's logical order),
        biases, norms and the embedding converted to ``dtype``. ``lm_head.weight`` only if the file has a head."""
        out: dict[str, torch.Tensor] = {}
        lins = self.linears
        for p, q in lins.items():
            out[f"{p}.weight"] = q.dequantize(dtype)
            if q.has_bias:
                out[f"{p}.bias"] = q.bias.to(dtype)
        owned = {f"{p}.{s}" for p in lins for s in Q_SUFFIXES + ("bias",)}
        for name in self.tensor_names:
            if name not in owned:
                out[name] = self.tensor(name).to(dtype)
        return out

    def layer_table(self) -> list[dict]:
        """One row per quantized linear: name, layer, kind, in, out, bit mix, groups, bpw, bytes (file and GPU)."""
        rows = []
        for p, q in self.linears.items():
            fb, gb = q.file_bytes(), q.gpu_bytes()
            rows.append({
                "name": p, "layer": q.layer, "kind": q.kind, "in": q.in_features, "out": q.out_features,
                "bits": {str(b): r for b, r in q.rows_per_bits().items()}, "mix": q.mix(),
                "groups": len(q.groups), "mean_bits": round(q.mean_bits, 4), "bpw": round(q.bits_per_weight, 4),
                "file_bytes": sum(fb.values()), "vram_bytes": sum(gb.values()),
            })
        return rows

    def byte_breakdown(self) -> dict:
        """Where the checkpoint's bytes go when exllamav2 loads it.

        vram_bytes: everything exllamav2 puts on the GPU for the weights: quantized linears in its GPU layout
        (see QuantLinear.gpu_bytes), biases, norms, any other fp16 tensor, and for a tied head an fp16 copy of the
        embedding padded to 32 rows. system_ram_bytes: the input embedding, which exllamav2 keeps on the CPU as
        fp16. disk_bytes: the *.safetensors files. Caches and scratch are not weights: see helpers.memory.
        """
        kinds = {"q_weight": 0, "q_scale": 0, "q_meta": 0, "bias": 0, "norms": 0, "fp16_head": 0, "other_fp16": 0}
        decoder = head = 0
        for p, q in self.linears.items():
            gb = q.gpu_bytes()
            for k, v in gb.items():
                kinds[k] += v
            if p == "lm_head":
                head += sum(gb.values())
            else:
                decoder += sum(gb.values())
        owned = {f"{p}.{s}" for p in self.linears for s in Q_SUFFIXES + ("bias",)}
        embed = 0
        for name in self.tensor_names:
            if name in owned:
                continue
            numel = math.prod(self.tensor_shape(name))
            if name.endswith("embed_tokens.weight"):
                embed += 2 * numel
            elif name == "lm_head.weight":  # an unquantized head: fp16 on the GPU, rows padded to 32
                shape = self.tensor_shape(name)
                kinds["fp16_head"] += 2 * (shape[0] + (-shape[0] % 32)) * math.prod(shape[1:])
                head += kinds["fp16_head"]
            elif "norm" in name:
                kinds["norms"] += 2 * numel
            else:
                kinds["other_fp16"] += 2 * numel
        if self.tied_head:
            vocab = config_get(self.config, "vocab_size")
            hidden = config_get(self.config, "hidden_size")
            emb = [n for n in self._where if n.endswith("embed_tokens.weight")]
            if emb:
                vocab, hidden = self.tensor_shape(emb[0])
            if vocab and hidden:
                kinds["fp16_head"] += 2 * (vocab + (-vocab % 32)) * hidden
                head += 2 * (vocab + (-vocab % 32)) * hidden
        vram = sum(kinds.values())
        return {
            "vram_bytes": vram,
            "system_ram_bytes": embed,
            "disk_bytes": sum(f.stat().st_size for f in self.files),
            "decoder_linear_bytes": decoder,
            "head_bytes": head,
            "head": "tied (fp16 copy of the embedding)" if self.tied_head else
                    ("exl2" if "lm_head" in self.linears else "fp16"),
            "norm_bytes": kinds["norms"],
            "embedding_bytes": embed,
            "by_kind": kinds,
            "bits_per_weight": self.bits_per_weight,
            "bits_per_weight_with_head": self.bits_per_weight_with_head,
            "bits_histogram": self.bits_histogram(),
        }

    def bits_histogram(self) -> dict[int, int]:
        """{bits: weights stored at that width} over all quantized linears (head included)."""
        hist = {b: 0 for b in BIT_WIDTHS}
        for q in self.linears.values():
            for b, r in q.groups:
                hist[b] += r * q.out_features
        return {b: n for b, n in hist.items() if n}

    def __repr__(self) -> str:
        return f"Exl2Checkpoint({self.dir}, {len(self.linears)} quantized linears, {self.bits_per_weight:.3f} bpw)"



def open_exl2(model_dir: str | os.PathLike) -> Exl2Checkpoint:
    """Open an EXL2 checkpoint directory (config.json + *.safetensors, sharded or not). Raises CourseError with
    one line for a missing directory, a missing config, a non-EXL2 checkpoint or a corrupt file."""
    d = Path(model_dir).expanduser()
    if not d.exists():
        raise CourseError(f"model directory {d} does not exist: check the path (or build it: python -m helpers model)")
    if not d.is_dir():
        raise CourseError(f"{d} is a file, not a model directory: pass the folder that holds config.json")
    cfg = load_config(d)
    files = sorted((f for f in d.glob("*.safetensors") if f.name not in IGNORED_FILES),
                   key=lambda p: natural_key(p.name))
    if not files:
        raise CourseError(f"{d} has no *.safetensors files: it is not a model checkpoint")
    ckpt = Exl2Checkpoint(d, cfg, files)
    names = ckpt.tensor_names
    if not any(n.endswith(".q_weight") for n in names):
        what = "GPTQ" if any(n.endswith(".qweight") for n in names) else "float (unquantized)"
        raise CourseError(f"{d} is not an EXL2 checkpoint: it holds {what} weights, no *.q_weight tensors. "
                          "Quantize it first (helpers.format.writer.write_exl2) or pick an EXL2 model")
    _ = ckpt.linears  # validate structure and shapes now, with one-line errors
    return ckpt
