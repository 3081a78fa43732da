"""The tiny EXL2 checkpoints made by exllamav2's own converter (fixtures/exl2/README.md): two live here, the third
ships with helpers because notebook 02 shows it."""
from pathlib import Path

from helpers.lessons.tour import CONVERTER_FIXTURE

HERE = Path(__file__).parent / "fixtures" / "exl2"
EXL2 = {"tiny_llama_b3.0": CONVERTER_FIXTURE, "tiny_llama_b4.5": HERE / "tiny_llama_b4.5",
        "tiny_qwen2_b6.5": HERE / "tiny_qwen2_b6.5"}
