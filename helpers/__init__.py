"""Helpers for the course "GPU memory and inference speed of local LLMs with ExLlamaV2".

One folder per layer, one idea per file, imports only downward (docs/ARCHITECTURE.md; an architecture test
checks it): core -> format -> specs -> memory -> models -> engines -> speed -> fallback -> lessons -> plots ->
recordings -> cli. exllamav2 is imported lazily, only on a CUDA machine, and only by engines/exllama.py (it compiles
its extension on first import).
"""
__version__ = "0.1.0"

import warnings as _warnings

# transformers imports tqdm.auto, which warns in Jupyter when ipywidgets is absent; the course's bars are plain text.
_warnings.filterwarnings("ignore", message="IProgress not found")
