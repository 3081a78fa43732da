"""`python -m helpers generate --prompt TEXT`: stream an answer from exllamav2 (CUDA) or the reference (anywhere)."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from helpers.core.errors import CourseError
from helpers.core.units import parse_tokens
from helpers.engines.backend import BACKENDS, load
from helpers.format.config import is_exl2_dir
from helpers.memory.cache_modes import CACHE_MODES


def float_model_note(model_dir) -> str | None:
    """One line when ``model_dir`` is not EXL2. generate runs float (Hugging Face safetensors) folders on purpose: the
    reference decoder reads them, and so does exllamav2 (unquantized); ``inspect`` and the memory tools read EXL2
    only and refuse them."""
    if is_exl2_dir(model_dir):
        return None
    return (f"note: {Path(model_dir).name} is a float (non-EXL2) model: generating from its unquantized weights; "
            "inspect and the EXL2 lessons need an EXL2 folder")


def main(argv: list[str]) -> int:
    """`python -m helpers generate --prompt TEXT [--model DIR] [--max-new-tokens N] ...`: stream the answer."""
    ap = argparse.ArgumentParser(prog="python -m helpers generate",
                                 description="Generate text with exllamav2 (CUDA) or the reference (anywhere).")
    ap.add_argument("--prompt", required=True, help="the user's message (wrapped in the chat template)")
    ap.add_argument("--model", default=None,
                    help="model directory (default: $EXL2_COURSE_MODEL or the embedded model); a float (non-EXL2) "
                         "folder runs unquantized, with a one-line note")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-seq-len", "--ctx", type=parse_tokens, default=2048,
                    help="cache length in tokens, e.g. 2048 or 2k (default 2048)")
    ap.add_argument("--cache-mode", default="fp16", help=f"cache mode: {', '.join(CACHE_MODES)}")
    ap.add_argument("--backend", default="auto", choices=BACKENDS)
    ap.add_argument("--device", default=None, choices=("cuda", "cpu"))
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-chat", action="store_true", help="feed the prompt as plain text, without the chat template")
    args = ap.parse_args(argv)
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
    if args.max_new_tokens < 1:
        raise CourseError("--max-new-tokens must be at least 1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        be = load(args.model, max_seq_len=args.max_seq_len, cache_mode=args.cache_mode, backend=args.backend,
                  device=args.device)
    print(f"backend: {be.name} on {be.device} ({be.reason}); model {be.model_dir}", file=sys.stderr)
    note = float_model_note(be.model_dir)
    if note:
        print(note, file=sys.stderr)

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    be.generate(args.prompt, max_new_tokens=args.max_new_tokens, chat=not args.no_chat,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=emit)
    sys.stdout.write("\n")
    return 0
