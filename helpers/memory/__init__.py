"""Where every byte goes when exllamav2 0.3.2 loads a model (the planner built on it lives in helpers.planning).

Every term was read off exllamav2's own sources (each function names the file and function it follows). Nothing
here imports exllamav2 or torch: this package must run on any laptop. Sizes are bytes (``int``) in code and GiB
(2**30) with the unit when shown.

- cache_modes: the KV cache modes (and their exllamav2 classes) and the two load paths
- allocation, limits: torch's 512-byte rounding, exllamav2's 32-row padding; the checks of a length and a batch
- weights, kv_cache, scratch: the three things exllamav2 allocates
- breakdown: every term of one configuration, with the CUDA context and a reserve
- load_order: the same allocations in the order exllamav2 makes them
- simple_calculator: the popular formula beside the real total
- recorded: GPU measurements read back (recorded by helpers.recordings.memory)
"""
