"""The spill model's arithmetic, and the sysmem-fallback probe's decisions with faked CUDA/NVML answers."""
from __future__ import annotations

import pytest

from helpers.cli import probe as cli_probe
from helpers.core.errors import CourseError
from helpers.core.units import GIB, MIB
from helpers.fallback import pcie, probe, seed, spill
from helpers.memory.setup import LoadSetup
from helpers.speed.model import CONSTANTS, Spill, first_principles

PCIE4 = 23.85e9   # PCIe 4.0 x16 in practice: 31.5 GB/s raw x the 47.7/63.0 share the external H100 record measured
REPEAT_KV = "repeat_kv copy (one layer's K/V at every query head)"

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


#: the seed's load: Qwen2.5-14B at 5.5 bpw, a 32k FP16 cache, on a 16 GB RTX 4080 Super, 0.2 GiB OS reserve
SEED = LoadSetup("qwen2.5-14b", bpw=5.5, max_seq_len=32768, gpus="RTX 4080 Super", reserve_gib=0.2)


def _toy_eval(p, depth=25, constants=None, **settings):
    # toy byte counts on a real shape: at 1 B/s VRAM and 0.5 B/s PCIe the speed model's seconds are the bytes
    model = spill.SpillModel(LoadSetup("qwen2.5-14b", max_seq_len=100, **settings), vram_bandwidth=1.0,
                             pcie_bandwidth=0.5, constants=constants)
    return spill.evaluate(p, model, depth)


def test_evaluate_takes_its_time_from_the_speed_model():
    from helpers.speed.model import decode_estimate

    p = spill.place(_order(), budget_bytes=130)
    pred = _toy_eval(p, depth=0, constants=first_principles(0.5 / 48))   # 0.5 s of host time over 48 layers
    assert pred.vram_read_bytes == 50 and pred.sysmem_read_bytes == 90      # counted here, at depth 0: weights
    # by hand: 0.5 s overhead + 50 B of weights at 1 B/s + 90 B of spilled weights at 0.5 B/s = 230.5 s
    assert pred.seconds_per_token == pytest.approx(0.5 + 50 + 180)
    assert pred.time_split_ms() == pytest.approx({"host_ms": 500.0, "vram_ms": 50e3, "pcie_ms": 180e3})
    est = decode_estimate(LoadSetup("qwen2.5-14b"), 0, weight_bytes=140, bandwidth_gbs=1e-9,
                          constants=first_principles(0.5 / 48), spill=Spill(90, 0, 0.5e-9))
    assert pred.tok_s == pytest.approx(est.tok_s) and pred.seconds == pytest.approx(est.seconds)
    assert pred.spilled_bytes == 90 and pred.spilled_weight_bytes == 90 and pred.spilled_cache_bytes == 0
    assert pred.spilled_modules() == ["l1.mlp", "head"] and pred.placement == "first_come"
    # by default the speed model's fitted constants: the host time is never a silent 0
    # (torch attention, no flash-attn: the host does its extra small ops too)
    assert _toy_eval(p).seconds["host"] == pytest.approx(48 * CONSTANTS["layer_s_desktop"]
                                                         * (1 + CONSTANTS["torch_host_extra"]))
    assert CONSTANTS["layer_s_desktop"] > 0
    with pytest.raises(CourseError, match="unknown host"):
        _toy_eval(p, host="laptop")
    assert _toy_eval(p, host="server").seconds["host"] > _toy_eval(p).seconds["host"]


