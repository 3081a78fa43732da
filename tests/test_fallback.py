"""The spill model's arithmetic, and the sysmem-fallback probe's decisions with faked CUDA/NVML answers."""
from __future__ import annotations

import pytest

from helpers.cli import probe as cli_probe
from helpers.core.errors import CourseError
from helpers.core.units import GIB, MIB
from helpers.fallback import pcie, probe, seed, spill

# ---------------------------------------------------------------------------------------------- spill model core


def _order():
    # embedding (CPU), two (attn + cache, mlp) layers, head: bytes chosen to make the walk easy to follow
    return [
        {"module": "embed", "weight_bytes": 500, "cache_bytes": 0, "device_hint": "cpu"},
        {"module": "l0.attn", "weight_bytes": 10, "cache_bytes": 40, "device_hint": "cuda"},
        {"module": "l0.mlp", "weight_bytes": 30, "cache_bytes": 0, "device_hint": "cuda"},
        {"module": "l1.attn", "weight_bytes": 10, "cache_bytes": 40, "device_hint": "cuda"},
        {"module": "l1.mlp", "weight_bytes": 30, "cache_bytes": 0, "device_hint": "cuda"},
        {"module": "head", "weight_bytes": 60, "cache_bytes": 0, "device_hint": "cuda"},
    ]


def test_place_first_fit_in_load_order():
    # 120 left for modules: l0 takes 50 + 30; l1.attn (50) does not fit in 40, l1.mlp (30) still does; head no
    p = spill.place(_order(), budget_bytes=150, fixed_bytes=30)
    assert [x["where"] for x in p] == ["cpu", "vram", "vram", "sysmem", "vram", "sysmem"]
    assert [x["vram_left_bytes"] for x in p] == [120, 70, 40, 40, 10, 10]
    # exactly full is still a fit: 130 = 50 + 30 + 50
    p = spill.place(_order(), budget_bytes=130)
    assert [x["where"] for x in p] == ["cpu", "vram", "vram", "vram", "sysmem", "sysmem"]
    assert p[3]["vram_left_bytes"] == 0
    p = spill.place(_order(), budget_bytes=10**6)
    assert all(x["where"] != "sysmem" for x in p)


def test_read_bytes_counts_weights_and_the_cache_up_to_depth():
    p = spill.place(_order(), budget_bytes=130)                   # l0 attn+mlp, l1.attn in VRAM; l1.mlp, head out
    assert [x["where"] for x in p][1:] == ["vram", "vram", "vram", "sysmem", "sysmem"]
    vram, sysmem = spill.read_bytes(p, depth=25, max_seq_len=100)  # a quarter of each cache layer
    assert vram == 10 + 10 + 30 + 10 + 10
    assert sysmem == 30 + 60
    assert spill.read_bytes(p, depth=0, max_seq_len=100) == (50, 90)
    with pytest.raises(CourseError):
        spill.read_bytes(p, depth=101, max_seq_len=100)


def test_seconds_per_token_and_evaluate():
    p = spill.place(_order(), budget_bytes=130)
    pred = spill.evaluate(p, depth=25, max_seq_len=100, overhead_s_per_token=0.5, vram_bandwidth=10.0,
                             pcie_bandwidth=1.0)
    assert pred.vram_read_bytes == 70 and pred.sysmem_read_bytes == 90
    assert pred.seconds_per_token == pytest.approx(0.5 + 7.0 + 90.0)
    assert pred.tok_s == pytest.approx(1 / 97.5)
    assert pred.spilled_bytes == 90 and pred.spilled_weight_bytes == 90 and pred.spilled_cache_bytes == 0
    assert pred.spilled_modules() == ["l1.mlp", "head"]
    assert pred.time_split_ms() == pytest.approx({"overhead_ms": 500.0, "vram_ms": 7000.0, "pcie_ms": 90000.0})
    with pytest.raises(CourseError):
        spill.seconds_per_token(1, 1, overhead_s_per_token=-1, vram_bandwidth=1, pcie_bandwidth=1)


