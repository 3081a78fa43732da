"""Notebook 02's logic: a guided tour of one EXL2 checkpoint, from its bytes on disk to a chat and its cost in quality.

1. Inside the file (``tensor_inventory``, ``linear_tensors``, ``decode_walkthrough``, ``inspect_report``): the tensors
   an EXL2 file holds, one linear decoded by hand, the per-layer chart exactly as ``python -m helpers inspect`` prints.
2. Loading (``load_with_memory``): ``engines.backend.load`` of a ``LoadSetup``, memory read before and after; ``chat``.
3. Agreement (``agreement``, ``reference_vs_transformers``): exllamav2's and the reference's logits, live on a GPU,
   else the recorded comparison (labelled).
4. Quantization cost (``quantization_cost``) and 5. the reader's own model (``own_model``).
exllamav2 is never imported here: the GPU branch goes through the front door, ``engines.exllama``.
"""
from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from helpers.core import devices as gpu
from helpers.core.errors import CourseError
from helpers.core.paths import MODEL_ENV
from helpers.core.progress import progress
from helpers.core.results import label
from helpers.core.tables import table
from helpers.core.units import GIB, fmt_gib
from helpers.engines import agreement as engine_agreement
from helpers.engines import backend as B
from helpers.engines.reference import ReferenceModel
from helpers.format.config import config_get
from helpers.format.inspect import inspect_summary, inspect_text
from helpers.format.reader import Exl2Checkpoint, QuantLinear, open_exl2
from helpers.lessons import quality
from helpers.memory.kv_cache import kv_cache_bytes
from helpers.memory.recorded import NOT_RECORDED
from helpers.models import embedded as models

#: the prompt of the chat and of the agreement checks
PROMPT = "What is the capital of France?"
#: the linear decoded by hand in the notebook (small: 576 inputs, 192 outputs in SmolLM2-135M)
DEMO_LINEAR = "model.layers.0.self_attn.k_proj"
#: the quality sweep the notebook shows: every width of the issue, on the first 256 tokens of the course's text,
#: so that a cold cache costs well under a minute on 2 cores (the default sweep scores 1,024 tokens)
SWEEP_BITS = (3, 4, 5, 6, 8)
SWEEP_TOKENS = 256
#: a tiny checkpoint made by exllamav2's own converter at 3.0 bpw (shipped with helpers): its layers carry different
#: bit mixes, and it holds exllamav2's own dequantized weights and logits (converter_fixture/README.md)
CONVERTER_FIXTURE = Path(__file__).resolve().parent / "converter_fixture" / "tiny_llama_b3.0"


# ====================================================================================================================
# 1. Inside the file
# ====================================================================================================================

def open_model(model_dir: str | os.PathLike | None = None) -> Exl2Checkpoint:
    """Open an EXL2 checkpoint: ``model_dir``, else ``$EXL2_COURSE_MODEL``, else the embedded model."""
    return open_exl2(models.resolve_model_dir(model_dir))


def tensor_inventory(ckpt: Exl2Checkpoint) -> list[dict]:
    """What the file holds, by kind of tensor: [{'tensor', 'count', 'dtype', 'bytes'}], largest first.

    Quantized linears contribute five tensors each (q_weight, q_scale, q_scale_max, q_groups, q_invperm; a bias
    when there is one); everything else is a plain fp16 tensor (norms, the embedding, an unquantized head)."""
    rows: dict[str, dict] = {}
    for name in ckpt.tensor_names:
        if name.endswith("embed_tokens.weight"):
            key = "embed_tokens.weight"
        elif name.rsplit(".", 1)[-1].startswith("q_") or name.endswith(".bias"):
            key = name.rsplit(".", 1)[-1]
        elif "norm" in name:
            key = "*norm.weight"
        else:
            key = name.split(".layers.")[-1].split(".", 1)[-1] if ".layers." in name else name
        dtype = str(ckpt.tensor_dtype(name)).replace("torch.", "")
        row = rows.setdefault(key, {"tensor": key, "count": 0, "dtype": dtype, "bytes": 0})
        row["count"] += 1
        row["bytes"] += ckpt.tensor_nbytes(name)
    return sorted(rows.values(), key=lambda r: -r["bytes"])


