"""One API over two engines: exllamav2 on a CUDA GPU, the course's pure-PyTorch reference anywhere else.

``load()`` picks the engine and says why (``Backend.name`` and ``Backend.reason``):
- ``backend="auto"`` takes exllamav2 only when torch sees a CUDA GPU *and* ``import exllamav2`` succeeds (the import
  compiles or loads its CUDA extension); otherwise the reference, on the GPU if there is one, else on the CPU.
- ``backend="exllamav2"`` insists (one-line error if it cannot run), ``backend="reference"`` never touches it.
exllamav2 is imported only inside ``_import_exllamav2()``, after ``gpu.require_cuda()``: a CPU machine never imports it.

Both engines expose the same calls: ``encode``/``decode`` (the model's own Hugging Face tokenizer and chat template),
``forward`` (prefill from position 0 or append at the current depth), ``fill_cache`` (put the cache at a depth
directly, by writing values into the preallocated K/V tensors), ``decode_step``, ``generate`` (greedy or sampled,
streaming), ``memory``, ``cache_bytes``, ``unload``. The exllamav2 path sets ``config.no_sdpa = True``: exllamav2
0.3.2's SDPA attention without flash-attn computes a non-causal prefill (DOMAIN.md, "three traps").

``python -m helpers generate --prompt TEXT`` is ``main_generate``. ``GPU_RECORDINGS["agreement"]`` records, on a CUDA
machine, how far exllamav2's logits are from the reference's on the embedded model, and whether their greedy tokens
agree up to the first near-tie.
"""
from __future__ import annotations

import functools

import gc
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch

from helpers.core import devices as gpu
from helpers.core.errors import CourseError
from helpers.engines.reference import ReferenceModel, Tokenizer, check_context, generate_text, read_config

from helpers.memory.accounting import CACHE_CLASSES, CACHE_MODES  # cache mode -> exllamav2 class name (memory owns the accounting)

BACKENDS = ("auto", "exllamav2", "reference")
QUANTIZED_CACHE_ERROR = "quantized caches need exllamav2 on a CUDA GPU; use cache_mode='fp16' here"


# --------------------------------------------------------------------------------------------------------------------
# The common interface
# --------------------------------------------------------------------------------------------------------------------

def exllamav2_cache_bytes(cache) -> int:
    """Every tensor an exllamav2 cache allocated: K/V (and scales) of all layers, plus the FP16 staging tensors of
    the quantized modes."""
    total = sum(t.numel() * t.element_size() for t in cache.all_tensors() if t is not None)
    for pair in getattr(cache, "temp_tensors", {}).values():
        total += sum(t.numel() * t.element_size() for t in pair)
    return total


