"""core.tables.table: rows of dicts become the DataFrame a notebook cell shows as its last value."""
from __future__ import annotations

import pytest

from helpers.core.errors import CourseError
from helpers.core.tables import table

ROWS = [{"mode": "fp16", "bytes": 196608, "gib": 6.0, "note": "K and V"},
        {"mode": "q4", "bytes": 59392, "gib": 1.8125, "note": "4-bit"}]


def test_columns_are_picked_renamed_and_indexed_in_order():
    df = table(ROWS, {"mode": "cache", "gib": "32k GiB", "bytes": "B/token"}, index="cache", digits=2)
    assert list(df.columns) == ["32k GiB", "B/token"]
    assert list(df.index) == ["fp16", "q4"] and df.index.name == "cache"
    assert df.loc["q4", "32k GiB"] == 1.81 and df.loc["q4", "B/token"] == 59392   # ints are not rounded


def test_digits_per_heading_and_all_columns_by_default():
    df = table(ROWS, digits={"gib": 1})
    assert list(df.columns) == ["mode", "bytes", "gib", "note"] and df["gib"].tolist() == [6.0, 1.8]


def test_a_missing_key_is_one_line_naming_it():
    with pytest.raises(CourseError, match=r"no column 'tok_s' in these rows \(they have mode, bytes, gib, note\)"):
        table(ROWS, ["mode", "tok_s"])