def test_overhead_from_run_and_the_roofline_clamp():
    # 50 tok/s = 20 ms; 1 GB at 100 GB/s = 10 ms -> 10 ms overhead
    over, note = spill.overhead_from_run(50.0, 1e9, 100e9)
    assert over == pytest.approx(0.010) and note is None
    # the seed: 80 tok/s reported, ~9.7 GB per token at 736 GB/s: roofline ~75.9 tok/s -> no time left for overhead
    over, note = spill.overhead_from_run(80.0, 9.7e9, 736e9)
    assert over == 0.0
    assert "at or above the roofline of 75.9 tok/s" in note


def test_pcie_bandwidths():
    # by hand: gen 4 = 16 GT/s per lane, 128b/130b encoding, 16 lanes, 8 bits a byte: 16e9 x 128/130 x 16 / 8
    assert pcie.pcie_raw_bandwidth(4, 16) == pytest.approx(31_507_692_307.7, rel=1e-9)
    assert pcie.pcie_raw_bandwidth(5, 16) == pytest.approx(63_015_384_615.4, rel=1e-9)    # 32 GT/s: twice gen 4
    assert pcie.pcie_raw_bandwidth(3, 8) == pytest.approx(7_876_923_076.9, rel=1e-9)      # 8 GT/s x 8 lanes
    assert pcie.pcie_raw_bandwidth(1, 1) == pytest.approx(250e6)           # 2.5 GT/s, 8b/10b: the classic 250 MB/s
    assert pcie.pcie_raw_bandwidth(6, 16) == pytest.approx(121e9)          # 64 GT/s x 16 / 8 x 242/256 (FLIT)
    # in practice: "~25 GB/s" on gen 4 x16 (the seed's figure), scaling with the link
    assert pcie.pcie_practical_bandwidth(4, 16) == pytest.approx(25e9)
    assert pcie.pcie_practical_bandwidth(5, 16) == pytest.approx(50e9)
    assert pcie.pcie_practical_bandwidth(4, 8) == pytest.approx(12.5e9)
    # more lanes or a newer generation never reads slower, and practice never beats the raw rate
    for gen in range(1, 7):
        lanes = [pcie.pcie_raw_bandwidth(gen, n) for n in (1, 2, 4, 8, 16)]
        assert lanes == sorted(lanes) and pcie.pcie_practical_bandwidth(gen) < pcie.pcie_raw_bandwidth(gen)
    gens = [pcie.pcie_raw_bandwidth(g) for g in range(1, 7)]
    assert gens == sorted(gens)
    with pytest.raises(CourseError):
        pcie.pcie_raw_bandwidth(9)
    with pytest.raises(CourseError):
        pcie.pcie_raw_bandwidth(4, 3)


# ------------------------------------------------------------------------------------------------------ the probe
class OOM(RuntimeError):
    pass


OOM.__name__ = "OutOfMemoryError"


class FakeAnswers:
    """CUDA/NVML answers of a made-up machine. ``spill``: allocations past ``free`` succeed (slowly) instead of OOM."""

    def __init__(self, *, system="Windows", driver="551.86", model="WDDM", total=16 * GIB, free=15 * GIB,
                 spill=True, vram_gbs=700.0, sys_gbs=24.0, ram=64 * GIB, interrupt_after=None, gpu=True,
                 release="10"):
        self.system, self.release_name = system, release
        self._gpu = {"name": "NVIDIA GeForce RTX 4080 SUPER", "driver": driver, "driver_model": model,
                     "dedicated_bytes": total, "free_bytes": free} if gpu else None
        self.free_vram, self.spill, self.vram_gbs, self.sys_gbs, self.ram = free, spill, vram_gbs, sys_gbs, ram
        self.used = 0
        self.live: dict[int, tuple[int, bool]] = {}
        self.next_id = 0
        self.max_used = 0
        self.allocs = 0
        self.released = 0
        self.interrupt_after = interrupt_after

    def gpu(self):
        return self._gpu

    def ram_available_bytes(self):
        return self.ram

    def allocate(self, nbytes):
        if self.interrupt_after is not None and self.allocs >= self.interrupt_after:
            raise KeyboardInterrupt
        past = self.used + nbytes > self.free_vram
        if past and not self.spill:
            raise OOM("CUDA out of memory. Tried to allocate 256.00 MiB")
        self.allocs += 1
        self.used += nbytes
        self.max_used = max(self.max_used, self.used)
        self.next_id += 1
        self.live[self.next_id] = (nbytes, past)
        return self.next_id

    def read_bandwidth(self, handle):
        return (self.sys_gbs if self.live[handle][1] else self.vram_gbs) * 1e9

    def free(self, handle):
        n, _ = self.live.pop(handle)
        self.used -= n

    def release(self):
        self.released += 1


