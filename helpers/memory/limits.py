"""The checks every memory term shares: a context length and a batch size the planner accepts."""
from __future__ import annotations

from typing import Any

from helpers.core.errors import CourseError

#: largest context the planner accepts: exllamav2 allocates the whole cache up front, so 16M tokens is already
#: terabytes for any real model. Anything larger is a typo.
MAX_SEQ_LEN_LIMIT = 2**24
#: exllamav2 0.3.2's dynamic generator pages the cache in 256-token pages (generator/dynamic.py,
#: ``PAGED_PAGE_SIZE = 256``) and asserts ``cache.max_seq_len % 256 == 0``; the planner reports lengths in these steps
#: and the bench refuses other cache lengths
PAGE = 256
#: exllamav2 config.py defaults: ``max_input_len = 2048``, ``max_attention_size = 2048**2``
DEFAULT_MAX_INPUT_LEN = 2048
DEFAULT_MAX_ATTENTION_SIZE = 2048**2


def check_len(max_seq_len: Any, what: str = "max_seq_len") -> int:
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, (int, float)) or max_seq_len != max_seq_len:
        raise CourseError(f"{what} must be a whole number of tokens (got {max_seq_len!r})")
    if max_seq_len != int(max_seq_len) or max_seq_len <= 0:
        raise CourseError(f"{what} must be a positive whole number of tokens (got {max_seq_len})")
    if max_seq_len > MAX_SEQ_LEN_LIMIT:
        raise CourseError(f"{what} {int(max_seq_len):,} is absurd: exllamav2 allocates the whole cache up front; "
                          f"use at most {MAX_SEQ_LEN_LIMIT:,} tokens")
    return int(max_seq_len)


def check_batch(batch: Any) -> int:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1 or batch > 4096:
        raise CourseError(f"batch must be a whole number from 1 to 4096 (got {batch!r})")
    return batch
