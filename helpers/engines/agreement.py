"""How far two engines agree on one prompt: logits at every prompt position, then greedy tokens until a near-tie.

``measure_agreement(exl, ref)`` compares exllamav2 (or any engine) with the reference: the maximum absolute
difference and relative L2 error of their prompt logits, and a greedy walk where both get the same tokens
(``greedy_agreement``): they must pick the same token wherever the reference's top-two gap is larger than their
difference. ``save_agreement``/``load_agreement`` write and read ``results/agreement/`` (a JSON document and a
.safetensors file of logits beside it; the GPU recording is ``helpers.recordings.agreement``), and
``recorded_vs_live`` compares the recorded exllamav2 logits with the engine running here (the reference on a CPU).
"""
from __future__ import annotations

from pathlib import Path

import torch

from helpers.core.paths import RESULTS_DIR
from helpers.core.results import load_results, provenance, save_result, slug
from helpers.engines.backend import Backend, load

AGREEMENT_PROMPT = "What is the capital of France?"
AGREEMENT_TOPIC = "agreement"


def compare_logits(a: torch.Tensor, b: torch.Tensor) -> dict:
    """max |a-b| and the relative L2 error |a-b|/|b| of two logit tensors (b the reference)."""
    a, b = a.float().cpu(), b.float().cpu()
    return {"max_abs_diff": float((a - b).abs().max()), "rel_l2": float((a - b).norm() / b.norm())}


def top2_gap(logits: torch.Tensor) -> float:
    top = torch.topk(logits.float().reshape(-1), 2).values
    return float(top[0] - top[1])


def greedy_agreement(exl: Backend, ref: Backend, prompt_ids: torch.Tensor, steps: int) -> tuple[list[dict], dict]:
    """Greedy decode with exllamav2, feeding the same tokens to the reference (teacher forcing), step by step.

    Per step: each engine's greedy token, the reference's top-two gap, and the logit difference. The engines must
    pick the same token wherever the gap is larger than their difference; the first step where it is not (a near-tie)
    is where they are allowed to part."""
    lx, lr = exl.forward(prompt_ids)[0, -1], ref.forward(prompt_ids)[0, -1]
    rows, first_diff, first_tie = [], None, None
    for step in range(steps):
        d = compare_logits(lx, lr)
        tx, tr = int(torch.argmax(lx)), int(torch.argmax(lr))
        gap = top2_gap(lr)
        near_tie = gap < d["max_abs_diff"]
        rows.append({"step": step, "exllamav2_token": tx, "reference_token": tr, "same": tx == tr,
                     "reference_top2_gap": round(gap, 5), "near_tie": near_tie,
                     "max_abs_diff": round(d["max_abs_diff"], 5), "rel_l2": round(d["rel_l2"], 6)})
        if first_tie is None and near_tie:
            first_tie = step
        if first_diff is None and tx != tr:
            first_diff = step
        if tx in exl.tokenizer.stop_ids:
            break
        lx, lr = exl.decode_step(tx), ref.decode_step(tx)
    summary = {"first_different_token": first_diff, "first_near_tie": first_tie,
               "agree_until_first_near_tie": first_diff is None or (first_tie is not None and first_diff >= first_tie)}
    return rows, summary


def measure_agreement(exl: Backend, ref: Backend, *, prompt: str = AGREEMENT_PROMPT, chat: bool = True,
                      steps: int = 48) -> tuple[list[dict], dict, dict[str, torch.Tensor]]:
    """Compare two engines on one prompt: (per-step rows, summary fields, tensors to keep).

    Prompt logits at every position (max abs difference, relative L2 error against ``ref``), then the greedy
    teacher-forced walk of ``greedy_agreement``."""
    ids = exl.encode(prompt, chat=chat)
    lx_all, lr_all = exl.forward(ids), ref.forward(ids)
    diff = compare_logits(lx_all, lr_all)
    rows, summary = greedy_agreement(exl, ref, ids, steps)
    text = exl.decode([r["exllamav2_token"] for r in rows if r["exllamav2_token"] not in exl.tokenizer.stop_ids])
    extra = {"model_dir": str(exl.model_dir), "prompt": prompt, "chat": chat, "prompt_tokens": int(ids.shape[1]),
             "engines": [f"{exl.name} on {exl.device}", f"{ref.name} on {ref.device}"],
             "prompt_logits_max_abs_diff": round(diff["max_abs_diff"], 5),
             "prompt_logits_rel_l2": round(diff["rel_l2"], 6), "greedy_text": text, **summary}
    tensors = {"prompt_ids": ids.cpu().contiguous(),
               "exllamav2_prompt_logits": lx_all[0].half().cpu().contiguous(),
               "exllamav2_last_logits": lx_all[0, -1].float().cpu().contiguous(),
               "reference_last_logits": lr_all[0, -1].float().cpu().contiguous()}
    return rows, extra, tensors


def save_agreement(name: str, rows: list[dict], extra: dict, tensors: dict[str, torch.Tensor], *,
                   prov: dict | None = None, results_dir: Path | None = None) -> Path:
    """results/agreement/<name>.json (rows, summary, provenance) and <name>.safetensors beside it, both atomic."""
    from safetensors.torch import save_file

    folder = Path(results_dir or RESULTS_DIR) / AGREEMENT_TOPIC
    folder.mkdir(parents=True, exist_ok=True)
    tensors_path = folder / f"{slug(name)}.safetensors"
    tmp = folder / f".{tensors_path.name}.tmp"
    save_file(tensors, str(tmp),
              metadata={"prompt": str(extra.get("prompt")), "model_dir": str(extra.get("model_dir"))})
    tmp.replace(tensors_path)
    return save_result(AGREEMENT_TOPIC, name, rows, prov=prov if prov is not None else provenance(),
                       extra={**extra, "tensors_file": tensors_path.name}, results_dir=results_dir)


def load_agreement(results_dir: Path | None = None) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The latest recorded agreement (its JSON document, its tensors), or None if nothing is recorded yet."""
    from safetensors.torch import load_file

    docs = [d for d in load_results(AGREEMENT_TOPIC, results_dir=results_dir) if d.get("tensors_file")]
    if not docs:
        return None
    doc = docs[-1]
    tensors_path = Path(doc["path"]).parent / doc["tensors_file"]
    return doc, (load_file(str(tensors_path)) if tensors_path.is_file() else {})


def recorded_vs_live(be: Backend | None = None, *, results_dir: Path | None = None) -> dict | None:
    """The recorded exllamav2 prompt logits against this machine's engine (the reference on a CPU), same prompt ids.

    Returns None when nothing is recorded yet; else the recording's label fields and the live comparison:
    max_abs_diff and rel_l2 over every prompt position, and whether both pick the same next token."""
    found = load_agreement(results_dir)
    if found is None or "exllamav2_prompt_logits" not in found[1]:
        return None
    doc, tensors = found
    if be is None:
        be = load(Path(doc["model_dir"]) if Path(doc["model_dir"]).is_dir() else None, max_seq_len=512)
    live = be.forward(tensors["prompt_ids"])[0]
    recorded = tensors["exllamav2_prompt_logits"].float()
    return {"provenance": doc["provenance"], "live_backend": f"{be.name} on {be.device}",
            **compare_logits(live, recorded),
            "same_next_token": int(live[-1].argmax()) == int(recorded[-1].argmax()),
            "recorded": {k: doc.get(k) for k in ("prompt_logits_max_abs_diff", "prompt_logits_rel_l2",
                                                  "first_different_token", "first_near_tie",
                                                  "agree_until_first_near_tie")}}
