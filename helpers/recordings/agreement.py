"""GPU recording: exllamav2 against the reference on the embedded model (``results/agreement/``).

``record_agreement`` runs both engines on a CUDA machine and saves what ``helpers.engines.agreement`` reads back:
per-step rows, a summary, and the logits notebook 02 compares with the reference it runs live on a CPU.
"""
from __future__ import annotations

from pathlib import Path

import torch

from helpers.core import devices as gpu
from helpers.core.errors import CourseError
from helpers.core.results import provenance
from helpers.engines.agreement import measure_agreement, save_agreement
from helpers.engines.backend import load
from helpers.models.embedded import embedded_model_dir


def record_agreement(max_new_tokens: int = 48) -> Path:
    """(CUDA) exllamav2 vs the reference (float32 on the GPU) on the embedded model: prompt logits and greedy tokens.

    Writes results/agreement/exllamav2-vs-reference-<gpu>.json (per-step rows and a summary) and, beside it, a
    .safetensors file with the prompt ids, exllamav2's prompt logits and both engines' last-position logits, so
    notebook 02 can compare the reference it runs live on a CPU against the recorded exllamav2 logits
    (``recorded_vs_live``)."""
    gpu.require_cuda("recording exllamav2 vs reference agreement")
    model_dir = embedded_model_dir()
    exl = load(model_dir, max_seq_len=1024, backend="exllamav2")
    ref = load(model_dir, max_seq_len=1024, backend="reference", device="cuda", dtype=torch.float32)
    rows, extra, tensors = measure_agreement(exl, ref, steps=max_new_tokens)
    extra.update(reference_dtype="float32", exllamav2_cache="fp16", no_sdpa=exl.config.no_sdpa)
    prov = provenance()
    path = save_agreement(f"exllamav2-vs-reference-{prov.get('gpu') or 'gpu'}", rows, extra, tensors, prov=prov)
    exl.unload()
    ref.unload()
    if not extra["agree_until_first_near_tie"]:
        raise CourseError(f"exllamav2 and the reference chose different tokens before any near-tie (step "
                          f"{extra['first_different_token']}); recorded in {path}: investigate before trusting it")
    return path


GPU_RECORDINGS = {"agreement": record_agreement}
