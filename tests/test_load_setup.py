"""helpers.memory.setup.LoadSetup: every setting validated once, in its constructor, with one line that says what to
do; a frozen object whose changed copies are checked again; the names that follow it (result rows, the reference
decoder's config, the notebook preamble)."""
import dataclasses
import warnings

import pytest
from fixture_dirs import EXL2

from helpers.core import results
from helpers.core.errors import CourseError, CourseWarning, notebook_setup
from helpers.engines.reference import DecoderConfig
from helpers.format.config import load_config
from helpers.memory.breakdown import breakdown
from helpers.memory.setup import LoadSetup
from helpers.specs.shapes import model_shape


@pytest.mark.parametrize("settings, match", [
    (dict(max_seq_len=0), "max_seq_len must be a positive whole number"),
    (dict(max_seq_len="4096"), "max_seq_len must be a whole number"),
    (dict(max_input_len=-1), "max_input_len must be a positive whole number"),
    (dict(cache_mode="q3"), "unknown cache mode 'q3'"),
    (dict(batch=0), "batch"),
    (dict(max_attention_size=0), "max_attention_size must be a positive whole number"),
    (dict(bpw=9.0), "2.0 to 8.0"),
    (dict(head_bits=7), "head bits 7 is not an exllamav2 head option"),
    (dict(cuda_context_gib=-0.5), "CUDA context must be zero or a positive number of GiB"),
    (dict(reserve_gib=8192), "reserve of 8192 GiB is absurd"),
    (dict(gpus=("RTX 3090", "RTX 3090"), reserve_gib=(0.5, 0.2, 0.1)), "3 reserves for 2 GPUs"),
    (dict(host="laptop"), "unknown host 'laptop'"),
    (dict(gpus="RTX 4080 Suprr"), "Did you mean"),
])
def test_every_setting_is_checked_in_the_constructor_with_one_line(settings, match):
    with pytest.raises(CourseError, match=match) as err:
        LoadSetup("qwen2.5-14b", **settings)
    assert "\n" not in str(err.value)


def test_the_model_is_resolved_once_and_the_setup_is_frozen():
    s = LoadSetup("qwen2.5-14b", bpw=5.5, max_seq_len=32768, gpus="RTX 4080 Super")
    assert s.model == model_shape("qwen2.5-14b") and s.shape is s.model
    assert s.gpu["name"] == "RTX 4080 Super" and s.host_class == "desktop"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_seq_len = 4096
    with pytest.raises(CourseError, match="config without weights"):
        _ = s.model_dir
    assert LoadSetup(EXL2["tiny_llama_b4.5"]).model_dir == EXL2["tiny_llama_b4.5"].resolve()


def test_a_changed_copy_is_checked_again_and_keeps_the_weights_it_can():
    s = LoadSetup("qwen2.5-14b", bpw=5.5, max_seq_len=4096)
    weights = s.weights                                                     # worked out once, on first use
    longer = s.with_(max_seq_len=32768)
    assert longer.weights is weights and s.max_seq_len == 4096              # the original is untouched
    assert s.with_(bpw=4.0).weights.vram < s.weights.vram                   # a new bpw: new weights
    with pytest.raises(CourseError, match="unknown cache mode"):
        s.with_(cache_mode="int4")
    assert breakdown(longer, warn=False).kv_cache_bytes == 8 * breakdown(s, warn=False).kv_cache_bytes


def test_the_reserve_lies_on_the_display_gpu_unless_given_per_gpu():
    two = LoadSetup("llama-3.3-70b", gpus=("RTX 3090", "RTX 3090"), reserve_gib=0.5)
    assert (two.reserve_gib_of(0), two.reserve_gib_of(1)) == (0.5, 0.0)
    each = two.with_(reserve_gib=[1.0, 0.2])
    assert each.reserve_gib == (1.0, 0.2) and each.reserve_gib_of(1) == 0.2
    assert LoadSetup("llama-3.3-70b", gpus=("RTX 3090",) * 2).reserve_gib_of(1) is None   # the default, first only


def test_the_reference_decoders_config_is_the_model_shape_plus_what_only_arithmetic_needs():
    folder = EXL2["tiny_qwen2_b6.5"]
    cfg = DecoderConfig.from_hf(load_config(folder))
    shape = model_shape(folder)
    assert cfg.shape == dataclasses.replace(shape, name=cfg.shape.name, source=cfg.shape.source, exl2_dir=None)
    assert cfg.rms_norm_eps > 0 and cfg.window is None   # Qwen2 without use_sliding_window: no window


def test_result_rows_read_the_old_key_once_and_write_the_new(tmp_path):
    results.save_result("speed", "old", [{"ctx": 4096, "trained_ctx": 2048, "depth": 1}], prov={"date": "x"},
                        results_dir=tmp_path)
    row = results.load_results("speed", tmp_path)[0]["rows"][0]
    assert row == {"max_seq_len": 4096, "trained_positions": 2048, "depth": 1}


def test_notebook_setup_shows_a_warning_on_one_line():
    notebook_setup()   # outside a kernel: the warning format only
    assert warnings.formatwarning("past 32,768 positions", CourseWarning, "file.py", 1) == (
        "CourseWarning: past 32,768 positions\n")
