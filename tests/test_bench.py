"""helpers.speed: the roofline arithmetic, statistics, bad input, CPU bandwidth, and the harness on a fake clock."""
from __future__ import annotations

import json

import pytest
import torch

from helpers.core.errors import CourseError
from helpers.core.units import parse_token_list
from helpers.memory.setup import LoadSetup
from helpers.recordings import speed as speed_recordings
from helpers.speed import harness, matrix, profile, report, roofline


# --------------------------------------------------------------------------------------------- pure arithmetic
def test_roofline_is_bandwidth_over_bytes():
    # the seed case: ~9.7 GB of weights per token at 736 GB/s
    assert roofline.roofline_tok_s(9.7e9, 736e9) == pytest.approx(75.876, abs=1e-3)
    assert roofline.roofline_tok_s(2**30, 2**40) == 1024.0


@pytest.mark.parametrize("bad", [(0, 1e9), (-5, 1e9), (1e9, 0), (1e9, None)])
def test_roofline_rejects_nonsense(bad):
    with pytest.raises(CourseError):
        roofline.roofline_tok_s(*bad)


def test_summarize_median_and_spread():
    s = harness.summarize([100.0, 98.0, 102.0, 101.0, 99.0])
    assert s == {"median": 100.0, "min": 98.0, "max": 102.0, "spread": pytest.approx(0.04), "n": 5}
    assert harness.summarize([7.0])["spread"] == 0.0
    with pytest.raises(CourseError, match="nothing was measured"):
        harness.summarize([])


def test_run_to_run_uses_each_process_median():
    r = harness.run_to_run([60.0, 61.2, 59.4])
    assert r["processes"] == 3 and r["median_tok_s"] == 60.0
    assert r["spread"] == pytest.approx((61.2 - 59.4) / 60.0)


def test_parse_token_list():
    assert parse_token_list("4096,32768", "cache length") == [4096, 32768]
    assert parse_token_list("4k, 32k", "cache length") == [4096, 32768]
    assert parse_token_list("128,30_000", "depth") == [128, 30000]
    assert parse_token_list(512, "depth") == [512]
    with pytest.raises(CourseError, match="not a whole number"):
        parse_token_list("4096,lots", "cache length")
    with pytest.raises(CourseError, match="no depth"):
        parse_token_list(" , ", "depth")


# ------------------------------------------------------------------------------------------------- bad input
def test_depth_beyond_cache_says_what_the_cache_holds():
    with pytest.raises(CourseError, match="the cache holds 4096 tokens"):
        matrix.check_config(4096, 4096)
    with pytest.raises(CourseError, match="the cache holds 4096 tokens"):
        matrix.check_config(4096, 30000)
    matrix.check_config(4096, 4095)  # one position left: fine


def test_depth_plus_decoded_tokens_must_fit():
    with pytest.raises(CourseError, match="at most 4064"):
        matrix.check_config(4096, 4080, decode_tokens=32)
    matrix.check_config(4096, 4064, decode_tokens=32)


def test_exllamav2_cache_length_must_be_pageable():
    with pytest.raises(CourseError, match="blocks of 256 tokens.*4096 or 4352"):
        matrix.check_config(4100, 128, exllamav2=True)
    with pytest.raises(CourseError, match="such as 256"):
        matrix.check_config(100, 10, exllamav2=True)
    matrix.check_config(4100, 128, exllamav2=False)  # the reference has no pages
    matrix.check_config(32768, 30000, exllamav2=True)


@pytest.mark.parametrize("max_seq_len, near", [(4100, (4096, 4352)), (300, (256, 512)), (32767, (32512, 32768)),
                                               (1000, (768, 1024)), (100, (256,)), (1, (256,))])
def test_unpageable_cache_length_suggests_the_neighbouring_pages(max_seq_len, near):
    # the suggestions are the multiples of 256 on either side of the request (only the one above when below 256)
    with pytest.raises(CourseError) as info:
        matrix.check_config(max_seq_len, 0, exllamav2=True)
    suggested = tuple(int(n) for n in str(info.value).split("such as ")[1].split(" or "))
    assert suggested == near


