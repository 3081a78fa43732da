"""The sysmem-fallback emulator's logic on the CPU: routing against the budget, cleanup after a run, an error or an
interrupt (with a fake device and a fake allocator), the C allocator built against a fake CUDA runtime, and the
byte counts it routes by."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import shutil
import subprocess
import sys
import textwrap
import types

import pytest
from fixture_dirs import EXL2

from helpers.core.errors import CourseError, CourseWarning
from helpers.core.units import GIB, MIB
from helpers.fallback import emulated_report, emulator, hostalloc, routed_load
from helpers.fallback.emulator import VramEmulator
from helpers.memory.setup import LoadSetup

TINY = EXL2["tiny_llama_b3.0"]
pytest_plugins = ("fake_exllamav2",)   # fixtures fake_cuda, fake_exllamav2 (tests/fake_exllamav2.py)


# ------------------------------------------------------------------------------------------------------ fakes
class FakeLib:
    """The allocator's bookkeeping, in Python: blocks handed out for the host pool."""

    path = "fake-hostalloc.so"

    def __init__(self):
        self.blocks: dict[int, int] = {}
        self.peak = 0
        self.forced = 0

    def add(self, key, n):
        self.blocks[key] = n
        self.peak = max(self.peak, self.outstanding_bytes())

    def outstanding_bytes(self):
        return sum(self.blocks.values())

    def peak_bytes(self):
        return self.peak

    def reset_peak(self):
        self.peak = self.outstanding_bytes()

    def free_all(self):
        n = len(self.blocks)
        self.forced += n
        self.blocks.clear()
        return n


class FakeTensor:
    def __init__(self, dev, n, host):
        self.dev, self.n, self.host = dev, n, host
        if host:
            dev.lib.add(id(self), n)
        else:
            dev.vram += n

    def __del__(self):
        if self.host:
            self.dev.lib.blocks.pop(id(self), None)
        else:
            self.dev.vram -= self.n


class FakeDevice:
    """VRAM as a counter; allocations made while the pool is active go to the fake allocator instead."""

    def __init__(self, lib, context=300):
        self.lib, self.vram, self.context = lib, 0, context
        self.pool_active = None
        self.pools = 0

    def used_bytes(self):
        return self.context + self.vram

    def make_pool(self, lib):
        self.pools += 1
        return object()

    @contextlib.contextmanager
    def use_pool(self, pool):
        self.pool_active = pool
        try:
            yield
        finally:
            self.pool_active = None

    def settle(self):
        gc.collect(0)

    def trim(self):
        pass

    def alloc(self, n):
        return FakeTensor(self, n, host=self.pool_active is not None)


# embedding on the CPU, then (attention + its cache layer, mlp) x 3, then the head
MODULES = [("embed", 1000, 0), ("l0.attn", 10, 40), ("l0.mlp", 30, 0), ("l1.attn", 10, 40), ("l1.mlp", 30, 0),
           ("l2.attn", 10, 40), ("l2.mlp", 30, 0), ("head", 60, 0)]


class FakeModel:
    def __init__(self):
        self.tensors = []

    def unload(self):
        self.tensors.clear()


def fake_load(emu, dev, modules=MODULES, fail_at=None, exc=RuntimeError):
    """What load_autosplit does, as the emulator sees it: a callback before each module, then its allocations."""
    model = FakeModel()
    for i, (name, w, c) in enumerate(modules):
        emu.decide(i, name, w, c, kind="attn" if "attn" in name else "", on_cpu=i == 0)
        if i == fail_at:
            raise exc("CUDA error while loading")
        if i:
            model.tensors.append(dev.alloc(w + c))
    emu.finish()
    return model


