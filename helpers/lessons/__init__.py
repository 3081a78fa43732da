"""Logic that belongs to one notebook: tour (notebook 02's walk through an EXL2 file), quality (perplexity and the
quantization-cost sweep on the embedded model), cache_quality (notebook 01: what each exllamav2 cache mode costs in
quality), exercises (every notebook's exercises, checked by ``check`` with their solutions out of the way)."""
