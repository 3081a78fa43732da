"""The bench harness: prefill and decode speed of a ``LoadSetup`` at a context depth (``bench``, ``bench_matrix``).

One measurement loads the model, times a prefill at the depth, puts the cache at the depth directly
(``fill_cache``) and times greedy decode steps, each waiting for its token; warm-up repeats are dropped, the rest
give median, min, max and spread. Each figure is set against the roofline (``helpers.speed.roofline``) on the same
device, and a profile says where a token's time goes. ``bench_subprocess`` runs it in a fresh process.
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from helpers.core import devices as gpu
from helpers.core.errors import CourseError
from helpers.core.paths import REPO_DIR
from helpers.core.progress import progress as bar
from helpers.core.units import GIB
from helpers.engines import backend as backend_mod
from helpers.format.config import load_config
from helpers.speed.matrix import check_config, plan_matrix
from helpers.speed.profile import profile_decode
from helpers.speed.roofline import (
    datasheet_bandwidth,
    datasheet_host,
    decode_bytes,
    measure_bandwidth,
    roofline_tok_s,
)


@dataclass(frozen=True)
class Measure:
    """How a measurement is run: the engine, and how many tokens and repeats it times."""

    backend: str = "auto"          # auto, exllamav2 or reference (engines.backend)
    device: str | None = None      # cpu or cuda (the reference); None: the engine's choice
    repeats: int = 5               # kept repeats (median, min, max)
    warmup: int = 2                # repeats run first and thrown away
    decode_tokens: int = 32        # decoded tokens per repeat
    prefill_tokens: int = 512      # prompt tokens per prefill (0: skip)
    profile_steps: int = 4         # profiled decode steps (0: no profile)

    def __post_init__(self):
        if self.repeats < 1 or self.decode_tokens < 1 or self.warmup < 0 or self.prefill_tokens < 0:
            raise CourseError("repeats and decode_tokens must be at least 1, warmup and prefill_tokens at least 0")


def summarize(values: Sequence[float]) -> dict[str, float]:
    """median, min, max and spread = (max - min) / median of repeated measurements."""
    vals = [float(v) for v in values]
    if not vals:
        raise CourseError("nothing was measured: repeats must be at least 1")
    med = statistics.median(vals)
    lo, hi = min(vals), max(vals)
    return {"median": med, "min": lo, "max": hi, "spread": (hi - lo) / med if med else math.inf, "n": len(vals)}


def run_to_run(medians: Sequence[float]) -> dict[str, float]:
    """Variation across processes: the same statistics over each process's median."""
    s = summarize(medians)
    return {"processes": s["n"], "median_tok_s": s["median"], "min_tok_s": s["min"], "max_tok_s": s["max"],
            "spread": s["spread"]}


def _trained_positions(model_dir: Path) -> int | None:
    try:
        cfg = load_config(model_dir)
    except CourseError:  # a synthetic or odd folder: then no trained length is known
        return None
    return cfg.get("max_position_embeddings")


def _prompt_ids(vocab_size: int, n: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, int(vocab_size), (1, n), generator=g)


def _time_decode(b, depth: int, steps: int, first_token: int) -> dict[str, Any]:
    """``steps`` greedy decode steps from depth ``depth``: total seconds and each step's wall time. Each step waits
    for its token (a generator needs it before the next step), so a step's wall time is what a reader sees."""
    b.fill_cache(depth)
    b.synchronize()
    tok, walls = first_token, []
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        tok = int(b.decode_step(tok).argmax())
        walls.append(time.perf_counter() - t0)
    b.synchronize()
    return {"seconds": time.perf_counter() - start, "walls": walls}


def _time_prefill(b, depth: int, ids) -> float:
    b.fill_cache(depth)
    b.synchronize()
    t0 = time.perf_counter()
    b.forward(ids, reset=False)
    b.synchronize()
    return time.perf_counter() - t0


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _flat_memory(prefix: str, reading: dict) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in (reading or {}).items() if isinstance(v, (int, float, str, type(None)))}


def flash_attn_installed() -> bool:
    """Whether exllamav2 0.3.2 attends with flash-attn here: installed, new enough and not switched off by
    EXLLAMA_NO_FLASH_ATTN (``core.devices.attention_path``, which works it out without importing it)."""
    return gpu.attention_path()["path"] == "flash-attn"