def test_placement_first_come_vs_first_touch():
    from helpers.fallback import placement

    order = [{"module": "ctx", "kind": "device_context", "scratch_bytes": 10},
             {"module": "scratch", "kind": "dequant_scratch", "scratch_bytes": 40},
             {"module": "l0", "kind": "attention", "weight_bytes": 30, "cache_bytes": 20},
             {"module": "head", "kind": "head", "weight_bytes": 30}]
    # budget 100: first come: ctx 10 + scratch 40 + l0 50 = 100, the head (made last) spills
    first = spill.place(order, 100, placement="first_come")
    assert [p["where"] for p in first] == ["vram", "vram", "vram", "sysmem"]
    # first touch: what decode touches first (ctx, l0, head: 90), the untouched scratch gets the 10 left: spills
    touch = spill.place(order, 100, placement="first_touch")
    assert [p["where"] for p in touch] == ["vram", "sysmem", "vram", "vram"]
    assert [p["module"] for p in touch] == ["ctx", "scratch", "l0", "head"]       # the order given is kept
    assert placement.touched_by_decode("head") and not placement.touched_by_decode("load_reserve")
    with pytest.raises(CourseError, match="unknown placement"):
        spill.place(order, 100, placement="lazy")


def test_placement_on_the_seed_card():
    seed = LoadSetup("qwen2.5-14b", bpw=5.5, max_seq_len=32768, gpus="RTX 4080 Super", reserve_gib=0.26)
    come = spill.SpillModel(seed, placement="first_come").predict(256)
    touch = spill.SpillModel(seed, placement="first_touch").predict(256)
    # the last module loaded spills, and so does the repeat_kv copy decode makes afterwards (no flash-attn)
    assert come.spilled_weight_bytes > 0 and come.spilled_modules()[-2:] == ["lm_head", REPEAT_KV]
    # first touch: the 1 GiB dequant scratch and the prompt's transients leave, and the repeat_kv copy decode
    # makes last finds no room; no weight or cache layer a token reads does
    assert set(touch.spilled_modules()) == {"dequantization scratch (device context)",
                                            "prompt transients (attention matrix, hidden state)",
                                            "repeat_kv copy (one layer's K/V at every query head)"}
    assert touch.sysmem_read_bytes == 0 and touch.spilled_bytes > GIB
    assert touch.tok_s > 3 * come.tok_s
    lay = spill.SpillModel(seed.with_(reserve_gib=None), placement="first_touch").layout()
    assert lay["terms"]["load_reserve_bytes"] == 0 and "never written" in lay["notes"][-1]


def test_overhead_from_run_and_a_reading_above_the_bound():
    from helpers.memory.weights import weight_bytes

    w = weight_bytes("qwen2.5-14b", bpw=5.5)["vram_bytes"]
    # 50 tok/s = 20 ms; the weights at 736 GB/s take w / 736e9 s at depth 0 -> the rest is overhead
    over, note = spill.overhead_from_run(50.0, LoadSetup("qwen2.5-14b"), weight_bytes=w, vram_bandwidth=736e9)
    assert over == pytest.approx(0.020 - w / 736e9) and note is None
    # the seed's 80 tok/s is above what the bytes allow: not a clean decode, and no overhead can be read from it
    over, note = spill.overhead_from_run(80.0, LoadSetup("qwen2.5-14b"), weight_bytes=w, vram_bandwidth=736e9)
    assert over == 0.0 and "not a clean decode" in note and "do not use 0" in note


