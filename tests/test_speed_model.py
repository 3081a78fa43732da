"""helpers.speed.model: bytes per position counted by hand, the decode estimate's behaviour, and the H100 slope."""
from __future__ import annotations

import pytest

from helpers.core.errors import CourseError
from helpers.memory import weights
from helpers.memory.setup import LoadSetup
from helpers.speed import model

# the small shape: SmolLM2-135M, 30 layers, 9 heads, 3 KV heads, head_dim 64
SMALL = "smollm2-135m"
QWEN = "qwen2.5-14b"  # 48 layers, 40 heads, 8 KV heads, head_dim 128


@pytest.mark.parametrize("shape, mode, flash, layer, total", [
    # FP16, torch attention: cache 2 (K,V) x 3 x 64 x 2 B = 768; repeat_kv writes and reads 2 x 9 x 64 x 2 = 2304
    (SMALL, "fp16", False, (768, 2304, 2304), 30 * 5376),
    (SMALL, "fp16", True, (768, 0, 0), 30 * 768),
    # Q4: K and V 3 x 32 B + scales 2 x 3 x 2 x 2 B = 216; the FP16 temp 768 written and read, then repeat_kv
    (SMALL, "q4", False, (216, 768 + 2304, 768 + 2304), 30 * 6360),
    (SMALL, "q4", True, (216, 768, 768), 30 * 1752),
    # Qwen2.5-14B: cache 2 x 8 x 128 x 2 = 4096; repeat_kv 2 x 40 x 128 x 2 = 20480 written and read
    (QWEN, "fp16", False, (4096, 20480, 20480), 48 * 45056),
    (QWEN, "fp16", True, (4096, 0, 0), 48 * 4096),
    # Q4: 2 x 8 x 64 + 2 x 8 x 4 x 2 = 1152; the temp 4096 written and read; repeat_kv as FP16
    (QWEN, "q4", False, (1152, 4096 + 20480, 4096 + 20480), 48 * 50304),
    (QWEN, "q4", True, (1152, 4096, 4096), 48 * 9344),
])
def test_position_bytes_by_hand(shape, mode, flash, layer, total):
    pb = model.position_bytes(shape, mode, flash)
    assert (pb.per_layer.cache_read, pb.per_layer.temp_written, pb.per_layer.temp_read) == layer
    assert pb.total == total == pb.cache_read + pb.temp_written + pb.temp_read
    assert pb.per_layer["total"] == sum(layer)
    assert "exllamav2 0.3.2" in pb.derivation and ("repeat_kv" in pb.derivation) != flash
    if mode != "fp16":
        assert "q_to_fp16_kv" in pb.derivation


def test_qwen_totals_are_the_figures_the_course_quotes():
    assert model.position_bytes(QWEN).total == 2_162_688          # ~2.2 MB per position per token
    assert model.position_bytes(QWEN, flash_attn=True).total == 196_608  # ~0.2 MB
    assert model.position_bytes(QWEN, "q4").total == 2_414_592    # more than FP16


def test_no_repeat_kv_when_heads_match():
    mha = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 256,
           "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 512, "vocab_size": 1000,
           "max_position_embeddings": 2048}
    pb = model.position_bytes(mha)
    assert pb.per_layer.temp_written == 0 and pb.total == 2 * (2 * 256 * 2)


def _est(depth=30000, bandwidth_gbs=736, constants=None, spill=None, **settings):
    """The estimate for Qwen2.5-14B at 5.5 bpw at ``depth`` (``settings``: the LoadSetup's cache mode, path, host)."""
    w = weights.weight_bytes(QWEN, bpw=5.5)["vram_bytes"]
    return model.decode_estimate(LoadSetup(QWEN, **settings), depth, weight_bytes=w, bandwidth_gbs=bandwidth_gbs,
                                 spill=spill, constants=constants)


def test_position_bytes_split_into_attention_and_dequantization():
    q4 = model.position_bytes(QWEN, "q4", flash_attn=True)
    # dequantization: the Q4 cache read (1152 B) and the FP16 temp written (4096 B); attention reads the temp
    assert (q4.per_layer.dequant, q4.per_layer.attention) == (1152 + 4096, 4096)
    fp16 = model.position_bytes(QWEN, "fp16", flash_attn=False)
    assert (fp16.per_layer.dequant, fp16.per_layer.attention) == (0, 4096 + 2 * 20480)


def test_estimate_monotonic_behaviour():
    assert _est(flash_attn=True).tok_s > _est(flash_attn=False).tok_s
    assert _est(cache_mode="q4").tok_s < _est(cache_mode="fp16").tok_s  # deep, no flash-attn: Q4 is slower
    shallow = {m: _est(depth=0, cache_mode=m, flash_attn=f).tok_s for m in ("fp16", "q4") for f in (True, False)}
    assert len({round(v, 9) for v in shallow.values()}) == 1  # at depth 0 neither mode nor path matters
    assert _est(depth=128).tok_s > _est(depth=30000).tok_s
    assert _est(host="server").tok_s < _est(host="desktop").tok_s