# ------------------------------------------------------------------------------------------------------ routing
def test_routes_first_fit_and_frees_everything():
    lib = FakeLib()
    dev = FakeDevice(lib)
    with VramEmulator(190, lib, dev) as emu:
        model = emu.own(fake_load(emu, dev))
        assert [d.where for d in emu.decisions] == ["cpu", "vram", "vram", "vram", "vram", "sysmem", "vram", "sysmem"]
        # l2.attn (50) did not fit in the 30 left; l2.mlp (30) did; the head (60) did not
        assert [d.used_before_bytes for d in emu.decisions] == [0, 0, 50, 80, 130, 160, 160, 190]
        assert emu.decisions[2].vram_delta_bytes == 30 and emu.decisions[5].host_delta_bytes == 50
        assert emu.decisions[-1].host_delta_bytes == 60
        assert emu.spilled_bytes() == 110 and emu.host_bytes() == 110 and lib.peak_bytes() == 110
        assert dev.pool_active is None                      # routing ends with the last module
        assert emu.placement()[5] == {"module": "l2.attn", "weight_bytes": 10, "cache_bytes": 40, "where": "sysmem"}
        del model
    assert lib.outstanding_bytes() == 0 and dev.vram == 0 and emu.leftover_bytes == 0 and lib.forced == 0
    assert emu.closed


def test_nothing_spills_when_it_fits():
    lib = FakeLib()
    dev = FakeDevice(lib)
    with VramEmulator(10**6, lib, dev) as emu:
        emu.own(fake_load(emu, dev))
        assert emu.spilled_bytes() == 0 and lib.peak_bytes() == 0
    assert lib.outstanding_bytes() == 0


def test_the_budget_counts_only_what_comes_after_the_start():
    lib = FakeLib()
    dev = FakeDevice(lib, context=5 * GIB)             # CUDA context and whatever else was there before
    with VramEmulator(190, lib, dev) as emu:
        emu.own(fake_load(emu, dev))
        assert emu.decisions[1].where == "vram" and emu.spilled_bytes() == 110


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_an_error_or_interrupt_mid_load_leaves_nothing_pinned(exc):
    lib = FakeLib()
    dev = FakeDevice(lib)
    with pytest.raises(exc):
        with VramEmulator(100, lib, dev) as emu:
            fake_load(emu, dev, fail_at=7, exc=exc)     # spilled modules exist only in the loader's frame
    assert lib.outstanding_bytes() == 0 and lib.forced == 0 and dev.vram == 0
    assert dev.pool_active is None and emu.leftover_bytes == 0


def test_a_tensor_that_outlives_the_run_is_freed_by_force_with_a_warning():
    lib = FakeLib()
    dev = FakeDevice(lib)
    with pytest.warns(CourseWarning, match="still referenced"):
        with VramEmulator(100, lib, dev) as emu:
            model = emu.own(fake_load(emu, dev))
            kept = model.tensors[-1]                  # the spilled head, held outside the emulator
    assert kept.host and emu.leftover_bytes == 60 and lib.forced == 1 and lib.outstanding_bytes() == 0


def test_host_context_and_bad_budgets():
    lib = FakeLib()
    dev = FakeDevice(lib)
    with VramEmulator(100, lib, dev) as emu:
        with emu.host():
            t = dev.alloc(7)
        assert t.host and dev.pool_active is None and emu.host_bytes() == 7
        del t
    with pytest.raises(CourseError, match="budget must be positive"):
        VramEmulator(0, lib, dev)
    emu = VramEmulator(10, lib, dev)
    with pytest.raises(CourseError, match="not open"):
        emu.enter()


def test_budget_for():
    assert emulator.budget_for(16, 0.2, 512 * MIB) == 16 * GIB - int(0.2 * GIB) - 512 * MIB
    with pytest.raises(CourseError, match="larger --card-gib"):
        emulator.budget_for(1, 0.5, GIB)


# ------------------------------------------------------------------------------------------- what a module needs
#: exllamav2 0.3.2's cache tensors per layer for Qwen2.5-14B's 8 KV heads of 128 at 32768 tokens (cache.py): element
#: dtype and the last dimension of K and V (quantized modes pack values into uint8: Q4 two a byte, Q6's V two a byte)
FAKE_CACHES = {"fp16": ("float16", 128, 128), "q8": ("uint8", 128, 128), "q6": ("uint8", 128, 64),
               "q4": ("uint8", 64, 64)}