def test_pcie_bandwidths():
    # by hand: gen 4 = 16 GT/s per lane, 128b/130b encoding, 16 lanes, 8 bits a byte: 16e9 x 128/130 x 16 / 8
    assert pcie.pcie_raw_bandwidth(4, 16) == pytest.approx(31_507_692_307.7, rel=1e-9)
    assert pcie.pcie_raw_bandwidth(5, 16) == pytest.approx(63_015_384_615.4, rel=1e-9)    # 32 GT/s: twice gen 4
    assert pcie.pcie_raw_bandwidth(3, 8) == pytest.approx(7_876_923_076.9, rel=1e-9)      # 8 GT/s x 8 lanes
    assert pcie.pcie_raw_bandwidth(1, 1) == pytest.approx(250e6)           # 2.5 GT/s, 8b/10b: the classic 250 MB/s
    assert pcie.pcie_raw_bandwidth(6, 16) == pytest.approx(121e9)          # 64 GT/s x 16 / 8 x 242/256 (FLIT)
    # in practice: the share the external H100 record measured (47.7 of 63.0 GB/s on gen 5 x16), scaling with the link
    assert pcie.pcie_practical_bandwidth(5, 16) == pytest.approx(47.7e9)
    assert pcie.pcie_practical_bandwidth(4, 16) == pytest.approx(47.7e9 / 2) == pytest.approx(23.85e9)
    assert pcie.pcie_practical_bandwidth(4, 8) == pytest.approx(47.7e9 / 4)
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
                 release="10", placement="first_come"):
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
        self.placement, self.untouched = placement, set()

    def gpu(self):
        return self._gpu

    def ram_available_bytes(self):
        return self.ram

    def free_vram_bytes(self):
        # what the driver has committed: everything, or (first_touch) only what was written
        held = sum(n for h, (n, _) in self.live.items() if self.placement == "first_come" or h not in self.untouched)
        return max(0, self.free_vram - held)

    def touch(self, handle):
        self.untouched.discard(handle)

    def allocate(self, nbytes, touch=True):
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
        if not touch:
            self.untouched.add(self.next_id)
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


def test_probe_reports_the_placement_the_driver_follows():
    rep = probe.run_probe(FakeAnswers(placement="first_come"), chunk_bytes=256 * MIB)
    assert rep.placement_observed == "first_come" == rep.placement_assumed
    assert "lowered the free VRAM by 256 MiB when made, 0 MiB more when written" in rep.text()
    a = FakeAnswers(placement="first_touch")
    rep = probe.run_probe(a, chunk_bytes=256 * MIB)
    assert rep.placement_observed == "first_touch" and "use placement='first_touch'" in rep.text()
    assert a.live == {} and a.used == 0                  # the placement chunk is freed too
    rep = probe.run_probe(FakeAnswers(placement="first_touch"), chunk_bytes=256 * MIB, placement="first_touch")
    assert rep.placement_assumed == "first_touch" and "use placement" not in rep.text()
    with pytest.raises(CourseError, match="unknown placement"):
        probe.run_probe(FakeAnswers(), placement="never")


def test_driver_wording_is_one_phrasing():
    assert probe.DRIVER_WORDING == ('the fallback exists since driver 536.40; the policy switch ("CUDA - Sysmem '
                                    'Fallback Policy") since 546.01')
    assert probe.DRIVER_WORDING in "\n".join(probe.LINUX_LINES + probe.POLICY_STEPS)


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
    assert doc["placement_assumed"] == "first_come" and doc["placement_observed"] == "first_come"
    assert cli_probe.main(["--fallback", "--placement", "first_touch", "--json"],
                          answers=FakeAnswers(placement="first_touch")) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["placement_assumed"] == doc["placement_observed"] == "first_touch"


# ----------------------------------------------------------------------------------------- the model on real shapes
def test_predict_nothing_spills_at_4k_and_speed_is_the_speed_models():
    p = spill.SpillModel(SEED.with_(max_seq_len=4096), constants=first_principles()).predict(0)
    assert p.spilled_bytes == 0 and p.sysmem_read_bytes == 0
    from helpers.memory.weights import weight_bytes

    w = weight_bytes("qwen2.5-14b", bpw=5.5)["vram_bytes"]
    assert p.vram_read_bytes == w                     # every GPU weight once, nothing of the cache at depth 0
    # no overhead, nothing spilled, depth 0: the roofline, ~9.7 GB per token at 736 GB/s = ~76 tok/s
    assert p.tok_s == pytest.approx(736e9 / w) and 74 < p.tok_s < 78
    assert p.pcie_bandwidth == pytest.approx(PCIE4) and p.vram_bandwidth == pytest.approx(736e9)


