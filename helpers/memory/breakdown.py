"""Every byte of one configuration, by term: weights, KV cache, scratch, transients, CUDA context and a reserve.

``breakdown`` adds up what exllamav2 0.3.2 allocates when ``model.load_autosplit(cache)`` returns (weights.py,
kv_cache.py, scratch.py) and what lies outside it: the **CUDA context** (driver, kernels; measured by the
``memory_cuda_context`` GPU recording, a documented default until then) and a **reserve** for the desktop/OS on a
display GPU.

What is not modelled, said plainly: Multi-head Latent Attention (DeepSeek-V2/V3: exllamav2 0.3.2 cannot load
those models at all), tensor-parallel loading (``load_tp``), multi-GPU splits, LoRA buffers, vision towers, MoE
scratch (MoE weights are estimated as experts x MLP), and CUDA graphs captured later by the generators.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from helpers.core.errors import CourseWarning
from helpers.core.paths import RESULTS_DIR
from helpers.core.units import MIB, gib
from helpers.memory.allocation import alloc_bytes
from helpers.memory.cache_modes import CACHE_CLASSES, CACHE_RULES
from helpers.memory.kv_cache import kv_cache_layout
from helpers.memory.scratch import scratch_bytes
from helpers.memory.setup import LoadSetup
from helpers.specs.shapes import ModelShape, long_context_tip, trained_positions

DEFAULT_CUDA_CONTEXT_BYTES = 512 * MIB
DEFAULT_CUDA_CONTEXT_SOURCE = (
    "default, not measured here: 0.5 GiB, a typical CUDA context with PyTorch's kernels loaded lazily (the size "
    "depends on the GPU, driver and libraries). The first NVML reading of a process includes such "
    "one-time costs but does not isolate them; GPU_RECORDINGS['memory_cuda_context'] measures it "
    "(NVML used after torch.cuda.init() and a tiny allocation, minus before)")
DEFAULT_RESERVE_BYTES = 512 * MIB
DEFAULT_RESERVE_SOURCE = (
    "assumption, not measured: 0.5 GiB for the desktop/OS on a GPU that drives a display (Windows DWM, browser, "
    "etc. typically hold a few hundred MiB to over 1 GiB); use --reserve-gib 0 for a headless GPU")


def cuda_context_default(results_dir: Path | None = None) -> tuple[int, str]:
    """(bytes, where it comes from): the median CUDA context measured by GPU_RECORDINGS if recorded, else the
    documented default."""
    folder = Path(results_dir or RESULTS_DIR) / "memory"
    vals, where = [], None
    try:
        for path in sorted(folder.glob("*.json")):
            doc = json.loads(path.read_text(encoding="utf-8"))
            for row in doc.get("rows", []):
                if row.get("kind") == "cuda_context" and isinstance(row.get("cuda_context_bytes"), int):
                    vals.append(row["cuda_context_bytes"] + int(row.get("cuda_libraries_bytes") or 0))
                    prov = doc.get("provenance", {})
                    where = f"{prov.get('gpu') or prov.get('device')}, {str(prov.get('date', '?'))[:10]}"
    except (OSError, ValueError):
        vals = []
    if vals:
        vals.sort()
        med = vals[len(vals) // 2]
        return med, (f"measured: median of {len(vals)} fresh processes (NVML used after torch.cuda.init(), a tiny "
                     f"allocation and a first cuBLAS matmul, minus before), recorded on {where}; another GPU or "
                     "driver differs")
    return DEFAULT_CUDA_CONTEXT_BYTES, DEFAULT_CUDA_CONTEXT_SOURCE


@dataclass
class Breakdown:
    """Every byte of one configuration, by term. ``vram_total_bytes`` is what the GPU must hold."""

    model: str
    weights_source: str
    bpw: float | None
    head_bits: int
    max_seq_len: int
    cache_mode: str
    batch: int
    max_input_len: int
    max_attention_size: int
    flash_attn: bool
    weights_bytes: int
    lm_head_bytes: int
    embedding_ram_bytes: int
    kv_layers_bytes: int
    kv_temp_bytes: int
    device_scratch_bytes: int
    rope_bytes: int
    attention_transient_bytes: int
    hidden_state_transient_bytes: int
    #: without flash-attn, the repeat_kv copy of one layer's K/V at every query head at a full cache (scratch.py)
    repeat_kv_bytes: int
    cuda_context_bytes: int
    reserve_bytes: int
    cuda_context_source: str
    reserve_source: str
    n_layers: int = 0
    max_position_embeddings: int = 0
    warnings: list = field(default_factory=list)

    @property
    def kv_cache_bytes(self) -> int:
        """The whole cache: layers (with scales) plus the FP16 temp layer of quantized modes."""
        return self.kv_layers_bytes + self.kv_temp_bytes

    @property
    def scratch_bytes(self) -> int:
        return self.device_scratch_bytes + self.rope_bytes

    @property
    def exllamav2_resident_bytes(self) -> int:
        """What torch has allocated for exllamav2 after ``load_autosplit`` returns: weights, cache, scratch, RoPE."""
        return self.weights_bytes + self.kv_cache_bytes + self.scratch_bytes

    @property
    def transient_bytes(self) -> int:
        """Made by a forward pass and kept by PyTorch's caching allocator: the prompt chunk's attention matrix, hidden
        state and mask, and (without flash-attn) the repeat_kv copy a decode step at a full cache makes."""
        return self.attention_transient_bytes + self.hidden_state_transient_bytes + self.repeat_kv_bytes

    @property
    def vram_total_bytes(self) -> int:
        return self.exllamav2_resident_bytes + self.transient_bytes + self.cuda_context_bytes + self.reserve_bytes

    def terms(self) -> list[tuple[str, int, str]]:
        """(label, bytes, note) rows of the table, in order."""
        r = CACHE_RULES[self.cache_mode]
        return [
            ("weights on the GPU (layers + norms)", self.weights_bytes - self.lm_head_bytes, self.weights_source),
            ("lm_head", self.lm_head_bytes, "as stored in the EXL2 folder" if self.bpw is None else
             (f"{self.head_bits}-bit EXL2" if self.head_bits != 16 else "fp16")),
            (f"KV cache, {self.n_layers} layers x {self.max_seq_len:,} tokens", self.kv_layers_bytes,
             f"{r.cls}: {r.note}"),
            ("KV cache FP16 temp layer", self.kv_temp_bytes, "quantized/FP8 modes decode into it" if r.temp else "n/a"),
            ("device scratch (largest module buffer)", self.device_scratch_bytes,
             f"max_input_len {self.max_input_len:,}; lm_head dequant buffer is usually the largest"),
            ("RoPE sin/cos tables", self.rope_bytes, "fp16, scale with max_seq_len"),
            ("attention matrix (transient)", self.attention_transient_bytes,
             f"max_attention_size {self.max_attention_size:,}" + (", flash-attn" if self.flash_attn else "")),
            ("hidden state + mask (transient)", self.hidden_state_transient_bytes, "one max_input_len chunk"),
            ("repeat_kv copy of one layer (transient)", self.repeat_kv_bytes,
             "flash-attn: none" if self.flash_attn else
             f"no flash-attn: K and V at every query head, {self.max_seq_len:,} deep"),
            ("CUDA context", self.cuda_context_bytes, self.cuda_context_source.split(":")[0]),
            ("desktop/OS reserve", self.reserve_bytes, self.reserve_source.split(":")[0]),
        ]

    def table(self) -> str:
        """A text table, every figure in GiB with its unit."""
        bpw = f"{self.bpw:g} bpw" if self.bpw is not None else "EXL2 tensors"
        head = (f"{self.model}, {bpw}, max_seq_len {self.max_seq_len:,}, cache {self.cache_mode} "
                f"({CACHE_CLASSES[self.cache_mode]}), batch {self.batch}")
        lines = [head, f"{'term':<44}{'GiB':>9}  note"]
        for label, b, note in self.terms():
            lines.append(f"{label:<44}{gib(b):>9.3f}  {note}")
        lines.append(f"{'total the GPU must hold':<44}{gib(self.vram_total_bytes):>9.3f}  GiB (2^30 bytes)")
        lines.append(f"{'system RAM: input embedding (fp16)':<44}{gib(self.embedding_ram_bytes):>9.3f}  "
                     "exllamav2 keeps it on the CPU")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(kv_cache_bytes=self.kv_cache_bytes, scratch_bytes=self.scratch_bytes,
                 exllamav2_resident_bytes=self.exllamav2_resident_bytes, transient_bytes=self.transient_bytes,
                 vram_total_bytes=self.vram_total_bytes, cache_class=CACHE_CLASSES[self.cache_mode])
        return d


def _context_warning(shape: ModelShape, max_seq_len: int) -> str | None:
    limit = trained_positions(shape)
    if max_seq_len <= limit:
        return None
    return (f"max_seq_len {max_seq_len:,} is beyond the {limit:,} positions {shape.name} was trained for: the memory "
            f"figures hold, but quality degrades past {limit:,} tokens; {long_context_tip(shape)}")


def cuda_context_of(setup: LoadSetup) -> tuple[int, str]:
    """(bytes, where it comes from): the setup's CUDA context, or the measured/documented default."""
    if setup.cuda_context_gib is None:
        return cuda_context_default()
    return setup.bytes_of(setup.cuda_context_gib), "given by the caller"