def test_cli_errors_are_one_line_and_name_the_flag(capsys):
    from helpers.__main__ import main

    # what the CLI prints for a bad request: one 'error:' line, exit 2, before anything is loaded
    for flag in ("--max-seq-len", "--ctx"):
        assert main(["bench", "--model", str(FIXTURE), "--backend", "reference", flag, "512", "--depth", "600"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: depth 600 does not fit: the cache holds 512 tokens")
        assert "raise --max-seq-len or lower --depth" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where there is no GPU")
@pytest.mark.parametrize("kw", [dict(backend="exllamav2"), dict(cache_mode="q4"), dict(cache_mode="q8")])
def test_gpu_only_measurement_without_gpu(kw):
    with pytest.raises(CourseError, match="needs a CUDA GPU"):
        matrix.check_request(4096, 128, **kw)
    with pytest.raises(CourseError, match="needs a CUDA GPU"):
        matrix.plan_matrix([4096], [128], [kw.get("cache_mode", "fp16")], backend=kw.get("backend", "auto"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where there is no GPU")
def test_gpu_bandwidth_and_recordings_need_a_gpu():
    with pytest.raises(CourseError, match="needs a CUDA GPU"):
        roofline.measure_bandwidth("cuda")
    assert set(speed_recordings.GPU_RECORDINGS) == {"speed_embedded", "speed_14b_synthetic_fp16",
                                                    "speed_14b_synthetic_q4", "speed_repeatability"}
    for fn in speed_recordings.GPU_RECORDINGS.values():
        with pytest.raises(CourseError, match="needs a CUDA GPU"):
            fn()


def test_plan_matrix_skips_depths_that_do_not_fit():
    plan = matrix.plan_matrix([4096, 32768], [128, 30000], ["fp16"], decode_tokens=32, backend="reference")
    assert plan == [("fp16", 4096, [128]), ("fp16", 32768, [128, 30000])]
    with pytest.raises(CourseError, match="the cache holds 4096 tokens"):
        matrix.plan_matrix([4096], [30000], ["fp16"], backend="reference")
    with pytest.raises(CourseError, match="the cache holds 4096 tokens"):
        matrix.plan_matrix([4096, 32768], [30000], ["fp16"], backend="reference", skip_unfit=False)


# ------------------------------------------------------------------------------------------------- bandwidth
def test_cpu_bandwidth_is_measured_and_plausible():
    bw = roofline.measure_bandwidth("cpu", nbytes=64 * 2**20, repeats=3, cached=False)
    # a CPU's memory reads somewhere between 0.5 GB/s (a very slow, busy VM) and 1 TB/s (caches included)
    assert 5e8 < bw < 1e12
    # cached per device and size: the second call is the same number
    assert roofline.measure_bandwidth("cpu", nbytes=64 * 2**20, repeats=3) == roofline.measure_bandwidth(
        "cpu", nbytes=64 * 2**20, repeats=3)


# ------------------------------------------------------------------------------------- the harness, fake clock
class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class FakeBackend:
    """Implements the backend API the harness uses; every step advances a fake clock by a known time."""

    name, device, cache_mode, vocab_size, model_dir = "reference", "cpu", "fp16", 50, "/nowhere"

    def __init__(self, clock, max_seq_len=4096, step_s=0.010, per_token_prefill_s=0.001, jitter=()):
        self.clock, self.max_seq_len, self.step_s = clock, max_seq_len, step_s
        self.per_token_prefill_s, self.jitter = per_token_prefill_s, list(jitter)
        self.depth, self.calls, self.steps = 0, [], 0

    def fill_cache(self, depth, seed=0):
        self.calls.append(("fill", depth))
        self.depth = depth

    def forward(self, ids, reset=True):
        assert not reset
        self.calls.append(("forward", self.depth, ids.shape[1]))
        self.clock.t += self.per_token_prefill_s * ids.shape[1]
        self.depth += ids.shape[1]
        return torch.zeros(1, ids.shape[1], self.vocab_size)

    def decode_step(self, token_id=None):
        assert self.depth < self.max_seq_len
        self.steps += 1
        self.clock.t += self.step_s + (self.jitter.pop(0) if self.jitter else 0.0)
        self.depth += 1
        out = torch.zeros(self.vocab_size)
        out[(token_id + 1) % self.vocab_size] = 1.0  # greedy chain: the harness must feed back the argmax
        return out

    def synchronize(self):
        pass

    def memory(self):
        return {"process_rss_bytes": 123, "device": "cpu"}

    def cache_bytes(self):
        return 30 * 2 * self.max_seq_len * 3 * 64 * 4


@pytest.fixture
def fake(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(harness.time, "perf_counter", clock)
    # 1 GB of weights and 1 MB per cached position at a bandwidth of 10 GB/s
    monkeypatch.setattr(harness, "_decode_bytes_of", lambda b, depth: {
        "weights_bytes": 10**9, "kv_bytes": depth * 10**6, "position_bytes": 10**6, "flash_attn": False,
        "attention_path": "fake", "total_bytes": 10**9 + depth * 10**6, "counted": "fake"})
    return clock


def test_harness_numbers_on_a_fake_clock(fake):
    b = FakeBackend(fake, jitter=[0.0] * 16 + [0.002] * 8 + [0.0] * 8)
    row = harness.measure_loaded(b, 1000, harness.Measure(repeats=3, warmup=1, decode_tokens=8, prefill_tokens=16,
                                                            profile_steps=0),
                                 bandwidth_bytes_s=10e9, progress=False)
    # warm-up round first (8 steps, 10 ms), then three kept rounds: 10 ms, 12 ms, 10 ms per step
    assert row["decode_tok_s_all"] == pytest.approx([100.0, 1000 / 12, 100.0])
    assert row["decode_tok_s"] == pytest.approx(100.0)
    assert row["decode_spread"] == pytest.approx((100 - 1000 / 12) / 100)
    assert row["prefill_tok_s"] == pytest.approx(1000.0) and row["prefill_tokens"] == 16
    assert row["step_ms"] == pytest.approx(10.0) and row["cpu_ms_per_token"] == pytest.approx(10.0)
    assert row["gpu_ms_per_token"] is None and row["gpu_idle_fraction"] is None
    assert row["prefill_over_decode"] == pytest.approx(10.0)
    # roofline: 10 GB/s / 2 GB per token = 5 tok/s; measured 100 tok/s is 20x it (the fake is not physical)
    assert row["bytes_per_token"] == 2 * 10**9 and row["roofline_tok_s"] == pytest.approx(5.0)
    assert row["roofline_fraction"] == pytest.approx(20.0)
    assert row["bandwidth_gbs"] == pytest.approx(10.0)
    assert row["cache_bytes"] == 30 * 2 * 4096 * 3 * 64 * 4 and row["mem_after_run_process_rss_bytes"] == 123
    # each round sets the cache to the depth directly before it is timed (prefill, then decode)
    fills = [c for c in b.calls if c[0] == "fill"]
    assert fills == [("fill", 1000)] * 8
    assert [c for c in b.calls if c[0] == "forward"] == [("forward", 1000, 16)] * 4
    assert b.steps == 4 * 8


def test_harness_checks_depth_against_the_loaded_cache(fake):
    b = FakeBackend(fake, max_seq_len=4096)
    with pytest.raises(CourseError, match="the cache holds 4096 tokens"):
        harness.measure_loaded(b, 5000, progress=False, bandwidth_bytes_s=1e9)
    b.name = "exllamav2"
    b.max_seq_len = 4000
    with pytest.raises(CourseError, match="blocks of 256"):
        harness.measure_loaded(b, 128, progress=False, bandwidth_bytes_s=1e9)
    assert b.steps == 0


def test_prefill_is_shortened_to_what_fits(fake):
    b = FakeBackend(fake, max_seq_len=1024)
    row = harness.measure_loaded(b, 1000, harness.Measure(repeats=1, warmup=0, decode_tokens=4, prefill_tokens=512,
                                                            profile_steps=0),
                                 bandwidth_bytes_s=1e9, progress=False)
    assert row["prefill_tokens"] == 24
    row = harness.measure_loaded(b, 10, harness.Measure(repeats=1, warmup=0, decode_tokens=4, prefill_tokens=0,
                                                          profile_steps=0),
                                 bandwidth_bytes_s=1e9, progress=False)
    assert row["prefill_tok_s"] is None and row["prefill_tokens"] == 0


def test_profile_decode_on_cpu_measures_torch_ops():
    class Tiny(FakeBackend):
        def decode_step(self, token_id=None):
            a = torch.randn(256, 256)
            return (a @ a).sum(0)[: self.vocab_size]

    prof = profile.profile_decode(Tiny(FakeClock()), depth=5, steps=2)
    assert prof["gpu_busy_ms"] is None and prof["torch_ops_ms"] > 0


def test_format_rows_and_json_round_trip(fake):
    b = FakeBackend(fake)
    row = harness.measure_loaded(b, 128, harness.Measure(repeats=2, warmup=0, decode_tokens=4, prefill_tokens=8,
                                                           profile_steps=0),
                                 bandwidth_bytes_s=1e9, progress=False)
    text = report.format_rows([row])
    assert "4096" in text and "100.0 (100.0-100.0)" in text and "roofline" in text
    assert json.loads(json.dumps(row)) == row


# ------------------------------------------------------------------------------ the real reference, a fixture
FIXTURE = __import__("pathlib").Path(__file__).parent / "fixtures" / "exl2" / "tiny_llama_b4.5"


def test_bench_on_the_reference_backend_counts_its_bytes_exactly():
    measure = harness.Measure(backend="reference", device="cpu", repeats=2, warmup=1, decode_tokens=4,
                              prefill_tokens=8, profile_steps=2)
    rows = harness.bench_matrix(FIXTURE, max_seq_lens=[512], depths=[16, 400], cache_modes=["fp16"],
                                measure=measure, progress=False)
    assert [(r["max_seq_len"], r["depth"]) for r in rows] == [(512, 16), (512, 400)]
    # float32 on the CPU: 2 layers x (q,o 256x256; k,v 256x128; gate,up,down 256x768; 2 norms) + final norm + head
    per_layer = 2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 768 + 2 * 256
    weights = 4 * (2 * per_layer + 256 + 1024 * 256)
    kv_per_token = 2 * 2 * 2 * 64 * 4  # layers x (K, V) x kv heads x head_dim x 4 bytes
    for r in rows:
        assert r["backend"] == "reference" and r["device"] == "cpu" and r["cache_mode"] == "fp16"
        assert r["weights_bytes"] == weights and r["kv_read_bytes"] == kv_per_token * r["depth"]
        assert r["position_bytes"] == kv_per_token and r["attention_path"].startswith("reference")
        assert r["bytes_per_token"] == weights + kv_per_token * r["depth"]
        assert r["cache_bytes"] == kv_per_token * 512
        assert r["roofline_tok_s"] == pytest.approx(r["bandwidth_gbs"] * 1e9 / r["bytes_per_token"])
        assert r["roofline_fraction"] == pytest.approx(r["decode_tok_s"] / r["roofline_tok_s"])
        assert len(r["decode_tok_s_all"]) == 2 and r["decode_tok_s_min"] <= r["decode_tok_s"] <= r["decode_tok_s_max"]
        assert r["prefill_tokens"] == 8 and r["prefill_tok_s"] > 0
        assert r["torch_ops_ms_per_token"] > 0 and r["gpu_ms_per_token"] is None
        assert r["trained_positions"] == 2048 and r["beyond_trained_positions"] is False
        assert r["mem_loaded_process_rss_bytes"] > 0
    assert rows[1]["roofline_tok_s"] < rows[0]["roofline_tok_s"]  # deeper: more bytes per token


def test_cli_json_and_errors(capsys):
    from helpers.__main__ import main

    assert main(["bench", "--model", str(FIXTURE), "--backend", "reference", "--ctx", "256", "--depth", "8",
                 "--repeats", "1", "--warmup", "0", "--decode-tokens", "2", "--prefill-tokens", "0",
                 "--no-progress", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["provenance"]["device"] in ("cpu", "cuda") and doc["provenance"]["command"].startswith(
        "python -m helpers bench")
    assert len(doc["rows"]) == 1 and doc["rows"][0]["depth"] == 8
    # a matrix: what it leaves out and the course's warnings each come as one plain line, no Python source line
    assert main(["bench", "--model", str(FIXTURE), "--backend", "reference", "--ctx", "256,4096", "--depth", "8,300",
                 "--repeats", "1", "--warmup", "0", "--decode-tokens", "2", "--prefill-tokens", "0",
                 "--no-progress", "--json"]) == 0
    out = capsys.readouterr()
    assert [(r["max_seq_len"], r["depth"]) for r in json.loads(out.out)["rows"]] == [(256, 8), (4096, 8), (4096, 300)]
    assert "skipped 256@300: depth >= context\n" in out.err
    assert "warning: max_seq_len 4096 is beyond" in out.err and "warnings.warn" not in out.err
    assert "Warning:" not in out.err
    # depth beyond the cache: one line, exit 2, nothing loaded
    assert main(["bench", "--model", str(FIXTURE), "--backend", "reference", "--ctx", "256", "--depth", "300"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: depth 300 does not fit: the cache holds 256 tokens") and err.count("\n") == 1
    assert main(["bench", "--ctx", "4k", "--depth", "1", "--cache", "q5"]) == 2
    assert "unknown cache mode 'q5'" in capsys.readouterr().err
    assert main(["bench", "--ctx", "4096", "--depth", "12x"]) == 2
    assert "not a whole number" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- bytes per decoded token
def test_bytes_per_decoded_token_for_the_seed_model():
    from helpers.memory.weights import weight_bytes
    from helpers.specs.shapes import model_shape

    w = weight_bytes("qwen2.5-14b", bpw=5.5)["vram_bytes"]
    fp16 = roofline.decode_bytes("qwen2.5-14b", 30000, "fp16", bpw=5.5, flash_attn=True)
    # flash-attn reads the cache once: 48 layers x (K + V) x 8 KV heads x 128 x 2 bytes = 196,608 B per position
    assert fp16 == {"weights_bytes": w, "kv_bytes": 196_608 * 30000, "position_bytes": 196_608,
                    "total_bytes": w + 196_608 * 30000, "embedding_row_bytes": 5120 * 2}
    # without flash-attn (the default), repeat_kv also writes and reads K and V at 40 heads: 48 x 45,056 B
    assert roofline.decode_bytes("qwen2.5-14b", 30000, "fp16", bpw=5.5)["position_bytes"] == 2_162_688
    # the bytes per position are the speed model's, one place
    from helpers.speed.model import position_bytes

    for mode in ("fp16", "q4"):
        for fa in (True, False):
            got = roofline.decode_bytes("qwen2.5-14b", 7, mode, bpw=5.5, flash_attn=fa)
            assert got["kv_bytes"] == 7 * position_bytes("qwen2.5-14b", mode, fa).total
    assert roofline.bytes_per_decoded_token("qwen2.5-14b", 0, "fp16", bpw=5.5) == w
    # ~9.7 GB of weights at 736 GB/s (RTX 4080 Super): the decode ceiling of the seed case is ~76 tok/s
    assert 9.5e9 < w < 9.9e9
    assert 75 < roofline.roofline_tok_s(roofline.bytes_per_decoded_token("qwen2.5-14b", 128, bpw=5.5, flash_attn=True),
                                        736e9) < 76
    # without flash-attn 128 positions already cost ~0.28 GB more per token: ~73.7 tok/s
    assert 73 < roofline.roofline_tok_s(roofline.bytes_per_decoded_token("qwen2.5-14b", 128, bpw=5.5), 736e9) < 74
    with pytest.raises(CourseError, match="pass a model directory"):
        roofline.decode_bytes(model_shape("qwen2.5-14b"), 128)


def test_datasheet_bandwidth_from_driver_names():
    assert roofline.datasheet_bandwidth("NVIDIA GeForce RTX 4080 SUPER") == 736e9
    assert roofline.datasheet_bandwidth("NVIDIA H100 80GB HBM3") == 3350e9
    assert roofline.datasheet_bandwidth("Some Unknown Accelerator") is None
    assert roofline.datasheet_bandwidth(None) is None


# ------------------------------------------------------------------------------ recorded results and figures
def _gpu_row(ctx, depth, mode, tok_s, **kw):
    per = {"fp16": 196_608, "q4": 448_512}[mode]  # bytes per position with flash-attn (helpers.speed.model)
    cache_per = {"fp16": 196_608, "q4": 55_296}[mode]
    r = {"max_seq_len": ctx, "depth": depth, "cache_mode": mode, "backend": "exllamav2", "device": "cuda",
         "model": report.SYNTH_LABEL, "decode_tok_s": tok_s, "decode_tok_s_min": tok_s - 1,
         "decode_tok_s_max": tok_s + 1,
         "decode_spread": 2 / tok_s, "decode_tok_s_all": [tok_s - 1, tok_s, tok_s + 1], "prefill_tok_s": 2000.0,
         "step_ms": 1000 / tok_s, "gpu_ms_per_token": 4.0, "gpu_idle_fraction": 1 - 4.0 * tok_s / 1000,
         "kernel_launches_per_token": 400.0, "cpu_ms_per_token": 12.0, "profiled_ms_per_token": 20.0,
         "torch_ops_ms_per_token": 3.0, "weights_bytes": 9 * 2**30, "kv_read_bytes": per * depth,
         "position_bytes": per, "flash_attn": True, "bandwidth_gbs": 2000.0, "cache_bytes": cache_per * ctx,
         "cache_gib": cache_per * ctx / 2**30}
    r["bytes_per_token"] = r["weights_bytes"] + r["kv_read_bytes"]
    r["roofline_tok_s"] = 2000e9 / r["bytes_per_token"]
    r["roofline_fraction"] = tok_s / r["roofline_tok_s"]
    r.update(kw)
    return r


def test_recorded_rows_tables_and_repeatability(tmp_path):
    from helpers.core import results

    assert report.load_recorded(tmp_path) == []
    assert "not recorded yet" in report.describe_repeatability(tmp_path)
    prov = {"device": "cuda", "gpu": "Test GPU", "date": "2026-01-02T00:00:00", "torch": "t", "exllamav2": "0.3.2"}
    rows = [_gpu_row(4096, 128, "fp16", 60.0), _gpu_row(32768, 30000, "q4", 30.0)]
    results.save_result("speed", "matrix", rows, prov=prov, results_dir=tmp_path)
    rep = [_gpu_row(4096, 128, "fp16", v, process=i, decode_spread=s) for i, (v, s) in
           enumerate([(60.0, 0.01), (61.2, 0.02), (59.4, 0.015)])]
    results.save_result("speed", "rep", rep, prov=prov, results_dir=tmp_path,
                        extra={"what": "one config", "run_to_run": harness.run_to_run([60.0, 61.2, 59.4])})
    got = report.load_recorded(tmp_path)
    assert len(got) == 2 and all(r["gpu"] == "Test GPU" and "recorded on Test GPU" in r["label"] for r in got)
    assert len(report.load_recorded(tmp_path, include_repeatability=True)) == 5
    text = report.describe_repeatability(tmp_path)
    assert "1.0%, 2.0%, 1.5% (all under 3%)" in text and "medians 59.4-61.2 tok/s, (max-min)/median 3.0%" in text
    table = report.format_rows(got, where=True)
    # 2000 GB/s over 9 GiB + 30000 x 448,512 bytes (Q4, flash-attn) = 86.5 tok/s; 30 tok/s is 0.347 of it
    assert "Test GPU" in table and "86.5    0.347" in table
    split = report.format_time_split(got)
    assert "76%" in split and "400" in split  # GPU idle (1 - 4 ms / 16.67 ms) and launches per token


def test_speed_figures_draw_live_and_recorded_panels():
    from helpers import plots

    rec = [_gpu_row(4096, 128, "fp16", 60.0), _gpu_row(32768, 128, "fp16", 59.0),
           _gpu_row(32768, 30000, "fp16", 18.0), _gpu_row(32768, 30000, "q4", 30.0)]
    fig = plots.plot_speed_vs_depth({"live": rec[:2], "recorded": rec, "none yet": []})
    ax_live, ax_rec, ax_none = fig.axes
    # one roofline per (model, mode, device): 1 in the live panel, 2 (fp16, q4) in the recorded one
    assert sum("roofline" in (line.get_label() or "") for line in ax_rec.get_lines()) == 2
    assert sum("roofline" in (line.get_label() or "") for line in ax_live.get_lines()) == 1
    assert any("not recorded yet" in t.get_text() for t in ax_none.texts)
    fig2 = plots.plot_decode_time_split(rec)
    assert len(fig2.axes[0].patches) == 2 * len(rec)
    fig3 = plots.plot_cache_bytes_by_max_seq_len(rec)
    assert len(fig3.axes[0].patches) == 3  # fp16 4k, fp16 32k, q4 32k


def test_bench_in_a_fresh_process_returns_its_rows():
    once = harness.Measure(backend="reference", repeats=1, warmup=0, decode_tokens=2, prefill_tokens=0)
    setup = LoadSetup(FIXTURE, max_seq_len=256)
    rows = harness.bench_subprocess(setup, depth=8, measure=once, model_label="tiny fixture")
    assert len(rows) == 1 and rows[0]["model"] == "tiny fixture" and rows[0]["max_seq_len"] == 256
    with pytest.raises(CourseError, match="bench process for max_seq_len 256 depth 300 fp16 failed"):
        harness.bench_subprocess(setup, depth=300, measure=once)


def test_busy_time_is_the_union_of_intervals():
    assert profile.busy_time_us([]) == 0.0
    assert profile.busy_time_us([(0, 10), (20, 25)]) == 15.0
    assert profile.busy_time_us([(0, 10), (5, 12), (2, 3), (30, 31)]) == 13.0  # overlaps counted once


# ----------------------------------------------------------------------------------------- external records
def test_external_record_import_keeps_figures_and_says_external(tmp_path):
    import hashlib

    from helpers.core import results
    from helpers.speed.model import position_bytes

    src_doc = {"what": "w", "provenance": {"gpu": "NVIDIA H100 80GB HBM3", "driver": "1", "cuda_torch": "torch 2.11",
                                           "exllamav2": "0.3.2 (x)", "python": "3.12", "flash_attn": False,
                                           "date": "2026-11-25", "harness": "external: a script", "method": "m",
                                           "model": "Qwen2.5-14B shape (48 layers)"},
               "bandwidth": {"hbm_read_gbs": 2857}, "caveats": ["c"],
               "memory": {"x_gib": 10.73, "method": "NVML not usable (see TEAMNOTES.md section 5)"},
               "rows": [{"run": 1, "cache_len": 32768, "depth": 30000, "decode_tok_s": 18.1, "load_s": 9.1}]}
    src = tmp_path / "h100.json"
    src.write_text(json.dumps(src_doc))
    from helpers.recordings.speed import import_external

    path = import_external(src, results_dir=tmp_path / "results")
    doc = json.loads(path.read_text())
    assert "TEAMNOTES" not in path.read_text() and doc["memory"]["method"].endswith("(see the record's caveats)")
    assert doc["memory"]["x_gib"] == 10.73 and doc["bandwidth"] == {"hbm_read_gbs": 2857} and doc["caveats"] == ["c"]
    p = doc["provenance"]
    assert p["external"] and p["method"] == "m" and p["source_file"] == "h100.json"
    assert p["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert results.label(p).startswith("external: measured on NVIDIA H100 80GB HBM3, 2026-11-25")
    assert results.label({"gpu": "G", "date": "2026"}).startswith("recorded on G")
    (row,) = doc["rows"]
    assert (row["max_seq_len"], row["depth"], row["decode_tok_s"], row["load_s"]) == (32768, 30000, 18.1, 9.1)
    assert row["position_bytes"] == position_bytes("qwen2.5-14b").total and row["flash_attn"] is False
    got = report.load_recorded(tmp_path / "results")
    assert got[0]["external"] and got[0]["label"].startswith("external")
    assert "18.1" in report.format_rows(got, where=True)


def test_alternate_decode_interleaves_and_pairs_rounds(fake):
    a, b = FakeBackend(fake, step_s=0.010), FakeBackend(fake, max_seq_len=32768, step_s=0.020)
    rows = harness.alternate_decode({"4k": a, "32k": b}, [128, 4000], rounds=3, warmup=1, decode_tokens=4)
    assert [(r["name"], r["depth"]) for r in rows] == [("4k", 128), ("32k", 128), ("4k", 4000), ("32k", 4000)]
    assert all(len(r["tok_s_all"]) == 3 for r in rows) and rows[0]["tok_s"] == pytest.approx(100.0)
    # round 2 runs backwards: the last configuration of round 1 is the first of round 2
    assert [c for c in a.calls if c[0] == "fill"][:4] == [("fill", 128), ("fill", 4000), ("fill", 4000), ("fill", 128)]
    r = harness.paired_ratio(rows, ("32k", 128), ("4k", 128))
    assert r["median"] == pytest.approx(0.5) and r["best"] == pytest.approx(0.5) and r["rounds"] == 3
    assert rows[0]["best"] == pytest.approx(100.0)
    assert harness.paired_ratio(rows, ("32k", 128), ("4k", 128), key="tok_s_all")["median"] == pytest.approx(0.5)
    with pytest.raises(CourseError):
        harness.alternate_decode({"4k": a}, [5000], rounds=1)


def test_rows_table_shows_what_was_measured_and_says_external():
    """notebook 03's bench table: one row per bench row, rounded; a column no row measured is left out; a figure
    measured outside the course's harness says so beside its GPU."""
    rows = [_gpu_row(4096, 128, "fp16", 60.0, gpu="NVIDIA Test GPU", external=True),
            _gpu_row(32768, 30000, "q4", 30.0, gpu="NVIDIA Test GPU", external=True, prefill_tok_s=None)]
    t = report.rows_table(rows, where=True)
    assert list(t["measured on"]) == ["Test GPU (external)"] * 2
    assert list(t["decode tok/s"]) == [60.0, 30.0] and list(t["min-max"]) == ["59.0-61.0", "29.0-31.0"]
    assert t["roofline"].tolist() == [round(2000e9 / (9 * 2**30 + 128 * 196_608), 1),
                                      round(2000e9 / (9 * 2**30 + 30000 * 448_512), 1)]   # 86.5 for the Q4 row
    assert t["prefill tok/s"].tolist()[0] == 2000.0
    bare = [{k: v for k, v in r.items() if k not in ("prefill_tok_s", "decode_spread")} for r in rows]
    t = report.rows_table(bare)
    assert "prefill tok/s" not in t.columns and "spread" not in t.columns and "model" not in t.columns
    assert list(t.columns[:3]) == ["cache", "max_seq_len", "depth"]