def test_predict_32k_spills_the_tail_of_the_load_order_and_round_trips():
    m = spill.SpillModel(SEED, constants=first_principles(0.002 / 48))
    p = m.predict(1000)
    spilled = p.spilled_modules()
    assert spilled[-2:] == ["lm_head", REPEAT_KV] and all(s.startswith("model.layers.4") for s in spilled[:-2])
    lay = m.layout()
    demand = lay["fixed_bytes"] + sum(e["bytes"] for e in lay["order"] if e["device_hint"] != "cpu")
    over = demand - lay["budget_bytes"]
    assert over > 0 and over <= p.spilled_bytes < over + 200 * MIB     # what overflows, in whole modules
    # seconds per token is exactly the sum of the speed model's terms
    t = p.time_split_ms()
    assert 1e3 / p.tok_s == pytest.approx(t["host_ms"] + t["vram_ms"] + t["pcie_ms"])
    assert p.spilled_cache_layers == sum(1 for q in p.modules if q["where"] == "sysmem" and q["cache_bytes"])
    # asking for the predicted weights-only speed gives back the spilled weight bytes
    w_only = p.estimate(spill=Spill(p.spilled_weight_bytes, 0, p.pcie_bandwidth / 1e9)).tok_s
    need = m.spill_needed_for(w_only, 1000)
    assert need["sysmem_read_bytes"] == pytest.approx(p.spilled_weight_bytes, rel=1e-6)
    assert need["modules"][0] == ("lm_head", 1.0)


def test_spill_needed_for_inverts_the_prediction():
    m = spill.SpillModel(SEED.with_(reserve_gib=None), constants=first_principles())
    need = m.spill_needed_for(25.0, 0)
    from helpers.memory.weights import weight_bytes

    w = weight_bytes("qwen2.5-14b", bpw=5.5)["vram_bytes"]
    x = need["sysmem_read_bytes"]
    # by hand: (w - x) / 736 GB/s + x / 23.85 GB/s = 40 ms
    assert (w - x) / 736e9 + x / PCIE4 == pytest.approx(1 / 25)
    assert 0.65e9 < x < 0.75e9        # ~0.69 GB a token: a small tail of the ~9.7 GB model
    assert need["spilled_weight_bytes"] == pytest.approx(x) and need["possible"]
    assert m.spill_needed_for(20.0, 0)["sysmem_read_bytes"] > x
    assert m.spill_needed_for(100.0)["sysmem_read_bytes"] == 0


def test_seed_case_takes_no_overhead_from_the_80():
    c = seed.seed_case()
    assert c["vram_bandwidth"] == 736e9 and c["pcie_bandwidth"] == pytest.approx(PCIE4)
    p4, p = c["prediction_4k"], c["prediction_32k"]
    assert p4.host == "desktop" and p4.seconds["host"] == pytest.approx(
        48 * CONSTANTS["layer_s_desktop"] * (1 + CONSTANTS["torch_host_extra"]))
    assert p4.spilled_bytes == 0 and p.spilled_bytes > 0 and p.tok_s < p4.tok_s
    assert c["predicted_over_reported"] == pytest.approx(p.tok_s / 25.0)
    rc = seed.roofline_check()
    # by hand: 80 / (736 GB/s / (weights + 256 positions x 48 layers x 4096 B)) = 1.06
    assert rc["bytes_per_token"] == rc["weight_bytes"] + 256 * 48 * 4096
    assert rc["reported_over_roofline"] == pytest.approx(80 * rc["bytes_per_token"] / 736e9)
    assert 1.05 < rc["reported_over_roofline"] < 1.07 and 1.2 < rc["reported_over_realistic"] < 1.3
    rows = seed.seed_variants()
    assert [(r["load_path"], r["placement"]) for r in rows] == [("autosplit", "first_come"),
                                                                ("autosplit", "first_touch"),
                                                                ("load", "first_come"), ("load", "first_touch")]
    assert rows[0]["tok_s"] == pytest.approx(p.tok_s) and rows[0]["tok_s_raw_pcie"] > rows[0]["tok_s"]
    assert rows[2]["spilled_weight_gb"] == 0 < rows[0]["spilled_weight_gb"]
    assert rows[1]["sysmem_read_gb"] == 0 == rows[3]["sysmem_read_gb"]     # first touch: nothing read spills