def test_probe_windows_fallback_active():
    a = FakeAnswers()
    rep = probe.run_probe(a, past_bytes=GIB, chunk_bytes=256 * MIB, python=r"C:\Python311\python.exe")
    assert rep.verdict == "fallback-active"
    assert rep.driver_has_fallback and rep.driver_has_policy_switch
    assert rep.allocated_bytes == 16 * GIB and rep.past_free_bytes == GIB
    assert a.max_used == 16 * GIB          # bounded: free VRAM + 1 GiB, never more
    assert a.live == {} and a.used == 0 and a.released == 1 and rep.freed
    assert rep.vram_read_gbs == pytest.approx(700.0) and rep.past_read_gbs == pytest.approx(24.0)
    text = rep.text()
    assert "SYSMEM FALLBACK ACTIVE" in text and "29x slower" in text
    assert "Prefer No Sysmem Fallback" in text and r"C:\Python311\python.exe" in text


def test_probe_windows_policy_set_raises_oom():
    a = FakeAnswers(spill=False)
    rep = probe.run_probe(a, past_bytes=GIB, chunk_bytes=256 * MIB)
    assert rep.verdict == "fallback-off"
    assert rep.refused_at_bytes == 15 * GIB and rep.past_free_bytes == 0
    assert a.live == {} and a.used == 0
    assert "NO FALLBACK" in rep.text()


def test_probe_old_driver_and_driver_without_policy_switch():
    rep = probe.run_probe(FakeAnswers(driver="531.79", spill=False), chunk_bytes=256 * MIB)
    assert rep.driver_has_fallback is False and rep.driver_has_policy_switch is False
    assert "predates 536.40" in rep.text() and rep.verdict == "fallback-off"
    rep = probe.run_probe(FakeAnswers(driver="537.13"), chunk_bytes=256 * MIB)
    assert rep.driver_has_fallback is True and rep.driver_has_policy_switch is False
    assert "needs 546.01" in rep.text() and rep.verdict == "fallback-active"


def test_probe_bounds_by_ram_and_frees_on_interrupt():
    a = FakeAnswers(ram=2 * GIB)                      # a quarter of 2 GiB: 0.5 GiB past the free VRAM at most
    rep = probe.run_probe(a, past_bytes=4 * GIB, chunk_bytes=256 * MIB)
    assert a.max_used == 15 * GIB + GIB // 2 and rep.past_free_bytes == GIB // 2
    a = FakeAnswers(interrupt_after=10)
    with pytest.raises(KeyboardInterrupt):
        probe.run_probe(a, chunk_bytes=256 * MIB)
    assert a.live == {} and a.used == 0 and a.released == 1


def test_probe_inconclusive_cases():
    # past the free reading, but just as fast: memory was there after all
    rep = probe.run_probe(FakeAnswers(sys_gbs=690.0), chunk_bytes=256 * MIB)
    assert rep.verdict == "inconclusive"
    # OOM long before the free VRAM is reached (another program took it)
    a = FakeAnswers(spill=False)
    a.free_vram = 4 * GIB
    rep = probe.run_probe(a, chunk_bytes=256 * MIB)
    assert rep.verdict == "inconclusive" and "below the free" in rep.text()


