"""GPU recording: exllamav2 loads the checkpoints helpers.format writes, and dequantizes them as our reader does.

``python -m helpers record`` runs ``GPU_RECORDINGS``; the result goes to ``results/exl2/``. Needs CUDA; exllamav2 is
imported only after ``devices.require_cuda()`` (through
``helpers.engines.exllama``).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from helpers.core import devices
from helpers.core.results import provenance, save_result, slug
from helpers.engines import exllama
from helpers.format.config import resolve_config
from helpers.format.reader import Exl2Checkpoint, open_exl2
from helpers.format.synthetic import write_synthetic
from helpers.format.tiny import random_float_state_dict, tiny_config
from helpers.format.writer import write_exl2
from helpers.memory.setup import LoadSetup

EXLLAMAV2_CHECK_TOPIC = "exl2"


def runtime_order_weight(ckpt: Exl2Checkpoint, name: str) -> torch.Tensor:
    """The reader's dequantized W^T (in, out) in exllamav2's runtime order: for the MLP, gate/up columns and
    down_proj rows follow argsort(down_proj.q_invperm), because exllamav2 folds that permutation in at load."""
    q = ckpt.linears[name]
    w_t = q.dequantize().T
    if q.kind in ("gate_proj", "up_proj") and q.layer is not None:
        down = ckpt.linears.get(name.rsplit(".", 1)[0] + ".down_proj")
        if down is not None:
            return w_t[:, down.perm]
    if q.kind == "down_proj":
        return w_t[q.perm]
    return w_t


def compare_with_exllamav2(model_dir: str | os.PathLike, label: str) -> list[dict]:
    """(CUDA) Load a checkpoint with exllamav2 and compare every linear's get_weight_tensor_dq() with the reader's
    dequantization; also run one forward pass and check the logits are finite. One row per linear."""
    devices.require_cuda("comparing EXL2 checkpoints with exllamav2")
    ckpt = open_exl2(model_dir)
    loaded = exllama.load(LoadSetup(model_dir, max_seq_len=256, max_input_len=256), with_cache=False, load_path="load")
    model, config = loaded.model, loaded.config
    try:
        ids = torch.randint(0, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        logits = model.forward(ids).float()
        finite = bool(torch.isfinite(logits).all())
        rows = []
        for name, q in ckpt.linears.items():
            mod = model.modules_dict[name]
            theirs = mod.get_weight_tensor_dq().float().cpu()[:, :q.out_features]
            ours = runtime_order_weight(ckpt, name)
            scale = ours.abs().max().item() or 1.0
            rows.append({
                "checkpoint": label, "linear": name, "in": q.in_features, "out": q.out_features, "mix": q.mix(),
                "bpw": round(q.bits_per_weight, 4),
                "max_abs_err_rel_to_max_weight": (theirs - ours).abs().max().item() / scale,
                "fp16_identical_share": (theirs.half() == ours.half()).float().mean().item(),
                "logits_finite": finite,
            })
        return rows
    finally:
        model.unload()
        del model
        torch.cuda.empty_cache()


def record_exllamav2_check(results_dir: Path | None = None) -> Path:
    """(CUDA) Write checkpoints at every width (2..8, act-order, a padded 1000-wide head, mixed groups, Qwen2
    biases, a tied head) and a synthetic Qwen2.5-shaped one, load each with exllamav2, and record how far its
    dequantized weights are from ours (relative to the largest weight). Intermediate sizes are multiples of 128
    (real models' shapes, for which exllamav2's fused MLP kernel is used: docs/FACTS.md §3)."""
    devices.require_cuda("recording the exllamav2 check of EXL2 checkpoints")

    prov = provenance()
    base = Path(tempfile.mkdtemp(prefix="exl2-check-"))
    rows: list[dict] = []
    try:
        cfg = tiny_config(vocab=1000)
        sd = random_float_state_dict(cfg, seed=0)
        cases: list[tuple[str, Any, dict, dict]] = [(f"writer {b}-bit", b, cfg, sd) for b in (2, 3, 4, 5, 6, 8)]
        cases.append(("writer mixed 0.1:8b_32g/0.2:6b_64g/0.7:3b_128g", "0.1:8b_32g/0.2:6b_64g/0.7:3b_128g", cfg, sd))
        qcfg = tiny_config(arch="Qwen2ForCausalLM", vocab=1000)
        cases.append(("writer Qwen2 4.5 bpw (biases)", 4.5, qcfg, random_float_state_dict(qcfg, seed=1)))
        tcfg = tiny_config(tied=True, vocab=1024)
        cases.append(("writer tied head 3.5 bpw", 3.5, tcfg, random_float_state_dict(tcfg, seed=2)))
        for i, (label, bits, c, s) in enumerate(cases):
            d = write_exl2(base / f"w{i}", c, s, bits=bits, head_bits=6, progress=False)
            rows += compare_with_exllamav2(d, label)
        scfg = resolve_config("qwen2.5-14b")
        scfg.update(num_hidden_layers=2, hidden_size=1024, num_attention_heads=8, num_key_value_heads=2,
                    intermediate_size=2816)
        d = write_synthetic(scfg, 5.5, base / "synthetic", progress=False)
        rows += compare_with_exllamav2(d, "synthetic Qwen2.5-14B-like (2 layers, hidden 1024) 5.5 bpw")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    worst = max(r["max_abs_err_rel_to_max_weight"] for r in rows)
    return save_result(EXLLAMAV2_CHECK_TOPIC, f"exllamav2-check-{slug(prov.get('gpu') or 'gpu')}", rows, prov=prov,
                       extra={"worst_rel_err": worst, "all_within_1pct": worst < 0.01,
                              "all_logits_finite": all(r["logits_finite"] for r in rows)},
                       results_dir=results_dir)


GPU_RECORDINGS = {"exl2-exllamav2-check": record_exllamav2_check}