class Backend:
    """What every engine offers. Subclasses set the attributes and implement forward/decode_step/fill_cache."""

    name: str
    reason: str
    device: str
    model_dir: Path
    max_seq_len: int
    cache_mode: str
    vocab_size: int
    tokenizer: Tokenizer

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name} on {self.device}: {self.model_dir.name}, max_seq_len "
                f"{self.max_seq_len}, cache {self.cache_mode}, depth {self.depth}>")

    # -- text --------------------------------------------------------------------------------------------------------
    def encode(self, text: str, *, chat: bool = False) -> torch.Tensor:
        """Token ids (1, n); chat=True applies the model's chat template to one user message."""
        return self.tokenizer.encode(text, chat=chat)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    # -- the engine ----------------------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        raise NotImplementedError

    def forward(self, ids: torch.Tensor, *, reset: bool = True) -> torch.Tensor:
        raise NotImplementedError

    def fill_cache(self, depth: int, *, seed: int = 0) -> None:
        raise NotImplementedError

    def _step(self, token_id: int) -> torch.Tensor:
        raise NotImplementedError

    def decode_step(self, token_id: int | None = None) -> torch.Tensor:
        """Logits (vocab,) after appending one token at the current depth (depth += 1).

        token_id None feeds the greedy choice of the previous logits (or the BOS token on an empty history)."""
        if token_id is None:
            token_id = self._next_default if self._next_default is not None else (self.tokenizer.hf.bos_token_id or 0)
        if self.depth + 1 > self.max_seq_len:
            raise CourseError(f"the cache is full (depth {self.depth} of max_seq_len={self.max_seq_len}): load with a "
                              "larger max_seq_len")
        logits = self._step(int(token_id))
        self._next_default = int(torch.argmax(logits))
        return logits

    _next_default: int | None = None

    def _check_forward(self, ids: torch.Tensor, reset: bool) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.shape[0] != 1 or ids.shape[1] == 0:
            raise CourseError(f"forward() takes ids of shape (1, n) with n >= 1, not {tuple(ids.shape)}")
        start = 0 if reset else self.depth
        if start + ids.shape[1] > self.max_seq_len:
            raise CourseError(f"{ids.shape[1]} tokens at cache depth {start} need {start + ids.shape[1]} positions, "
                              f"beyond max_seq_len={self.max_seq_len}: load with a larger max_seq_len")
        return ids

    def _check_depth(self, depth: int) -> int:
        depth = int(depth)
        if not 0 <= depth < self.max_seq_len:
            raise CourseError(f"fill_cache depth {depth} must be in [0, max_seq_len={self.max_seq_len}) to leave room "
                              "for the next token: load with a larger max_seq_len")
        return depth

    def generate(self, prompt: str, *, max_new_tokens: int = 64, chat: bool = True, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stream: Callable[[str], None] | None = None) -> str:
        """Text continuing ``prompt`` (wrapped in the chat template when chat=True); temperature 0 = greedy.

        stream, if given, is called with each new piece of text as soon as it is decoded."""
        ids = self.encode(prompt, chat=chat)
        check_context(ids.shape[1], max_new_tokens, self.max_seq_len)
        text, _ = generate_text(prompt_ids=ids, prefill=lambda p: self.forward(p)[0, -1], step=self.decode_step,
                                tokenizer=self.tokenizer, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_k=top_k, top_p=top_p, seed=seed, stream=stream)
        return text

    # -- measurements --------------------------------------------------------------------------------------------------
    def synchronize(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def memory(self) -> dict:
        """cuda: torch allocated/reserved bytes and NVML's used bytes; cpu: this process's resident bytes."""
        out = {"device": self.device, "process_rss_bytes": gpu.process_rss_bytes()}
        if self.device == "cuda":
            out.update(torch_allocated_bytes=int(torch.cuda.memory_allocated()),
                       torch_reserved_bytes=int(torch.cuda.memory_reserved()),
                       nvml_used_bytes=gpu.nvml_used_bytes(torch.cuda.current_device()))
        return out

    def cache_bytes(self) -> int:
        raise NotImplementedError

    def unload(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------------
# The reference engine
# --------------------------------------------------------------------------------------------------------------------

class ReferenceBackend(Backend):
    """The pure-PyTorch decoder (helpers.engines.reference). CPU: float32 weights and cache (4 bytes per cache element,
    twice exllamav2's FP16 cache); CUDA: float16, the same bytes per element as exllamav2's FP16 cache."""

    name = "reference"

    def __init__(self, model_dir: Path, *, max_seq_len: int, cache_mode: str, device: str, reason: str,
                 dtype: torch.dtype | None = None):
        if cache_mode != "fp16":
            raise CourseError(QUANTIZED_CACHE_ERROR)
        self.dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
        self.model = ReferenceModel.from_dir(model_dir, device=device, dtype=self.dtype, max_seq_len=max_seq_len)
        self.model_dir, self.device, self.reason = Path(model_dir), device, reason
        self.max_seq_len, self.cache_mode = int(max_seq_len), cache_mode
        self.vocab_size = self.model.config.vocab_size
        self.tokenizer = self.model.tokenizer
        if device == "cpu" and self.dtype != torch.float16:
            self.reason += (f"; its cache is stored in {str(self.dtype).replace('torch.', '')} on the CPU "
                            f"({self.model.cache.key_states[0].element_size()} bytes per element, not fp16's 2)")

    @property
    def depth(self) -> int:
        return self.model.depth

    def forward(self, ids: torch.Tensor, *, reset: bool = True) -> torch.Tensor:
        ids = self._check_forward(ids, reset)
        logits = self.model.forward(ids, reset=reset)
        self._next_default = int(torch.argmax(logits[0, -1]))
        return logits

    def _step(self, token_id: int) -> torch.Tensor:
        return self.model.decode_step(token_id)

    def fill_cache(self, depth: int, *, seed: int = 0) -> None:
        self.model.fill_cache(self._check_depth(depth), seed=seed)

    def cache_bytes(self) -> int:
        return self.model.cache.nbytes()

    def unload(self) -> None:
        self.model = None
        super().unload()


# --------------------------------------------------------------------------------------------------------------------
# The exllamav2 engine
# --------------------------------------------------------------------------------------------------------------------

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:200]


def _import_exllamav2():
    """Import exllamav2 (on first use this compiles its CUDA extension, minutes) or raise one line saying what to do."""
    gpu.require_cuda("exllamav2")
    try:
        import exllamav2  # noqa: F401  (loads or JIT-builds exllamav2_ext)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "exllamav2":
            raise CourseError("exllamav2 is not installed: `pip install exllamav2==0.3.2` (or a prebuilt wheel "
                              "matching your torch, CUDA and Python from its GitHub releases), or use "
                              "backend='reference'") from None
        raise CourseError(f"exllamav2 failed to import ({_first_line(exc)}): install its missing dependency, or use "
                          "backend='reference'") from None
    except Exception as exc:  # a failed JIT build raises RuntimeError/OSError/CalledProcessError/ImportError
        raise CourseError(f"exllamav2's CUDA extension failed to build or load ({_first_line(exc)}): install the CUDA "
                          f"toolkit matching torch's CUDA {torch.version.cuda} and a C++ compiler (MSVC Build Tools on "
                          "Windows), or a prebuilt exllamav2 wheel for your torch/CUDA/Python; or use "
                          "backend='reference'") from None
    return exllamav2


class ExLlamaV2Backend(Backend):
    """exllamav2 0.3.2: ExLlamaV2Config/ExLlamaV2/ExLlamaV2Cache*, no_sdpa=True, loaded with load_autosplit."""

    name = "exllamav2"

    def __init__(self, model_dir: Path, *, max_seq_len: int, cache_mode: str, reason: str):
        ex = _import_exllamav2()
        from helpers.core.progress import progress

        self.model_dir, self.device, self.reason = Path(model_dir), "cuda", reason
        self.max_seq_len, self.cache_mode = int(max_seq_len), cache_mode
        hf = read_config(model_dir)
        config = ex.ExLlamaV2Config(str(model_dir))
        config.no_sdpa = True            # DOMAIN trap: 0.3.2's SDPA prefill without flash-attn is not causal
        config.max_seq_len = self.max_seq_len
        theta = (hf.get("rope_parameters") or {}).get("rope_theta")
        if "rope_theta" not in hf and theta is not None:
            config.rotary_embedding_base = float(theta)   # 0.3.2 reads only the top-level key (DOMAIN trap)
        self.config = config
        self.model = ex.ExLlamaV2(config)
        cache_cls = getattr(ex, CACHE_CLASSES[cache_mode])
        self.cache = cache_cls(self.model, max_seq_len=self.max_seq_len, lazy=True)
        bar = progress(total=len(self.model.modules), desc=f"exllamav2 loading {self.model_dir.name}", unit="module")

        def advance(done: int, total: int) -> None:  # exllamav2 reports (modules loaded, all modules)
            bar.update(done - bar.n)

        try:
            self.model.load_autosplit(self.cache, callback=advance)
        finally:
            bar.close()
        self.vocab_size = int(config.vocab_size)

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        """Loaded on first use: a synthetic checkpoint (helpers.format.synthetic) has no tokenizer and is only benchmarked."""
        return Tokenizer(self.model_dir)

    @property
    def depth(self) -> int:
        return int(self.cache.current_seq_len)

    def forward(self, ids: torch.Tensor, *, reset: bool = True) -> torch.Tensor:
        ids = self._check_forward(ids, reset)
        if reset:
            self.cache.current_seq_len = 0
        logits = self.model.forward(ids, self.cache).float()   # input ids stay on the CPU (the embedding lives there)
        self._next_default = int(torch.argmax(logits[0, -1]))
        return logits

    def _step(self, token_id: int) -> torch.Tensor:
        ids = torch.tensor([[token_id]], dtype=torch.long)
        return self.model.forward(ids, self.cache).float()[0, -1]

    @torch.inference_mode()
    def fill_cache(self, depth: int, *, seed: int = 0) -> None:
        """Write random K/V values of unit scale at positions [0, depth) of every layer, then set the length.

        FP16 cache: straight into key_states/value_states. FP8/Q caches: into the cache's FP16 staging tensors,
        then exllamav2's own store_kv_state converts them into its 8-bit or quantized storage."""
        depth = self._check_depth(depth)
        gens: dict[torch.device, torch.Generator] = {}
        for layer in range(len(self.cache.key_states)):
            k, v = self.cache.get_kv_state(layer, 1, 0, 0)
            if depth:
                gen = gens.setdefault(k.device, torch.Generator(device=k.device).manual_seed(int(seed)))
                shape = (k.shape[0], depth) + tuple(k.shape[2:])
                k[:, :depth] = torch.randn(shape, generator=gen, device=k.device, dtype=torch.float16)
                v[:, :depth] = torch.randn(shape, generator=gen, device=v.device, dtype=torch.float16)
                self.cache.store_kv_state(layer, 1, 0, depth)
        self.cache.current_seq_len = depth

    def cache_bytes(self) -> int:
        return exllamav2_cache_bytes(self.cache)

    def unload(self) -> None:
        try:
            self.model.unload()
        finally:
            self.model = self.cache = None
            super().unload()


# --------------------------------------------------------------------------------------------------------------------
# Choosing
# --------------------------------------------------------------------------------------------------------------------

def choose_backend(backend: str = "auto", device: str | None = None) -> tuple[str, str, str]:
    """(engine, device, reason) for a request; imports exllamav2 only when it is a candidate on a CUDA machine."""
    if backend not in BACKENDS:
        raise CourseError(f"backend '{backend}' is unknown: use one of {', '.join(BACKENDS)}")
    if device not in (None, "cpu", "cuda"):
        raise CourseError(f"device '{device}' is unknown: use 'cuda', 'cpu' or leave it out")
    if device == "cuda":
        gpu.require_cuda("device='cuda'")
    cuda = gpu.cuda_status()
    if backend == "reference":
        dev = device or ("cuda" if cuda["available"] else "cpu")
        return "reference", dev, f"backend='reference' was asked for (on {dev})"
    if backend == "exllamav2":
        if device == "cpu":
            raise CourseError("exllamav2 runs only on a CUDA GPU: drop device='cpu', or use backend='reference'")
        _import_exllamav2()
        return "exllamav2", "cuda", "backend='exllamav2' was asked for"
    if device == "cpu":
        return "reference", "cpu", "device='cpu' was asked for, and exllamav2 runs only on CUDA: the reference runs"
    if not cuda["available"]:
        return "reference", "cpu", f"no CUDA GPU ({cuda['reason']}): the pure-PyTorch reference runs on the CPU"
    try:
        _import_exllamav2()
    except CourseError as exc:
        return "reference", "cuda", f"a CUDA GPU is here but exllamav2 cannot run ({exc}); the reference runs on the GPU"
    name = cuda["devices"][0]["name"]
    return "exllamav2", "cuda", f"CUDA GPU {name} and exllamav2 imports: exllamav2 runs the model"


def load(model_dir: str | Path | None = None, *, max_seq_len: int = 4096, cache_mode: str = "fp16",
         backend: str = "auto", device: str | None = None, dtype: torch.dtype | None = None) -> Backend:
    """Load a model with a preallocated cache of ``max_seq_len`` tokens on the engine that fits this machine.

    model_dir None -> helpers.models.embedded.resolve_model_dir() (argument, $EXL2_COURSE_MODEL, the embedded model).
    dtype applies to the reference only (default float32 on the CPU, float16 on CUDA)."""
    cache_mode = str(cache_mode).lower()
    if cache_mode not in CACHE_MODES:
        raise CourseError(f"cache_mode '{cache_mode}' is unknown: use one of {', '.join(CACHE_MODES)}")
    if int(max_seq_len) < 1:
        raise CourseError(f"max_seq_len must be a positive number of tokens, not {max_seq_len}")
    engine, dev, reason = choose_backend(backend, device)
    if engine == "reference" and cache_mode != "fp16":
        raise CourseError(f"{QUANTIZED_CACHE_ERROR} (this machine runs the reference: {reason})")
    if model_dir is None:
        from helpers.models.embedded import resolve_model_dir

        model_dir = resolve_model_dir()
    model_dir = Path(model_dir).expanduser()
    if not model_dir.is_dir():
        raise CourseError(f"model directory {model_dir} does not exist: pass an existing folder, or omit it to use "
                          "the course's embedded model")
    if engine == "exllamav2":
        return ExLlamaV2Backend(model_dir, max_seq_len=max_seq_len, cache_mode=cache_mode, reason=reason)
    return ReferenceBackend(model_dir, max_seq_len=max_seq_len, cache_mode=cache_mode, device=dev, reason=reason,
                            dtype=dtype)


# --------------------------------------------------------------------------------------------------------------------
# CLI: python -m helpers generate
# --------------------------------------------------------------------------------------------------------------------

def main_generate(argv: list[str]) -> int:
    """`python -m helpers generate --prompt TEXT [--model DIR] [--max-new-tokens N] ...`: stream the answer."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m helpers generate",
                                 description="Generate text with exllamav2 (CUDA) or the reference (anywhere).")
    ap.add_argument("--prompt", required=True, help="the user's message (wrapped in the chat template)")
    ap.add_argument("--model", default=None, help="model directory (default: $EXL2_COURSE_MODEL or the embedded model)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-seq-len", type=int, default=2048, help="cache length in tokens (default 2048)")
    ap.add_argument("--cache-mode", default="fp16", choices=CACHE_MODES)
    ap.add_argument("--backend", default="auto", choices=BACKENDS)
    ap.add_argument("--device", default=None, choices=("cuda", "cpu"))
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-chat", action="store_true", help="feed the prompt as plain text, without the chat template")
    args = ap.parse_args(argv)
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    if args.max_new_tokens < 1:
        raise CourseError("--max-new-tokens must be at least 1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        be = load(args.model, max_seq_len=args.max_seq_len, cache_mode=args.cache_mode, backend=args.backend,
                  device=args.device)
    print(f"backend: {be.name} on {be.device} ({be.reason}); model {be.model_dir}", file=sys.stderr)

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    be.generate(args.prompt, max_new_tokens=args.max_new_tokens, chat=not args.no_chat,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=emit)
    sys.stdout.write("\n")
    return 0


# --------------------------------------------------------------------------------------------------------------------
# GPU recording: exllamav2 vs the reference on the embedded model
# --------------------------------------------------------------------------------------------------------------------

AGREEMENT_PROMPT = "What is the capital of France?"
AGREEMENT_TOPIC = "agreement"


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> dict:
    """max |a-b| and the relative L2 error |a-b|/|b| of two logit tensors (b the reference)."""
    a, b = a.float().cpu(), b.float().cpu()
    return {"max_abs_diff": float((a - b).abs().max()), "rel_l2": float((a - b).norm() / b.norm())}


def top2_gap(logits: torch.Tensor) -> float:
    top = torch.topk(logits.float().reshape(-1), 2).values
    return float(top[0] - top[1])


def greedy_agreement(exl: Backend, ref: Backend, prompt_ids: torch.Tensor, steps: int) -> tuple[list[dict], dict]:
    """Greedy decode with exllamav2, feeding the same tokens to the reference (teacher forcing), step by step.

    Per step: each engine's greedy token, the reference's top-two gap, and the logit difference. The engines must
    pick the same token wherever the gap is larger than their difference; the first step where it is not (a near-tie)
    is where they are allowed to part."""
    lx, lr = exl.forward(prompt_ids)[0, -1], ref.forward(prompt_ids)[0, -1]
    rows, first_diff, first_tie = [], None, None
    for step in range(steps):
        d = compare_logits(lx, lr)
        tx, tr = int(torch.argmax(lx)), int(torch.argmax(lr))
        gap = top2_gap(lr)
        near_tie = gap < d["max_abs_diff"]
        rows.append({"step": step, "exllamav2_token": tx, "reference_token": tr, "same": tx == tr,
                     "reference_top2_gap": round(gap, 5), "near_tie": near_tie,
                     "max_abs_diff": round(d["max_abs_diff"], 5), "rel_l2": round(d["rel_l2"], 6)})
        if first_tie is None and near_tie:
            first_tie = step
        if first_diff is None and tx != tr:
            first_diff = step
        if tx in exl.tokenizer.stop_ids:
            break
        lx, lr = exl.decode_step(tx), ref.decode_step(tx)
    summary = {"first_different_token": first_diff, "first_near_tie": first_tie,
               "agree_until_first_near_tie": first_diff is None or (first_tie is not None and first_diff >= first_tie)}
    return rows, summary


def measure_agreement(exl: Backend, ref: Backend, *, prompt: str = AGREEMENT_PROMPT, chat: bool = True,
                      steps: int = 48) -> tuple[list[dict], dict, dict[str, torch.Tensor]]:
    """Compare two engines on one prompt: (per-step rows, summary fields, tensors to keep).

    Prompt logits at every position (max abs difference, relative L2 error against ``ref``), then the greedy
    teacher-forced walk of ``greedy_agreement``."""
    ids = exl.encode(prompt, chat=chat)
    lx_all, lr_all = exl.forward(ids), ref.forward(ids)
    diff = compare_logits(lx_all, lr_all)
    rows, summary = greedy_agreement(exl, ref, ids, steps)
    text = exl.decode([r["exllamav2_token"] for r in rows if r["exllamav2_token"] not in exl.tokenizer.stop_ids])
    extra = {"model_dir": str(exl.model_dir), "prompt": prompt, "chat": chat, "prompt_tokens": int(ids.shape[1]),
             "engines": [f"{exl.name} on {exl.device}", f"{ref.name} on {ref.device}"],
             "prompt_logits_max_abs_diff": round(diff["max_abs_diff"], 5),
             "prompt_logits_rel_l2": round(diff["rel_l2"], 6), "greedy_text": text, **summary}
    tensors = {"prompt_ids": ids.cpu().contiguous(),
               "exllamav2_prompt_logits": lx_all[0].half().cpu().contiguous(),
               "exllamav2_last_logits": lx_all[0, -1].float().cpu().contiguous(),
               "reference_last_logits": lr_all[0, -1].float().cpu().contiguous()}
    return rows, extra, tensors


def save_agreement(name: str, rows: list[dict], extra: dict, tensors: dict[str, torch.Tensor], *,
                   prov: dict | None = None, results_dir: Path | None = None) -> Path:
    """results/agreement/<name>.json (rows, summary, provenance) and <name>.safetensors beside it, both atomic."""
    from safetensors.torch import save_file

    from helpers.core.paths import RESULTS_DIR
    from helpers.core.results import provenance, save_result, slug

    folder = Path(results_dir or RESULTS_DIR) / AGREEMENT_TOPIC
    folder.mkdir(parents=True, exist_ok=True)
    tensors_path = folder / f"{slug(name)}.safetensors"
    tmp = folder / f".{tensors_path.name}.tmp"
    save_file(tensors, str(tmp), metadata={"prompt": str(extra.get("prompt")), "model_dir": str(extra.get("model_dir"))})
    tmp.replace(tensors_path)
    return save_result(AGREEMENT_TOPIC, name, rows, prov=prov if prov is not None else provenance(),
                       extra={**extra, "tensors_file": tensors_path.name}, results_dir=results_dir)


def record_agreement(max_new_tokens: int = 48) -> Path:
    """(CUDA) exllamav2 vs the reference (float32 on the GPU) on the embedded model: prompt logits and greedy tokens.

    Writes results/agreement/exllamav2-vs-reference-<gpu>.json (per-step rows and a summary) and, beside it, a
    .safetensors file with the prompt ids, exllamav2's prompt logits and both engines' last-position logits, so
    notebook 02 can compare the reference it runs live on a CPU against the recorded exllamav2 logits
    (``recorded_vs_live``)."""
    from helpers.models.embedded import embedded_model_dir
    from helpers.core.results import provenance

    gpu.require_cuda("recording exllamav2 vs reference agreement")
    model_dir = embedded_model_dir()
    exl = load(model_dir, max_seq_len=1024, backend="exllamav2")
    ref = load(model_dir, max_seq_len=1024, backend="reference", device="cuda", dtype=torch.float32)
    rows, extra, tensors = measure_agreement(exl, ref, steps=max_new_tokens)
    extra.update(reference_dtype="float32", exllamav2_cache="fp16", no_sdpa=exl.config.no_sdpa)
    prov = provenance()
    path = save_agreement(f"exllamav2-vs-reference-{prov.get('gpu') or 'gpu'}", rows, extra, tensors, prov=prov)
    exl.unload()
    ref.unload()
    if not extra["agree_until_first_near_tie"]:
        raise CourseError(f"exllamav2 and the reference chose different tokens before any near-tie (step "
                          f"{extra['first_different_token']}); recorded in {path}: investigate before trusting it")
    return path


def load_agreement(results_dir: Path | None = None) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The latest recorded agreement (its JSON document, its tensors), or None if nothing is recorded yet."""
    from safetensors.torch import load_file

    from helpers.core.results import load_results

    docs = [d for d in load_results(AGREEMENT_TOPIC, results_dir=results_dir) if d.get("tensors_file")]
    if not docs:
        return None
    doc = docs[-1]
    tensors_path = Path(doc["path"]).parent / doc["tensors_file"]
    return doc, (load_file(str(tensors_path)) if tensors_path.is_file() else {})


GPU_RECORDINGS = {"agreement": record_agreement}


def recorded_vs_live(be: Backend | None = None, *, results_dir: Path | None = None) -> dict | None:
    """The recorded exllamav2 prompt logits against this machine's engine (the reference on a CPU), same prompt ids.

    Returns None when nothing is recorded yet; else the recording's label fields and the live comparison:
    max_abs_diff and rel_l2 over every prompt position, and whether both pick the same next token."""
    found = load_agreement(results_dir)
    if found is None or "exllamav2_prompt_logits" not in found[1]:
        return None
    doc, tensors = found
    if be is None:
        be = load(Path(doc["model_dir"]) if Path(doc["model_dir"]).is_dir() else None, max_seq_len=512)
    live = be.forward(tensors["prompt_ids"])[0]
    recorded = tensors["exllamav2_prompt_logits"].float()
    return {"provenance": doc["provenance"], "live_backend": f"{be.name} on {be.device}",
            **compare_logits(live, recorded),
            "same_next_token": int(live[-1].argmax()) == int(recorded[-1].argmax()),
            "recorded": {k: doc.get(k) for k in ("prompt_logits_max_abs_diff", "prompt_logits_rel_l2",
                                                  "first_different_token", "first_near_tie",
                                                  "agree_until_first_near_tie")}}
