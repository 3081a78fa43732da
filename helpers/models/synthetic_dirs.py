"""The course's synthetic checkpoints in the cache folder, each written once: Qwen2.5-14B's exact shape with random
weights at 5.5 bits per weight (the seed case's model), for the GPU recordings of memory, speed and the fallback."""
from __future__ import annotations

from pathlib import Path

from helpers.core.paths import cache_dir
from helpers.format import synthetic

#: the 14B-shaped checkpoint of the seed case: Qwen2.5-14B's shape (helpers/configs), random weights, 5.5 bpw
SYNTH_14B_CONFIG = "qwen2.5-14b"
SYNTH_14B_BPW = 5.5


def _synthetic_14b_folder() -> Path:
    return cache_dir() / "synthetic" / f"{SYNTH_14B_CONFIG}-{SYNTH_14B_BPW}bpw"


def synthetic_14b_written() -> bool:
    """Whether the 14B-shaped checkpoint is already in the cache folder (its config and tensors), writing nothing."""
    out = _synthetic_14b_folder()
    return (out / "config.json").exists() and any(out.glob("*.safetensors"))


def synthetic_14b_dir() -> Path:
    """The Qwen2.5-14B-shaped 5.5 bpw EXL2 checkpoint in the cache folder, written on first use (``format.synthetic``;
    a folder without its config or tensors is written again)."""
    out = _synthetic_14b_folder()
    if synthetic_14b_written():
        return out
    return Path(synthetic.write_synthetic(SYNTH_14B_CONFIG, SYNTH_14B_BPW, out) or out)