def test_estimate_is_the_formula_with_the_fitted_constants():
    c = model.CONSTANTS
    w = weights.weight_bytes(QWEN, bpw=5.5)["vram_bytes"]
    e = _est()
    eta, bw = c["bandwidth_fraction"], 736e9
    assert e.label == "estimate" and set(e.seconds) == {"weights", "attention", "host", "hops", "pcie"}
    assert e.seconds["weights"] == pytest.approx(w / (eta * bw))
    assert e.seconds["attention"] == pytest.approx(30000 * 2_162_688 * c["torch_attn_cost"] / (eta * bw))
    assert e.seconds["host"] == pytest.approx(48 * c["layer_s_desktop"] * (1 + c["torch_host_extra"]))
    assert _est(flash_attn=True).seconds["host"] == pytest.approx(48 * c["layer_s_desktop"])
    assert e.seconds["hops"] == 0 and e.seconds["pcie"] == 0
    assert e.tok_s == pytest.approx(1 / sum(e.seconds.values()))
    # the likely range is the out-of-source percentiles around the central figure
    assert e.tok_s_low == pytest.approx(e.tok_s * c.range_low) and e.tok_s_high == pytest.approx(e.tok_s * c.range_high)
    assert c.range_low < 1 < c.range_high
    # the ceiling: the same bytes at the datasheet bandwidth, no host time
    assert e.ceiling_tok_s == pytest.approx(736e9 / (w + 30000 * 2_162_688))
    q = _est(cache_mode="q4", flash_attn=True)
    assert q.seconds["attention"] == pytest.approx(30000 * 48 * (4096 * c["flash_attn_cost"] + 5248 * c["dequant_cost"])
                                                   / (eta * bw))
    assert e.short() == f"{e.tok_s:.0f} tok/s (likely {e.tok_s_low:.0f}-{e.tok_s_high:.0f})"
    assert any("not known to the model" in a for a in e.assumptions)


def test_first_principles_constants_give_the_roofline():
    w = weights.weight_bytes(QWEN, bpw=5.5)["vram_bytes"]
    e = _est(constants=model.first_principles())
    assert e.tok_s == pytest.approx(736e9 / (w + 30000 * 2_162_688)) == pytest.approx(e.ceiling_tok_s)
    assert e.tok_s_low == e.tok_s == e.tok_s_high


def test_spill_goes_over_pcie():
    w = weights.weight_bytes(QWEN, bpw=5.5)["vram_bytes"]
    fp = model.first_principles()
    e = _est(spill=model.Spill(10**9, 2, 25), constants=fp)
    assert e.seconds["pcie"] == pytest.approx((10**9 + 2 * 4096 * 30000) / 25e9)
    assert e.seconds["weights"] == pytest.approx((w - 10**9) / 736e9)
    assert e.seconds["attention"] == pytest.approx((30000 * 2_162_688 - 2 * 4096 * 30000) / 736e9)
    with pytest.raises(CourseError, match="pcie_gbs"):
        _est(spill=model.Spill(10**9))
    with pytest.raises(CourseError):
        _est(bandwidth_gbs=0)
    with pytest.raises(CourseError, match="unknown host"):
        _est(host="laptop")


def test_depth_for_speed_inverts_the_estimate():
    w = weights.weight_bytes(QWEN, bpw=5.5)["vram_bytes"]
    d = model.depth_for_speed(LoadSetup(QWEN), 25, weight_bytes=w, bandwidth_gbs=736)
    e = model.decode_estimate(LoadSetup(QWEN), d, weight_bytes=w, bandwidth_gbs=736)
    assert e.tok_s == pytest.approx(25, abs=0.01)
    assert 1000 < d < 20000  # a 4080 Super without flash-attn: 25 tok/s some thousands of tokens deep, no spill
    assert model.depth_for_speed(LoadSetup(QWEN), 500, weight_bytes=w, bandwidth_gbs=736) == 0


def test_constants_file_damaged_is_one_line(tmp_path):
    bad = tmp_path / "constants.json"
    bad.write_text("{")
    with pytest.raises(CourseError, match="python -m helpers calibrate") as e:
        model.load_constants(bad)
    assert "\n" not in str(e.value)


def test_repeat_kv_copies_five_times_the_values_and_moves_eleven_times_the_bytes():
    """Notebook 01 prints both figures side by side: the copy holds 40 / 8 = 5x the cache's values, and reading the
    cache, writing the copy and reading it again moves 1 + 2 x 5 = 11x the bytes flash-attn moves."""
    slow, fast = model.position_bytes(QWEN, flash_attn=False), model.position_bytes(QWEN, flash_attn=True)
    assert slow.per_layer.temp_written / fast.per_layer.cache_read == 5
    assert slow.total / fast.total == 11
