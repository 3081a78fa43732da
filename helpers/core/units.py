"""Units: sizes are bytes in code and shown in GiB (2**30) with the unit; bandwidths are bytes per second.

The one place the course defines GiB and MiB and formats a byte count for a reader.
"""
from __future__ import annotations

from collections.abc import Iterable

from helpers.core.errors import CourseError

GIB = 2**30
MIB = 2**20
GB = 10**9  #: datasheets quote bandwidth in GB/s (10**9 bytes per second)


def gib(n_bytes: float) -> float:
    """Bytes -> GiB (2**30) as a float."""
    return float(n_bytes) / GIB


def fmt_gib(n_bytes: float, digits: int = 2, *, small_in_mib: bool = False) -> str:
    """'12.34 GiB': a byte count shown in GiB with its unit.

    ``small_in_mib``: below 0.1 GiB, show five decimals and the MiB in brackets, so a small tensor does not read as
    zero ('0.00049 GiB (0.50 MiB)'); ``digits`` is then ignored for such sizes.
    """
    g = gib(n_bytes)
    if small_in_mib and g < 0.1:
        return f"{g:.5f} GiB ({n_bytes / MIB:.2f} MiB)"
    return f"{g:.{digits}f} GiB"


def parse_tokens(text: str | int, what: str = "context") -> int:
    """A token count as people write it: '32768', '32k' (= 32,768: k is 1024 tokens, as in '4k context'),
    '32_768'. The one parser every CLI command uses for a context or a depth; a mistake is a one-line CourseError.
    """
    if isinstance(text, bool):
        raise CourseError(f"{what} must be a whole number of tokens (got {text!r})")
    if isinstance(text, int):
        value = text
    else:
        p = str(text).strip().lower().replace("_", "")
        try:
            value = int(p[:-1]) * 1024 if p.endswith("k") else int(p)
        except ValueError:
            raise CourseError(f"{what} '{str(text).strip()}' is not a whole number of tokens; write e.g. 32768 or "
                              "32k (k = 1024 tokens)") from None
    if value < 0:
        raise CourseError(f"{what} must not be negative (got {value})")
    return value


def parse_token_list(text: str | int | Iterable[int | str], what: str = "context") -> list[int]:
    """'4096,32768' or '4k,32k' (or a list of either) -> [4096, 32768], each part read by ``parse_tokens``."""
    if isinstance(text, int) and not isinstance(text, bool):
        return [parse_tokens(text, what)]
    parts = str(text).split(",") if isinstance(text, str) else list(text)
    out = [parse_tokens(part, what) for part in parts if str(part).strip()]
    if not out:
        raise CourseError(f"no {what} given; write e.g. 4096,32768 (or 4k,32k)")
    return out