def _decode_bytes_of(b, depth: int) -> dict[str, Any]:
    """What one decoded token moves on the loaded backend ``b`` at ``depth`` (see ``speed.roofline``).

    exllamav2: the checkpoint's GPU-resident bytes and the bytes per position of its attention path
    (``speed.model.position_bytes``: flash-attn if installed, else torch attention with repeat_kv). The reference:
    its own tensors in its own dtype (float32 on a CPU: twice fp16's bytes), counted from the loaded model; its SDPA
    attention reads its cache once per position (``enable_gqa``, no copy).
    """
    if b.name == "reference" and hasattr(b, "model"):
        m = b.model
        tensors = [m.norm, m.lm_head]
        for layer in m.layers:
            tensors += [t for t in vars(layer).values() if hasattr(t, "element_size")]
        weights = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        per_pos = int(m.cache.bytes_per_token())
        kv = per_pos * depth
        return {"weights_bytes": int(weights), "kv_bytes": kv, "position_bytes": per_pos,
                "total_bytes": int(weights) + kv,
                "flash_attn": None, "attention_path": "reference SDPA (reads its cache once)",
                "counted": f"reference {str(b.dtype).replace('torch.', '')} tensors: layers, final norm, head "
                           f"(not the input embedding unless tied as the head); K and V of {depth} positions"}
    flash = flash_attn_installed()
    d = decode_bytes(b.model_dir, depth, b.cache_mode, flash_attn=flash)
    d["flash_attn"] = flash
    d["attention_path"] = "flash-attn" if flash else "torch attention with repeat_kv"
    d["counted"] = (f"EXL2 GPU-resident weights incl. head and norms (not the input embedding, in system RAM); "
                    f"{depth} positions x {d['position_bytes']:,} B ({b.cache_mode} cache, {d['attention_path']}, "
                    "helpers.speed.model)")
    return d


def measure_loaded(b, depth: int, measure: Measure = Measure(), *, bandwidth_bytes_s: float | None = None,
                   progress: bool = True, desc: str = "") -> dict[str, Any]:
    """Measure one depth on an already loaded backend ``b`` (its cache length is ``b.max_seq_len``)."""
    max_seq_len, mode = int(b.max_seq_len), str(b.cache_mode)
    repeats, warmup, decode_tokens = measure.repeats, measure.warmup, measure.decode_tokens
    prefill_tokens, profile_steps = measure.prefill_tokens, measure.profile_steps
    check_config(max_seq_len, depth, decode_tokens=decode_tokens, exllamav2=(b.name == "exllamav2"))
    n_prefill = min(prefill_tokens, max_seq_len - depth)
    ids = _prompt_ids(b.vocab_size, n_prefill) if n_prefill else None
    rounds = warmup + repeats
    pbar = bar(total=rounds * (decode_tokens + (1 if n_prefill else 0)),
               desc=desc or f"max_seq_len {max_seq_len} depth {depth}", unit="tok") if progress else None
    prefill_s, decode, walls = [], [], []
    try:
        for r in range(rounds):
            if n_prefill:
                dt = _time_prefill(b, depth, ids)
                if r >= warmup:
                    prefill_s.append(dt)
                if pbar:
                    pbar.update(1)
            run = _time_decode(b, depth, decode_tokens, first_token=0)
            if r >= warmup:
                decode.append(decode_tokens / run["seconds"])
                walls += run["walls"]
            if pbar:
                pbar.update(decode_tokens)
    finally:
        if pbar:
            pbar.close()
    mem_run = b.memory()
    prof = profile_decode(b, depth, steps=profile_steps) if profile_steps else {}
    d = summarize(decode)
    row: dict[str, Any] = {
        "max_seq_len": max_seq_len, "depth": depth, "cache_mode": mode, "backend": b.name, "device": str(b.device),
        "torch_threads": _torch_threads(),
        "decode_tokens": decode_tokens, "repeats": repeats, "warmup": warmup,
        "decode_tok_s": d["median"], "decode_tok_s_min": d["min"], "decode_tok_s_max": d["max"],
        "decode_spread": d["spread"], "decode_tok_s_all": decode,
        "prefill_tokens": n_prefill,
    }
    if n_prefill:
        p = summarize([n_prefill / s for s in prefill_s])
        row.update(prefill_tok_s=p["median"], prefill_tok_s_min=p["min"], prefill_tok_s_max=p["max"],
                   prefill_spread=p["spread"])
    else:
        row.update(prefill_tok_s=None)
    step_ms = statistics.median(walls) * 1e3
    cuda = str(b.device).startswith("cuda")
    gpu_ms = prof.get("gpu_busy_ms")
    ops_ms = prof.get("torch_ops_ms")
    row.update(
        step_ms=step_ms,
        # CUDA: the host's own work per token (profiled: Python, exllamav2's host code, kernel launches); CPU: all of it
        cpu_ms_per_token=prof.get("host_work_ms") if cuda else step_ms,
        gpu_ms_per_token=gpu_ms,
        gpu_idle_fraction=(max(0.0, 1 - gpu_ms / step_ms) if gpu_ms is not None and step_ms else None),
        host_blocked_ms_per_token=prof.get("host_blocked_ms"),
        kernel_launches_per_token=prof.get("kernel_launches"),
        profiled_ms_per_token=prof.get("profiled_ms"),
        torch_ops_ms_per_token=ops_ms,
        outside_torch_ops_ms_per_token=(max(0.0, prof["profiled_ms"] - ops_ms) if ops_ms is not None else None),
    )
    # bytes and the roofline
    counted = _decode_bytes_of(b, depth)
    row.update(weights_bytes=counted["weights_bytes"], kv_read_bytes=counted["kv_bytes"],
               position_bytes=counted["position_bytes"], flash_attn=counted["flash_attn"],
               attention_path=counted["attention_path"], bytes_per_token=counted["total_bytes"],
               bytes_counted=counted["counted"])
    if bandwidth_bytes_s is None:
        bandwidth_bytes_s = measure_bandwidth(str(b.device))
    row["bandwidth_gbs"] = bandwidth_bytes_s / 1e9
    roof = roofline_tok_s(row["bytes_per_token"], bandwidth_bytes_s)
    row.update(roofline_tok_s=roof, roofline_fraction=row["decode_tok_s"] / roof)
    if row.get("prefill_tok_s"):
        # prefill reads the weights once for the whole prompt: memory is not what limits it, compute is
        row["prefill_over_decode"] = row["prefill_tok_s"] / row["decode_tok_s"]
    row["cache_bytes"] = int(b.cache_bytes())
    row["cache_gib"] = row["cache_bytes"] / GIB
    row.update(_flat_memory("mem_after_run_", mem_run))
    return row


