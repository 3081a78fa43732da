"""Native vs emulated decode on one GPU and the spill model's prediction of the slowdown (``compare``); the cleanup
checks of an interrupted emulated load (``cleanup_checks``).

``compare`` loads a ``LoadSetup`` twice, on its emulated smaller card (``fallback.emulator``) and natively, decodes
both in alternating rounds (``speed.harness.measure_loaded``), and predicts the slowdown with the spill model from
this GPU's measured VRAM and PCIe bandwidths and the native run's host time.
"""
from __future__ import annotations

import statistics
from pathlib import Path

from helpers.core.errors import CourseError
from helpers.core.progress import progress as bar
from helpers.core.units import GIB
from helpers.fallback.emulator import VramEmulator, budget_of, emulated_card, measure_host_read_bandwidth
from helpers.fallback.hostalloc import HostAllocLib, build_hostalloc
from helpers.fallback.routed_load import Exl2Model
from helpers.fallback.spill import SpillModel, evaluate, overhead_from_run, place
from helpers.memory.setup import LoadSetup
from helpers.models.synthetic_dirs import synthetic_14b_dir
from helpers.speed.harness import Measure, measure_loaded
from helpers.speed.model import first_principles
from helpers.speed.roofline import measure_bandwidth


def resolve_model_dir(model_dir=None) -> Path:
    """``model_dir`` checked, or by default the 14B-shaped 5.5 bpw checkpoint of the seed case (written once)."""
    if model_dir is not None:
        p = Path(model_dir).expanduser()
        if not (p / "config.json").exists():
            raise CourseError(f"{p} is not a model directory (no config.json); pass an EXL2 model folder")
        return p
    return synthetic_14b_dir()


def _flatten(rows: list[dict], run: str) -> list[float]:
    return [v for r in rows if r["run"] == run for v in r["decode_tok_s_all"]]


#: how ``compare`` times each round: no prefill, no profile, 64 tokens, the first repeat thrown away
COMPARE_MEASURE = Measure(repeats=3, warmup=1, decode_tokens=64, prefill_tokens=0, profile_steps=0)


