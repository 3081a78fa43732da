"""The speed model's calibration: the public data set, the fit (known constants recovered from synthetic data), the
leave-one-source-out validation, the shipped constants, and the consistency rule (every record the course holds lies
inside the range the course prints for its configuration)."""
from __future__ import annotations

import dataclasses
import json
import math

import jsonschema
import pytest

from helpers.cli.calibrate import main as calibrate_main
from helpers.cli.calibrate import same
from helpers.core.paths import PACKAGE_DIR, REPO_DIR
from helpers.memory.setup import LoadSetup
from helpers.planning.planner import plan
from helpers.speed import calibration as cal
from helpers.speed.model import CONSTANTS, CONSTANTS_PATH, SpeedConstants

SCHEMA = json.loads((PACKAGE_DIR / "speed" / "calibration.schema.json").read_text())
DOC = json.loads(cal.DATA_PATH.read_text())
KNOWN = {"bandwidth_fraction": 0.7, "flash_attn_cost": 1.3, "torch_attn_cost": 1.6, "dequant_cost": 1.1,
         "layer_s_desktop": 40e-6, "layer_s_server": 200e-6, "torch_host_extra": 0.5, "hop_s": 80e-6}


@pytest.fixture(scope="module")
def points():
    return cal.load_points()[1]


def test_the_data_set_follows_its_schema_and_names_its_sources():
    jsonschema.validate(DOC, SCHEMA, cls=jsonschema.Draft202012Validator)
    used = [p for p in DOC["points"] if p["use"]]
    assert len(used) >= 15 and len({p["source"] for p in used}) >= 8
    for p in DOC["points"]:
        src = DOC["sources"][p["source"]]
        assert src["url"] and p["quote"] and (p["use"] or p["excluded_because"])
        assert set(p["config"]) >= {"model", "bpw", "gpus", "depth", "cache", "flash_attn"}
    # the seed's own report (exllamav2 issue 739) is what the course explains: it is never fitted
    assert not any("/739" in s["url"] for s in DOC["sources"].values())
    assert not any(p["config"]["model"] == "qwen2.5-14b" and "RTX 4080 Super" in p["config"]["gpus"]
                   for p in DOC["points"])


def _synthetic(points, values):
    """The real points' configurations with speeds computed from known constants."""
    pred = cal.predict(points, values)
    return [dataclasses.replace(p, tok_s=float(t)) for p, t in zip(points, pred)]


def test_the_fit_recovers_known_constants_from_synthetic_data(points):
    fake = _synthetic(points, KNOWN)
    got = cal.fit(fake)
    ident = cal.identified(fake)
    for name, value in KNOWN.items():
        if ident[name]:
            assert got[name] == pytest.approx(value, rel=2e-3), name
    # what no point pins down takes its stated fallback, never a fitted number
    assert not ident["hop_s"] and got["hop_s"] == cal.FALLBACK["hop_s"]


def test_a_constant_no_point_pins_down_falls_back(points):
    desktop_flash = [p for p in points if p.terms.host == "desktop" and p.terms.flash_attn]
    got = cal.fit(_synthetic(desktop_flash, KNOWN))
    assert got["layer_s_server"] == got["layer_s_desktop"]          # tied to the desktop's host time
    assert got["torch_attn_cost"] == 1.0 and got["torch_host_extra"] == 0.0   # first principles, no extra host time
    assert got["bandwidth_fraction"] == pytest.approx(KNOWN["bandwidth_fraction"], rel=5e-3)


def test_leave_one_source_out_never_sees_the_source_it_predicts(points):
    # a source made 3x slower than the rest: its own held-out prediction must not move towards it
    fake = _synthetic(points, KNOWN)
    slow = "oobabooga-blog-2023"
    bent = [dataclasses.replace(p, tok_s=p.tok_s / 3) if p.source == slow else p for p in fake]
    rows = {r["id"]: r for r in cal.leave_one_source_out(bent)}
    for p in bent:
        if p.source == slow:
            assert rows[p.id]["ratio"] == pytest.approx(1 / 3, rel=1e-2)


def test_the_shipped_constants_come_from_the_shipped_data(capsys):
    shipped = json.loads(CONSTANTS_PATH.read_text())
    assert shipped["data_sha256"] == cal.data_sha256()
    assert calibrate_main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "agrees with the data" in out and "leave one source out" in out and "eta" in out
    other = json.loads(json.dumps(shipped))
    other["constants"]["bandwidth_fraction"]["value"] *= 1.01
    assert not same(shipped, other)


def test_the_range_comes_from_out_of_source_errors(points):
    rows = cal.leave_one_source_out(points)
    lo, hi = (cal.percentile([r["ratio"] for r in rows], q) for q in cal.RANGE_PERCENTILES)
    assert CONSTANTS.range_low == pytest.approx(lo, rel=1e-4) and CONSTANTS.range_high == pytest.approx(hi, rel=1e-4)
    assert CONSTANTS.range_low < 1 < CONSTANTS.range_high and CONSTANTS.range_high / CONSTANTS.range_low < 1.9
    print(f"out of source: median measured/predicted {CONSTANTS.validation['leave_one_source_out']['median_ratio']}")


def test_every_record_lies_inside_the_range_the_course_prints(points):
    """The consistency rule: for every configuration the course holds a record of, the range it prints contains it."""
    pred = cal.predict(points, CONSTANTS.values)
    outside = [(p.id, p.tok_s, float(t)) for p, t in zip(points, pred)
               if not CONSTANTS.range_low * t <= p.tok_s <= CONSTANTS.range_high * t]
    assert not outside, outside


@pytest.mark.parametrize("depth, measured", [(128, 59.4), (30000, 18.1)])
def test_the_h100_record_lies_inside_what_plan_prints(depth, measured):
    """The external H100 record's 32k rows against `plan --gpu "H100 80GB SXM"` for that configuration."""
    doc = json.loads((REPO_DIR / "results/speed/external-h100-exllamav2-0-3-2-2026-11-25.json").read_text())
    assert {(r["ctx"], r["depth"]): r["decode_tok_s"] for r in doc["rows"]}[(32768, depth)] == measured
    p = plan(LoadSetup("qwen2.5-14b", gpus="H100 80GB SXM", bpw=5.5, max_seq_len=32768), depth=depth)
    lo, hi = p.to_dict()["decode_estimate_range_tok_s"]
    assert lo <= measured <= hi, (lo, measured, hi)


def test_the_constants_are_physical():
    c = CONSTANTS
    assert 0.5 < c["bandwidth_fraction"] <= 1.0          # a share of the datasheet bandwidth
    assert c["layer_s_server"] > c["layer_s_desktop"] > 0  # cloud hosts: slower per layer
    assert all(math.isfinite(v) and v >= 0 for v in c.values.values())
    assert isinstance(c, SpeedConstants) and "hop_s" in c.fallbacks
