"""What quantization costs: perplexity of the embedded model at several EXL2 widths against its float source.

Perplexity is exp(mean negative log-likelihood) of each next token of a fixed text: how "surprised" the model is on
average. It is measured here on ``helpers/lessons/perplexity_text.txt``, a plain-English passage written for the course
(about 1,700 tokens with SmolLM2's tokenizer), with the project's reference decoder (``helpers.engines.reference``) in
float32 on the CPU. An EXL2 checkpoint is evaluated on its dequantized weights, so the numbers measure the format's
rounding, not a kernel.

``quality_sweep`` writes the embedded model at several widths with the course's EXL2 writer, measures each, and keeps
the table in the cache folder: it is computed once per machine (a minute or two) and then read back instantly.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from helpers.core.atomic import atomic_write_text
from helpers.core.errors import CourseError
from helpers.core.paths import cache_dir
from helpers.core.progress import progress
from helpers.engines.reference import ReferenceModel, load_state_dict
from helpers.format.reader import open_exl2
from helpers.models import embedded as models

TEXT_PATH = Path(__file__).with_name("perplexity_text.txt")
#: tokens of the fixed text used by default (the whole passage is ~1,700 tokens)
DEFAULT_MAX_TOKENS = 1024
SWEEP_BITS = (3, 4, 5, 6, 8)
#: bumped when the sweep's method changes, so a cached table is recomputed
SWEEP_VERSION = 1


def fixed_text() -> str:
    """The course's fixed evaluation passage."""
    try:
        return TEXT_PATH.read_text(encoding="utf-8")
    except OSError as exc:
        raise CourseError(f"the evaluation text {TEXT_PATH} is missing ({exc}): reinstall the course (git checkout)") \
            from None


def encode_text(text: str, tokenizer_dir: Path) -> "torch.Tensor":  # noqa: F821
    """The token ids of ``text`` (no special tokens added) with the tokenizer.json of ``tokenizer_dir``."""
    import torch
    from tokenizers import Tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise CourseError(f"{tokenizer_dir} has no tokenizer.json: perplexity needs the model's tokenizer")
    ids = Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.long)


def _load(model) -> tuple[dict, dict, Path | None]:
    """(config, float state dict, folder) from a folder (EXL2 or float) or a (config, state_dict) pair."""
    if isinstance(model, (str, os.PathLike)):
        cfg, state = load_state_dict(Path(model))
        return cfg, state, Path(model)
    if isinstance(model, tuple) and len(model) == 2:
        return model[0], model[1], None
    raise CourseError("perplexity() takes a model folder or a (config, state_dict) pair")


def nll_of(config: dict, state_dict: dict, ids) -> float:
    """Mean negative log-likelihood (nats/token) of ``ids[1:]`` given the prefix, with the reference decoder."""
    import torch
    import torch.nn.functional as F

    if ids.numel() < 2:
        raise CourseError("perplexity needs a text of at least two tokens")
    model = ReferenceModel.from_state_dict(config, state_dict, max_seq_len=int(ids.numel()))
    with torch.inference_mode():
        logits = model.forward(ids[None])
    return float(F.cross_entropy(logits[0, :-1].float(), ids[1:]))


def perplexity(model, text: str | None = None, *, max_tokens: int = DEFAULT_MAX_TOKENS,
               tokenizer_dir: str | os.PathLike | None = None) -> float:
    """Perplexity of ``model`` (an EXL2 or float folder, or a (config, state_dict) pair) on ``text``.

    ``text`` defaults to the course's fixed passage; only its first ``max_tokens`` tokens are scored. The tokenizer is
    the model folder's (or ``tokenizer_dir``; for a state dict, the embedded model's float source).
    """
    config, state, folder = _load(model)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else folder
    if tok_dir is None:
        tok_dir = models.float_model_dir()
    ids = encode_text(fixed_text() if text is None else text, tok_dir)[: int(max_tokens)]
    return math.exp(nll_of(config, state, ids))


def _sweep_key(bits_list: Sequence[float], max_tokens: int) -> str:
    text_hash = hashlib.sha256(fixed_text().encode("utf-8")).hexdigest()[:12]
    raw = json.dumps([SWEEP_VERSION, models._exl2_name(0), list(map(float, bits_list)), max_tokens, text_hash])
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def quality_sweep(bits_list: Sequence[float] = SWEEP_BITS, *, max_tokens: int = DEFAULT_MAX_TOKENS,
                  refresh: bool = False) -> list[dict]:
    """Perplexity and size of the embedded model at each width in ``bits_list``, and of its float source.

    Rows (first the float source, then one per width): ``label``, ``bits`` (None for float), ``bpw`` (measured bits
    per weight of the decoder layers), ``weights_bytes`` (the safetensors files; the float row also gives
    ``fp16_bytes``, what the same weights take in 16-bit), ``perplexity``, ``ppl_vs_float`` (ratio). Computed once
    and cached in the cache folder (``refresh=True`` recomputes).
    """
    bits_list = [float(b) for b in bits_list]
    cache_file = cache_dir() / f"quality-sweep-{_sweep_key(bits_list, max_tokens)}.json"
    if cache_file.is_file() and not refresh:
        try:
            return json.loads(cache_file.read_text(encoding="utf-8"))["rows"]
        except (OSError, json.JSONDecodeError, KeyError):
            pass  # a damaged cache entry is recomputed
    float_dir = models.float_model_dir()
    config, state = models.load_float_tensors(float_dir)
    ids = encode_text(fixed_text(), float_dir)[:max_tokens]
    n_params = sum(t.numel() for t in state.values())
    base = math.exp(nll_of(config, state, ids))
    del state
    rows = [{"label": "float (dequantized GGUF)", "bits": None, "bpw": 32.0, "weights_bytes": _folder_bytes(float_dir),
             "fp16_bytes": 2 * n_params, "perplexity": round(base, 4), "ppl_vs_float": 1.0}]

    for bits in progress(bits_list, desc="quality sweep (write EXL2, measure)", unit="width"):
        cached = models.exl2_model_dir(bits, build=False) if models.is_complete(
            cache_dir() / models._exl2_name(bits)) else None
        tmp = None
        try:
            if cached is None:
                tmp = Path(tempfile.mkdtemp(prefix=".sweep-", dir=cache_dir()))
                models.write_exl2_from_float(tmp / "model", bits, float_dir=float_dir, show_progress=False)
                folder = tmp / "model"
            else:
                folder = cached
            ckpt = open_exl2(folder)
            ppl = math.exp(nll_of(config, ckpt.float_state_dict(), ids))
            rows.append({"label": f"EXL2 {bits:g} bpw", "bits": bits, "bpw": round(ckpt.bits_per_weight, 3),
                         "weights_bytes": _folder_bytes(folder), "perplexity": round(ppl, 4),
                         "ppl_vs_float": round(ppl / base, 4)})
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    doc = {"bits_list": bits_list, "max_tokens": max_tokens, "text": TEXT_PATH.name, "rows": rows}
    atomic_write_text(cache_file, json.dumps(doc, indent=1) + "\n")
    return rows
