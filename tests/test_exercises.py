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
    assert E.check(exercise_id, ex.expected()) is None      # a cell ending in check() shows its line and no True
    assert capsys.readouterr().out.startswith(E.RIGHT)
    text = E.solution_text(exercise_id)
    assert "def " in text and "answer:" in text     # the worked solution is real code, printed out of the notebook


@pytest.mark.parametrize("exercise_id", IDS)
def test_wrong_answer_is_refused_with_a_hint(exercise_id, capsys):
    ex = E.registry()[exercise_id]
    E.check(exercise_id, _wrong(ex.expected()))
    out = capsys.readouterr().out
    assert out.startswith(E.NOT_YET) and out.count("\n") == 1 and len(out) > len(E.NOT_YET) + 10


@pytest.mark.parametrize("exercise_id", IDS)
def test_typical_mistakes_get_their_own_hint(exercise_id):
    ex = E.registry()[exercise_id]
    for wrong, why in ex.mistakes:
        ok, line = E.verdict(exercise_id, wrong())
        assert not ok and (why() if callable(why) else why) in line, (exercise_id, line)


def test_none_and_wrong_types_say_so():
    assert E.verdict("01.predict_kv_nemo", None) == (False, "no answer yet: replace None with your answer (in B)")
    assert "drop the quotes" in E.verdict("01.predict_kv_nemo", "163840 B")[1]
    assert "a number" in E.verdict("01.predict_kv_nemo", True)[1]


def test_exact_answers_are_exact_and_rounded_ones_state_their_tolerance():
    import torch

    exact = E.registry()["01.predict_kv_nemo"].expected()
    assert E.verdict("01.predict_kv_nemo", float(exact))[0] and E.verdict("01.predict_kv_nemo", torch.tensor(exact))[0]
    assert not E.verdict("01.predict_kv_nemo", 163_000)[0]              # close is not right for an exact count
    assert not E.verdict("01.fp16_tokens_4gib", E.registry()["01.fp16_tokens_4gib"].expected() - 1)[0]
    gib = E.registry()["01.q4_8b_32k"].expected()
    assert E.verdict("01.q4_8b_32k", round(gib, 2))[0] and not E.verdict("01.q4_8b_32k", gib * 1.05)[0]
    for exercise_id, ex in E.registry().items():
        text = E.question_text(exercise_id)
        if ex.rel_tol:
            assert f"Checked to within {ex.rel_tol * 100:g}%." in text, exercise_id
        elif isinstance(ex.expected(), (int, float)):
            assert text.endswith("Checked exactly."), exercise_id


def test_a_hint_names_a_mistake_only_when_the_answer_is_that_mistake():
    exact = E.registry()["01.predict_kv_nemo"].expected()
    ok, line = E.verdict("01.predict_kv_nemo", exact / 1024)
    assert not ok and "a factor of 1024" in line
    assert "factor" not in E.verdict("01.predict_kv_nemo", exact / 1000)[1]   # 1000 is not the GB/GiB slip
    assert "factor" not in E.verdict("03.predict_tok_s_30k", 5000)[1]
    assert "K alone" in E.verdict("01.predict_kv_nemo", exact // 2)[1]


def test_predict_then_check_says_how_far_off_and_why(capsys):
    E.predict("01.predict_kv_nemo", 200_000)
    assert capsys.readouterr().out.startswith("your prediction: 200,000 B")
    ok, line = E.verdict("01.predict_kv_nemo")
    assert not ok and "you predicted 200,000 B, it is 163,840 B (+22%)" in line and "head_dim 128" in line
    E.predict("01.predict_kv_nemo", None)           # the stored notebook: the course's own answer, deterministic
    assert "no prediction written yet" in capsys.readouterr().out
    assert E.verdict("01.predict_kv_nemo")[0]
    assert "not a prediction" in (E.predict("01.gqa_gemma", 2) or capsys.readouterr().out)
    assert "give your answer" in E.verdict("01.gqa_gemma")[1]


def test_every_notebook_has_a_prediction_and_04_a_hypothesis_exercise():
    for nb in ("01", "02", "03", "04", "05"):
        assert any(E.registry()[i].predict for i in E.exercises(nb)), nb
    ids = E.exercises("04")
    assert any(i.startswith("04.hypothesis_") for i in ids)
    ok, line = E.verdict("04.hypothesis_readings", "a")
    assert not ok and line.startswith(E.NOT_YET + "(a) fails: it gives")
    ok, line = E.verdict("04.hypothesis_readings", "B")
    assert ok and "(b) stands" in line and "(b+d) it needs flash-attn absent" in line


def test_unknown_id(capsys):
    E.check("01.nope", 1)
    assert "no exercise '01.nope'" in capsys.readouterr().out


def test_the_slower_link_exercise_names_the_halving_slip_only_when_made():
    """04.lm_head_pcie3: halving row (c')'s whole speed is a slip the check names; another wrong value is not it."""
    from helpers.lessons.exercises import nb04

    right = nb04.lm_head_pcie3_tok_s()
    assert 13.0 < right < 15.0 and right > nb04.half_of_row_c() * 1.2      # more than half: only the link slows
    ok, line = E.verdict("04.lm_head_pcie3", round(nb04.half_of_row_c(), 3))
    assert not ok and "doubles only the time over the link" in line
    ok, line = E.verdict("04.lm_head_pcie3", 8.0)
    assert not ok and "doubles only the time over the link" not in line
    assert E.verdict("04.lm_head_pcie3", round(right, 2))[0]
