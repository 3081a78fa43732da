"""Helpers for the course "GPU memory and inference speed of local LLMs with ExLlamaV2".

Rooms, one idea each, imported from the ground up (nothing imports upward):
errors/paths/results -> gpu, exl2 -> memory, models, reference -> backend -> bench -> fallback -> plots, __main__.
exllamav2 is imported lazily, only on a CUDA machine (it compiles its extension on first import).
"""
__version__ = "0.1.0"

import warnings as _warnings

# transformers imports tqdm.auto, which warns in Jupyter when ipywidgets is absent; the course's bars are plain text.
_warnings.filterwarnings("ignore", message="IProgress not found")
