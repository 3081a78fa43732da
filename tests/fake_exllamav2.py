"""One stand-in for exllamav2 0.3.2, for tests on machines without a GPU (no CUDA, no compile).

It has the names the course uses (``ExLlamaV2Config``, ``ExLlamaV2``, the five cache classes, ``ExLlamaV2Tokenizer``)
and behaves like the real ones where the course depends on it:

- ``ExLlamaV2Config(model_dir)`` starts with exllamav2's defaults (``no_sdpa`` False, ``max_seq_len`` 2048,
  ``max_input_len`` 2048, ``rotary_embedding_base`` 10000.0), whatever config.json says;
- a cache made with ``lazy=True`` holds no tensor until the model loads: ``load_autosplit(cache)`` makes each
  layer as it reaches the attention module (``update_cache_tensors``); a cache made after ``model.load()`` without
  ``lazy`` allocates every layer at once. Quantized caches keep FP16 staging tensors (``temp_tensors``) that
  ``store_kv_state`` converts from;
- ``load_autosplit``/``load`` call ``callback(i, n)`` before module i and ``callback(n, n)`` at the end.

Every call that matters is appended to ``ex.calls`` (a list of tuples), so a test can check what ran, in order.
Its fixtures (``pytest_plugins = ("fake_exllamav2",)`` in a test module): ``fake_exllamav2`` installs it for one
test, and needs a CUDA machine faked (``fake_cuda``), since the front door asks for CUDA before importing
exllamav2; ``forbid_exllamav2(error)`` makes the import fail instead (a failed build, a missing package).
"""
from __future__ import annotations

import builtins
import sys
import types

import pytest
import torch

from helpers.core import devices

VOCAB = 1024
LAYERS = 2
KV_HEADS = 2
HEAD_DIM = 64

FAKE_CUDA = {"available": True, "torch": torch.__version__, "torch_cuda": "12.4",
             "devices": [{"index": 0, "name": "Fake GPU 16GB", "total_gib": 16.0, "capability": "8.9", "sms": 1}]}


