"""How big one GPU allocation really is: torch's 512-byte blocks and exllamav2's 32-row padding of linears."""
from __future__ import annotations

#: torch's CUDA caching allocator hands out blocks in multiples of 512 bytes (the smallest block is 512 B), and
#: ``torch.cuda.memory_allocated`` counts those block sizes. Exact predictions round every tensor the same way.
TORCH_BLOCK_BYTES = 512


def alloc_bytes(n_bytes: int) -> int:
    """The bytes torch's caching allocator reports for one tensor of ``n_bytes`` (rounded up to 512 B)."""
    n = int(n_bytes)
    if n <= 0:
        return 0
    return -(-n // TORCH_BLOCK_BYTES) * TORCH_BLOCK_BYTES


def pad32(n: int) -> int:
    """exllamav2 linear.py ``ExLlamaV2Linear.__init__``: ``out_features`` is padded to a multiple of 32."""
    return n + (-n % 32)
