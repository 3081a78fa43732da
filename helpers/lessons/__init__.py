"""Logic that belongs to one notebook: tour (notebook 02's walk through an EXL2 file), quality (perplexity and the
quantization-cost sweep on the embedded model)."""
