"""The decode-vs-depth recording on the CPU: the 14B recording's code path (front door, speed harness, speed model)
run against the fake exllamav2 (tests/fake_exllamav2.py) with a fake clock, so every figure is known in advance."""
import dataclasses
import json
import types
from pathlib import Path

import pytest
import torch

from helpers.core import devices
from helpers.core.errors import CourseError
from helpers.memory.setup import LoadSetup
from helpers.recordings import decode_depth
from helpers.speed import harness
from helpers.speed.model import decode_estimate, position_bytes

pytest_plugins = ("fake_exllamav2",)   # fixtures fake_cuda, fake_exllamav2 (tests/fake_exllamav2.py)

MODEL = Path(__file__).parent / "fixtures" / "exl2" / "tiny_qwen2_b6.5"   # GQA: repeat_kv is counted
BANDWIDTH = 2.0e12
STEP_S = 0.010            # the fake step's fixed seconds
PER_POSITION_S = 2.0e-7   # and its seconds per position already in the cache: the slope the recording must find


@pytest.fixture
def fake_gpu_run(monkeypatch, fake_cuda, fake_exllamav2, tmp_path):
    """A CUDA machine faked around the harness: the fake exllamav2's forward advances a clock by STEP_S +
    PER_POSITION_S x the cache's depth; the bandwidth reads BANDWIDTH."""
    clock = [0.0]
    real_forward = fake_exllamav2.ExLlamaV2.forward

    def forward(self, ids, cache=None, **kw):
        clock[0] += STEP_S + PER_POSITION_S * cache.current_seq_len
        return real_forward(self, ids, cache, **kw)

    monkeypatch.setattr(fake_exllamav2.ExLlamaV2, "forward", forward)
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(harness, "measure_bandwidth", lambda *a, **k: BANDWIDTH)
    monkeypatch.setattr(harness, "_memory_before_load", lambda: {})
    monkeypatch.setattr(harness, "_device_name", lambda device: "Fake GPU 16GB")
    monkeypatch.setattr(harness, "flash_attn_installed", lambda: False)
    monkeypatch.setattr(decode_depth, "flash_attn_installed", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(devices, "nvml_used_bytes", lambda *a, **k: None)
    monkeypatch.setattr(devices, "device_summary", lambda: {"device": "cuda", "gpu_name": "Fake GPU 16GB",
                                                            "driver": "0", "cuda": "12.4"})
    return fake_exllamav2


@pytest.mark.parametrize("mode", ["fp16", "q4"])
def test_one_row_per_depth_through_the_front_door_with_the_model_s_prediction(fake_gpu_run, tmp_path, mode):
    setup = LoadSetup(MODEL, max_seq_len=decode_depth.MAX_SEQ_LEN, cache_mode=mode)
    measure = dataclasses.replace(decode_depth.MEASURE, profile_steps=0)
    path = decode_depth.record_decode_depth(setup, measure=measure, results_dir=tmp_path)
    assert path == tmp_path / "speed" / f"decode-depth-{mode}-fake-gpu-16gb.json"
    doc = json.loads(path.read_text())
    rows = doc["rows"]
    # one load, through the front door: no_sdpa config, the mode's cache class, lazy, load_autosplit, 32k tokens
    calls = fake_gpu_run.calls
    cls = {"fp16": "ExLlamaV2Cache", "q4": "ExLlamaV2Cache_Q4"}[mode]
    assert [c for c in calls if c[0] in ("cache", "load_autosplit")] == [("cache", cls, 32768, True),
                                                                          ("load_autosplit", cls)]
    assert [r["depth"] for r in rows] == [128, 4096, 16384, 30000]
    pb = position_bytes(MODEL, mode, flash_attn=False).total
    s = decode_depth.MEASURE
    for r in rows:
        assert r["kind"] == "decode_vs_depth" and r["cache_mode"] == mode and r["max_seq_len"] == 32768
        assert r["backend"] == "exllamav2" and r["flash_attn"] is False
        assert r["attention_path"] == "torch attention with repeat_kv" and r["position_bytes"] == pb
        # the fake clock: each step costs STEP_S + PER_POSITION_S x (depth + steps decoded so far)
        mean_depth = r["depth"] + (s.decode_tokens - 1) / 2
        assert r["decode_tok_s"] == pytest.approx(1 / (STEP_S + PER_POSITION_S * mean_depth))
        assert r["bandwidth_gbs"] == pytest.approx(BANDWIDTH / 1e9)
        est = decode_estimate(setup, r["depth"], weight_bytes=r["weights_bytes"], bandwidth_gbs=BANDWIDTH / 1e9)
        assert r["predicted_tok_s"] == pytest.approx(est.tok_s)
        assert r["predicted_tok_s_low"] <= r["predicted_tok_s"] <= r["predicted_tok_s_high"]
        assert r["measured_over_predicted"] == pytest.approx(r["decode_tok_s"] / est.tok_s)
        assert "fitted constants, at the measured bandwidth" in r["prediction"]
        assert r["inside_predicted_range"] == (r["predicted_tok_s_low"] <= r["decode_tok_s"]
                                               <= r["predicted_tok_s_high"])
    # the slope between neighbouring depths is the fake's per-position seconds, whatever the fixed cost
    assert "slope_s_per_position" not in rows[0]
    for prev, r in zip(rows, rows[1:]):
        assert r["slope_from_depth"] == prev["depth"]
        assert r["slope_s_per_position"] == pytest.approx(PER_POSITION_S, rel=1e-6)
        assert r["implied_position_bytes"] == pytest.approx(PER_POSITION_S * BANDWIDTH, rel=1e-6)
        assert r["implied_over_model"] == pytest.approx(PER_POSITION_S * BANDWIDTH / pb, rel=1e-6)
    summary = doc["slope"]
    assert summary["depths"] == [128, 30000] and summary["position_bytes"] == pb
    assert summary["slope_s_per_position"] == pytest.approx(PER_POSITION_S, rel=1e-6)
    assert summary["implied_position_bytes"] == pytest.approx(400_000, rel=1e-6)   # 2e-7 s x 2e12 B/s
    # provenance as the other recordings
    assert doc["provenance"]["gpu"] == "Fake GPU 16GB" and doc["provenance"]["command"]
    assert doc["settings"]["decode_tokens"] == s.decode_tokens and doc["settings"]["profile_steps"] == 0


def test_q4_costs_more_per_position_than_fp16_in_the_model():
    """What the recording tests: the speed model says a Q4 cache moves more bytes per position than FP16 without
    flash-attn (dequantized into the FP16 temp layer first), although it stores fewer."""
    fp16 = position_bytes("qwen2.5-14b", "fp16", flash_attn=False)
    q4 = position_bytes("qwen2.5-14b", "q4", flash_attn=False)
    assert q4.total > fp16.total and q4.cache_read < fp16.cache_read


def test_slope_of_two_points():
    assert decode_depth.slope((100, 50.0), (1100, 40.0)) == pytest.approx((1 / 40 - 1 / 50) / 1000)
    with pytest.raises(CourseError, match="two different depths"):
        decode_depth.slope((100, 50.0), (100, 40.0))


def test_refuses_flash_attn_and_a_cpu(monkeypatch, fake_cuda):
    monkeypatch.setattr(decode_depth, "flash_attn_installed", lambda: True)
    with pytest.raises(CourseError, match="flash-attn is installed"):
        decode_depth.record_decode_depth(LoadSetup(MODEL, max_seq_len=decode_depth.MAX_SEQ_LEN))


def test_refuses_without_cuda(monkeypatch):
    monkeypatch.setattr(devices, "cuda_status", lambda: {"available": False, "reason": "no GPU here",
                                                         "devices": []})
    for fn in decode_depth.GPU_RECORDINGS.values():
        with pytest.raises(CourseError, match="CUDA"):
            fn()


def test_one_recording_per_cache_mode():
    assert set(decode_depth.GPU_RECORDINGS) == {"decode_depth_fp16", "decode_depth_q4"}
    assert decode_depth.MAX_SEQ_LEN == 32768 and decode_depth.DEPTHS == (128, 4096, 16384, 30000)
    assert max(decode_depth.DEPTHS) + decode_depth.MEASURE.decode_tokens <= decode_depth.MAX_SEQ_LEN