def test_model_load_path_spills_the_cache_tail_and_slows_with_depth():
    m = spill.SpillModel(SEED, load_path="load")
    assert m.reserve_while_loading() == 0 and spill.SpillModel(SEED).reserve_while_loading() == 448 * MIB
    p = m.predict(0)
    kinds = {q["kind"] for q in p.modules if q["where"] == "sysmem"}
    assert kinds == {"cache", "transient", "repeat_kv"} and p.spilled_weight_bytes == 0
    assert [q["module"] for q in p.modules[-2:]] == ["first forward's transients", REPEAT_KV]
    assert p.sysmem_read_bytes == 0 and p.seconds["pcie"] == 0     # depth 0: the spilled cache holds nothing yet
    lay = m.layout()
    assert lay["fixed_bytes"] == lay["terms"]["cuda_context_bytes"]
    deep = m.predict(16384)
    spilled_cache = sum(q["cache_bytes"] for q in p.modules if q["where"] == "sysmem")
    assert deep.sysmem_read_bytes == pytest.approx(spilled_cache / 2, abs=64)
    # by hand: the spilled layers' cache up to the depth crosses PCIe: layers x 16384 x 4096 B / 23.85 GB/s
    assert deep.seconds["pcie"] == pytest.approx(deep.spilled_cache_layers * 16384 * 4096 / PCIE4)
    assert deep.tok_s < p.tok_s
    with pytest.raises(CourseError, match="unknown load path"):
        spill.SpillModel(SEED, load_path="fast").predict()


def test_depth_at_bisects_a_falling_speed():
    assert seed.depth_at(lambda d: 100 - d / 100, 25.0) == 7500
    assert seed.depth_at(lambda d: 20.0, 25.0) == 0 and seed.depth_at(lambda d: 90.0, 25.0) is None
    c = seed.seed_case(depth=0, load_path="load")
    d = seed.depth_for_speed(c, 25.0)
    assert c["prediction_32k"].at_depth(d).tok_s == pytest.approx(25.0, rel=1e-3)
    assert seed.depth_for_speed(seed.seed_case(depth=0), 25.0) == 0   # autosplit, first come: slower from the start


def _by_hand(depth, *, flash, spilled=0.0):
    """The speed model for the seed, written out with its fitted constants: weights/(eta 736 GB/s) + depth x bytes
    per position x k_path/(eta 736 GB/s) + 48 layers x h_desktop + spilled weights/23.85 GB/s."""
    from helpers.memory.weights import weight_bytes

    c = CONSTANTS
    bw = c["bandwidth_fraction"] * 736e9
    w = weight_bytes("qwen2.5-14b", bpw=5.5)["vram_bytes"]
    per_pos = 48 * (4096 if flash else 4096 + 2 * 2 * 40 * 128 * 2)     # + repeat_kv: 40 heads written and read
    k = c["flash_attn_cost"] if flash else c["torch_attn_cost"]
    host = 48 * c["layer_s_desktop"] * (1 if flash else 1 + c["torch_host_extra"])
    return 1 / ((w - spilled) / bw + depth * per_pos * k / bw + host + spilled / PCIE4)


