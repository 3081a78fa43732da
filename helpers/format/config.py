"""A model's config.json: the one reader of it, the values the course needs from it, and "is this folder EXL2?".

Torch-free. ``load_config`` reads a model directory's config.json (one-line CourseErrors for a missing or invalid
file); ``resolve_config`` also takes a dict or a bundled name such as ``"qwen2.5-14b"``. ``config_get`` looks inside
``text_config`` too (multimodal configs nest the language model there), ``rope_theta_of`` finds rope_theta wherever
transformers put it, ``expected_linear_shapes`` gives every linear's (in, out). ``is_exl2_dir`` is the one check of
"this folder is an EXL2 checkpoint".
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from helpers.core import paths
from helpers.core.errors import CourseError
from helpers.format.header import read_header


def read_config_file(path: Path) -> dict:
    """The JSON object in a config.json file (CourseError if it is unreadable, not JSON or not an object)."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CourseError(f"{path} is not valid JSON ({exc}); restore it from the model's source") from None
    if not isinstance(cfg, dict):
        raise CourseError(f"{path} does not hold a JSON object; restore it from the model's source")
    return cfg


def load_config(model_dir: Path) -> dict:
    """config.json of a model directory as a dict."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CourseError(f"{model_dir} has no config.json: point at a model directory (config.json + *.safetensors)")
    return read_config_file(path)


def resolve_config(config: Mapping | str | os.PathLike) -> dict:
    """A config dict from a dict, a path to config.json (or its folder), or a bundled name ('qwen2.5-14b')."""
    if isinstance(config, Mapping):
        return dict(config)
    p = Path(str(config)).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        bundled = paths.CONFIGS_DIR / f"{config}.json"
        if bundled.is_file():
            p = bundled
        else:
            names = sorted(f.stem for f in paths.CONFIGS_DIR.glob("*.json")) if paths.CONFIGS_DIR.is_dir() else []
            raise CourseError(f"no config '{config}': give a path to a config.json or one of the bundled names "
                              f"({', '.join(names) or 'none bundled'})")
    return read_config_file(p)


def config_get(config: Mapping, key: str, default: Any = None) -> Any:
    """``config[key]``, looking inside ``text_config`` too (multimodal configs nest the language model)."""
    if key in config and config[key] is not None:
        return config[key]
    sub = config.get("text_config")
    if isinstance(sub, Mapping) and sub.get(key) is not None:
        return sub[key]
    return default


def expected_linear_shapes(config: Mapping) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) per linear kind for a Llama/Mistral/Qwen2-style config."""
    h = config_get(config, "hidden_size")
    nh = config_get(config, "num_attention_heads")
    if not h or not nh:
        return {}
    nkv = config_get(config, "num_key_value_heads", nh)
    hd = config_get(config, "head_dim") or h // nh
    inter = config_get(config, "intermediate_size")
    shapes = {"q_proj": (h, nh * hd), "k_proj": (h, nkv * hd), "v_proj": (h, nkv * hd), "o_proj": (nh * hd, h)}
    if inter:
        shapes.update(gate_proj=(h, inter), up_proj=(h, inter), down_proj=(inter, h))
    vocab = config_get(config, "vocab_size")
    if vocab:
        shapes["lm_head"] = (h, vocab)
    return shapes


def rope_theta_of(config: Mapping) -> float | None:
    """rope_theta wherever the config keeps it (top level, or transformers 5's ``rope_parameters``)."""
    if config.get("rope_theta") is not None:
        return float(config["rope_theta"])
    for key in ("rope_parameters", "rope_scaling"):
        sub = config.get(key)
        if isinstance(sub, Mapping) and sub.get("rope_theta") is not None:
            return float(sub["rope_theta"])
    sub = config.get("text_config")
    if isinstance(sub, Mapping):
        return rope_theta_of(sub)
    return None


def is_exl2_dir(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds an EXL2 checkpoint: its config.json declares ``quant_method: exl2`` (as exllamav2's
    converter and this course's writers write it), or one of its ``*.safetensors`` holds a ``*.q_weight`` tensor.
    Reads headers only (no torch); a corrupt safetensors file raises CourseError."""
    d = Path(folder)
    if not d.is_dir():
        return False
    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
        if cfg.get("quantization_config", {}).get("quant_method") == "exl2":
            return True
    except (OSError, ValueError, AttributeError):
        pass
    for f in sorted(d.glob("*.safetensors")):
        header, _ = read_header(f)
        if any(k.endswith(".q_weight") for k in header):
            return True
    return False
