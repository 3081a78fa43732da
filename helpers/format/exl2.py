"""The EXL2 format: read, dequantize, write (round-to-nearest) and inspect ExLlamaV2 checkpoints.

The rules below were checked against exllamav2 0.3.2's sources (conversion/adaptivegptq.py, qparams.py,
linear.py, module.py, ext.py, exllamav2_ext/cuda/q_matrix.cu, pack_tensor.cu, quant/qdq_*.cuh) and against
checkpoints made by exllamav2's own converter (tests/fixtures/exl2). Nothing here imports exllamav2 except the GPU
recording at the bottom, and only after ``gpu.require_cuda()``.

One quantized linear (K = in_features, N = out_features, the stored matrix is W transposed, K x N):

* ``q_invperm`` int32[K]: the act-order permutation's inverse. Stored row ``r`` of the K x N matrix is the
  original input row ``q_perm[r]`` with ``q_perm = argsort(q_invperm)``; the logical matrix is ``stored[q_invperm]``.
* ``q_groups`` int16[2G]: pairs (bits, first packed row) per group, groups ordered by bits 8, 6, 5, 4, 3, 2.
  A group's rows = (next group's first packed row - its own) * 32 / bits; the last group takes the rows that remain.
* ``q_weight`` int32[packed_rows, Npad]: every column is a little-endian bit stream; 32 rows of ``bits`` bits fill
  exactly ``bits`` words (2-bit: 16 values a word, 4-bit: 8, 8-bit: 4; 3-, 5- and 6-bit values straddle words).
* ``q_scale`` int32[G, Npad/8]: one 4-bit code per group and column, 8 per word, low nibble first.
* ``q_scale_max`` fp16[G]. Dequantize: ``scale = (code + 1)**2 * q_scale_max / 256`` and
  ``w = (q - 2**(bits-1)) * scale``.
* Columns are padded to a multiple of 32 (``Npad``); padding columns hold the weight code ``2**(bits-1)`` (zero)
  and the scale code 15.
* Optional fp16 ``bias`` [N]. A checkpoint without ``lm_head.*`` ties the head to ``model.embed_tokens``.

How bits per weight are counted here (``QuantLinear.bits_per_weight``): every stored bit of ``q_weight`` (padding
columns included), ``q_scale``, ``q_scale_max``, ``q_groups`` and ``q_invperm``, divided by ``in * out`` (the logical
shape). Biases are not counted. ``Exl2Checkpoint.bits_per_weight`` is the same sum over all quantized linears of the
decoder layers, *excluding* the head (exllamav2's converter also targets ``bits`` without the head, which has its own
``head_bits``); ``bits_per_weight_with_head`` includes a quantized ``lm_head``.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import struct
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from helpers.core.errors import CourseError

GIB = 2**30
BIT_WIDTHS = (8, 6, 5, 4, 3, 2)  #: the widths EXL2 kernels support, in the order groups are stored
WRITER_VERSION = 1  #: bump when the writer's output changes, so cached models (helpers.models.embedded) are rebuilt
Q_SUFFIXES = ("q_weight", "q_scale", "q_scale_max", "q_groups", "q_invperm")
LINEAR_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
                   "chat_template.json")
#: exllamav2's head options (conversion/qparams.py, ``qparams_headoptions``): head_bits -> mix
HEAD_MIXES: dict[int, list[tuple[float, int, int]]] = {
    2: [(0.3, 4, 32), (0.7, 2, 32)],
    3: [(0.15, 4, 32), (0.85, 3, 32)],
    4: [(0.15, 6, 32), (0.85, 4, 32)],
    5: [(0.15, 6, 128), (0.85, 5, 128)],
    6: [(0.15, 8, 128), (0.85, 6, 128)],
    8: [(1.0, 8, 128)],
}
#: files beside a checkpoint that are not part of it (the course's fixtures keep exllamav2's answers there)
IGNORED_FILES = ("exllamav2_truth.safetensors",)
_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def gib(nbytes: float) -> float:
    return nbytes / GIB


@contextlib.contextmanager
def _few_threads(numel: int) -> Iterator[None]:
    """One torch thread for small matrices: on a busy machine, waking a thread pool for tensors this small costs
    ten times the work itself (measured on the course's 2-core box). Large matrices keep every thread."""
    before = torch.get_num_threads()
    if numel < 2**22 and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------------
# Bit packing (byte-exact with exllamav2's pack_columns / pack_rows_4)
# ----------------------------------------------------------------------------------------------------------------

def _check_bits(bits: int, where: str = "") -> int:
    if int(bits) not in BIT_WIDTHS:
        raise CourseError(f"unsupported bit width {bits}{where}: EXL2 supports {', '.join(map(str, BIT_WIDTHS))}")
    return int(bits)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 values -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def packed_rows(rows: int, bits: int) -> int:
    """Packed int32 rows that ``rows`` values of ``bits`` bits take (rounded up)."""
    return _ceil(rows * bits, 32)


def pack_columns(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (rows, N) of ``bits`` bits into int32 words (ceil(rows*bits/32), N), column-wise.

    Each column is a little-endian bit stream: value ``i`` starts at bit ``i*bits``. This is exllamav2's
    ``pack_columns`` layout; the GPU reorders ("shuffles") the words at load time, the file does not.
    """
    bits = _check_bits(bits)
    rows, n = codes.shape
    q = packed_rows(rows, bits)
    v = codes.to(torch.int64)
    start = torch.arange(rows, dtype=torch.int64) * bits
    word, shift = start // 32, (start % 32)[:, None]
    out = torch.zeros((q + 1, n), dtype=torch.int64)
    out.index_add_(0, word, (v << shift) & 0xFFFFFFFF)
    out.index_add_(0, word + 1, v >> (32 - shift))  # the part that spills into the next word (0 when none)
    return _to_int32(out[:q])


def unpack_columns(words: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Inverse of :func:`pack_columns`: int32 (packed_rows, N) -> codes uint8 (rows, N)."""
    bits = _check_bits(bits)
    w = words.to(torch.int64) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros((1, w.shape[1]), dtype=torch.int64)])
    start = torch.arange(rows, dtype=torch.int64) * bits
    word, shift = start // 32, (start % 32)[:, None]
    lo = w[word] >> shift
    hi = w[word + 1] << (32 - shift)
    return ((lo | hi) & ((1 << bits) - 1)).to(torch.uint8)


