"""The backend API: choosing an engine, the reference behind it, exllamav2's wiring and its front door (faked on
CPU), errors, the CLI, the agreement measurement."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fixture_dirs import EXL2

from helpers.cli.generate import main as main_generate
from helpers.core import devices as gpu
from helpers.core.errors import CourseError
from helpers.engines import agreement as A
from helpers.engines import backend as B
from helpers.engines import exllama
from helpers.memory.cache_modes import CACHE_CLASSES, CACHE_MODES
from helpers.memory.setup import LoadSetup

LLAMA = EXL2["tiny_llama_b4.5"]
QWEN = EXL2["tiny_qwen2_b6.5"]

torch.set_num_threads(2)

pytest_plugins = ("fake_exllamav2",)   # fixtures fake_cuda, fake_exllamav2, forbid_exllamav2 (tests/fake_exllamav2.py)

NO_CUDA = {"available": False, "reason": "this torch is a CPU-only build", "torch": torch.__version__}


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(gpu, "cuda_status", lambda: dict(NO_CUDA))



# --- the reference behind the API ---------------------------------------------------------------------------------

def test_auto_on_a_cpu_machine_is_the_reference_and_never_imports_exllamav2(no_cuda, forbid_exllamav2):
    forbid_exllamav2()
    be = B.load(LLAMA, max_seq_len=128)
    assert (be.name, be.device, be.cache_mode, be.max_seq_len, be.vocab_size) == ("reference", "cpu", "fp16", 128, 1024)
    assert "no CUDA GPU" in be.reason and "float32" in be.reason
    assert be.cache_bytes() == 2 * 2 * 128 * 2 * 64 * 4     # K+V x layers x positions x kv heads x head_dim x fp32
    assert be.memory()["process_rss_bytes"] > 0


def test_forward_reset_and_append_give_the_same_logits():
    be = B.load(QWEN, max_seq_len=64, backend="reference")
    ids = torch.arange(3, 23)[None]
    whole = be.forward(ids)
    assert whole.shape == (1, 20, 1024) and whole.dtype == torch.float32 and be.depth == 20
    first = be.forward(ids[:, :15])
    rest = be.forward(ids[:, 15:18], reset=False)
    last = [be.decode_step(int(t)) for t in ids[0, 18:]]
    assert be.depth == 20
    got = torch.cat([first, rest, torch.stack(last)[None]], dim=1)
    assert torch.allclose(got, whole, atol=1e-4, rtol=1e-4)


def test_fill_cache_puts_the_depth_directly_then_decodes():
    be = B.load(LLAMA, max_seq_len=2048, backend="reference")
    be.fill_cache(1500, seed=1)
    assert be.depth == 1500
    logits = be.decode_step()            # no token given: BOS/greedy default
    assert be.depth == 1501 and logits.shape == (1024,) and torch.isfinite(logits).all()
    be.decode_step(7)
    assert be.depth == 1502
    be.fill_cache(0)
    assert be.depth == 0
    with pytest.raises(CourseError, match="fill_cache depth 2048 must be in"):
        be.fill_cache(2048)


def test_generate_streams_and_samples_reproducibly():
    be = B.load(QWEN, max_seq_len=64, backend="reference")
    pieces: list[str] = []
    text = be.generate("hello", max_new_tokens=10, chat=False, stream=pieces.append)
    assert text and "".join(pieces) == text
    assert be.decode(be.encode(text)) == text
    a = be.generate("hello", max_new_tokens=10, chat=False, temperature=0.9, top_k=50, top_p=0.95, seed=3)
    assert a == be.generate("hello", max_new_tokens=10, chat=False, temperature=0.9, top_k=50, top_p=0.95, seed=3)


def test_embedded_model_answers_paris_through_the_cli(capsys):
    assert main_generate(["--prompt", "What is the capital of France?", "--max-new-tokens", "16",
                            "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out
    assert "backend: reference on cpu" in err


def test_cli_with_a_model_dir_and_plain_prompt(capsys):
    assert main_generate(["--prompt", "hello", "--model", str(QWEN), "--no-chat", "--max-new-tokens", "5",
                            "--backend", "reference"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() and "backend: reference" in err and "asked for" in err


# --- bad input: one clear line each -------------------------------------------------------------------------------

def test_quantized_cache_on_the_reference_says_what_to_do(no_cuda):
    with pytest.raises(CourseError, match="quantized caches need exllamav2 on a CUDA GPU; use cache_mode='fp16'"):
        B.load(LLAMA, cache_mode="q4")


def test_unknown_names_are_refused():
    with pytest.raises(CourseError, match="unknown cache mode 'q3': use one of fp16"):
        B.load(LLAMA, cache_mode="q3")
    with pytest.raises(CourseError, match="backend 'vllm' is unknown"):
        B.load(LLAMA, backend="vllm")
    with pytest.raises(CourseError, match="does not exist"):
        B.load(LLAMA / "nope", backend="reference")


def test_cuda_asked_for_where_there_is_none(no_cuda, forbid_exllamav2):
    forbid_exllamav2()
    with pytest.raises(CourseError, match="device='cuda' needs a CUDA GPU, but this torch is a CPU-only build"):
        B.load(LLAMA, device="cuda")
    with pytest.raises(CourseError, match="exllamav2 needs a CUDA GPU"):
        B.load(LLAMA, backend="exllamav2")


def test_context_beyond_the_cache(no_cuda):
    be = B.load(LLAMA, max_seq_len=32)
    with pytest.raises(CourseError, match="beyond max_seq_len=32: load with a larger max_seq_len"):
        be.forward(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(CourseError, match=r"plus max_new_tokens \(40\).*max_seq_len >= "):
        be.generate("hello", max_new_tokens=40, chat=False)


def test_unsupported_architecture(tmp_path):
    for f in LLAMA.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["Gemma2ForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CourseError, match="Gemma2ForCausalLM is not supported by the reference decoder; it runs "
                                          "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        B.load(tmp_path, backend="reference")


def test_extension_build_failure_is_one_line_and_auto_falls_back(fake_cuda, forbid_exllamav2):
    boom = RuntimeError("Error building extension 'exllamav2_ext':\n[1/45] c++ ... \nninja: build stopped")
    forbid_exllamav2(boom)
    with pytest.raises(CourseError) as info:
        B.load(LLAMA, backend="exllamav2")
    msg = str(info.value)
    assert "\n" not in msg and "failed to build or load" in msg and "ninja: build stopped" in msg
    assert "CUDA toolkit matching torch's CUDA" in msg and "prebuilt exllamav2 wheel" in msg
    engine, device, reason = B.choose_backend("auto")
    assert (engine, device) == ("reference", "cuda") and "exllamav2 cannot run" in reason


def test_exllamav2_not_installed(fake_cuda, forbid_exllamav2):
    forbid_exllamav2(ModuleNotFoundError("No module named 'exllamav2'", name="exllamav2"))
    with pytest.raises(CourseError, match=r"exllamav2 is not installed: `pip install exllamav2==0.3.2`"):
        B.choose_backend("exllamav2")


# --- exllamav2's wiring, against a stand-in module with the same names (no GPU, no compile) ---------------------

def test_exllamav2_path_wiring(fake_cuda, fake_exllamav2):
    ex = fake_exllamav2
    be = B.load(QWEN, max_seq_len=300)
    assert (be.name, be.device) == ("exllamav2", "cuda") and "Fake GPU 16GB" in be.reason
    assert be.config.no_sdpa is True and be.config.max_seq_len == 300        # the SDPA trap avoided
    assert type(be.cache).__name__ == "ExLlamaV2Cache" and be.vocab_size == 1024
    assert be.cache_bytes() == 2 * 2 * 300 * 2 * 64 * 2
    logits = be.forward(torch.arange(5)[None])
    assert logits.dtype == torch.float32 and logits.shape == (1, 5, 1024) and be.depth == 5
    be.decode_step(3)
    be.forward(torch.arange(4)[None])                                        # reset: back to position 0
    assert ex.calls[-3:] == [("forward", 0, 5), ("forward", 5, 1), ("forward", 0, 4)]
    be.fill_cache(200, seed=0)
    assert be.depth == 200 and be.cache.current_seq_len == 200
    k = be.cache.key_states[1]
    assert 0.9 < float(k[0, :200].float().std()) < 1.1 and k[0, 200:].abs().sum() == 0
    with pytest.raises(CourseError, match="larger max_seq_len"):
        be.forward(torch.zeros(1, 101, dtype=torch.long), reset=False)
    be.unload()
    assert ex.calls[-1] == ("unload",)


def test_exllamav2_quantized_cache_fill_goes_through_store_kv_state(fake_cuda, fake_exllamav2):
    ex = fake_exllamav2
    be = B.load(LLAMA, max_seq_len=256, cache_mode="q4", backend="exllamav2")
    assert type(be.cache).__name__ == "ExLlamaV2Cache_Q4"
    # storage (uint8, half the head_dim) + FP16 staging K and V
    assert be.cache_bytes() == 2 * 2 * 256 * 2 * 32 + 2 * 256 * 2 * 64 * 2
    be.fill_cache(100, seed=0)
    assert [c for c in ex.calls if c[0] == "store"] == [("store", 0, 0, 100), ("store", 1, 0, 100)]
    assert be.depth == 100


def _rope_parameters_only(tmp_path: Path, theta: float = 100000.0) -> Path:
    for f in QWEN.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["rope_theta"]
    cfg["rope_parameters"]["rope_theta"] = theta
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_rope_theta_only_in_rope_parameters_is_passed_to_exllamav2(fake_cuda, fake_exllamav2, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        be = B.load(_rope_parameters_only(tmp_path), max_seq_len=64, backend="exllamav2")
    assert be.config.rotary_embedding_base == 100000.0


def test_exllamav2_loads_a_checkpoint_without_tokenizer_files(fake_cuda, fake_exllamav2, tmp_path):
    """Synthetic checkpoints (helpers.format.synthetic) carry no tokenizer: loading and decoding by id must still
    work."""
    shutil.copy(LLAMA / "config.json", tmp_path / "config.json")
    be = B.load(tmp_path, max_seq_len=256, backend="exllamav2")
    be.fill_cache(10)
    assert be.decode_step(5).shape == (1024,) and be.depth == 11
    with pytest.raises(CourseError, match="tokenizer.json"):
        be.encode("hello")


# --- the front door (helpers.engines.exllama), against the same stand-in ----------------------------------------

def test_front_door_config_sets_no_sdpa_max_seq_len_and_the_rope_theta_fix(fake_cuda, fake_exllamav2, tmp_path):
    config = exllama.make_config(LoadSetup(QWEN, max_seq_len=300, max_attention_size=1024 ** 2))
    assert config.no_sdpa is True and config.max_seq_len == 300 and config.max_input_len == 300
    assert config.max_attention_size == 1024 ** 2
    assert config.rotary_embedding_base == 10000.0        # config.json has a top-level rope_theta: left to exllamav2
    config = exllama.make_config(LoadSetup(_rope_parameters_only(tmp_path), max_seq_len=128, max_input_len=256))
    assert config.rotary_embedding_base == 100000.0 and config.max_input_len == 128   # capped at max_seq_len
    assert exllama.make_config(LoadSetup(QWEN, max_seq_len=4096)).max_input_len == 2048   # exllamav2's default
    with pytest.raises(CourseError, match="max_seq_len must be a positive whole number"):
        LoadSetup(QWEN, max_seq_len=0)


@pytest.mark.parametrize("mode", CACHE_MODES)
def test_front_door_cache_class_per_mode(fake_cuda, fake_exllamav2, mode):
    setup = LoadSetup(QWEN, max_seq_len=256, cache_mode=mode)
    model = fake_exllamav2.ExLlamaV2(exllama.make_config(setup))
    cache = exllama.make_cache(model, setup, lazy=True)
    assert type(cache).__name__ == CACHE_CLASSES[mode] == exllama.cache_class_name(mode)
    assert fake_exllamav2.calls[-1] == ("cache", CACHE_CLASSES[mode], 256, True)
    assert exllama.cache_bytes(cache) == 0                 # lazy: nothing allocated before the model loads
    assert exllama.cache_class_name(mode.upper()) == CACHE_CLASSES[mode]
    with pytest.raises(CourseError, match="unknown cache mode 'q3'"):
        setup.with_(cache_mode="q3")


def test_front_door_autosplit_makes_a_lazy_cache_then_loads_with_it(fake_cuda, fake_exllamav2):
    seen = []
    loaded = exllama.load(LoadSetup(QWEN, max_seq_len=256, cache_mode="q4"), on_module=lambda i, n: seen.append((i, n)))
    assert [c[0] for c in fake_exllamav2.calls] == ["config", "model", "cache", "load_autosplit"]
    assert fake_exllamav2.calls[2:] == [("cache", "ExLlamaV2Cache_Q4", 256, True),
                                        ("load_autosplit", "ExLlamaV2Cache_Q4")]
    n = len(loaded.model.modules)
    assert seen == [(i, n) for i in range(n + 1)]          # before each module, then (n, n) at the end
    assert loaded.config.no_sdpa and loaded.setup.max_seq_len == 256 and loaded.setup.cache_mode == "q4"
    assert exllama.cache_bytes(loaded.cache) == 2 * 2 * 256 * 2 * 32 + 2 * 256 * 2 * 64 * 2


def test_front_door_load_path_loads_the_weights_then_makes_the_cache(fake_cuda, fake_exllamav2):
    seen = []
    setup = LoadSetup(QWEN, max_seq_len=128)
    loaded = exllama.load(setup, load_path="load", on_module=lambda i, n: seen.append(i))
    assert [c[0] for c in fake_exllamav2.calls] == ["config", "model", "load", "cache"]
    assert fake_exllamav2.calls[-1] == ("cache", "ExLlamaV2Cache", 128, False)       # not lazy, after model.load()
    assert seen == list(range(len(loaded.model.modules) + 1))
    assert exllama.cache_bytes(loaded.cache) == 2 * 2 * 128 * 2 * 64 * 2
    bare = exllama.load(setup, with_cache=False, load_path="load")   # weights only
    assert bare.cache is None and fake_exllamav2.calls[-1] == ("load",)
    with pytest.raises(CourseError, match="unknown load path 'fast'"):
        exllama.load(setup, load_path="fast")
    with pytest.raises(CourseError, match="loads the model together with its cache"):
        exllama.load(setup, with_cache=False)


def test_front_door_prepare_then_load_modules_without_the_cache(fake_cuda, fake_exllamav2):
    """What the emulator does on the 'load' path: a lazy cache first, the weights, then its own layer-by-layer cache."""
    loaded = exllama.prepare(LoadSetup(QWEN, max_seq_len=64))
    assert loaded.cache is not None and exllama.cache_bytes(loaded.cache) == 0
    exllama.load_modules(loaded, "load", cache_after_load=False)
    assert [c[0] for c in fake_exllamav2.calls] == ["config", "model", "cache", "load"]
    loaded.cache.update_cache_tensors()
    assert exllama.cache_bytes(loaded.cache) == 2 * 2 * 64 * 2 * 64 * 2


def test_front_door_import_failure_is_one_line(fake_cuda, forbid_exllamav2):
    forbid_exllamav2(RuntimeError("Error building extension 'exllamav2_ext':\n[3/45] "
                                                            "nvcc ...\nninja: build stopped: subcommand failed."))
    with pytest.raises(CourseError) as info:
        exllama.load(LoadSetup(QWEN, max_seq_len=64))
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("exllamav2's CUDA extension failed to build or load (RuntimeError: ")
    assert "ninja: build stopped" in msg and "backend='reference'" not in msg
    forbid_exllamav2(ModuleNotFoundError("No module named 'flash_attn'", name="flash_attn"))
    with pytest.raises(CourseError, match=r"^exllamav2 failed to import \(ModuleNotFoundError: No module named "
                                          r"'flash_attn'\): install its missing dependency, or use X$"):
        exllama.import_exllamav2(alternative="use X")


def test_front_door_never_imports_exllamav2_without_cuda(no_cuda, forbid_exllamav2):
    forbid_exllamav2()
    with pytest.raises(CourseError, match="exllamav2 needs a CUDA GPU, but this torch is a CPU-only build"):
        exllama.load(LoadSetup(QWEN, max_seq_len=64))


# --- the agreement recording's logic (run on a CPU with two references) ---------------------------------------

def test_compare_logits_and_top2_gap():
    d = A.compare_logits(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 4.0]))
    assert d == {"max_abs_diff": 3.0, "rel_l2": 0.75}
    assert A.top2_gap(torch.tensor([1.0, 5.0, 4.5, -2.0])) == 0.5


class _Noisy:
    """Wraps a backend and adds a fixed perturbation to every logit vector: a stand-in for exllamav2's fp16."""

    def __init__(self, inner, noise):
        self.inner, self.noise, self.tokenizer = inner, noise, inner.tokenizer

    def __getattr__(self, name):          # everything else (encode, decode, name, device...) from the wrapped one
        return getattr(self.inner, name)

    def forward(self, ids, *, reset=True):
        return self.inner.forward(ids, reset=reset) + self.noise

    def decode_step(self, token_id=None):
        return self.inner.decode_step(token_id) + self.noise