def bench(model=None, *, depth: int = 128, measure: Measure = Measure(), progress: bool = True,
          **settings) -> dict[str, Any]:
    """One measurement (one row) of ``model`` (a ``LoadSetup``, or a folder with its settings as keywords, e.g.
    ``max_seq_len=4096``): load, set the cache to ``depth``, time prefill and decode.

    Keys (units in the names): max_seq_len, depth, cache_mode, backend, device, prefill_tok_s, decode_tok_s (median
    of the repeats), decode_tok_s_min/max, decode_spread = (max - min) / median, bytes_per_token (weights_bytes +
    kv_read_bytes = depth x position_bytes), roofline_tok_s, roofline_fraction, bandwidth_gbs, cache_bytes, mem_*
    readings, step_ms, cpu_ms_per_token, gpu_ms_per_token (CUDA), gpu_idle_fraction, torch_ops_ms_per_token.
    """
    setup = backend_mod.setup_of(model, **settings)
    return bench_matrix(setup, max_seq_lens=[setup.max_seq_len], depths=[depth], cache_modes=[setup.cache_mode],
                        measure=measure, progress=progress, skip_unfit=False)[0]


def bench_matrix(model=None, *, max_seq_lens: Iterable[int] = (4096, 32768), depths: Iterable[int] = (128,),
                 cache_modes: Iterable[str] = ("fp16",), measure: Measure = Measure(), progress: bool = True,
                 skip_unfit: bool = True, model_label: str | None = None) -> list[dict[str, Any]]:
    """Every (cache mode, max_seq_len, depth) of ``model`` (a ``LoadSetup`` or a folder; None: the embedded model);
    one load per (cache mode, max_seq_len). Depths that do not fit a cache are skipped (a single combination that
    does not fit is an error)."""
    base = backend_mod.setup_of(model)
    model_dir = base.model_dir
    plan = plan_matrix(max_seq_lens, depths, cache_modes, decode_tokens=measure.decode_tokens,
                       backend=measure.backend, skip_unfit=skip_unfit)
    trained = _trained_positions(model_dir)
    rows = []
    bw = None
    for mode, c, ds in plan:
        before = _memory_before_load()
        b = backend_mod.load(base.with_(max_seq_len=c, cache_mode=mode), backend=measure.backend,
                             device=measure.device)
        try:
            mem_loaded = b.memory()
            if bw is None:  # the same threads as the decode it bounds
                bw = measure_bandwidth(str(b.device), threads=_torch_threads())
            method = _bandwidth_method(str(b.device))
            ds_bw = datasheet_bandwidth(_device_name(str(b.device)))
            host = datasheet_host(_device_name(str(b.device)))
            for d in ds:
                row = measure_loaded(b, d, measure, bandwidth_bytes_s=bw, progress=progress,
                                     desc=f"{mode} max_seq_len {c} depth {d}")
                row.update(_flat_memory("mem_before_load_", before))
                row.update(_flat_memory("mem_loaded_", mem_loaded))
                if str(b.device).startswith("cuda"):
                    import torch

                    row["mem_peak_torch_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
                row.update(model=model_label or Path(model_dir).name, model_dir=str(model_dir),
                           trained_positions=trained, beyond_trained_positions=bool(trained and c > trained),
                           bandwidth_method=method, datasheet_bandwidth_gbs=ds_bw / 1e9 if ds_bw else None,
                           host=host)
                rows.append(row)
        finally:
            b.unload()
    return rows


def _memory_before_load() -> dict[str, Any]:
    """Readings taken before a load (NVML's used bytes include other processes and the CUDA context)."""
    out: dict[str, Any] = {"process_rss_bytes": gpu.process_rss_bytes()}
    if gpu.cuda_status()["available"]:
        import torch

        torch.cuda.reset_peak_memory_stats()
        out["nvml_used_bytes"] = gpu.nvml_used_bytes(torch.cuda.current_device())
    return out


def _bandwidth_method(device: str) -> str:
    if device.startswith("cuda"):
        return "median of 5 sums over a 1 GiB fp16 buffer, CUDA events"
    return f"median of 5 sums over a 256 MiB fp32 buffer, {_torch_threads()} torch threads"


def _device_name(device: str) -> str | None:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return None


def alternate_decode(backends: dict, depths: Iterable[int], *, rounds: int = 3, warmup: int = 1,
                     decode_tokens: int = 8) -> list[dict[str, Any]]:
    """Decode speed of several loaded backends ({name: backend}) at several depths, the configurations interleaved
    round by round (forward, then backward order) so that a shared machine's slow spells hit them all alike.

    One row per (name, depth): ``tok_s_all`` (each kept round: tokens / seconds), ``best_all`` (each kept round: 1 /
    its fastest step; noise on a shared machine only ever adds time, so the fastest step is the steadiest figure)
    and ``tok_s``, ``best`` (median and fastest over the rounds). Compare them with ``paired_ratio``."""
    depths = list(depths)
    if rounds < 1 or warmup < 0 or decode_tokens < 1:
        raise CourseError("rounds and decode_tokens must be at least 1, warmup at least 0")
    combos = [(n, d) for d in depths for n in backends]
    for n, d in combos:
        check_config(int(backends[n].max_seq_len), d, decode_tokens=decode_tokens)
    runs: dict[tuple, list[float]] = {c: [] for c in combos}
    best: dict[tuple, list[float]] = {c: [] for c in combos}
    for r in range(warmup + rounds):
        for n, d in (combos if r % 2 == 0 else combos[::-1]):
            run = _time_decode(backends[n], d, decode_tokens, first_token=0)
            if r >= warmup:
                runs[(n, d)].append(decode_tokens / run["seconds"])
                best[(n, d)].append(1 / min(run["walls"]))
    return [{"name": n, "depth": d, "tok_s_all": runs[(n, d)], "tok_s": statistics.median(runs[(n, d)]),
             "best_all": best[(n, d)], "best": max(best[(n, d)])} for n, d in combos]


def paired_ratio(rows: list[dict], a: tuple, b: tuple, key: str = "best_all") -> dict[str, float]:
    """Two ``alternate_decode`` rows compared, a = (name, depth) over b: ``best``, the ratio of their fastest steps
    over all rounds (the steadiest figure a busy machine gives), and the round-by-round ratios of ``key`` (each
    round's fastest step by default; "tok_s_all" for whole rounds): their median, min and max."""
    row = {(r["name"], r["depth"]): r for r in rows}
    ratios = [x / y for x, y in zip(row[a][key], row[b][key])]
    return {"best": max(row[a]["best_all"]) / max(row[b]["best_all"]), "median": statistics.median(ratios),
            "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


def bench_subprocess(setup, *, depth: int, measure: Measure = Measure(), model_label: str | None = None,
                     timeout: float | None = None) -> list[dict[str, Any]]:
    """The same measurement in a fresh Python process (nothing cached, allocated or compiled by earlier runs)."""
    setup = backend_mod.setup_of(setup)
    m = measure
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "helpers", "bench", "--model", str(setup.model_dir),
               "--max-seq-len", str(setup.max_seq_len), "--depth", str(depth), "--cache", setup.cache_mode,
               "--backend", m.backend, "--repeats", str(m.repeats), "--warmup", str(m.warmup),
               "--decode-tokens", str(m.decode_tokens), "--prefill-tokens", str(m.prefill_tokens), "--out", str(out)]
        if model_label:
            cmd += ["--label", model_label]
        # the child's stdout goes to our stderr: exllamav2 prints while it loads, and `record` reads our stdout
        try:
            sink = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # a captured stderr (pytest, some notebooks) has no descriptor
            sink = None
        proc = subprocess.run(cmd, stdout=sink, timeout=timeout, cwd=REPO_DIR)
        if proc.returncode != 0 or not out.is_file():
            raise CourseError(f"the bench process for max_seq_len {setup.max_seq_len} depth {depth} "
                              f"{setup.cache_mode} failed (exit {proc.returncode}); run `python "
                              f"{' '.join(cmd[1:-2])}` to see why")
        return json.loads(out.read_text(encoding="utf-8"))["rows"]