def pack_scales(codes: torch.Tensor) -> torch.Tensor:
    """4-bit scale codes (G, N), N a multiple of 8, -> int32 (G, N/8), low nibble first (exllamav2 pack_rows_4)."""
    g, n = codes.shape
    if n % 8:
        raise CourseError(f"scale codes need a multiple of 8 columns, got {n}")
    v = codes.to(torch.int64).reshape(g, n // 8, 8) & 0xF
    shifts = torch.arange(8, dtype=torch.int64) * 4
    return _to_int32((v << shifts).sum(-1))


def unpack_scales(words: torch.Tensor) -> torch.Tensor:
    """int32 (G, N/8) -> 4-bit scale codes uint8 (G, N)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(8, dtype=torch.int64) * 4
    return ((w[:, :, None] >> shifts) & 0xF).reshape(w.shape[0], -1).to(torch.uint8)


def scale_values(scale_codes: torch.Tensor, scale_max: torch.Tensor) -> torch.Tensor:
    """Effective scales (G, N) = (code + 1)^2 * q_scale_max / 256, rounded as exllamav2 rounds them.

    exllamav2 multiplies the fp16 ``q_scale_max`` by 1/256 in fp16 when it loads a matrix (ext.py
    ``make_q_matrix``) and forms ``(code + 1)^2 * that`` in fp16 (qdq_util.cuh ``dq_scale``); its converter picks
    the codes against the very same fp16 products (adaptivegptq.py ``find_params``). Small scales become fp16
    subnormals there and lose precision (up to ~1% of the largest weight for 8-bit groups), so the reader rounds the
    same way: the format means what the kernels compute. Returned as float32.
    """
    smax = scale_max.to(torch.float16) * torch.tensor(1 / 256, dtype=torch.float16)
    c = scale_codes.to(torch.int32) + 1
    return ((c * c).to(torch.float16) * smax[:, None]).to(torch.float32)


def groups_from_q_groups(q_groups: Sequence[int], in_features: int, n_packed_rows: int, where: str = "") \
        -> list[tuple[int, int, int]]:
    """Decode ``q_groups`` into [(bits, n_rows, first_packed_row)], checking it against K and q_weight's rows."""
    vals = [int(x) for x in q_groups]
    if len(vals) < 2 or len(vals) % 2:
        raise CourseError(f"{where}q_groups has {len(vals)} entries; it must hold (bits, row) pairs")
    out = []
    row = 0
    n = len(vals) // 2
    for i in range(n):
        bits, start = vals[2 * i], vals[2 * i + 1]
        _check_bits(bits, f" in {where}q_groups")
        end = vals[2 * i + 3] if i < n - 1 else n_packed_rows
        if end <= start:
            raise CourseError(f"{where}q_groups is corrupt: group {i} starts at packed row {start}, next at {end}")
        if i < n - 1:
            if ((end - start) * 32) % bits:
                raise CourseError(f"{where}q_groups is corrupt: group {i} has a fractional number of rows")
            rows = (end - start) * 32 // bits
        else:
            rows = in_features - row
            if rows <= 0 or packed_rows(rows, bits) != end - start:
                raise CourseError(f"{where}q_weight has {n_packed_rows} packed rows, which does not match "
                                  f"q_groups and in_features={in_features} (wrong shape or corrupt file)")
        out.append((bits, rows, start))
        row += rows
    order = [BIT_WIDTHS.index(b) for b, _, _ in out]
    if order != sorted(order):
        raise CourseError(f"{where}q_groups is not ordered by bits 8, 6, 5, 4, 3, 2 as exllamav2 requires")
    return out


def q_groups_tensor(groups: Sequence[tuple[int, int]]) -> torch.Tensor:
    """[(bits, rows)] -> the int16 ``q_groups`` tensor (bits, first packed row) exllamav2 stores."""
    vals, start = [], 0
    for bits, rows in groups:
        vals += [_check_bits(bits), start]
        start += packed_rows(rows, bits)
    return torch.tensor(vals, dtype=torch.int16)


def pack_linear(codes: torch.Tensor, scale_codes: torch.Tensor, scale_max: torch.Tensor,
                groups: Sequence[tuple[int, int]], invperm: torch.Tensor, bias: torch.Tensor | None = None) \
        -> dict[str, torch.Tensor]:
    """Assemble one EXL2 linear from its decoded parts (all in stored, i.e. permuted, row order).

    codes: (K, Npad) weight codes; scale_codes: (G, Npad) 4-bit codes; scale_max: (G,) fp16; groups: [(bits, rows)];
    invperm: (K,) int. Returns the tensors exllamav2 reads (q_weight, q_scale, q_scale_max, q_groups, q_invperm[, bias]).
    """
    k = codes.shape[0]
    if sum(r for _, r in groups) != k:
        raise CourseError(f"group rows sum to {sum(r for _, r in groups)}, but the weight has {k} rows")
    parts, row = [], 0
    for bits, rows in groups:
        parts.append(pack_columns(codes[row:row + rows], bits))
        row += rows
    out = {
        "q_weight": torch.cat(parts).contiguous(),
        "q_scale": pack_scales(scale_codes).contiguous(),
        "q_scale_max": scale_max.to(torch.float16).contiguous(),
        "q_groups": q_groups_tensor(groups),
        "q_invperm": invperm.to(torch.int32).contiguous(),
    }
    if bias is not None:
        out["bias"] = bias.to(torch.float16).contiguous()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Config helpers
# ----------------------------------------------------------------------------------------------------------------

def config_get(config: Mapping, key: str, default: Any = None) -> Any:
    """``config[key]``, looking inside ``text_config`` too (multimodal configs nest the language model)."""
    if key in config and config[key] is not None:
        return config[key]
    sub = config.get("text_config")
    if isinstance(sub, Mapping) and sub.get(key) is not None:
        return sub[key]
    return default


def expected_linear_shapes(config: Mapping) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) per linear kind for a Llama/Mistral/Qwen2-style config."""
    h = config_get(config, "hidden_size")
    nh = config_get(config, "num_attention_heads")
    if not h or not nh:
        return {}
    nkv = config_get(config, "num_key_value_heads", nh)
    hd = config_get(config, "head_dim") or h // nh
    inter = config_get(config, "intermediate_size")
    shapes = {"q_proj": (h, nh * hd), "k_proj": (h, nkv * hd), "v_proj": (h, nkv * hd), "o_proj": (nh * hd, h)}
    if inter:
        shapes.update(gate_proj=(h, inter), up_proj=(h, inter), down_proj=(inter, h))
    vocab = config_get(config, "vocab_size")
    if vocab:
        shapes["lm_head"] = (h, vocab)
    return shapes


def rope_theta_of(config: Mapping) -> float | None:
    """rope_theta wherever the config keeps it (top level, or transformers 5's ``rope_parameters``)."""
    if config.get("rope_theta") is not None:
        return float(config["rope_theta"])
    for key in ("rope_parameters", "rope_scaling"):
        sub = config.get(key)
        if isinstance(sub, Mapping) and sub.get("rope_theta") is not None:
            return float(sub["rope_theta"])
    sub = config.get("text_config")
    if isinstance(sub, Mapping):
        return rope_theta_of(sub)
    return None


def load_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CourseError(f"{model_dir} has no config.json: point at a model directory (config.json + *.safetensors)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CourseError(f"{path} is not valid JSON ({exc}); restore it from the model's source") from None
    if not isinstance(cfg, dict):
        raise CourseError(f"{path} does not hold a JSON object; restore it from the model's source")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------

def _layer_of(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name + ".")
    return int(m.group(1)) if m else None


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
        return _layer_of(self.name)

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
        with _few_threads(self.in_features * self.padded_out_features):
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
        with _few_threads(self.in_features * self.padded_out_features):
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
        with _few_threads(w_t.numel()):
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
                raise CourseError(f"{f} is not a readable safetensors file ({_short(exc)}); it is corrupt or "
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
        return _ST_DTYPES.get(self._meta[name][1], torch.uint8)

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
            raise CourseError(f"could not read tensor {name} from {self._where[name]} ({_short(exc)}); the file "
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
                              key=_linear_order)
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
        fp16. disk_bytes: the *.safetensors files. Caches and scratch are not weights: see helpers.memory.accounting.
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


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160] or type(exc).__name__


def _linear_order(name: str):
    """Execution order: layer by layer; q, k, v, o, gate, up, down inside a layer; the head last."""
    layer = _layer_of(name)
    kind = name.rsplit(".", 1)[-1]
    rank = LINEAR_KINDS.index(kind) if kind in LINEAR_KINDS else len(LINEAR_KINDS)
    return (1 if layer is None else 0, layer or 0, rank, _natural_key(name))


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


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
                   key=lambda p: _natural_key(p.name))
    if not files:
        raise CourseError(f"{d} has no *.safetensors files: it is not a model checkpoint")
    ckpt = Exl2Checkpoint(d, cfg, files)
    names = ckpt.tensor_names
    if not any(n.endswith(".q_weight") for n in names):
        what = "GPTQ" if any(n.endswith(".qweight") for n in names) else "float (unquantized)"
        raise CourseError(f"{d} is not an EXL2 checkpoint: it holds {what} weights, no *.q_weight tensors. "
                          "Quantize it first (helpers.format.exl2.write_exl2) or pick an EXL2 model")
    ckpt.linears  # validate structure and shapes now, with one-line errors
    return ckpt


# ----------------------------------------------------------------------------------------------------------------
# Writing (round-to-nearest)
# ----------------------------------------------------------------------------------------------------------------
#
# A bit mix says how many input rows of a linear get each width. Accepted forms (``bits_mix`` / ``bits``):
#   int b                      every row at b bits, groups of ``group_size`` rows
#   float t                    a target bits per weight: two neighbouring widths, mixed so the stored bits per weight
#                              (see the module docstring) come as close to t as whole groups allow
#   "0.1:6b_32g/0.9:5b_32g"    exllamav2's own notation (``QParams.get_desc``): fraction:bits b_group g
#   [(0.1, 6, 32), (0.9, 5)]   (fraction of rows, bits[, group size])
# Groups are stored widest first; the rows with the most weight energy (act-order) get the widest groups.

def parse_mix(spec: Any, group_size: int = 32) -> list[tuple[float, int, int]]:
    """A mix spec (string or list) -> [(fraction, bits, group_size)], widest first."""
    if isinstance(spec, str):
        items = []
        for part in spec.split(" ")[0].split("/"):
            m = re.fullmatch(r"\s*([0-9.]+):(\d+)b(?:_(\d+)g)?\s*", part)
            if not m:
                raise CourseError(f"cannot read the bit mix '{spec}': write it like '0.1:6b_32g/0.9:5b_32g'")
            items.append((float(m.group(1)), int(m.group(2)), int(m.group(3) or group_size)))
    elif isinstance(spec, (int,)) and not isinstance(spec, bool):
        items = [(1.0, int(spec), group_size)]
    elif isinstance(spec, (list, tuple)):
        items = []
        for it in spec:
            if not isinstance(it, (list, tuple)) or len(it) not in (2, 3):
                raise CourseError(f"cannot read the bit mix {spec!r}: use [(fraction, bits, group_size), ...]")
            items.append((float(it[0]), int(it[1]), int(it[2]) if len(it) == 3 else group_size))
    else:
        raise CourseError(f"cannot read the bit mix {spec!r}: use bits (int), a target bpw (float), "
                          "'0.1:6b_32g/0.9:5b_32g' or [(fraction, bits, group_size), ...]")
    for frac, bits, gs in items:
        _check_bits(bits, f" in the bit mix {spec!r}")
        if frac <= 0 or gs <= 0 or gs % 32:
            raise CourseError(f"bad bit mix {spec!r}: fractions must be > 0 and group sizes multiples of 32 "
                              "(exllamav2's kernels step through rows 32 at a time)")
    if abs(sum(f for f, _, _ in items) - 1) > 1e-3:
        raise CourseError(f"the fractions of the bit mix {spec!r} add up to {sum(f for f, _, _ in items):.3f}, not 1")
    return sorted(items, key=lambda it: BIT_WIDTHS.index(it[1]))


def plan_groups(in_features: int, mix: Sequence[tuple[float, int, int]]) -> list[tuple[int, int]]:
    """Split K input rows into groups [(bits, rows)] for a mix, like exllamav2's converter: each width takes
    ceil(fraction * K / group_size) whole groups while rows remain; the last group takes what is left."""
    k = in_features
    if k % 32:
        raise CourseError(f"in_features={k} is not a multiple of 32, which exllamav2's EXL2 kernels require")
    groups: list[tuple[int, int]] = []
    remaining = k
    for frac, bits, gs in mix:
        n = math.ceil(min(k * frac, remaining) / gs - 1e-9) if remaining > 0 else 0
        for _ in range(n):
            if remaining <= 0:
                break
            rows = min(gs, remaining)
            groups.append((bits, rows))
            remaining -= rows
    while remaining > 0:  # fractions that round down leave rows: the narrowest width takes them
        bits, gs = mix[-1][1], mix[-1][2]
        rows = min(gs, remaining)
        groups.append((bits, rows))
        remaining -= rows
    return groups


def stored_bits(in_features: int, out_features: int, groups: Sequence[tuple[int, int]]) -> int:
    """Bits the file stores for a linear with these groups (q_weight with padded columns, q_scale, q_scale_max,
    q_groups, q_invperm): the numerator of bits per weight."""
    npad = out_features + (-out_features % 32)
    g = len(groups)
    qrows = sum(packed_rows(r, b) for b, r in groups)
    return 32 * qrows * npad + 4 * g * npad + 16 * g + 32 * g + 32 * in_features


def auto_mix(in_features: int, out_features: int, target_bpw: float, group_size: int = 32) \
        -> list[tuple[int, int]]:
    """Groups [(bits, rows)] of two neighbouring widths whose stored bits per weight come closest to the target
    (the wider width first, in whole groups of ``group_size`` rows; the last group may be shorter)."""
    if not 2.0 <= target_bpw <= 9.0:
        raise CourseError(f"target of {target_bpw} bits per weight is out of range: EXL2 stores 2 to 8 bits "
                          "per weight (plus ~0.1-0.2 for scales)")
    k, n = in_features, out_features
    if k % 32:
        raise CourseError(f"in_features={k} is not a multiple of 32, which exllamav2's EXL2 kernels require")
    if group_size % 32:
        raise CourseError(f"group size {group_size} is not a multiple of 32")
    n_groups = _ceil(k, group_size)
    npad = n + (-n % 32)
    # everything but q_weight is the same for any choice of widths (same number of groups)
    fixed = 4 * n_groups * npad + 48 * n_groups + 32 * k

    def groups_for(hi: int, lo: int, n_hi: int) -> list[tuple[int, int]]:
        sizes = [group_size] * (n_groups - 1) + [k - group_size * (n_groups - 1)]
        return [(hi if i < n_hi else lo, r) for i, r in enumerate(sizes)]

    def bpw(hi: int, lo: int, n_hi: int) -> float:
        rows_hi = min(k, n_hi * group_size)
        return ((rows_hi * hi + (k - rows_hi) * lo) * npad + fixed) / (k * n)

    widths = sorted(BIT_WIDTHS)
    if target_bpw <= bpw(2, 2, 0):
        return groups_for(2, 2, 0)
    for lo, hi in zip(widths, widths[1:]):
        if target_bpw <= bpw(hi, lo, n_groups):
            best = min(range(n_groups + 1), key=lambda m: abs(bpw(hi, lo, m) - target_bpw))
            return groups_for(hi, lo, best) if best < n_groups else groups_for(hi, hi, n_groups)
    return groups_for(8, 8, n_groups)


def resolve_groups(spec: Any, in_features: int, out_features: int, group_size: int = 32) -> list[tuple[int, int]]:
    """Any accepted bit spec -> groups [(bits, rows)] for one linear."""
    if isinstance(spec, float):
        return auto_mix(in_features, out_features, spec, group_size)
    return plan_groups(in_features, parse_mix(spec, group_size))


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
    with _few_threads(weight.numel()):
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


# ----------------------------------------------------------------------------------------------------------------
# Files: a streaming safetensors writer and directories that appear whole or not at all
# ----------------------------------------------------------------------------------------------------------------

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


def _is_exl2_dir(d: Path) -> bool:
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
        return cfg.get("quantization_config", {}).get("quant_method") == "exl2"
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success it is renamed to ``out_dir``, on any error it is
    deleted. An existing ``out_dir`` is replaced only if ``overwrite`` and it is empty or an EXL2 checkpoint.
    A full disk (or any other OSError) becomes a one-line CourseError."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists():
        if not overwrite:
            raise CourseError(f"{out} already exists: choose another directory or allow overwriting")
        if not out.is_dir() or (any(out.iterdir()) and not _is_exl2_dir(out)):
            raise CourseError(f"refusing to replace {out}: it exists and is not an EXL2 checkpoint; "
                              "choose another directory")
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.partial-{tag}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, CourseError):
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CourseError(f"the disk is full while writing {out}; nothing was kept. Free some space "
                                  "(or pick a folder on a bigger disk) and run it again") from None
            raise CourseError(f"could not write {out} ({_short(exc)}); nothing was kept") from None
        raise


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
            and _layer_of(name) is not None:
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
    from helpers.core.progress import progress as bar

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
    specs.sort(key=lambda s: _natural_key(s.name))
    bpw = sum(b for b, _ in lin_bits) / sum(w for _, w in lin_bits)
    cfg = exl2_config(config, bits_per_weight=bpw, head_bits=None if tied else head_bits, tied=tied,
                      extra={"target": bits if isinstance(bits, (int, float, str)) else "per-layer spec"})
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        write_shards(tmp, specs, shard_bytes=shard_bytes)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp)
    return Path(out_dir).expanduser().absolute()