def test_probe_tcc_and_linux_allocate_nothing():
    a = FakeAnswers(model="TCC")
    rep = probe.run_probe(a)
    assert rep.verdict == "tcc" and a.allocs == 0
    a = FakeAnswers(system="Linux", driver="580.159.03", model=None, release="6.8.0")
    rep = probe.run_probe(a)
    assert rep.verdict == "not-windows" and a.allocs == 0
    assert "raises CUDA out-of-memory" in rep.text() and "WSL2" not in rep.text()
    rep = probe.run_probe(FakeAnswers(system="Linux", model=None, release="5.15.167.4-microsoft-standard-WSL2"))
    assert "WSL2" in rep.text()
    rep = probe.run_probe(FakeAnswers(system="Linux", gpu=False))
    assert rep.verdict == "no-gpu" and "no NVIDIA GPU" in rep.text() and "Windows (WDDM) driver" in rep.text()


def test_parse_driver_version():
    assert probe.parse_driver_version("551.86") == (551, 86)
    assert probe.parse_driver_version("580.159.03") == (580, 159)
    assert probe.parse_driver_version("546.01") >= probe.POLICY_DRIVER
    assert probe.parse_driver_version(None) is None and probe.parse_driver_version("n/a") is None


def test_main_probe_here_exits_cleanly(capsys):
    assert cli_probe.main(["--fallback"]) == 0
    out = capsys.readouterr().out
    assert "raises CUDA out-of-memory" in out or "nothing to probe" in out
    with pytest.raises(CourseError):
        cli_probe.main([])
    with pytest.raises(CourseError):
        cli_probe.main(["--fallback", "--max-gib", "-1"])


def test_main_probe_with_fake_windows_answers(capsys):
    assert cli_probe.main(["--fallback", "--max-gib", "0.5", "--json"], answers=FakeAnswers()) == 0
    import json

    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] == "fallback-active" and doc["past_free_bytes"] == GIB // 2


# ----------------------------------------------------------------------------------------- the model on real shapes
def test_predict_nothing_spills_at_4k_and_speed_is_the_roofline():
    p = spill.predict("qwen2.5-14b", "RTX 4080 Super", bpw=5.5, max_seq_len=4096, depth=0, reserve_gib=0.2)
    assert p.spilled_bytes == 0 and p.sysmem_read_bytes == 0
    from helpers.memory.weights import weight_bytes

    w = weight_bytes("qwen2.5-14b", bpw=5.5)["vram_bytes"]
    assert p.vram_read_bytes == w                     # every GPU weight once, nothing of the cache at depth 0
    # no overhead and nothing spilled: the roofline, ~9.7 GB per token at 736 GB/s = ~76 tok/s (the seed's ceiling)
    assert p.tok_s == pytest.approx(p.roofline_tok_s) and 74 < p.tok_s < 78
    assert p.pcie_bandwidth == pytest.approx(25e9) and p.vram_bandwidth == pytest.approx(736e9)


def test_predict_32k_spills_the_tail_of_the_load_order_and_round_trips():
    m = spill.SpillModel("RTX 4080 Super", reserve_gib=0.2, overhead_s_per_token=0.002)
    p = m.predict("qwen2.5-14b", bpw=5.5, max_seq_len=32768, depth=1000)
    spilled = p.spilled_modules()
    assert spilled[-1] == "lm_head" and all(s.startswith("model.layers.4") for s in spilled[:-1])
    lay = m.layout("qwen2.5-14b", bpw=5.5, max_seq_len=32768)
    demand = lay["fixed_bytes"] + sum(e["bytes"] for e in lay["order"] if e["device_hint"] != "cpu")
    over = demand - lay["budget_bytes"]
    assert over > 0 and over <= p.spilled_bytes < over + 200 * MIB     # what overflows, in whole modules
    # seconds per token is exactly the sum of its parts
    t = p.time_split_ms()
    assert 1e3 / p.tok_s == pytest.approx(t["overhead_ms"] + t["vram_ms"] + t["pcie_ms"])
    # asking for the predicted speed gives back the bytes read over PCIe (the tail, the norm aside)
    need = m.spill_needed_for(p.tok_s, "qwen2.5-14b", bpw=5.5, max_seq_len=32768, depth=1000)
    assert need["sysmem_read_bytes"] == pytest.approx(p.sysmem_read_bytes, rel=1e-3)
    assert need["modules"][0] == ("lm_head", 1.0)


