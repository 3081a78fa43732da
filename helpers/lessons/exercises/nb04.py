"""Notebook 04's exercises (the Windows sysmem fallback as a test of rival explanations). Each expected answer is
computed below with the course's speed model (``helpers.speed.model``) and datasheet figures; ``solution(id)``
prints the function that computes it."""
from __future__ import annotations

from helpers.fallback import seed
from helpers.fallback.pcie import pcie_practical_bandwidth
from helpers.lessons.exercises import Exercise, register
from helpers.memory.setup import LoadSetup
from helpers.speed import model as speed

#: the seed's model on its card (FP16 cache, a desktop host)
SEED = LoadSetup("qwen2.5-14b", bpw=5.5, gpus="RTX 4080 Super")
PCIE = pcie_practical_bandwidth(4, 16)          # bytes/s the seed's PCIe 4.0 x16 delivers in practice
PCIE3 = pcie_practical_bandwidth(3, 16)         # the same card in a PCIe 3.0 x16 slot: half of it


def lm_head_pcie3_tok_s() -> float:             # row (c') with the card in a PCIe 3.0 x16 slot, 256 deep
    return seed.lm_head_only(256, PCIE3).tok_s  # the central estimate, the fitted constants


def _vram_bandwidth() -> float:                 # what the fitted model reaches of the datasheet's 736 GB/s
    return speed.CONSTANTS["bandwidth_fraction"] * SEED.gpu["bandwidth_gbs"] * 1e9


def lm_head_read_twice() -> float:              # a slip: the lm_head counted in VRAM as well as over PCIe
    return 1 / (1 / lm_head_pcie3_tok_s() + SEED.weights.head / _vram_bandwidth())


def half_of_row_c() -> float:                   # a slip: half the link's bandwidth taken as half the whole speed
    return seed.lm_head_only(256).tok_s / 2


def _lm_head_why() -> str:
    head, vram = SEED.weights.head, SEED.weights.vram
    four, three = head / PCIE * 1e3, head / PCIE3 * 1e3
    vram_ms = (vram - head) / _vram_bandwidth() * 1e3
    return (f"{head / 1e9:.2f} GB over the link takes {three:.0f} ms a token on PCIe 3.0 instead of {four:.0f} ms on "
            f"4.0, while the {vram_ms:.0f} ms for the weights left in VRAM stay: one small tensor every token reads "
            "sets the speed, and the slower the link, the more it does")


#: made-up readings from a machine the notebook has not shown (not the seed's)
READINGS = {"shared_gpu_memory_gb": 0.9, "flash_attn": True, "tok_s": {256: 45.0, 16384: 21.0}}


def surviving_hypothesis() -> str:
    # every rival of seed.hypotheses against the readings: the one whose attention path, spill and ranges fit
    stands = [r["id"] for r in seed.judge(READINGS) if r["stands"]]
    if len(stands) != 1:
        raise ValueError(f"the readings should leave one explanation, they leave {stands}")
    return stands[0]


def _fails(rid: str):
    return lambda: f"({rid}) fails: " + next(r["reason"] for r in seed.judge(READINGS) if r["id"] == rid)


def _verdicts() -> str:
    return "; ".join(f"({r['id']}) " + ("stands" if r["stands"] else r["reason"].split(";")[0])
                     for r in seed.judge(READINGS))


EXERCISES = register(
    Exercise(
        "04.lm_head_pcie3",
        "Predict, then compute: row (c') put only the lm_head in system RAM, read over the seed's PCIe 4.0 x16. "
        "Suppose the same card sits in a PCIe 3.0 x16 slot (an older board: 11.93 GB/s in practice, half of 4.0's). "
        "How many tok/s does the speed model give (flash-attn, FP16 cache, 256 tokens deep)?",
        lm_head_pcie3_tok_s, unit="tok/s", rel_tol=0.01, predict=True,
        hint="speed.decode_estimate(setup, 256, spill=speed.Spill(the lm_head's bytes, 0, 11.925)): the weights still "
             "in VRAM at eta x 736 GB/s, the host time, and the lm_head over the slower link",
        why=_lm_head_why,
        mistakes=((lm_head_read_twice, "the lm_head is read over PCIe instead of from VRAM, not as well: take its "
                                       "bytes out of the VRAM term"),
                  (half_of_row_c, "half the link's bandwidth doubles only the time over the link, not the whole "
                                  "token's: the weights in VRAM and the host time stay"))),
    Exercise(
        "04.hypothesis_readings",
        "Made-up readings from another machine: Task Manager shows 0.9 GB of Shared GPU memory for the process "
        "while it decodes, `import flash_attn` works, and it decodes 45 tok/s at 256 tokens deep and 21 tok/s at "
        "16,384. Which explanation of the hypotheses table survives: a, b, c, c', d, e or b+d?",
        surviving_hypothesis, accept=("(b)",),
        hint=lambda: "test each row against the three readings: " + _verdicts(),
        why=_verdicts,
        mistakes=tuple((lambda rid=rid: rid, _fails(rid)) for rid in ("a", "c", "c'", "d", "e", "b+d"))),
)