def make_fake_exllamav2() -> types.ModuleType:
    """A fresh fake ``exllamav2`` module (its own ``calls`` list)."""
    ex = types.ModuleType("exllamav2")
    ex.__version__ = "0.3.2"
    ex.calls = []

    class ExLlamaV2Config:
        def __init__(self, model_dir):
            ex.calls.append(("config", str(model_dir)))
            self.model_dir, self.no_sdpa, self.max_seq_len, self.max_input_len = str(model_dir), False, 2048, 2048
            self.vocab_size, self.rotary_embedding_base = VOCAB, 10000.0

    class ExLlamaV2:
        def __init__(self, config):
            ex.calls.append(("model",))
            self.config, self.modules = config, ["embed", "attn.0", "mlp.0", "attn.1", "mlp.1", "norm", "head"]
            self.cache_map: dict[int, str] = {}

        def _load_modules(self, callback, cache=None):
            n = len(self.modules)
            for i, name in enumerate(self.modules):
                if callback is not None:
                    callback(i, n)
                if name.startswith("attn."):
                    self.cache_map[int(name.split(".")[1])] = "cuda:0"
                    if cache is not None:
                        cache.update_cache_tensors()
            if callback is not None:
                callback(n, n)

        def load_autosplit(self, cache, reserve_vram=None, last_id_only=False, callback=None, callback_gen=None,
                           progress=False):
            ex.calls.append(("load_autosplit", type(cache).__name__))
            self._load_modules(callback, cache)

        def load(self, gpu_split=None, lazy=False, stats=False, callback=None, callback_gen=None, progress=False):
            ex.calls.append(("load",))
            self._load_modules(callback)

        def forward(self, ids, cache=None, **kwargs):
            assert ids.device.type == "cpu"
            ex.calls.append(("forward", cache.current_seq_len, ids.shape[1]))
            cache.current_seq_len += ids.shape[1]
            return torch.randn(1, ids.shape[1], VOCAB).half()

        def unload(self):
            ex.calls.append(("unload",))

    class ExLlamaV2Cache:
        """FP16 K and V; subclasses store fewer bits per element (``k_width``/``v_width``) and stage in FP16."""

        storage, k_width, v_width, staged = torch.float16, HEAD_DIM, HEAD_DIM, False

        def __init__(self, model, max_seq_len=-1, lazy=False, **kwargs):
            ex.calls.append(("cache", type(self).__name__, max_seq_len, lazy))
            self.model, self.max_seq_len, self.current_seq_len = model, max_seq_len, 0
            self.key_states: list = [None] * LAYERS
            self.value_states: list = [None] * LAYERS
            self.temp_tensors: dict = {}
            if not lazy:
                for layer in range(LAYERS):
                    self._make(layer)

        def _make(self, layer):
            if self.staged and not self.temp_tensors:
                shape = (1, self.max_seq_len, KV_HEADS, HEAD_DIM)
                self.temp_tensors["cuda:0"] = (torch.zeros(shape, dtype=torch.float16),
                                               torch.zeros(shape, dtype=torch.float16))
            self.key_states[layer] = torch.zeros(1, self.max_seq_len, KV_HEADS, self.k_width, dtype=self.storage)
            self.value_states[layer] = torch.zeros(1, self.max_seq_len, KV_HEADS, self.v_width, dtype=self.storage)

        def update_cache_tensors(self):
            for layer in self.model.cache_map:
                if self.key_states[layer] is None:
                    self._make(layer)

        def get_kv_state(self, layer, batch, offset, width):
            if self.staged:
                return self.temp_tensors["cuda:0"]
            return self.key_states[layer], self.value_states[layer]

        def store_kv_state(self, layer, batch, offset, width):
            ex.calls.append(("store", layer, offset, width))

        def all_tensors(self):
            return self.key_states + self.value_states

    class ExLlamaV2Cache_8bit(ExLlamaV2Cache):  # noqa: N801 (exllamav2's names)
        storage, staged = torch.uint8, True

    class ExLlamaV2Cache_Q8(ExLlamaV2Cache_8bit):  # noqa: N801
        pass

    class ExLlamaV2Cache_Q6(ExLlamaV2Cache_8bit):  # noqa: N801
        v_width = HEAD_DIM // 2

    class ExLlamaV2Cache_Q4(ExLlamaV2Cache_8bit):  # noqa: N801
        k_width = v_width = HEAD_DIM // 2

    class ExLlamaV2Tokenizer:
        def __init__(self, config):
            self.config, self.eos_token_id = config, 2

    for cls in (ExLlamaV2Config, ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Cache_8bit, ExLlamaV2Cache_Q8, ExLlamaV2Cache_Q6,
                ExLlamaV2Cache_Q4, ExLlamaV2Tokenizer):
        setattr(ex, cls.__name__, cls)
    return ex


def forbid_exllamav2_import(monkeypatch, error: BaseException | None = None) -> None:
    """Make ``import exllamav2`` fail: with ``error`` (a failed build, a missing package), or, when None, with an
    AssertionError saying it must not be imported at all here."""
    real_import = builtins.__import__

    def guarded(name, *args, **kwargs):
        if name.split(".")[0] == "exllamav2":
            if error is None:
                raise AssertionError("exllamav2 was imported on a machine without CUDA")
            raise error
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "exllamav2", raising=False)
    monkeypatch.setattr(builtins, "__import__", guarded)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch "sees" one 16 GB GPU (``devices.cuda_status``); nothing else about CUDA is faked."""
    monkeypatch.setattr(devices, "cuda_status", lambda: dict(FAKE_CUDA))


@pytest.fixture
def forbid_exllamav2(monkeypatch):
    """``forbid_exllamav2(error=None)``: ``forbid_exllamav2_import`` for this test."""
    return lambda error=None: forbid_exllamav2_import(monkeypatch, error)


@pytest.fixture
def fake_exllamav2(monkeypatch) -> types.ModuleType:
    """The fake module installed as ``exllamav2`` for one test; returns it (its ``calls`` list records the calls)."""
    ex = make_fake_exllamav2()
    monkeypatch.setitem(sys.modules, "exllamav2", ex)
    return ex