def test_spill_needed_for_inverts_the_prediction():
    m = spill.SpillModel("RTX 4080 Super")
    need = m.spill_needed_for(25.0, "qwen2.5-14b", bpw=5.5, max_seq_len=32768, depth=0)
    from helpers.memory.weights import weight_bytes

    w = weight_bytes("qwen2.5-14b", bpw=5.5)["vram_bytes"]
    x = need["sysmem_read_bytes"]
    # reading x of the w bytes over PCIe (25 GB/s) and the rest from VRAM (736 GB/s) takes 40 ms: 25 tok/s
    assert spill.seconds_per_token(w - x, x, overhead_s_per_token=0.0, vram_bandwidth=736e9,
                                   pcie_bandwidth=25e9) == pytest.approx(1 / 25)
    assert 0.65e9 < x < 0.75e9        # ~0.69 GB a token: a small tail of the ~9.7 GB model
    assert need["spilled_weight_bytes"] == pytest.approx(x)   # at depth 0 only weights are read
    assert need["possible"]
    # slower targets need more over PCIe; faster than the roofline needs no spill at all
    assert m.spill_needed_for(20.0, "qwen2.5-14b", bpw=5.5, max_seq_len=32768, depth=0)["sysmem_read_bytes"] > x
    assert m.spill_needed_for(100.0, "qwen2.5-14b", bpw=5.5, max_seq_len=32768)["sysmem_read_bytes"] == 0


def test_seed_case_is_told_from_datasheet_and_readings():
    c = seed.seed_case()
    assert c["vram_bandwidth"] == 736e9 and c["pcie_bandwidth"] == pytest.approx(25e9)
    assert c["roofline_4k_tok_s"] < 80 < c["roofline_4k_tok_s"] * 1.1      # the report is at or above the roofline
    assert c["overhead_s_per_token"] == 0 and "at or above the roofline" in c["overhead_note"]
    assert c["prediction_4k"].spilled_bytes == 0
    p = c["prediction_32k"]
    assert p.spilled_bytes > 0 and p.tok_s < c["prediction_4k"].tok_s
    assert c["predicted_over_reported"] == pytest.approx(p.tok_s / 25.0)
    assert c["within_20pct"] == (abs(p.tok_s / 25.0 - 1) <= 0.2)
    rows = seed.seed_variants()
    assert [(r["load_path"], r["pcie"][:3]) for r in rows] == [("autosplit", "pra"), ("autosplit", "raw"),
                                                               ("load", "pra"), ("load", "raw")]
    assert rows[0]["tok_s"] == pytest.approx(p.tok_s)
    assert rows[1]["tok_s"] > rows[0]["tok_s"] and rows[3]["tok_s"] > rows[2]["tok_s"]   # faster PCIe, faster
    assert rows[2]["spilled_weight_gb"] == 0 < rows[0]["spilled_weight_gb"]


