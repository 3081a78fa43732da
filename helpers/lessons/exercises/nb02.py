"""Notebook 02's exercises (inside an EXL2 file). Each expected answer is computed below from first principles or
with the course's helpers; ``solution(id)`` prints the function that computes it."""
from __future__ import annotations

from helpers.core.units import GIB
from helpers.lessons import tour
from helpers.lessons.exercises import Exercise, register
from helpers.specs import shapes


def fixture_bpw() -> float:

    return tour.inspect_report(tour.open_model(tour.CONVERTER_FIXTURE))["totals"]["bits_per_weight"]


def linears_gib_14b_at_4bpw() -> float:
    shape = shapes.model_shape("qwen2.5-14b")
    weights = shape.n_layers * sum(k * n for _mod, _lin, k, n, _bias in shape.layer_linears())
    return weights * 4.0 / 8 / GIB                       # bits per weight / 8 = bytes per weight


def linears_gib_14b_in_gb() -> float:                     # GB instead of GiB
    return linears_gib_14b_at_4bpw() * GIB / 1e9


def packed_rows_5bit() -> int:
    rows, bits = 32, 5
    return rows * bits // 32                              # 32 codes of 5 bits = 160 bits = 5 int32 words per column


def one_weight() -> float:
    bits, q, scale_code, q_scale_max = 6, 45, 11, 0.0625
    scale = (scale_code + 1) ** 2 * q_scale_max / 256     # 4-bit scale code on a square-law curve
    return (q - 2 ** (bits - 1)) * scale                   # 6-bit code around its zero point 2^5 = 32


def one_weight_no_zero_point() -> float:
    bits, q, scale_code, q_scale_max = 6, 45, 11, 0.0625
    return q * (scale_code + 1) ** 2 * q_scale_max / 256 + 0 * bits


EXERCISES = register(
    Exercise(
        "02.predict_fixture_bpw",
        "Predict before the chart: exllamav2's converter was asked for 3.0 bits per weight on the tiny checkpoint "
        "below. What average bits per weight do its decoder linears end up with (every stored bit counted: codes, "
        "scales, group data; the head excluded)?",
        fixture_bpw, unit="bpw", rel_tol=0.02, predict=True,
        hint="the converter keeps to its target: the bits it spends where the error is worst it saves elsewhere",
        why="the converter measures each layer's error at every candidate mix and picks the mixes that lower the "
            "error most within the target; the chart shows where it spent more bits and where fewer"),
    Exercise(
        "02.linears_14b_4bpw",
        "How many GiB do the decoder linears of Qwen2.5-14B take at an average 4.0 bits per weight? (Use the shape's "
        "layer_linears(): in_features x out_features per linear.)",
        linears_gib_14b_at_4bpw, unit="GiB", rel_tol=0.01,
        hint="weights = layers x sum(in x out) over q/k/v/o/gate/up/down; bytes = weights x bpw / 8; GiB = bytes / "
             "2^30",
        mistakes=((linears_gib_14b_in_gb, "that is in GB (10^9 bytes): the course counts GiB (2^30 bytes)"),)),
    Exercise(
        "02.packed_rows_5bit",
        "A group of 32 rows stored at 5 bits: how many int32 rows of q_weight does it fill (per output column)?",
        packed_rows_5bit, unit="rows",
        hint="32 codes x 5 bits, packed into 32-bit words"),
    Exercise(
        "02.one_weight",
        "A 6-bit code q = 45 in a group whose scale code is 11 and q_scale_max is 0.0625: what weight does it "
        "stand for? (Exact arithmetic, no fp16 rounding.)",
        one_weight, rel_tol=1e-4,
        hint="scale = (code + 1)^2 x q_scale_max / 256; weight = (q - 2^(bits-1)) x scale",
        mistakes=((one_weight_no_zero_point, "subtract the zero point 2^(bits-1) from the code first"),)),
)
