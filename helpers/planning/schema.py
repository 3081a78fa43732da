"""The JSON a plan prints (``plan --json``) and the versioned JSON Schema it follows (plan.schema.json, here)."""
from __future__ import annotations

import json
from pathlib import Path

from helpers.core.errors import CourseError
from helpers.planning.planner import SCHEMA_VERSION

SCHEMA_PATH = Path(__file__).with_name("plan.schema.json")


def load_schema() -> dict:
    """The schema (draft 2020-12) as a dict."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def validate(doc: dict | str) -> dict:
    """Check a plan's JSON (a dict or its text) against the schema with the jsonschema library; returns the dict or
    raises a one-line CourseError naming the first mismatch."""
    import jsonschema

    data = json.loads(doc) if isinstance(doc, str) else doc
    major = str(data.get("schema_version", "")).split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise CourseError(f"plan JSON has schema_version {data.get('schema_version')!r}; this course reads "
                          f"{SCHEMA_VERSION.split('.')[0]}.x")
    try:
        jsonschema.validate(data, load_schema(), cls=jsonschema.Draft202012Validator)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top)"
        raise CourseError(f"plan JSON does not follow plan.schema.json at {where}: {exc.message}") from None
    return data