def test_hypothesis_rows_are_hand_checkable():
    rows = {r["id"]: r for r in seed.hypotheses(256)}
    assert list(rows) == ["a", "b", "c", "c'", "d", "e", "b+d", "f", "g"]
    for r in rows.values():
        assert r["hypothesis"] and r["must_be_true"] and r["prediction"] and r["observation"]
        assert r["tok_s_low"] <= r["tok_s"] <= r["tok_s_high"]
    from helpers.memory.weights import weight_bytes

    head = weight_bytes("qwen2.5-14b", bpw=5.5)["lm_head_bytes"]
    # (d) and (e): no spill, by hand at 256 deep
    assert rows["d"]["tok_s"] == pytest.approx(_by_hand(256, flash=False))
    assert rows["e"]["tok_s"] == pytest.approx(_by_hand(256, flash=True))
    # (c') only the lm_head over PCIe: ~26 tok/s already at a short depth
    assert rows["c'"]["tok_s"] == pytest.approx(_by_hand(256, flash=True, spilled=head))
    # (d) gives 25 tok/s at the depth where the line crosses 1/25 s; (e) never within 32k
    d = rows["d"]["depth_for_25"]
    assert _by_hand(d, flash=False) == pytest.approx(25.0, rel=1e-3) and 1000 < d < 20000
    assert rows["e"]["depth_for_25"] is None and _by_hand(32767, flash=True) > 25
    # the likely range's slow end reaches 25 tok/s earlier, its fast end later
    assert rows["d"]["depth_for_25_early"] < d < rows["d"]["depth_for_25_late"]
    # (a) first come: slower than 25 from the first token; by hand from what spilled (weights every token, the
    # spilled cache layers' 256 positions over PCIe); (c) first touch: nothing read spills, as fast as (e)
    a = spill.SpillModel(seed.seed_setup(flash_attn=True)).predict(256)
    pcie_cache = a.spilled_cache_layers * 256 * 4096
    w = weight_bytes("qwen2.5-14b", bpw=5.5)["vram_bytes"]
    c = CONSTANTS
    bw = c["bandwidth_fraction"] * 736e9
    by_hand = 1 / ((w - a.spilled_weight_bytes) / bw + (256 * 48 * 4096 - pcie_cache) * c["flash_attn_cost"] / bw
                   + 48 * c["layer_s_desktop"] + (a.spilled_weight_bytes + pcie_cache) / PCIE4)
    assert rows["a"]["tok_s"] == pytest.approx(by_hand) and 5 < by_hand < 25
    assert rows["a"]["depth_for_25"] == 0 and rows["a"]["tok_s"] < 25
    assert rows["c"]["tok_s"] == pytest.approx(rows["e"]["tok_s"]) and rows["c"]["depth_for_25"] is None
    # (b) model.load(): fast when shallow, 25 tok/s only deep in the conversation
    assert rows["b"]["tok_s"] > 40 and 5000 < rows["b"]["depth_for_25"] < 30000
    # (b+d) both at once: slower than either alone at the same depth
    assert rows["b+d"]["tok_s"] < min(rows["b"]["tok_s"], rows["d"]["tok_s"])
    assert rows["b+d"]["depth_for_25"] < rows["d"]["depth_for_25"]
    # (f) -ngram: 80 tok/s is above the datasheet roofline; a clean 4k decode (d's) needs ~80/clean kept per forward
    assert rows["f"]["tok_s"] == rows["d"]["tok_s"] < seed.roofline_check(256)["roofline_tok_s"] < 80
    assert rows["f"]["tokens_per_forward_for_80"] == pytest.approx(80 / rows["d"]["tok_s"])
    assert "SD eff." in rows["f"]["observation"]
    # (g) ruled out for chat.py by its code: the timer starts after the prefill
    assert rows["g"]["prediction"].startswith("ruled out for chat.py")
    table = seed.format_table(list(rows.values()), seed.HYPOTHESIS_COLUMNS)
    assert "Shared GPU memory" in table and "import flash_attn" in table and "Prefer No Sysmem Fallback" in table


def test_readings_reserve_is_a_check():
    def reserve(used, full):
        four_k = LoadSetup("qwen2.5-14b", bpw=5.5, max_seq_len=4096, gpus="RTX 4080 Super")
        return seed.readings_reserve_gib(four_k, used_gib=used, full_gib=full)

    res, how = reserve(12.0, 15.8)
    assert "16 GiB card - 15.8 GiB used when full = 0.20 GiB never used" in how
    # the seed's readings leave little: the 0.2 GiB never used and a little held by the rest of the system
    assert 0.1 < res < 1.0 and how.endswith(f"together {res:.2f} GiB")
    # every GiB more in use at 4k is a GiB more held by others; every GiB more used when full is one less unused
    assert reserve(13.0, 15.8)[0] == pytest.approx(res + 1.0)
    assert reserve(12.0, 15.3)[0] == pytest.approx(res + 0.5)
    # a reading below what the process itself holds cannot make the reserve negative
    res, how = reserve(5.0, 16.0)
    assert res == 0.0 and how.endswith("taken as 0")