def linear_tensors(ckpt: Exl2Checkpoint, prefix: str = DEMO_LINEAR) -> list[dict]:
    """The stored tensors of one quantized linear: [{'name', 'shape', 'dtype', 'bytes'}]."""
    q = _linear(ckpt, prefix)
    return [{"name": f"{prefix}.{s}", "shape": list(ckpt.tensor_shape(f"{prefix}.{s}")),
             "dtype": str(ckpt.tensor_dtype(f"{prefix}.{s}")).replace("torch.", ""), "bytes": b}
            for s, b in q.file_bytes().items()]


def _linear(ckpt: Exl2Checkpoint, prefix: str) -> QuantLinear:
    if prefix not in ckpt.linears:
        some = ", ".join(list(ckpt.linears)[:3])
        raise CourseError(f"{ckpt.dir.name} has no quantized linear '{prefix}': pick one of its linears ({some}, ...)")
    return ckpt.linears[prefix]


def group_table(ckpt: Exl2Checkpoint, prefix: str = DEMO_LINEAR) -> list[dict]:
    """q_groups decoded: one row per group: bits, rows of K, first packed row, packed rows, first stored row."""
    q = _linear(ckpt, prefix)
    raw = ckpt.tensor(f"{prefix}.q_groups").tolist()
    n_packed = ckpt.tensor_shape(f"{prefix}.q_weight")[0]
    rows, first_row = [], 0
    for g in range(len(raw) // 2):
        bits, start = raw[2 * g], raw[2 * g + 1]
        end = raw[2 * g + 3] if 2 * g + 3 < len(raw) else n_packed
        n_rows = (end - start) * 32 // bits if 2 * g + 3 < len(raw) else q.in_features - first_row
        rows.append({"group": g, "bits": bits, "rows": n_rows, "first_packed_row": start, "packed_rows": end - start,
                     "first_row": first_row})
        first_row += n_rows
    return rows


def _u32(x: int) -> int:
    return int(x) & 0xFFFFFFFF


def hand_unpack(words: list[int], bits: int, count: int) -> list[int]:
    """Decode ``count`` values of ``bits`` bits from one column's words, the slow obvious way (for reading):
    value i occupies bits [i*bits, (i+1)*bits) of the column's little-endian bit stream, possibly across two words."""
    stream = 0
    for i, w in enumerate(words):
        stream |= _u32(w) << (32 * i)
    return [(stream >> (i * bits)) & ((1 << bits) - 1) for i in range(count)]


def decode_walkthrough(ckpt: Exl2Checkpoint, prefix: str = DEMO_LINEAR, *, column: int = 0, n_values: int = 6) \
        -> dict:
    """One linear decoded by hand in front of the reader, checked against helpers.format.reader's vectorised decoder.

    For the first group and one output ``column``: the q_scale word, its 8 4-bit codes, the scale
    ``(code + 1)^2 * q_scale_max / 256``; the first q_weight words of the column, the first ``n_values`` codes in
    them, and the weights ``(q - 2^(bits-1)) * scale``; then where those stored rows go (``q_invperm``) in the
    logical (out, in) matrix that ``QuantLinear.dequantize()`` returns."""
    q = _linear(ckpt, prefix)
    groups = group_table(ckpt, prefix)
    g0 = groups[0]
    bits = g0["bits"]
    scale_word = int(ckpt.tensor(f"{prefix}.q_scale")[0, column // 8])
    scale_codes = [(_u32(scale_word) >> (4 * i)) & 0xF for i in range(8)]
    code = scale_codes[column % 8]
    smax = float(ckpt.tensor(f"{prefix}.q_scale_max")[0])
    scale_exact = (code + 1) ** 2 * smax / 256
    # exllamav2 forms the scale in fp16: q_scale_max x (1/256) rounded to fp16, times (code + 1)^2, rounded again
    # (small scales become fp16 subnormals and lose digits; the kernels compute exactly this)
    f16 = torch.float16
    smax_256 = torch.tensor(smax, dtype=f16) * torch.tensor(1 / 256, dtype=f16)
    scale_by_hand = float(torch.tensor(float((code + 1) ** 2), dtype=f16) * smax_256)
    n_words = -(-n_values * bits // 32)
    qw = ckpt.tensor(f"{prefix}.q_weight")
    words = [int(w) for w in qw[g0["first_packed_row"]:g0["first_packed_row"] + n_words, column]]
    codes = hand_unpack(words, bits, n_values)
    zero = 2 ** (bits - 1)
    weights_by_hand = [(c - zero) * scale_by_hand for c in codes]
    # the library's answers for the same numbers
    lib_codes = q.codes()[:n_values, column].tolist()
    lib_scale = float(q.scales()[0, column])
    lib_weights = q.dequantize_stored()[:n_values, column].tolist()
    invperm = ckpt.tensor(f"{prefix}.q_invperm").to(torch.int64)
    perm = torch.argsort(invperm)
    logical = q.dequantize()
    inputs = [int(perm[r]) for r in range(n_values)]
    placed = [float(logical[column, i]) for i in inputs]
    return {
        "linear": prefix, "in_features": q.in_features, "out_features": q.out_features, "column": column,
        "group": g0, "n_groups": len(groups), "bits": bits,
        "scale_word": _u32(scale_word), "scale_codes": scale_codes, "scale_code": code, "q_scale_max": smax,
        "scale_exact": scale_exact, "scale_by_hand": scale_by_hand, "scale_lib": lib_scale,
        "weight_words": [_u32(w) for w in words], "codes": codes, "codes_lib": lib_codes, "zero": zero,
        "weights_by_hand": weights_by_hand, "weights_lib": lib_weights,
        "stored_rows_to_inputs": inputs, "weights_in_logical_matrix": placed,
        "agrees": codes == lib_codes and placed == lib_weights and scale_by_hand == lib_scale
        and all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(weights_by_hand, lib_weights)),
    }


def format_walkthrough(d: dict) -> str:
    """The walkthrough as the notebook prints it (numbers rounded, deterministic)."""
    g, b = d["group"], d["bits"]
    lines = [
        f"{d['linear']}: in={d['in_features']}, out={d['out_features']}, {d['n_groups']} groups; "
        f"group 0 = {g['rows']} rows at {b} bits, "
        f"packed rows {g['first_packed_row']}..{g['first_packed_row'] + g['packed_rows'] - 1}",
        f"q_scale[0, {d['column'] // 8}] = 0x{d['scale_word']:08x} "
        f"-> 4-bit codes (low nibble first) {d['scale_codes']}",
        f"column {d['column']}: code {d['scale_code']}; q_scale_max[0] = {d['q_scale_max']:.6g}; "
        f"scale = ({d['scale_code']} + 1)^2 x {d['q_scale_max']:.6g} / 256 = {d['scale_exact']:.6g}; "
        f"in fp16, as the kernels compute it: {d['scale_by_hand']:.6g} (library: {d['scale_lib']:.6g})",
        f"q_weight words of column {d['column']}: " + " ".join(f"0x{w:08x}" for w in d["weight_words"]),
        f"first {len(d['codes'])} {b}-bit codes: {d['codes']} (library: {d['codes_lib']}); "
        f"zero point 2^{b - 1} = {d['zero']}",
        "weights (q - zero) x scale: " + ", ".join(f"{w:+.5f}" for w in d["weights_by_hand"]),
        "library dequantize_stored:  " + ", ".join(f"{w:+.5f}" for w in d["weights_lib"]),
        f"q_invperm puts stored rows 0..{len(d['codes']) - 1} at inputs {d['stored_rows_to_inputs']} of the "
        f"logical weight; dequantize()[{d['column']}, those inputs] = "
        + ", ".join(f"{w:+.5f}" for w in d["weights_in_logical_matrix"]),
        f"hand decoding agrees with helpers.format.reader: {d['agrees']}",
    ]
    return "\n".join(lines)


def inspect_report(ckpt: Exl2Checkpoint) -> dict:
    """Exactly what ``python -m helpers inspect DIR --json`` prints, from the same functions:
    {'layers': ``Exl2Checkpoint.layer_table()``, 'totals': ``helpers.format.inspect.inspect_summary()``}. The
    notebook's chart and byte lines are drawn from this dict and nothing else (a test holds the two equal)."""
    return {"layers": ckpt.layer_table(), "totals": inspect_summary(ckpt)}


def inspect_totals_text(ckpt: Exl2Checkpoint) -> str:
    """``python -m helpers inspect DIR --totals``, word for word, except that the folder is shown by its name (the
    full path depends on the machine)."""
    return inspect_text(ckpt, table=False).replace(str(ckpt.dir), ckpt.dir.name)


def vram_parts(totals: dict) -> list[tuple[str, int]]:
    """What the VRAM total of inspect's totals is made of: [(part, bytes)], non-zero parts only, summing to it."""
    names = {"q_weight": "q_weight (codes)", "q_scale": "q_scale (4-bit scale codes)",
             "q_meta": "q_scale_max, q_groups, group map, 16-bit perms", "bias": "biases", "norms": "norms",
             "fp16_head": "fp16 head", "other_fp16": "other fp16 tensors"}
    return [(names.get(k, k), v) for k, v in totals["bytes"]["by_kind"].items() if v]


def summary(ckpt: Exl2Checkpoint) -> str:
    """One paragraph: what this checkpoint is."""
    cfg = ckpt.config
    t = inspect_summary(ckpt)   # the numbers inspect prints, rounded as it rounds them
    return (f"{ckpt.dir.name}: {t['architecture']}, {t['layers']} layers, hidden {config_get(cfg, 'hidden_size')}, "
            f"vocab {config_get(cfg, 'vocab_size')}; {t['quantized_linears']} quantized linears at "
            f"{t['bits_per_weight']:.3f} bpw; head: {t['head']}; {t['disk_gib']:.4f} GiB on disk")


# ====================================================================================================================
# 2. Loading, memory, chat
# ====================================================================================================================

def memory_reading(device: str | None = None) -> dict:
    """Now: NVML's used bytes of GPU 0 (and torch's allocated bytes) on a CUDA machine; this process's resident
    bytes (RSS) everywhere. Never raises where NVML or CUDA is missing."""
    out = {"process_rss_bytes": gpu.process_rss_bytes()}
    if (device or ("cuda" if gpu.cuda_status()["available"] else "cpu")) == "cuda":
        out["nvml_used_bytes"] = gpu.nvml_used_bytes(0)
        out["torch_allocated_bytes"] = int(torch.cuda.memory_allocated())
    return out


@dataclass
class Loaded:
    """A loaded backend and the memory readings around its load."""
    backend: "object"
    before: dict
    after: dict
    predicted_cache_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        be = self.backend
        lines = [f"engine: {be.name} on {be.device} ({be.reason})",
                 f"max_seq_len {be.max_seq_len}, cache mode {be.cache_mode}"]
        for key, what in (("nvml_used_bytes", "NVML used (whole GPU)"), ("torch_allocated_bytes", "torch allocated"),
                          ("process_rss_bytes", "process RSS (system RAM)")):
            a, b = self.before.get(key), self.after.get(key)
            if a is not None and b is not None:
                lines.append(f"{what:<26} before {fmt_gib(a, 3)}, after {fmt_gib(b, 3)}: {(b - a) / GIB:+.3f} GiB")
        lines.append(f"KV cache this engine allocated: {fmt_gib(be.cache_bytes(), 4)}; exllamav2's {be.cache_mode} "
                     f"cache of the same length: {fmt_gib(self.predicted_cache_bytes, 4)}")
        return "\n".join(lines + self.notes)


def load_with_memory(model=None, *, backend: str = "auto", **settings) -> Loaded:
    """``helpers.engines.backend.load`` of ``model`` (a ``LoadSetup``, or a folder and its settings) with memory
    read before and after, and the cache exllamav2 would allocate.

    exllamav2 shows its own progress bar (one step per module); the reference's load is one step (read and
    dequantize every linear, allocate the cache), shown as such."""
    setup = B.setup_of(model, **settings)
    engine, device, _ = B.choose_backend(backend)
    before = memory_reading(device)
    if engine == "exllamav2":
        be = B.load(setup, backend=backend)
    else:
        with progress(total=1, desc="reference: dequantize weights, allocate cache", unit="model") as bar:
            be = B.load(setup, backend=backend)
            bar.update(1)
    after = memory_reading(be.device)
    predicted = kv_cache_bytes(setup.shape, setup.max_seq_len, setup.cache_mode)
    return Loaded(be, before, after, predicted)


def chat(be, prompts: list[str] | str = PROMPT, *, max_new_tokens: int = 24,
         out: Callable[[str], None] | None = None) -> list[str]:
    """A short chat: each prompt in the model's chat template, greedy, streamed as it is decoded. Returns answers."""
    write = out or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    answers = []
    for p in [prompts] if isinstance(prompts, str) else prompts:
        write(f"user: {p}\nassistant: ")
        answers.append(be.generate(p, max_new_tokens=max_new_tokens, chat=True, stream=write))
        write("\n")
    return answers


# ====================================================================================================================
# 3. Agreement
# ====================================================================================================================

def converter_agreement(folder: Path = CONVERTER_FIXTURE) -> dict:
    """The course's decoder against the logits exllamav2 itself computed for one of its converter's checkpoints
    (``exllamav2_truth.safetensors``: a 32-token prefill and one decode step, FP16 cache, no_sdpa): the largest
    difference, the relative L2 error, and on how many positions both pick the same top token."""
    from safetensors.torch import load_file

    truth = load_file(str(Path(folder) / "exllamav2_truth.safetensors"))
    ids, step = truth["input_ids"], truth["next_id"]
    model = ReferenceModel.from_dir(folder, max_seq_len=ids.shape[1] + 1)
    ours = torch.cat([model.forward(ids), model.forward(step, reset=False)], dim=1)[0]
    theirs = torch.cat([truth["logits_prefill"], truth["logits_step"]], dim=1)[0].float()
    d = engine_agreement.compare_logits(ours, theirs)
    same = int((ours.argmax(-1) == theirs.argmax(-1)).sum())
    return {**d, "positions": int(ours.shape[0]), "same_top1": same, "logit_range": float(theirs.abs().max())}


def converter_agreement_text(d: dict) -> str:
    return (f"course decoder vs exllamav2's own logits, {d['positions']} positions (a 32-token prefill, one decode "
            f"step): largest difference {d['max_abs_diff']:.4f} (logits reach {d['logit_range']:.1f}), relative L2 "
            f"{d['rel_l2']:.2e}, same top token at {d['same_top1']} of {d['positions']}")


def agreement(be, *, steps: int = 8, results_dir: Path | None = None) -> dict:
    """exllamav2 against the reference on ``PROMPT``.

    ``be`` is exllamav2 (a CUDA machine): the reference is loaded on the same GPU in float32 and both run live
    (``helpers.engines.agreement.measure_agreement``). Otherwise the latest recording (``results/agreement``) is shown
    with its label, and this machine's engine is compared live with the recorded exllamav2 logits on the recorded
    prompt ids (``helpers.engines.agreement.recorded_vs_live``). ``mode``: 'live', 'recorded' or 'none'."""
    if be.name == "exllamav2":
        ref = B.load(be.model_dir, max_seq_len=min(1024, be.max_seq_len), backend="reference", device="cuda",
                     dtype=torch.float32)
        try:
            rows, extra, _ = engine_agreement.measure_agreement(be, ref, prompt=PROMPT, steps=steps)
        finally:
            ref.unload()
        return {"mode": "live", "engines": extra["engines"], "rows": rows, "summary": extra}
    found = engine_agreement.load_agreement(results_dir)
    if found is None:
        return {"mode": "none", "message": NOT_RECORDED}
    doc, _ = found
    live = engine_agreement.recorded_vs_live(be, results_dir=results_dir)
    return {"mode": "recorded", "label": label(doc["provenance"]), "summary": {k: v for k, v in doc.items()
                                                                           if k not in ("rows", "provenance")},
            "rows": doc["rows"], "live_vs_recorded": live}


def format_agreement(a: dict) -> str:
    if a["mode"] == "none":
        return a["message"]
    s = a["summary"]
    head = (f"{' vs '.join(s.get('engines', []))}, live on this machine" if a["mode"] == "live"
            else f"exllamav2 vs reference, {a['label']}")
    lines = [head,
             f"prompt logits over {s.get('prompt_tokens')} positions: "
             f"max |diff| {s['prompt_logits_max_abs_diff']:.4f}, "
             f"relative L2 error {s['prompt_logits_rel_l2']:.2e}",
             f"greedy tokens: first different at step {s.get('first_different_token')}, first near-tie at step "
             f"{s.get('first_near_tie')}; agree until the first near-tie: {s.get('agree_until_first_near_tie')}"]
    live = a.get("live_vs_recorded")
    if live:
        lines.append(f"live {live['live_backend']} vs the recorded exllamav2 logits (same prompt ids): max |diff| "
                     f"{live['max_abs_diff']:.4f}, relative L2 {live['rel_l2']:.2e}, same next token: "
                     f"{live['same_next_token']}")
    return "\n".join(lines)


def reference_vs_transformers(float_dir: str | os.PathLike | None = None, prompt: str = PROMPT) -> dict:
    """The course's reference decoder against transformers' LlamaForCausalLM, both float32 on the CPU, on the same
    float safetensors (the embedded model's source by default): logits of every position of one chat prompt."""
    folder = Path(float_dir) if float_dir is not None else models.float_model_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    ref = ReferenceModel.from_dir(folder, max_seq_len=128)
    ids = ref.tokenizer.encode(prompt, chat=True)
    with torch.inference_mode():
        a = hf(ids).logits[0].float()
    b = ref.forward(ids)[0]
    top_a, top_b = a[-1].topk(5).indices.tolist(), b[-1].topk(5).indices.tolist()
    return {"float_dir": str(folder), "prompt_tokens": int(ids.shape[1]),
            "max_abs_diff": float((a - b).abs().max()), "rel_l2": float((a - b).norm() / a.norm()),
            "max_abs_logit": float(a.abs().max()), "same_top5": top_a == top_b,
            "top5_tokens": [ref.tokenizer.decode([t]) for t in top_b],
            "same_argmax_every_position": bool((a.argmax(-1) == b.argmax(-1)).all())}


def format_reference_vs_transformers(r: dict, tol: float = 1e-4) -> str:
    """Deterministic lines (thresholds, tokens); the exact errors vary with the CPU's arithmetic."""
    return (f"reference vs transformers on {Path(r['float_dir']).name}, {r['prompt_tokens']} prompt tokens\n"
            f"relative L2 error below {tol:g}: {r['rel_l2'] < tol}; same greedy token at every position: "
            f"{r['same_argmax_every_position']}\n"
            f"same top-5 next tokens: {r['same_top5']} {r['top5_tokens']}")


# ====================================================================================================================
# 4. What quantization costs
# ====================================================================================================================

def quantization_cost(bits_list=SWEEP_BITS, *, max_tokens: int = SWEEP_TOKENS) -> list[dict]:
    """``helpers.lessons.quality.quality_sweep`` at the notebook's widths and text length (cached after the first
    run)."""
    return quality.quality_sweep(bits_list, max_tokens=max_tokens)


def cost_table(rows: list[dict]):
    """``quantization_cost``'s rows as a table (``core.tables.table``): bpw, size in GiB, perplexity, and the
    perplexity over the float model's."""
    return table(({**r, "GiB": r["weights_bytes"] / GIB} for r in rows),
                 {"label": "weights", "bpw": "bpw", "GiB": "GiB", "perplexity": "perplexity",
                  "ppl_vs_float": "vs float"}, index="weights", digits={"bpw": 2, "GiB": 3, "perplexity": 2,
                                                                           "vs float": 2})


# ====================================================================================================================
# 5. The reader's own model
# ====================================================================================================================

def own_model() -> tuple[Path, str]:
    """(folder, one-line message): ``$EXL2_COURSE_MODEL`` if set and valid, else the embedded model. A bad value is
    reported in the message (not raised), and the embedded model is used."""
    value = os.environ.get(MODEL_ENV, "").strip()
    if not value:
        return models.embedded_model_dir(), (f"{MODEL_ENV} is not set: using the embedded model. "
                                             "Set it to your EXL2 folder to run these cells on your own model.")
    try:
        folder = models.check_exl2_dir(Path(value), origin=f"{MODEL_ENV}=")
    except CourseError as exc:
        return models.embedded_model_dir(), f"{exc} (using the embedded model for now)"
    return folder, f"{MODEL_ENV}={folder}: using your model"


def fits_here(ckpt: Exl2Checkpoint, device: str) -> tuple[bool, str]:
    """Can this machine load the checkpoint for a chat? The CPU reference holds every weight dequantized in float32:
    4 bytes per parameter must fit in the available RAM with room to spare. A GPU is left to exllamav2 to decide."""
    import psutil

    if device == "cuda":
        return True, ""
    params = sum(q.in_features * q.out_features for q in ckpt.linears.values())
    params += sum(int(torch.Size(ckpt.tensor_shape(n)).numel()) for n in ckpt.tensor_names
                  if not n.rsplit(".", 1)[-1].startswith("q_") and not n.endswith(".bias"))
    need, have = 4 * params, psutil.virtual_memory().available
    if need > 0.7 * have:
        return False, (f"too big for the CPU reference here: {fmt_gib(need, 2)} of float32 weights, "
                       f"{fmt_gib(have, 2)} of RAM available; the inspection above is all this machine can show")
    return True, ""
