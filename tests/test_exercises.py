"""Every exercise of every notebook: its worked solution passes its own checker, a wrong answer is refused with a
hint, "not answered yet" and wrong types get one clear line, and each notebook has 2 to 4 exercises."""
from __future__ import annotations

import importlib
import re

import pytest

from helpers.lessons import exercises as E

IDS = sorted(E.registry())


def _wrong(expected):
    if isinstance(expected, bool):
        return not expected
    if isinstance(expected, str):
        return expected + " (no)"
    if isinstance(expected, (list, tuple)):
        return [_wrong(x) for x in expected]
    return expected * 1.37 + 1


def test_modules_are_discovered_and_ids_match_their_notebook():
    mods = E.notebook_modules()
    assert "nb01" in mods and "nb02" in mods
    for name in mods:
        module = importlib.import_module(f"helpers.lessons.exercises.{name}")
        found = getattr(module, "EXERCISES", None)
        assert isinstance(found, dict) and found, f"{name}.py registers no EXERCISES"
        assert 2 <= len(found) <= 4, f"{name}.py has {len(found)} exercises; the course asks for 2 to 4"
        for key, ex in found.items():
            assert isinstance(ex, E.Exercise) and key == ex.id, key
            assert re.fullmatch(rf"{name[2:]}\.[a-z0-9_]+", key), f"{key}: ids are '<notebook>.<name>'"
            assert ex.hint and ex.question, key


@pytest.mark.parametrize("exercise_id", IDS)
def test_solution_passes_its_checker(exercise_id, capsys):
    ex = E.registry()[exercise_id]
    assert E.check(exercise_id, ex.expected()) is True
    assert capsys.readouterr().out.startswith(E.RIGHT)
    text = E.solution_text(exercise_id)
    assert "def " in text and "answer:" in text     # the worked solution is real code, printed out of the notebook


@pytest.mark.parametrize("exercise_id", IDS)
def test_wrong_answer_is_refused_with_a_hint(exercise_id, capsys):
    ex = E.registry()[exercise_id]
    assert E.check(exercise_id, _wrong(ex.expected())) is False
    out = capsys.readouterr().out
    assert out.startswith(E.NOT_YET) and out.count("\n") == 1 and len(out) > len(E.NOT_YET) + 10


@pytest.mark.parametrize("exercise_id", IDS)
def test_typical_mistakes_get_their_own_hint(exercise_id):
    ex = E.registry()[exercise_id]
    for wrong, why in ex.mistakes:
        ok, line = E.verdict(exercise_id, wrong())
        assert not ok and why in line, (exercise_id, line)


def test_none_and_wrong_types_say_so(capsys):
    assert E.check("01.kv_llama8b", None) is False
    assert "not answered yet" in capsys.readouterr().out
    assert E.check("01.kv_llama8b", "131072 B") is False
    assert "drop the quotes" in capsys.readouterr().out
    assert E.check("01.kv_llama8b", True) is False
    assert "a number" in capsys.readouterr().out


def test_tolerance_and_numeric_types():
    import torch

    exact = E.registry()["01.kv_llama8b"].expected()
    assert E.verdict("01.kv_llama8b", float(exact))[0]
    assert E.verdict("01.kv_llama8b", torch.tensor(exact))[0]
    gib = E.registry()["01.q4_14b_32k"].expected()
    assert E.verdict("01.q4_14b_32k", round(gib, 2))[0]          # rounded as printed: within 1 %
    assert not E.verdict("01.q4_14b_32k", gib * 1.05)[0]


def test_factor_hint_and_unknown_id(capsys):
    exact = E.registry()["01.kv_llama8b"].expected()
    ok, line = E.verdict("01.kv_llama8b", exact / 1024)
    assert not ok and "1024" in line
    assert E.check("01.nope", 1) is False
    assert "no exercise '01.nope'" in capsys.readouterr().out