def test_model_load_path_spills_the_cache_tail_and_slows_with_depth():
    m = spill.SpillModel("RTX 4080 Super", reserve_gib=0.2, load_path="load")
    assert m.reserve_while_loading() == 0 and spill.SpillModel("x").reserve_while_loading() == 448 * MIB
    p = m.predict("qwen2.5-14b", bpw=5.5, max_seq_len=32768, depth=0)
    kinds = {q["kind"] for q in p.placement if q["where"] == "sysmem"}
    assert kinds == {"cache", "transient"} and p.spilled_weight_bytes == 0
    assert p.placement[-1]["module"] == "first forward's transients"
    assert p.sysmem_read_bytes == 0                       # depth 0: the spilled cache holds nothing yet
    lay = m.layout("qwen2.5-14b", bpw=5.5, max_seq_len=32768)
    assert lay["fixed_bytes"] == lay["terms"]["cuda_context_bytes"]
    demand = lay["fixed_bytes"] + sum(e["bytes"] for e in lay["order"] if e["device_hint"] != "cpu")
    assert demand - lay["budget_bytes"] <= p.spilled_bytes
    deep = m.predict("qwen2.5-14b", bpw=5.5, max_seq_len=32768, depth=16384)
    spilled_cache = sum(q["cache_bytes"] for q in p.placement if q["where"] == "sysmem")
    assert deep.sysmem_read_bytes == pytest.approx(spilled_cache / 2, abs=64)
    assert deep.tok_s < p.tok_s
    with pytest.raises(CourseError, match="unknown load path"):
        spill.SpillModel("RTX 4080 Super", load_path="fast").predict("qwen2.5-14b", bpw=5.5, max_seq_len=4096)


def test_depth_for_speed_solves_the_line():
    c = seed.seed_case(depth=0, load_path="load")
    d = seed.depth_for_speed(c, 25.0)
    p = c["prediction_32k"]
    at = spill.evaluate(p.placement, depth=d, max_seq_len=32768, overhead_s_per_token=0.0,
                           vram_bandwidth=p.vram_bandwidth, pcie_bandwidth=p.pcie_bandwidth)
    assert at.tok_s == pytest.approx(25.0, rel=1e-3)
    assert seed.depth_for_speed(c, 500.0) is None                     # faster than at depth 0
    assert seed.depth_for_speed(seed.seed_case(depth=0), 25.0) is None   # autosplit: slower from the start
    curves = seed.seed_depth_curves([0, 16384, 32767])
    assert curves["load"]["depth_at_reported"] == d and curves["autosplit"]["depth_at_reported"] is None
    assert curves["load"]["tok_s"][0] > curves["load"]["tok_s"][1] > curves["load"]["tok_s"][2]


def test_anchored_reserve():
    def reserve(used, full):
        return seed.anchored_reserve_gib("qwen2.5-14b", "RTX 4080 Super", bpw=5.5, used_gib=used, full_gib=full)

    res, how = reserve(12.0, 15.8)
    assert "16 GiB card - 15.8 GiB used when full = 0.20 GiB never used" in how
    # the seed's readings leave little: the 0.2 GiB never used and a little held by the rest of the system
    assert 0.2 < res < 1.0 and how.endswith(f"reserve {res:.2f} GiB")
    # every GiB more in use at 4k is a GiB more held by others; every GiB more used when full is one less unused
    assert reserve(13.0, 15.8)[0] == pytest.approx(res + 1.0)
    assert reserve(12.0, 15.3)[0] == pytest.approx(res + 0.5)
    # a reading below what the process itself holds cannot make the reserve negative
    res, how = reserve(5.0, 16.0)
    assert res == 0.0 and how.endswith("taken as 0")


def test_plots_draw_the_seed_case():
    from helpers import plots

    c = seed.seed_case()
    fig = plots.plot_spill_walk(c["prediction_32k"])
    ax = fig.axes[0]
    assert "spilled" in ax.get_title() and ax.get_ylabel() == "VRAM taken so far (GiB)"
    red = [p for p in ax.patches if p.get_facecolor()[:3] == pytest.approx((0.839, 0.153, 0.157), abs=0.01)]
    assert len(red) == len(c["prediction_32k"].spilled_modules())
    fig = plots.plot_time_per_token({"4k": c["prediction_4k"], "32k": c["prediction_32k"]}, {"32k": 25})
    assert fig.axes[0].get_xlabel() == "ms per decoded token"
    fig = plots.plot_speed_vs_spill(c)
    assert fig.axes[0].get_ylabel() == "decode tok/s"
    fig = plots.plot_spill_vs_depth(seed.seed_depth_curves([0, 16384, 32767]), reported=25)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 4 and "deep" in ax.texts[0].get_text()   # two paths, one reported marker, 25 line
    import matplotlib.pyplot as plt

    plt.close("all")