#: the bytes of one such layer, by hand: fp16 2 x 32768 x 8 x 128 x 2 = 128 MiB; the quantized modes
#: 32768 x 8 x (K + V bytes) plus fp16 scales for K and V, 2 x 32768 x 8 x 4 x 2 = 4 MiB
LAYER_BYTES = {"fp16": 128 * MIB, "q8": 64 * MIB + 4 * MIB, "q6": 48 * MIB + 4 * MIB, "q4": 32 * MIB + 4 * MIB}


def _fake_cache(mode, L=32768, kv=8, hd=128):
    import torch

    dtype, k_last, v_last = FAKE_CACHES[mode]
    return types.SimpleNamespace(
        dtype=getattr(torch, dtype), has_scales=mode != "fp16",
        shape_wk=(1, L, kv, k_last), shape_wv=(1, L, kv, v_last), shape_s=(1, L, kv, hd // 32),
        shape_basic=(1, L, kv, hd), **({} if mode == "fp16" else {"temp_tensors": {}}))


@pytest.mark.parametrize("mode", ["fp16", "q8", "q6", "q4"])
def test_cache_layer_bytes_match_the_planner(mode):
    from helpers.memory.kv_cache import kv_layer_bytes_per_token

    assert routed_load.cache_layer_bytes(_fake_cache(mode)) == LAYER_BYTES[mode]
    # the planner counts the same bytes per layer from the model's shape alone
    assert kv_layer_bytes_per_token("qwen2.5-14b", mode) * 32768 == LAYER_BYTES[mode]


def test_module_need():
    class ExLlamaV2Attention:
        key = "model.layers.0.self_attn"

        def weight_footprint(self):
            return 43345920

    class ExLlamaV2MLP(ExLlamaV2Attention):
        key = "model.layers.0.mlp"

    class ExLlamaV2Embedding(ExLlamaV2Attention):
        key = "model.embed_tokens"

    model = types.SimpleNamespace(modules=[ExLlamaV2Embedding(), ExLlamaV2Attention(), ExLlamaV2MLP()])
    fp16 = _fake_cache("fp16")
    assert routed_load.module_need(model, fp16, 0)["on_cpu"] is True
    a = routed_load.module_need(model, fp16, 1)
    assert a == {"module": "model.layers.0.self_attn", "kind": "ExLlamaV2Attention", "weight_bytes": 43345920,
                 "cache_bytes": 128 * MIB, "on_cpu": False}
    assert routed_load.module_need(model, fp16, 2)["cache_bytes"] == 0
    q4 = _fake_cache("q4")                    # first layer of a quantized cache also makes the FP16 temp K/V
    assert routed_load.module_need(model, q4, 1)["cache_bytes"] == 36 * MIB + 2 * 64 * MIB
    q4.temp_tensors["cuda:0"] = object()
    assert routed_load.module_need(model, q4, 1)["cache_bytes"] == 36 * MIB


def _routed_model_and_cache(dev, events):
    """exllamav2 0.3.2's model and FP16 cache as ``Exl2Model`` sees them (the rest is the shared fake's): modules with
    footprints, ``load_autosplit`` (cache layer, then weights, per attention module), ``load`` (weights only) and a
    lazy cache whose ``update_cache_tensors`` makes every mapped layer not made yet. Every allocation goes through the
    fake device, so routing shows in the bytes."""

    class Module:
        def __init__(self, key, w):
            self.key, self.w = key, w

        def weight_footprint(self):
            return self.w

    class ExLlamaV2Embedding(Module):
        pass

    class ExLlamaV2Attention(Module):
        def __init__(self, key, w, layer_idx):
            super().__init__(key, w)
            self.layer_idx = layer_idx

    class ExLlamaV2MLP(Module):
        pass

    class ExLlamaV2:
        def __init__(self, config):
            self.modules = [ExLlamaV2Embedding("embed", 1000)]
            for i in range(3):
                self.modules += [ExLlamaV2Attention(f"l{i}.attn", 10, i), ExLlamaV2MLP(f"l{i}.mlp", 30)]
            self.modules.append(Module("head", 60))
            self.cache_map, self.held = {}, []

        def _load(self, i, cache=None):
            m = self.modules[i]
            if isinstance(m, ExLlamaV2Attention) and cache is not None:
                self.cache_map[m.layer_idx] = "cuda:0"
                cache.update_cache_tensors()
            if i:
                self.held.append(dev.alloc(m.w))
                events.append(("weights", m.key))

        def load_autosplit(self, cache, callback=None):
            for i in range(len(self.modules)):
                callback(i, len(self.modules))
                self._load(i, cache)
            callback(len(self.modules), len(self.modules))

        def load(self, callback=None):
            for i in range(len(self.modules)):
                callback(i, len(self.modules))
                self._load(i)
            self.cache_map = {m.layer_idx: "cuda:0" for m in self.modules if isinstance(m, ExLlamaV2Attention)}
            callback(len(self.modules), len(self.modules))

        def unload(self):
            self.held.clear()

    import torch

    class ExLlamaV2Cache:
        dtype, has_scales = torch.float16, False
        shape_wk = shape_wv = (1, 2, 1, 5)       # K and V of 10 fp16 values each: 40 bytes per layer

        def __init__(self, model, max_seq_len, lazy, batch_size=1):
            assert lazy
            self.model, self.layers = model, {}

        def update_cache_tensors(self):
            for k in self.model.cache_map:
                if k not in self.layers:
                    self.layers[k] = dev.alloc(40)
                    events.append(("cache", k))

    return types.SimpleNamespace(ExLlamaV2=ExLlamaV2, ExLlamaV2Cache=ExLlamaV2Cache)


@pytest.mark.parametrize("path", ["autosplit", "load"])
def test_exl2model_routes_each_load_path_in_exllamav2s_order(path, monkeypatch, tmp_path, fake_cuda, fake_exllamav2):
    lib, events = FakeLib(), []
    dev = FakeDevice(lib)
    routed = _routed_model_and_cache(dev, events)     # the shared fake, its model and cache on the fake device
    monkeypatch.setattr(fake_exllamav2, "ExLlamaV2", routed.ExLlamaV2)
    monkeypatch.setattr(fake_exllamav2, "ExLlamaV2Cache", routed.ExLlamaV2Cache)
    setup = LoadSetup(TINY, max_seq_len=4)   # a real folder for the config; the fake builds its own model

    def drop(x):
        x.model.unload()
        x.cache.layers.clear()

    with VramEmulator(190 if path == "autosplit" else 230, lib, dev) as emu:
        m = emu.own(routed_load.Exl2Model(setup, emulator=emu, load_path=path), drop)
        where = {d.module: d.where for d in emu.decisions}
        if path == "autosplit":        # same walk as the fake load above: l2.attn with its cache, and the head spill
            assert [d.module for d in emu.decisions][:3] == ["embed", "l0.attn", "l0.mlp"]
            assert events[:2] == [("cache", 0), ("weights", "l0.attn")]
            assert [k for k, w in where.items() if w == "sysmem"] == ["l2.attn", "head"]
            assert emu.spilled_bytes() == 110 == lib.outstanding_bytes()
        else:                          # all weights (180) first, then the cache layers: one more fits
            assert [e[0] for e in events] == ["weights"] * 7 + ["cache"] * 3
            assert [d.module for d in emu.decisions][-3:] == ["cache layer 0", "cache layer 1", "cache layer 2"]
            assert [k for k, w in where.items() if w == "sysmem"] == ["cache layer 1", "cache layer 2"]
            assert emu.spilled_bytes() == 80 == lib.outstanding_bytes()
            assert m.model.cache_map == {0: "cuda:0", 1: "cuda:0", 2: "cuda:0"}    # the full map is back
        assert m.weight_bytes() == 180 and dev.pool_active is None
    assert lib.outstanding_bytes() == 0 and emu.leftover_bytes == 0
    with pytest.raises(CourseError, match="unknown load path 'lazy'"):
        routed_load.Exl2Model(setup, load_path="lazy")


# ------------------------------------------------------------------------------------------------- the C allocator
FAKE_CUDART = textwrap.dedent("""
    #include <stdlib.h>
    static int live = 0, fail = 0;
    int cudaHostAlloc(void **p, size_t n, unsigned int flags) {
        if (fail || !(flags & 2)) { *p = 0; return 2; }
        *p = malloc(n); live++; return 0; }
    int cudaHostGetDevicePointer(void **d, void *h, unsigned int flags) { *d = h; return 0; }
    int cudaFreeHost(void *p) { free(p); live--; return 0; }
    int cudaGetLastError(void) { return 0; }
    int cudaDeviceSynchronize(void) { return 0; }
    int fake_live(void) { return live; }
    void fake_fail(int f) { fail = f; }
""")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc or not sys.platform.startswith("linux"):
        pytest.skip("needs a C compiler on Linux")
    d = tmp_path_factory.mktemp("cudart")
    (d / "fake_cudart.c").write_text(FAKE_CUDART)
    fake = d / "libfakecudart.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(fake), str(d / "fake_cudart.c")], check=True)
    out = hostalloc.compile_hostalloc(d / "hostalloc.so", cudart=fake, cc=cc)
    return out, ctypes.CDLL(str(fake))


def test_c_allocator_counts_and_frees(built):
    so, fake = built
    lib = hostalloc.HostAllocLib(so)
    assert lib.outstanding_bytes() == 0
    a, b = lib.alloc(1000), lib.alloc(24)
    assert a and b and a != b
    assert lib.outstanding_bytes() == 1024 and lib.outstanding_count() == 2 and fake.fake_live() == 2
    assert lib.peak_bytes() == 1024 and lib.total_allocs() == 2
    lib.free(a, 1000)
    assert lib.outstanding_bytes() == 24 and fake.fake_live() == 1 and lib.peak_bytes() == 1024
    lib.free(a, 1000)                                   # unknown pointer: ignored, nothing freed twice
    assert fake.fake_live() == 1
    fake.fake_fail(1)
    assert lib.alloc(10) is None and lib.failed_allocs() == 1 and lib.last_error() == 2
    fake.fake_fail(0)
    for _ in range(300):                                # grows its table past the first 256 entries
        lib.alloc(1)
    assert lib.outstanding_count() == 301 and lib.free_all() == 301
    assert lib.outstanding_bytes() == 0 and fake.fake_live() == 0
    lib.reset_peak()
    assert lib.peak_bytes() == 0


def test_compile_errors_are_one_line(tmp_path):
    with pytest.raises(CourseError, match="needs a C compiler"):
        hostalloc.compile_hostalloc(tmp_path / "x.so", cudart=None, cc=None, nvcc=None)
    if shutil.which("cc"):
        bad = tmp_path / "bad.c"
        bad.write_text("this is not C")
        with pytest.raises(CourseError, match="compiling bad.c failed"):
            hostalloc.compile_hostalloc(tmp_path / "y.so", cudart=tmp_path / "none.so", cc="cc", source=bad)
    assert not list(tmp_path.glob(".*.tmp"))             # no half-written library left behind


def test_cli_without_cuda_says_so(capsys):
    from helpers.__main__ import main

    for flag in ("--ctx", "--max-seq-len"):          # --ctx is kept as an alias of --max-seq-len
        assert main(["emulate", flag, "4096"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
    assert main(["emulate", "--max-seq-len", "4k,lots"]) == 2     # parsed before CUDA is asked for
    assert "'lots' is not a whole number" in capsys.readouterr().err       # core.units' one token-count parser


def test_build_needs_cuda():
    with pytest.raises(CourseError, match="needs a CUDA GPU"):
        hostalloc.build_hostalloc()


def test_the_spill_model_walks_an_emulator_placement_with_the_embedding_on_the_cpu():
    from helpers.fallback import spill
    from helpers.speed.model import first_principles

    lib = FakeLib()
    dev = FakeDevice(lib)
    with VramEmulator(190, lib, dev) as emu:
        emu.own(fake_load(emu, dev))
        placement = emu.placement()
    walked = spill.place(placement, 190, 0)          # the model's own walk over the emulator's byte counts
    assert [p["where"] for p in walked] == [d["where"] for d in placement]
    model = spill.SpillModel(LoadSetup("qwen2.5-14b", max_seq_len=100), vram_bandwidth=1.0, pcie_bandwidth=0.5,
                             constants=first_principles())
    pred = spill.evaluate(placement, model, 0)
    assert pred.vram_read_bytes == 10 + 30 + 10 + 30 + 30 and pred.sysmem_read_bytes == 10 + 60
    # the speed model's time at depth 0: 110 B at 1 B/s + 70 B at 0.5 B/s
    assert pred.seconds_per_token == pytest.approx(110 + 140)


def test_recorded_results_are_read_labelled_and_plotted(tmp_path):
    """The notebook's path once a GPU has recorded (a made-up record in a temporary folder, never in results/)."""
    from helpers import plots
    from helpers.core import results

    assert "not recorded yet" in emulated_report.report_recorded(tmp_path)
    prov = {"gpu": "TEST GPU", "date": "2026-01-01T00:00:00+00:00", "torch": "x", "exllamav2": "0.3.2"}
    base = {"cache_mode": "fp16", "depth": 128, "card_gib": 16.0, "spilled_modules": [], "pcie_read_gbs": 50.0,
            "vram_bandwidth_gbs": 2800.0, "overhead_ms": 14.0, "pinned_left_bytes": 0}
    results.save_result("fallback", "emulated-4096-test", [dict(base, ctx=4096, spilled_bytes=0, spilled_gib=0.0,
                        native_tok_s=60.0, emulated_tok_s=59.0, slowdown=60 / 59, predicted_slowdown=1.0,
                        prediction_ratio=60 / 59, emulated_over_native=59 / 60)], prov=prov, results_dir=tmp_path)
    results.save_result("fallback", "emulated-32768-test", [dict(base, ctx=32768, spilled_bytes=2 * GIB,
                        spilled_gib=2.0, spilled_modules=["a", "b"], native_tok_s=60.0, emulated_tok_s=20.0,
                        slowdown=3.0, predicted_slowdown=2.7, prediction_ratio=3.0 / 2.7, emulated_over_native=1 / 3,
                        pinned_left_after_error_bytes=0, pinned_left_after_interrupt_bytes=0)],
                        prov=prov, results_dir=tmp_path, extra={"decisions": [{"where": "vram"}]})
    results.save_result("fallback", "emulated-32768-load-test", [dict(base, ctx=32768, depth=16384, load_path="load",
                        spilled_bytes=GIB, spilled_gib=1.0, spilled_modules=["cache layer 47"], native_tok_s=40.0,
                        emulated_tok_s=30.0, slowdown=4 / 3, predicted_slowdown=1.3, prediction_ratio=4 / 3 / 1.3,
                        emulated_over_native=0.75)], prov=prov, results_dir=tmp_path)
    results.save_result("fallback", "linux-oom-test", [{"ctx": 32768, "outcome": "out-of-memory",
                        "error_type": "RuntimeError", "error": "Insufficient VRAM for model and cache",
                        "explanation": "Linux has no sysmem fallback"}], prov=prov, results_dir=tmp_path)
    rec = emulated_report.load_recorded(tmp_path)
    # files written with the old key "ctx" read as max_seq_len
    assert [r["max_seq_len"] for r in rec["emulated"]] == [4096, 32768, 32768] and len(rec["oom"]) == 1
    auto32 = next(r for r in rec["emulated"] if r["max_seq_len"] == 32768 and "load_path" not in r)
    assert auto32["decisions"] == [{"where": "vram"}] and "TEST GPU" in rec["emulated"][0]["label"]
    text = emulated_report.report_recorded(tmp_path)
    assert "emulated/native = 0.983 (target: within 5%)" in text
    assert "measured slowdown / predicted = 1.11 (target: within 25%)" in text
    assert "after an injected interrupt mid-load: 0" in text and "Insufficient VRAM" in text
    assert "cache 32768 (fp16, load path, 16384 deep) on an emulated 16 GiB card: spilled 1.00 GiB" in text
    fig = plots.plot_emulated(rec["emulated"])
    assert len(fig.axes[0].patches) == 6
    assert sum("model.load()" in t.get_text() for t in fig.axes[0].get_xticklabels()) == 1