def test_greedy_agreement_stops_blaming_at_the_first_near_tie():
    ref = B.load(QWEN, max_seq_len=64, backend="reference")
    other = B.load(QWEN, max_seq_len=64, backend="reference")
    ids = torch.arange(3, 10)[None]
    rows, summary = A.greedy_agreement(other, ref, ids, 8)
    assert len(rows) == 8 and all(r["same"] and r["max_abs_diff"] == 0 for r in rows)
    assert summary == {"first_different_token": None, "first_near_tie": None, "agree_until_first_near_tie": True}
    noise = torch.zeros(1024)
    noise[int(ref.forward(ids)[0, -1].topk(2).indices[1])] = 50.0   # the runner-up wins: a real disagreement
    rows, summary = A.greedy_agreement(_Noisy(other, noise), ref, ids, 3)
    assert summary["first_different_token"] == 0 and summary["first_near_tie"] == 0
    assert rows[0]["max_abs_diff"] == 50.0 and not rows[0]["same"]


def test_load_agreement_without_recordings(tmp_path):
    assert A.load_agreement(results_dir=tmp_path) is None


def test_agreement_record_round_trip_and_live_comparison_on_cpu(tmp_path):
    """The recording's files, written from two CPU engines (one perturbed), read back as notebook 02 does."""
    ref = B.load(QWEN, max_seq_len=64, backend="reference")
    noise = torch.linspace(-0.01, 0.01, 1024)
    rows, extra, tensors = A.measure_agreement(_Noisy(B.load(QWEN, max_seq_len=64, backend="reference"), noise), ref,
                                               prompt="hello there", chat=False, steps=5)
    assert extra["prompt_logits_max_abs_diff"] == pytest.approx(0.01, abs=1e-5)
    assert tensors["exllamav2_prompt_logits"].shape == (extra["prompt_tokens"], 1024)
    path = A.save_agreement("exllamav2-vs-reference-Fake GPU", rows, extra, tensors,
                            prov={"device": "cuda", "gpu": "Fake GPU", "date": "2026-01-01"}, results_dir=tmp_path)
    assert path.name == "exllamav2-vs-reference-fake-gpu.json"
    assert sorted(p.name for p in path.parent.iterdir()) == ["exllamav2-vs-reference-fake-gpu.json",
                                                              "exllamav2-vs-reference-fake-gpu.safetensors"]
    doc, back = A.load_agreement(tmp_path)
    assert doc["rows"] == rows and torch.equal(back["prompt_ids"], tensors["prompt_ids"])
    live = A.recorded_vs_live(ref, results_dir=tmp_path)
    assert live["same_next_token"] and live["live_backend"] == "reference on cpu"
    assert live["max_abs_diff"] == pytest.approx(0.01, abs=0.01)   # the perturbation, through fp16 storage
    assert live["recorded"]["agree_until_first_near_tie"] is True


# --- on a CUDA machine only: the real exllamav2 against its own fixtures and the reference -----------------------

gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with exllamav2")


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("name", ["tiny_llama_b4.5", "tiny_qwen2_b6.5"])
def test_real_exllamav2_matches_its_fixtures_and_fills_every_cache_mode(name):
    from safetensors.torch import load_file

    t = load_file(str(EXL2[name] / "exllamav2_truth.safetensors"))
    be = B.load(EXL2[name], max_seq_len=256, backend="exllamav2")
    got = be.forward(t["input_ids"]).cpu()
    assert float((got - t["logits_prefill"]).norm() / t["logits_prefill"].norm()) < 0.01   # causal (no_sdpa)
    be.unload()
    for mode in CACHE_MODES:
        be = B.load(EXL2[name], max_seq_len=512, cache_mode=mode, backend="exllamav2")
        be.fill_cache(400)
        assert be.depth == 400 and torch.isfinite(be.decode_step(5)).all() and be.depth == 401
        be.unload()
