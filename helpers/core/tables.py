"""Rows of results as a table a notebook shows as a cell's last value: a pandas DataFrame (JupyterLab draws it as an
HTML table, nbval compares its text). The helpers return rows (lists of dicts); ``table`` turns them into one."""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from helpers.core.errors import CourseError


def table(rows: Iterable[Mapping], columns: Mapping[str, str] | Sequence[str] | None = None, *,
          index: str | None = None, digits: int | Mapping[str, int] | None = None):
    """A DataFrame of ``rows``: ``columns`` picks the keys in order (a mapping also renames them: key -> heading),
    ``index`` names the heading (after renaming) that labels the rows, ``digits`` rounds floats (one count, or one
    per heading). A key missing from every row is a one-line error naming it."""
    try:
        import pandas as pd
    except ImportError as exc:
        raise CourseError("pandas is not installed: run `python3 scripts/setup.py install` (it installs "
                          "requirements.txt)") from exc
    rows = [dict(r) for r in rows]
    df = pd.DataFrame(rows)
    if columns is not None:
        keys = list(columns)
        missing = [k for k in keys if k not in df.columns]
        if missing:
            raise CourseError(f"no column {', '.join(map(repr, missing))} in these rows (they have "
                              f"{', '.join(map(str, df.columns)) or 'none'})")
        df = df[keys]
        if isinstance(columns, Mapping):
            df = df.rename(columns=dict(columns))
    if digits is not None:
        df = df.round(digits if isinstance(digits, int) else dict(digits))
    if index is not None:
        df = df.set_index(index)
    return df


__all__ = ["table"]
