"""GPU recording: exllamav2 loads the embedded EXL2 checkpoint and answers the capital question (``results/models/``).

The course's own writer made the checkpoint; this checks, on a CUDA machine, that exllamav2 itself reads it and
answers "Paris" greedily, through the front door (``helpers.engines.exllama``: no_sdpa, load_autosplit).
"""
from __future__ import annotations

import os
from pathlib import Path

from helpers.core import devices as gpu
from helpers.core.errors import CourseError
from helpers.core.results import provenance, save_result
from helpers.engines import exllama
from helpers.memory.setup import LoadSetup
from helpers.models.embedded import CAPITAL_PROMPT, chat_prompt, resolve_model_dir

#: the cache of the recording: room for the prompt and the answer
CAPITAL_MAX_SEQ_LEN = 256 * 4


def record_capital_answer(model_dir: str | os.PathLike | None = None, max_new_tokens: int = 32) -> Path:
    """(CUDA) exllamav2 loads the embedded checkpoint and answers the capital question greedily; saved with its text."""
    gpu.require_cuda("loading the EXL2 model with exllamav2")
    folder = resolve_model_dir(model_dir)
    loaded = exllama.load(LoadSetup(folder, max_seq_len=CAPITAL_MAX_SEQ_LEN), load_path="autosplit")
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2Sampler  # after the front door's import

    tokenizer = loaded.ex.ExLlamaV2Tokenizer(loaded.config)
    generator = ExLlamaV2DynamicGenerator(model=loaded.model, cache=loaded.cache, tokenizer=tokenizer, paged=False)
    prompt = chat_prompt(CAPITAL_PROMPT, folder)
    answer = generator.generate(prompt=prompt, max_new_tokens=max_new_tokens,
                                gen_settings=ExLlamaV2Sampler.Settings.greedy(), encode_special_tokens=True,
                                stop_conditions=[tokenizer.eos_token_id], completion_only=True)
    ok = "paris" in answer.lower()
    rows = [{"model_dir": str(folder), "prompt": CAPITAL_PROMPT, "answer": answer.strip(), "paris": ok,
             "max_new_tokens": max_new_tokens, "no_sdpa": bool(loaded.config.no_sdpa)}]
    path = save_result("models", "capital-answer", rows, prov=provenance())
    if not ok:
        raise CourseError(f"exllamav2 answered {answer.strip()!r} (no 'Paris'); recorded in {path}")
    return path


GPU_RECORDINGS = {"capital-answer": record_capital_answer}