# ----------------------------------------------------------------------------------------------------------------
# Small float models for tests and GPU checks
# ----------------------------------------------------------------------------------------------------------------

def tiny_config(*, arch: str = "LlamaForCausalLM", hidden: int = 256, intermediate: int = 768, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, vocab: int = 1000, tied: bool = False,
                rope_theta: float = 100000.0) -> dict:
    """A small Llama/Qwen2 config.json (transformers 5 style: rope_theta nested in rope_parameters). Keep the
    intermediate size a multiple of 128 for exllamav2's fused MLP (DOMAIN.md, trap 2)."""
    cfg = {"architectures": [arch], "model_type": "qwen2" if arch.startswith("Qwen2") else "llama",
           "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
           "vocab_size": vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "hidden_act": "silu",
           "tie_word_embeddings": tied, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float16",
           "rope_parameters": {"rope_theta": rope_theta, "rope_type": "default"}}
    return cfg


def random_float_state_dict(config: Mapping, *, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random float32 weights with a model's Hugging Face names and shapes (Llama/Mistral/Qwen2 layout; Qwen2 gets
    q/k/v biases). For tests and exllamav2 checks, not for text."""
    gen = torch.Generator().manual_seed(seed)
    shapes = expected_linear_shapes(config)
    h, vocab = config_get(config, "hidden_size"), config_get(config, "vocab_size")
    qwen = str(config_get(config, "model_type", "")).startswith("qwen2") or \
        any(str(a).startswith("Qwen2") for a in config.get("architectures", []))
    sd = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=gen) * std * 25,
          "model.norm.weight": 1 + 0.1 * torch.randn(h, generator=gen)}
    for i in range(config_get(config, "num_hidden_layers")):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=gen)
        sd[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(h, generator=gen)
        for kind in LINEAR_KINDS:
            k, n = shapes[kind]
            sub = "self_attn" if kind.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            sd[f"{p}{sub}.{kind}.weight"] = torch.randn(n, k, generator=gen) * std
            if qwen and kind in ("q_proj", "k_proj", "v_proj"):
                sd[f"{p}{sub}.{kind}.bias"] = torch.randn(n, generator=gen) * std
    if not config.get("tie_word_embeddings"):
        sd["lm_head.weight"] = torch.randn(vocab, h, generator=gen) * std
    return sd


# ----------------------------------------------------------------------------------------------------------------
# Inspect: python -m helpers inspect DIR [--json]
# ----------------------------------------------------------------------------------------------------------------

def inspect_summary(ckpt: Exl2Checkpoint) -> dict:
    """The totals ``inspect`` prints (every number from layer_table()/byte_breakdown(), so notebooks match)."""
    bb = ckpt.byte_breakdown()
    hist = bb["bits_histogram"]
    total_w = sum(hist.values())
    return {
        "dir": str(ckpt.dir),
        "architecture": (ckpt.config.get("architectures") or ["?"])[0],
        "layers": config_get(ckpt.config, "num_hidden_layers"),
        "quantized_linears": len(ckpt.linears),
        "bits_per_weight": round(bb["bits_per_weight"], 4),
        "bits_per_weight_with_head": round(bb["bits_per_weight_with_head"], 4),
        "bits_share": {str(b): round(n / total_w, 4) for b, n in hist.items()},
        "head": bb["head"],
        "vram_gib": round(gib(bb["vram_bytes"]), 4),
        "system_ram_gib": round(gib(bb["system_ram_bytes"]), 4),
        "disk_gib": round(gib(bb["disk_bytes"]), 4),
        "bytes": {k: v for k, v in bb.items() if k.endswith("_bytes")} | {"by_kind": bb["by_kind"]},
    }


def fmt_gib(nbytes: float) -> str:
    """Bytes as GiB with the unit; small sizes get MiB in brackets so they do not read as zero."""
    g = gib(nbytes)
    return f"{g:.3f} GiB" if g >= 0.1 else f"{g:.5f} GiB ({nbytes / 2**20:.2f} MiB)"


def inspect_text(ckpt: Exl2Checkpoint, *, table: bool = True) -> str:
    """The per-layer table and the totals, as ``python -m helpers inspect`` prints them."""
    rows = ckpt.layer_table()
    s = inspect_summary(ckpt)
    lines = [f"EXL2 checkpoint {s['dir']}",
             f"{s['architecture']}, {s['layers']} layers, {s['quantized_linears']} quantized linears"]
    if table:
        lines.append("")
        lines.append(f"{'linear':<34} {'in':>6} {'out':>7}  {'bit mix (share of input rows)':<30} {'groups':>6} "
                     f"{'bpw':>6} {'GPU MiB':>8}")
        for r in rows:
            lines.append(f"{r['name']:<34} {r['in']:>6} {r['out']:>7}  {r['mix']:<30} {r['groups']:>6} "
                         f"{r['bpw']:>6.3f} {r['vram_bytes'] / 2**20:>8.2f}")
    b = s["bytes"]
    share = ", ".join(f"{k}-bit {v * 100:.1f}%" for k, v in s["bits_share"].items())
    lines += [
        "",
        f"bits per weight: {s['bits_per_weight']:.3f} (decoder linears, head excluded; with the head "
        f"{s['bits_per_weight_with_head']:.3f}). Counted: all stored bits of q_weight, q_scale, q_scale_max, "
        "q_groups and q_invperm over in x out.",
        f"weights by bit width: {share}",
        f"GPU (VRAM), weights as exllamav2 loads them: {fmt_gib(b['vram_bytes'])} "
        f"(decoder linears {fmt_gib(b['decoder_linear_bytes'])}, head {fmt_gib(b['head_bytes'])} [{s['head']}], "
        f"norms {fmt_gib(b['norm_bytes'])}); KV cache and scratch come on top",
        f"system RAM (input embedding, fp16, kept on the CPU by exllamav2): {fmt_gib(b['system_ram_bytes'])}",
        f"disk (*.safetensors): {fmt_gib(b['disk_bytes'])}",
    ]
    return "\n".join(lines)


def main_inspect(argv: list[str] | None = None) -> int:
    """python -m helpers inspect DIR [--json] [--totals]"""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m helpers inspect",
                                 description="Per-layer bits, groups and byte totals of an EXL2 checkpoint.")
    ap.add_argument("dir", help="the EXL2 model directory (config.json + *.safetensors)")
    ap.add_argument("--json", action="store_true", help="print {'layers': [...], 'totals': {...}} as JSON")
    ap.add_argument("--totals", action="store_true", help="only the totals, no per-layer table")
    args = ap.parse_args(argv)
    ckpt = open_exl2(args.dir)
    if args.json:
        print(json.dumps({"layers": ckpt.layer_table(), "totals": inspect_summary(ckpt)}, indent=1))
    else:
        print(inspect_text(ckpt, table=not args.totals))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# GPU recording: exllamav2 loads what we write, and dequantizes it as we do
# ----------------------------------------------------------------------------------------------------------------

EXLLAMAV2_CHECK_TOPIC = "exl2"


def runtime_order_weight(ckpt: Exl2Checkpoint, name: str) -> torch.Tensor:
    """The reader's dequantized W^T (in, out) in exllamav2's runtime order: for the MLP, gate/up columns and
    down_proj rows follow argsort(down_proj.q_invperm), because exllamav2 folds that permutation in at load."""
    q = ckpt.linears[name]
    w_t = q.dequantize().T
    if q.kind in ("gate_proj", "up_proj") and q.layer is not None:
        down = ckpt.linears.get(name.rsplit(".", 1)[0] + ".down_proj")
        if down is not None:
            return w_t[:, down.perm]
    if q.kind == "down_proj":
        return w_t[q.perm]
    return w_t


def compare_with_exllamav2(model_dir: str | os.PathLike, label: str) -> list[dict]:
    """(CUDA) Load a checkpoint with exllamav2 and compare every linear's get_weight_tensor_dq() with the reader's
    dequantization; also run one forward pass and check the logits are finite. One row per linear."""
    from helpers.core import devices as gpu

    gpu.require_cuda("comparing EXL2 checkpoints with exllamav2")
    from exllamav2 import ExLlamaV2, ExLlamaV2Config  # noqa: WPS433 (CUDA only, compiles on first import)

    ckpt = open_exl2(model_dir)
    config = ExLlamaV2Config(str(model_dir))
    config.max_seq_len = 256
    config.max_input_len = 256
    config.no_sdpa = True
    model = ExLlamaV2(config)
    model.load()
    try:
        ids = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        logits = model.forward(ids).float()
        finite = bool(torch.isfinite(logits).all())
        rows = []
        for name, q in ckpt.linears.items():
            mod = model.modules_dict[name]
            theirs = mod.get_weight_tensor_dq().float().cpu()[:, :q.out_features]
            ours = runtime_order_weight(ckpt, name)
            scale = ours.abs().max().item() or 1.0
            rows.append({
                "checkpoint": label, "linear": name, "in": q.in_features, "out": q.out_features, "mix": q.mix(),
                "bpw": round(q.bits_per_weight, 4),
                "max_abs_err_rel_to_max_weight": (theirs - ours).abs().max().item() / scale,
                "fp16_identical_share": (theirs.half() == ours.half()).float().mean().item(),
                "logits_finite": finite,
            })
        return rows
    finally:
        model.unload()
        del model
        torch.cuda.empty_cache()


def record_exllamav2_check(results_dir: Path | None = None) -> Path:
    """(CUDA) Write checkpoints at every width (2..8, act-order, a padded 1000-wide head, mixed groups, Qwen2
    biases, a tied head) and a synthetic Qwen2.5-shaped one, load each with exllamav2, and record how far its
    dequantized weights are from ours (relative to the largest weight). Intermediate sizes are multiples of 128
    (exllamav2's fused MLP was wrong at 800: DOMAIN.md)."""
    from helpers.core import devices as gpu
    from helpers.core.results import provenance, save_result, slug

    gpu.require_cuda("recording the exllamav2 check of EXL2 checkpoints")
    from helpers.format import synthetic  # noqa: WPS433 (synthetic imports exl2; this runs only when recording

    prov = provenance()
    base = Path(tempfile.mkdtemp(prefix="exl2-check-"))
    rows: list[dict] = []
    try:
        cfg = tiny_config(vocab=1000)
        sd = random_float_state_dict(cfg, seed=0)
        cases: list[tuple[str, Any, dict, dict]] = [(f"writer {b}-bit", b, cfg, sd) for b in (2, 3, 4, 5, 6, 8)]
        cases.append(("writer mixed 0.1:8b_32g/0.2:6b_64g/0.7:3b_128g", "0.1:8b_32g/0.2:6b_64g/0.7:3b_128g", cfg, sd))
        qcfg = tiny_config(arch="Qwen2ForCausalLM", vocab=1000)
        cases.append(("writer Qwen2 4.5 bpw (biases)", 4.5, qcfg, random_float_state_dict(qcfg, seed=1)))
        tcfg = tiny_config(tied=True, vocab=1024)
        cases.append(("writer tied head 3.5 bpw", 3.5, tcfg, random_float_state_dict(tcfg, seed=2)))
        for i, (label, bits, c, s) in enumerate(cases):
            d = write_exl2(base / f"w{i}", c, s, bits=bits, head_bits=6, progress=False)
            rows += compare_with_exllamav2(d, label)
        scfg = synthetic.resolve_config("qwen2.5-14b")
        scfg.update(num_hidden_layers=2, hidden_size=1024, num_attention_heads=8, num_key_value_heads=2,
                    intermediate_size=2816)
        d = synthetic.write_synthetic(scfg, 5.5, base / "synthetic", progress=False)
        rows += compare_with_exllamav2(d, "synthetic Qwen2.5-14B-like (2 layers, hidden 1024) 5.5 bpw")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    worst = max(r["max_abs_err_rel_to_max_weight"] for r in rows)
    return save_result(EXLLAMAV2_CHECK_TOPIC, f"exllamav2-check-{slug(prov.get('gpu') or 'gpu')}", rows, prov=prov,
                       extra={"worst_rel_err": worst, "all_within_1pct": worst < 0.01,
                              "all_logits_finite": all(r["logits_finite"] for r in rows)},
                       results_dir=results_dir)


GPU_RECORDINGS = {"exl2-exllamav2-check": record_exllamav2_check}