def reserve_of(setup: LoadSetup, index: int = 0) -> tuple[int, str]:
    """(bytes, where it comes from): the desktop/OS reserve on GPU ``index``; the default lies on the first GPU."""
    gib = setup.reserve_gib_of(index)
    if gib is None:
        return (DEFAULT_RESERVE_BYTES, DEFAULT_RESERVE_SOURCE) if index == 0 else (0, "not the display GPU")
    return setup.bytes_of(gib), "given by the caller"


def breakdown(setup: LoadSetup, *, warn: bool = True, reserve: tuple[int, str] | None = None) -> Breakdown:
    """Every term of the setup on its first GPU (``reserve``: another (bytes, source) than the setup's). A context
    beyond the model's trained positions warns (``warn``)."""
    s, max_seq_len, mode = setup.shape, setup.max_seq_len, setup.cache_mode
    st = setup.weights
    layout = kv_cache_layout(setup)
    temp = sum(alloc_bytes(r["bytes"]) for r in layout if r["name"].startswith("temp_"))
    layers = sum(alloc_bytes(r["bytes"]) for r in layout) - temp
    sc = scratch_bytes(setup)
    context, res = cuda_context_of(setup), reserve or reserve_of(setup)
    w = [x for x in [_context_warning(s, max_seq_len)] if x]
    bd = Breakdown(
        model=s.name, weights_source=st.source, bpw=st.bpw, head_bits=st.head_bits, max_seq_len=max_seq_len,
        cache_mode=mode, batch=setup.batch, max_input_len=min(setup.max_input_len, max_seq_len),
        max_attention_size=setup.max_attention_size,
        flash_attn=setup.flash_attn, weights_bytes=st.vram, lm_head_bytes=st.head, embedding_ram_bytes=st.ram,
        kv_layers_bytes=layers, kv_temp_bytes=temp, device_scratch_bytes=sc["device_scratch"],
        rope_bytes=sc["rope_tables"], attention_transient_bytes=sc["attention_transient"],
        hidden_state_transient_bytes=sc["hidden_state_transient"] + sc["attn_mask_transient"],
        repeat_kv_bytes=sc["repeat_kv_transient"], cuda_context_bytes=context[0], reserve_bytes=res[0],
        cuda_context_source=context[1], reserve_source=res[1], n_layers=s.n_layers,
        max_position_embeddings=s.max_position_embeddings, warnings=w)
    if warn:
        for msg in setup.weight_warnings + w:
            warnings.warn(msg, CourseWarning, stacklevel=2)
    return bd
