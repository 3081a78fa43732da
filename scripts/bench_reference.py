"""Decode speed of the course's reference decoder against transformers, on the same model, dtype and threads.

    .venv/bin/python scripts/bench_reference.py [--model DIR] [--threads 2] [--tokens 32] [--repeats 5]

Both engines load the embedded model's float source (``helpers.models.embedded.float_model_dir()``; or ``--model``,
a float or EXL2 directory: transformers gets the reference's dequantized weights either way), in the same dtype,
in the same process, with the same number of torch threads. Each repeat prefills the same chat prompt and then decodes
``--tokens`` greedy tokens one at a time, timing the decode steps only; the engines alternate repeat by repeat so that
a machine busy with something else slows both alike. Prints each engine's median tokens/s and the ratio.
This is a benchmark, not a test: it prints figures and asserts nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch


def reference_decode(model, prompt_ids: torch.Tensor, tokens: int) -> tuple[float, list[int]]:
    """Seconds for ``tokens`` greedy decode steps after a prefill of the prompt, and the tokens."""
    logits = model.forward(prompt_ids, last_only=True)[0, -1]
    out = []
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok = int(torch.argmax(logits))
        out.append(tok)
        logits = model.decode_step(tok)
    return time.perf_counter() - t0, out


@torch.inference_mode()
def transformers_decode(model, prompt_ids: torch.Tensor, tokens: int) -> tuple[float, list[int]]:
    """The same loop through transformers: one forward per token with its own KV cache (DynamicCache)."""
    out = model(prompt_ids, use_cache=True, logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[0, -1]
    toks = []
    t0 = time.perf_counter()
    for _ in range(tokens):
        tok = int(torch.argmax(logits))
        toks.append(tok)
        out = model(torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[0, -1]
    return time.perf_counter() - t0, toks


def transformers_model(model_dir, dtype: torch.dtype):
    """transformers' own model class for the config, holding the float state dict the reference reads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from helpers.engines.reference import load_state_dict

    cfg, state = load_state_dict(model_dir, dtype=dtype)
    cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "architectures", "transformers_version")}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise SystemExit(f"transformers' model does not match the weights: missing {missing}, unexpected {unexpected}")
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the embedded model's float source)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    args = ap.parse_args(argv)

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    from helpers.core.errors import CourseError
    from helpers.engines.reference import ReferenceModel

    try:
        if args.model is None:
            from helpers.models.embedded import float_model_dir

            model_dir = float_model_dir()
        else:
            model_dir = args.model
        ref = ReferenceModel.from_dir(model_dir, dtype=dtype, max_seq_len=1024)
    except CourseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    hf = transformers_model(model_dir, dtype)
    ids = ref.tokenizer.encode(args.prompt, chat=True)
    shape = ref.config.shape
    print(f"model {model_dir}\n{shape.architecture}, {shape.n_layers} layers, dtype {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, prompt {ids.shape[1]} tokens, "
          f"{args.tokens} decode steps x {args.repeats} repeats, alternating")
    # warm-up (first calls allocate and pick kernels)
    reference_decode(ref, ids, 4)
    transformers_decode(hf, ids, 4)
    ref_rates, hf_rates, same = [], [], True
    for r in range(args.repeats):
        t_ref, toks_ref = reference_decode(ref, ids, args.tokens)
        t_hf, toks_hf = transformers_decode(hf, ids, args.tokens)
        ref_rates.append(args.tokens / t_ref)
        hf_rates.append(args.tokens / t_hf)
        same &= toks_ref == toks_hf
        print(f"  repeat {r + 1}: reference {ref_rates[-1]:6.2f} tok/s   transformers {hf_rates[-1]:6.2f} tok/s",
              flush=True)
    m_ref, m_hf = statistics.median(ref_rates), statistics.median(hf_rates)
    print(f"decode tokens/s, median of {args.repeats}: reference {m_ref:.2f}, transformers {m_hf:.2f} "
          f"(reference / transformers = {m_ref / m_hf:.2f}x)")
    print(f"greedy tokens identical in every repeat: {same}")
    print(f"reference KV cache: {ref.cache.nbytes() / 2**20:.1f} MiB for max_seq_len {ref.max_seq_len} "
          f"({ref.cache.bytes_per_token()} bytes per token, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
