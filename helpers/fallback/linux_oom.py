"""Linux's own answer to the overflow the Windows driver hides: CUDA out-of-memory at load time (``linux_oom_demo``).

The process's VRAM is capped with ``torch.cuda.set_per_process_memory_fraction`` to what the smaller card would give
it; loading then raises CUDA out-of-memory (exllamav2's ``load_autosplit`` turns it into "Insufficient VRAM for model
and cache"), which is caught, explained, and the cap lifted.
"""
from __future__ import annotations

import gc
import traceback

from helpers.core import devices as gpu
from helpers.core.errors import CourseError
from helpers.core.units import GIB
from helpers.fallback.emulator import budget_of, emulated_card
from helpers.fallback.routed_load import Exl2Model
from helpers.memory.setup import LoadSetup


def linux_oom_demo(setup: LoadSetup) -> dict:
    """The same overflow without the emulator: cap this process's VRAM to ``setup``'s smaller card (less its reserve
    and CUDA context), load, catch the error.

    ``torch.cuda.set_per_process_memory_fraction`` limits what torch's allocator may take (every exllamav2 weight
    and cache tensor is a torch tensor). The cap is lifted afterwards, whatever happens."""
    import torch

    gpu.require_cuda("the Linux out-of-memory demonstration")
    total = torch.cuda.mem_get_info()[1]
    cap, card = budget_of(setup), emulated_card(setup)
    if cap >= total:
        raise CourseError(f"this GPU has {total / GIB:.1f} GiB, not more than the emulated {card['card_gib']:g} GiB "
                          "card: nothing to cap; use a smaller --card-gib")
    reached: list[int] = []
    out = {"max_seq_len": setup.max_seq_len, "cache_mode": setup.cache_mode, **card, "cap_bytes": cap,
           "fraction": cap / total}
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.set_per_process_memory_fraction(cap / total)
    model = None
    try:
        model = Exl2Model(setup, on_module=lambda i, n: reached.append(i))
        out.update(outcome="loaded", error=None)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        text = str(exc).strip().splitlines()
        if not (isinstance(exc, torch.cuda.OutOfMemoryError) or "Insufficient VRAM" in str(exc)
                or "out of memory" in str(exc)):
            raise
        out.update(outcome="out-of-memory", error_type=type(exc).__name__, error=text[0][:300] if text else "")
        traceback.clear_frames(exc.__traceback__)
        del exc
    finally:
        peak = torch.cuda.max_memory_allocated()
        if model is not None:
            model.unload()
        model = None
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
    last = reached[-1] if reached else None
    out.update(peak_allocated_bytes=int(peak), last_module_index=last,
               allocated_after_bytes=int(torch.cuda.memory_allocated()))
    if out["outcome"] == "out-of-memory":
        out["explanation"] = (
            f"Linux has no sysmem fallback: with {cap / GIB:.2f} GiB allowed, loading ran out of VRAM at module "
            f"{last} (torch had {peak / GIB:.2f} GiB allocated at its peak). exllamav2's load_autosplit caught CUDA's "
            "out-of-memory, found no further GPU and stopped ('Insufficient VRAM for model and cache'). The same "
            "load on Windows would not stop (the fallback exists since driver 536.40; the policy switch (\"CUDA - "
            "Sysmem Fallback Policy\") since 546.01): it would put the rest in system RAM and run slowly.")
    else:
        out["explanation"] = (f"the model and its {setup.max_seq_len}-token cache fit in {cap / GIB:.2f} GiB: "
                              "nothing overflowed")
    return out