def test_seed_reserve_is_exllamav2s_default_not_the_readings(monkeypatch):
    """The seed's desktop reserve is load_autosplit_gen's default reserve_vram on the first GPU, 192 MiB exactly
    (exllamav2 0.3.2 model.py), whatever the user's memory readings say; the readings only check it."""
    assert seed.seed_reserve_gib() == 192 / 1024 == 0.1875
    assert seed.seed_setup().reserve_gib_of(0) == 0.1875
    before = seed.seed_case()["prediction_32k"].spilled_bytes
    monkeypatch.setitem(seed.SEED, "used_4k_gib", 13.0)
    monkeypatch.setitem(seed.SEED, "full_gib", 15.0)
    assert seed.seed_reserve_gib() == 0.1875
    assert seed.seed_case()["prediction_32k"].spilled_bytes == before
    check = seed.readings_check()                       # the readings move the check, never the reserve
    assert check["reserve_gib"] == 0.1875 and check["implied_gib"] == pytest.approx(0.1778 + 1.0 + 0.8, abs=1e-3)


def test_plots_draw_the_seed_case():
    from helpers import plots

    c = seed.seed_case()
    fig = plots.plot_spill_walk(c["prediction_32k"])
    ax = fig.axes[0]
    assert "spilled" in ax.get_title() and ax.get_ylabel() == "VRAM taken so far (GiB)"
    red = [p for p in ax.patches if p.get_facecolor()[:3] == pytest.approx((0.839, 0.153, 0.157), abs=0.01)]
    assert len(red) == len(c["prediction_32k"].spilled_modules())
    figs = [fig, plots.plot_time_per_token({"4k": c["prediction_4k"], "32k": c["prediction_32k"]}, {"32k": 25}),
            plots.plot_speed_vs_spill(c),
            plots.plot_hypotheses_vs_depth(seed.depth_curves([0, 16384, 32767]), reported=25)]
    assert figs[1].axes[0].get_xlabel() == "ms per decoded token"
    assert figs[2].axes[0].get_ylabel() == "decode tok/s"
    assert len(figs[3].axes[0].get_lines()) >= 7                 # six hypotheses and the reported line
    assert all(f.axes[0].get_title() for f in figs)               # every plot titled
    import matplotlib.pyplot as plt

    plt.close("all")


def test_ways_out_table_says_which_reserve_it_used():
    """Notebook 04's ways out use exllamav2's default reserve_vram as the desktop reserve, not the planner's default:
    the table says so, so its contexts and bpw are not mistaken for notebook 05's."""
    text = seed.format_rows(seed.ways_out(depth=16384), depth=16384)
    assert ("desktop/OS reserve: 0.19 GiB (1.19 GiB in the row that adds reserve), exllamav2's default reserve_vram "
            "on the first GPU (192 MiB") in text
    assert "not the planner's 0.5 GiB default" in text


def test_ways_out_never_say_fits_beside_a_spill():
    """One kind of on-screen disagreement: 'fits yes' next to 'spilled 0.57 GiB'. A plan that fits once loaded but
    spills while load_autosplit holds its reserve is 'tight'."""
    rows = seed.ways_out(depth=16384)
    for r in rows:
        assert r["verdict"] == ("NO" if not r["fits"] else "tight" if r["spilled_gib"] > 0 else "yes"), r
    text = seed.format_rows(rows, depth=16384)
    assert all(" yes " not in line or " 0.00 GiB" in line for line in text.splitlines()[1:len(rows) + 1])
