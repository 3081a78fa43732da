"""One API over two engines: exllamav2 on a CUDA GPU, the course's pure-PyTorch reference anywhere else.

``load()`` picks the engine and says why (``Backend.name``, ``Backend.reason``): ``backend="auto"`` takes exllamav2
only when torch sees a CUDA GPU and ``import exllamav2`` succeeds, else the reference (on the GPU if there is one);
``"exllamav2"`` insists, ``"reference"`` never touches it. Both engines offer the same calls: ``encode``/``decode``,
``forward``, ``fill_cache`` (the cache at a depth, written directly), ``decode_step``, ``generate``, ``memory``,
``cache_bytes``, ``unload``. How far they agree is measured in ``helpers.engines.agreement``.
"""
from __future__ import annotations

import functools
import gc
from pathlib import Path
from typing import Callable

import torch

from helpers.core import devices as gpu
from helpers.core.errors import CourseError
from helpers.core.progress import progress
from helpers.engines import exllama
from helpers.engines.reference import ReferenceModel, Tokenizer, check_context, generate_text
from helpers.memory.setup import LoadSetup
from helpers.models.embedded import resolve_model_dir

BACKENDS = ("auto", "exllamav2", "reference")
QUANTIZED_CACHE_ERROR = "quantized caches need exllamav2 on a CUDA GPU; use cache_mode='fp16' here"


#: what the front door's import errors suggest instead of exllamav2
REFERENCE_ALTERNATIVE = "use backend='reference'"


# --------------------------------------------------------------------------------------------------------------------
# The common interface
# --------------------------------------------------------------------------------------------------------------------

class Backend:
    """What every engine offers. Subclasses set the attributes and implement forward/decode_step/fill_cache."""

    name: str
    reason: str
    device: str
    setup: LoadSetup
    vocab_size: int
    tokenizer: Tokenizer

    @property
    def model_dir(self) -> Path:
        return self.setup.model_dir

    @property
    def max_seq_len(self) -> int:
        return self.setup.max_seq_len

    @property
    def cache_mode(self) -> str:
        return self.setup.cache_mode

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

    def __init__(self, setup: LoadSetup, *, device: str, reason: str, dtype: torch.dtype | None = None):
        if setup.cache_mode != "fp16":
            raise CourseError(QUANTIZED_CACHE_ERROR)
        self.setup, self.device, self.reason = setup, device, reason
        self.dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
        self.model = ReferenceModel.from_dir(setup.model_dir, device=device, dtype=self.dtype,
                                             max_seq_len=setup.max_seq_len)
        self.vocab_size = self.model.config.shape.vocab
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

class ExLlamaV2Backend(Backend):
    """exllamav2 0.3.2 through the front door (helpers.engines.exllama): no_sdpa=True, loaded with load_autosplit."""

    name = "exllamav2"

    def __init__(self, setup: LoadSetup, *, reason: str):
        self.setup, self.device, self.reason = setup, "cuda", reason
        loaded = exllama.prepare(setup, alternative=REFERENCE_ALTERNATIVE)
        self.config, self.model, self.cache = loaded.config, loaded.model, loaded.cache
        bar = progress(total=len(self.model.modules), desc=f"exllamav2 loading {self.model_dir.name}", unit="module")

        def advance(done: int, total: int) -> None:  # exllamav2 reports (modules loaded, all modules)
            bar.update(done - bar.n)

        try:
            exllama.load_modules(loaded, "autosplit", on_module=advance)
        finally:
            bar.close()
        self.vocab_size = int(self.config.vocab_size)

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        """Loaded on first use: a synthetic checkpoint (helpers.format.synthetic) has no tokenizer and is only
        benchmarked."""
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
        return exllama.cache_bytes(self.cache)

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
        exllama.import_exllamav2(alternative=REFERENCE_ALTERNATIVE)
        return "exllamav2", "cuda", "backend='exllamav2' was asked for"
    if device == "cpu":
        return "reference", "cpu", "device='cpu' was asked for, and exllamav2 runs only on CUDA: the reference runs"
    if not cuda["available"]:
        return "reference", "cpu", f"no CUDA GPU ({cuda['reason']}): the pure-PyTorch reference runs on the CPU"
    try:
        exllama.import_exllamav2(alternative=REFERENCE_ALTERNATIVE)
    except CourseError as exc:
        return ("reference", "cuda",
                f"a CUDA GPU is here but exllamav2 cannot run ({exc}); the reference runs on the GPU")
    name = cuda["devices"][0]["name"]
    return "exllamav2", "cuda", f"CUDA GPU {name} and exllamav2 imports: exllamav2 runs the model"


def setup_of(model: LoadSetup | str | Path | None = None, **settings) -> LoadSetup:
    """``model`` if it is a ``LoadSetup`` (with ``settings`` changed), else the ``LoadSetup`` of a model folder (None:
    ``resolve_model_dir()``: $EXL2_COURSE_MODEL or the embedded model) with ``settings`` as its keywords."""
    if isinstance(model, LoadSetup):
        return model.with_(**settings) if settings else model
    folder = Path(resolve_model_dir() if model is None else model).expanduser()
    if not folder.is_dir():
        raise CourseError(f"model directory {folder} does not exist: pass an existing folder, or omit it to use "
                          "the course's embedded model")
    return LoadSetup(folder, **settings)


def load(model: LoadSetup | str | Path | None = None, *, backend: str = "auto", device: str | None = None,
         dtype: torch.dtype | None = None, **settings) -> Backend:
    """Load a model with its preallocated cache on the engine that fits this machine.

    ``model``: a ``LoadSetup``, or a model folder with ``LoadSetup`` settings as keywords (``max_seq_len=4096``,
    ``cache_mode='fp16'``); see ``setup_of``. dtype applies to the reference only (default float32 on the CPU,
    float16 on CUDA)."""
    setup = setup_of(model, **settings)
    engine, dev, reason = choose_backend(backend, device)
    if engine == "reference" and setup.cache_mode != "fp16":
        raise CourseError(f"{QUANTIZED_CACHE_ERROR} (this machine runs the reference: {reason})")
    if engine == "exllamav2":
        return ExLlamaV2Backend(setup, reason=reason)
    return ReferenceBackend(setup, device=dev, reason=reason, dtype=dtype)