def compare(setup: LoadSetup, *, depth: int = 128, rounds: int = 4, measure: Measure = COMPARE_MEASURE,
            lib: HostAllocLib | None = None, progress: bool = True, load_path: str = "autosplit") -> dict:
    """``setup`` (its GPU: the emulated card, ``emulator.emulated_setup``) loaded on the emulated card and natively,
    decoded in alternating rounds, and the spill model's prediction of the slowdown from this GPU's measured
    bandwidths and a native run's overhead."""
    lib = lib or HostAllocLib(build_hostalloc())
    budget = budget_of(setup)
    vram_bw = measure_bandwidth("cuda")
    measurements: list[dict] = []
    with VramEmulator(budget, lib) as emu:
        emulated = emu.own(Exl2Model(setup, emulator=emu, load_path=load_path))
        decisions, placement = emu.rows(), emu.placement()
        host_bytes_loaded = emu.host_bytes()
        pcie_bw = measure_host_read_bandwidth(emu)
        native = emu.own(Exl2Model(setup, load_path=load_path))
        jobs = [(r, name) for r in range(rounds)
                for name in (("native", "emulated") if r % 2 == 0 else ("emulated", "native"))]
        shown = bar(jobs, desc=f"cache {setup.max_seq_len}: native/emulated rounds", unit="run") if progress else jobs
        for r, name in shown:
            b = native if name == "native" else emulated
            row = measure_loaded(b, depth, measure, bandwidth_bytes_s=vram_bw, progress=False)
            keep = {k: row[k] for k in ("decode_tok_s", "decode_tok_s_all", "decode_spread", "bytes_per_token",
                                        "roofline_tok_s", "step_ms") if k in row}
            measurements.append({"max_seq_len": setup.max_seq_len, "run": name, "round": r, **keep})
        pinned_peak = lib.peak_bytes()
    pinned_left = emu.leftover_bytes            # still pinned after cleanup, before any forced free (target 0)
    pinned_outstanding = lib.outstanding_bytes()
    native_all, emu_all = _flatten(measurements, "native"), _flatten(measurements, "emulated")
    nat, emt = statistics.median(native_all), statistics.median(emu_all)
    # the spill model for this GPU: measured bandwidths; overhead from the native run (it spills nothing)
    all_vram = [{**p, "where": "vram" if p["where"] == "sysmem" else p["where"]} for p in placement]
    gpu_weights = sum(int(p["weight_bytes"]) for p in all_vram if p["where"] == "vram")
    overhead, note = overhead_from_run(nat, setup, weight_bytes=gpu_weights, vram_bandwidth=vram_bw, depth=depth)
    # first principles at the measured bandwidth, the host time of the native run (as it was derived): the
    # emulated/native ratio is then the spill's alone
    model = SpillModel(setup, load_path=load_path, vram_bandwidth=vram_bw, pcie_bandwidth=pcie_bw,
                       constants=first_principles(overhead / setup.shape.n_layers))
    pred_nat = evaluate(all_vram, model, depth, budget_bytes=budget)
    pred_emu = evaluate(placement, model, depth, budget_bytes=budget)
    # the same model placing the modules itself (first fit from the VRAM taken before the first GPU module)
    fixed = next((d["used_before_bytes"] for d in decisions if d["where"] != "cpu"), 0)
    walk = evaluate(place(placement, budget, fixed), model, depth, budget_bytes=budget, fixed_bytes=fixed)
    slowdown = nat / emt                                            # measured: native tok/s over emulated tok/s
    predicted = pred_emu.seconds_per_token / pred_nat.seconds_per_token
    summary = {
        "max_seq_len": setup.max_seq_len, "cache_mode": setup.cache_mode, "depth": depth, "load_path": load_path,
        **emulated_card(setup), "budget_bytes": budget,
        "spilled_bytes": emu_spilled(placement), "spilled_gib": emu_spilled(placement) / GIB,
        "spilled_weight_bytes": pred_emu.spilled_weight_bytes, "spilled_cache_bytes": pred_emu.spilled_cache_bytes,
        "spilled_modules": pred_emu.spilled_modules(), "pinned_host_bytes_loaded": host_bytes_loaded,
        "pinned_peak_bytes": pinned_peak, "pinned_left_bytes": pinned_left,
        "pinned_outstanding_bytes": pinned_outstanding,
        "native_tok_s": nat, "emulated_tok_s": emt, "native_tok_s_all": native_all, "emulated_tok_s_all": emu_all,
        "slowdown": slowdown, "predicted_slowdown": predicted,
        "prediction_ratio": slowdown / predicted if predicted else None,
        "predicted_slowdown_walk": walk.seconds_per_token / pred_nat.seconds_per_token,
        "walk_spilled_bytes": walk.spilled_bytes,
        "predicted_native_tok_s": pred_nat.tok_s, "predicted_emulated_tok_s": pred_emu.tok_s,
        "vram_bandwidth_gbs": vram_bw / 1e9, "pcie_read_gbs": pcie_bw / 1e9, "overhead_ms": overhead * 1e3,
        "overhead_note": note, "sysmem_read_bytes": pred_emu.sysmem_read_bytes,
        "vram_read_bytes": pred_emu.vram_read_bytes,
        "emulated_over_native": emt / nat,
        "rounds": rounds, "repeats": measure.repeats, "decode_tokens": measure.decode_tokens,
    }
    return {"summary": summary, "measurements": measurements, "decisions": decisions}


def cleanup_checks(setup: LoadSetup, *, lib: HostAllocLib, after_spilled: int = 2,
                   load_path: str = "autosplit") -> dict:
    """Interrupt an emulated load of ``setup`` twice, once with an error and once with KeyboardInterrupt (as Ctrl-C
    raises it), ``after_spilled`` modules after the spill began; return the pinned bytes cleanup found still held
    after each (0 is the target: everything came back without a forced free)."""
    out = {}
    for name, exc in (("error", RuntimeError), ("interrupt", KeyboardInterrupt)):
        class Injected(exc):  # noqa: N801 (a local marker type)
            pass

        def stop(i: int, n: int, emu_ref: list, name: str = name, Injected: type = Injected) -> None:
            emu = emu_ref[0]
            if sum(d.where == "sysmem" for d in emu.decisions) >= after_spilled:
                raise Injected(f"injected {name} at module {i}")

        ref: list = []
        try:
            with VramEmulator(budget_of(setup), lib) as emu:
                ref.append(emu)
                emu.own(Exl2Model(setup, emulator=emu, on_module=lambda i, n, ref=ref: stop(i, n, ref),
                                  load_path=load_path))
            out[f"pinned_left_after_{name}_bytes"] = None          # the spill never began: nothing to interrupt
        except Injected:
            # leftover_bytes: what cleanup found still pinned before any forced free (0 means it all came back by
            # itself); outstanding: what the allocator holds now
            out[f"pinned_left_after_{name}_bytes"] = ref[0].leftover_bytes
            out[f"pinned_outstanding_after_{name}_bytes"] = lib.outstanding_bytes()
            out[f"pinned_peak_before_{name}_bytes"] = lib.peak_bytes()
    return out


def emu_spilled(placement: list[dict]) -> int:
    return sum(p["weight_bytes"] + p["cache_bytes"] for p in placement if p["where"] == "sysmem")
