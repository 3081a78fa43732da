"""Exercises with checked answers: the learner's own kernel grades them, the solutions stay out of the notebook.

In a notebook: ``check("01.kv_llama8b", answer)`` prints "right: ..." or "not yet: <hint>";
``solution("01.kv_llama8b")`` prints the worked solution. Each notebook's exercises live in ``nbNN.py`` as
``EXERCISES = register(Exercise(...), ...)``, ids like ``"01.kv_llama8b"``. An expected answer is never typed in:
``Exercise.solve`` computes it with the course's helpers, and ``solution()`` prints that function, so the worked
solution is the code the test suite checks. Answers may be numbers (within ``rel_tol``/``abs_tol``), sequences of
numbers, booleans or short texts (``Exercise.accept`` lists other spellings); ``None`` means not answered yet.
"""
from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable

#: the one-line prefixes check() prints
RIGHT, NOT_YET = "right: ", "not yet: "
#: factors a learner's number is often off by, and what they usually mean
_FACTORS = ((2, "a factor of 2"),
            (8, "a factor of 8 (bits vs bytes?)"),
            (1024, "a factor of 1024 (bytes vs KiB, KiB vs MiB, ...?)"),
            (2 ** 20, "a factor of 2^20 (bytes vs MiB?)"),
            (2 ** 30, "a factor of 2^30 (bytes vs GiB?)"),
            (1e9 / 2 ** 30, "the ratio of GB to GiB (10^9 vs 2^30 bytes?)"))


@dataclass(frozen=True)
class Exercise:
    """One exercise: ``solve()`` computes the expected answer; ``hint`` is shown for a wrong one.

    ``mistakes``: (wrong_solve, hint) pairs: when the answer matches what ``wrong_solve()`` computes (a typical slip,
    itself computed, not typed), that hint is shown instead of the general one. ``rel_tol`` 0 (the default): the
    answer is checked exactly; otherwise the question states the tolerance. ``predict``: the learner writes the
    number with ``predict()`` before the cell that works it out, and ``why`` (text, or a function that returns it)
    says afterwards what decides it. Hints and ``why`` may be functions, for texts worked out from the model."""

    id: str
    question: str
    solve: Callable[[], Any]
    hint: str | Callable[[], str]
    unit: str = ""
    rel_tol: float = 0.0
    abs_tol: float = 0.0
    accept: tuple[str, ...] = ()
    mistakes: tuple[tuple[Callable[[], Any], str | Callable[[], str]], ...] = field(default=())
    predict: bool = False
    why: str | Callable[[], str] = ""

    def expected(self) -> Any:
        return self.solve()


def _text(t: str | Callable[[], str]) -> str:
    return t() if callable(t) else t


# --------------------------------------------------------------------------------------------------------------------
# The registry: every helpers/lessons/exercises/nbNN.py
# --------------------------------------------------------------------------------------------------------------------

def register(*exercises: Exercise) -> dict[str, Exercise]:
    """A notebook module's ``EXERCISES``: its exercises by their own ids, in order; a repeated id is refused."""
    found: dict[str, Exercise] = {}
    for ex in exercises:
        if ex.id in found:
            raise ValueError(f"exercise id {ex.id!r} is registered twice")
        found[ex.id] = ex
    return found


def notebook_modules() -> list[str]:
    """Names of the exercise modules (nb01, nb02, ...), sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("nb") and m.name[2:].isdigit())


def registry() -> dict[str, Exercise]:
    """Every registered exercise, by id, from every nbNN.py."""
    found: dict[str, Exercise] = {}
    for name in notebook_modules():
        module = importlib.import_module(f"{__name__}.{name}")
        found.update(getattr(module, "EXERCISES", {}))
    return found


def exercises(notebook: str | int | None = None) -> list[str]:
    """Ids of the exercises of one notebook (``"01"`` or ``1``), or of all."""
    ids = sorted(registry())
    if notebook is None:
        return ids
    prefix = f"{int(notebook):02d}." if str(notebook).isdigit() else f"{notebook}."
    return [i for i in ids if i.startswith(prefix)]


def _get(exercise_id: str) -> Exercise | None:
    return registry().get(str(exercise_id))


# --------------------------------------------------------------------------------------------------------------------
# Comparing an answer
# --------------------------------------------------------------------------------------------------------------------

def _is_number(x: Any) -> bool:
    if isinstance(x, (bool, str, bytes)) or x is None:
        return False
    if isinstance(x, (int, float)):
        return True
    try:                       # numpy / torch scalars (0-dimensional arrays and tensors)
        float(x)
        return getattr(x, "ndim", 0) == 0
    except (TypeError, ValueError):
        return False


def _is_sequence(x: Any) -> bool:
    return isinstance(x, (list, tuple)) or (hasattr(x, "tolist") and not _is_number(x))


def _fmt(x: Any, unit: str = "") -> str:
    if isinstance(x, bool) or not _is_number(x):
        text = repr(x) if isinstance(x, str) else str(x)
    else:
        v = float(x)
        text = f"{int(v):,}" if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    return f"{text} {unit}".rstrip()


def _close(a: float, b: float, ex: Exercise) -> bool:
    return math.isclose(float(a), float(b), rel_tol=ex.rel_tol, abs_tol=ex.abs_tol)


def _same(answer: Any, expected: Any, ex: Exercise) -> bool:
    if isinstance(expected, bool):
        return isinstance(answer, bool) and answer == expected
    if isinstance(expected, str):
        said = str(answer).strip().lower()
        return said == expected.strip().lower() or said in {a.strip().lower() for a in ex.accept}
    if _is_sequence(expected):
        got = list(answer.tolist() if hasattr(answer, "tolist") else answer)
        want = list(expected)
        return len(got) == len(want) and all(_same(g, w, ex) for g, w in zip(got, want))
    return _is_number(answer) and _close(answer, expected, ex)


def _type_problem(answer: Any, expected: Any, ex: Exercise) -> str | None:
    """A sentence when the answer is of the wrong kind, else None."""
    unit = f" (in {ex.unit})" if ex.unit else ""
    if isinstance(expected, bool):
        return None if isinstance(answer, bool) else f"the answer is True or False, got {type(answer).__name__}"
    if isinstance(expected, str):
        return None if isinstance(answer, str) else f"the answer is a word or short text, got {type(answer).__name__}"
    if _is_sequence(expected):
        if not _is_sequence(answer):
            return f"the answer is a list of {len(expected)} values{unit}, got {type(answer).__name__}"
        n = len(answer.tolist() if hasattr(answer, "tolist") else answer)
        return None if n == len(expected) else f"the answer is a list of {len(expected)} values, got {n}"
    if _is_number(answer):
        return None
    if isinstance(answer, str):
        return f"the answer is a number{unit}, got the text {answer!r}: drop the quotes and the unit"
    return f"the answer is a number{unit}, got {type(answer).__name__}"


def _factor_hint(answer: Any, expected: Any) -> str | None:
    """"too large by a factor of 8 (...)" only when the answer is that factor off, to 0.1%."""
    if not (_is_number(answer) and _is_number(expected)) or float(answer) == 0 or float(expected) == 0:
        return None
    ratio = float(answer) / float(expected)
    for f, what in _FACTORS:
        for r in (f, 1 / f):
            if math.isclose(ratio, r, rel_tol=1e-3):
                side = "too large" if r > 1 else "too small"
                return f"{side} by {what}"
    return None


def _miss(answer: Any, expected: Any, ex: Exercise) -> str:
    """Why an answer is wrong: the typical slip it matches, else the hint (and a factor it is off by)."""
    for wrong, why in ex.mistakes:
        try:
            if _same(answer, wrong(), ex):
                return _text(why)
        except Exception:  # a mistake that cannot be computed here is simply skipped
            continue
    factor = _factor_hint(answer, expected)
    return _text(ex.hint) + (f" (your number is {factor})" if factor else "")


def _within(ex: Exercise, expected: Any) -> str:
    if not _is_number(expected) or (ex.rel_tol == 0 and ex.abs_tol == 0):
        return ""
    return f" (within {ex.rel_tol * 100:g}%)" if ex.rel_tol else f" (within {_fmt(ex.abs_tol, ex.unit)})"


#: what the learner predicted, per exercise, in this kernel (``predict``)
_PREDICTIONS: dict[str, Any] = {}
_FROM_PREDICTION = object()


def question_text(exercise_id: str) -> str:
    """The question, with how exactly the answer is checked."""
    ex = _get(exercise_id)
    if ex is None:
        return verdict(exercise_id, None)[1]
    expected = ex.expected()
    how = (f" Checked to within {ex.rel_tol * 100:g}%." if ex.rel_tol else
           f" Checked to within {_fmt(ex.abs_tol, ex.unit)}." if ex.abs_tol else
           " Checked exactly." if _is_number(expected) else "")
    unit = f" Answer in {ex.unit}." if ex.unit else ""
    return f"{ex.question}{unit}{how}"


def ask(exercise_id: str) -> None:
    """Print an exercise's question (the notebook asks it from here, so question and checker cannot disagree)."""
    print(textwrap.fill(question_text(exercise_id), 116))


def predict(exercise_id: str, value: Any = None) -> None:
    """Write down a prediction before the cell that works the number out; ``check(id)`` compares them afterwards.
    ``None``: nothing predicted yet, and the notebook goes on with the course's own answer."""
    ex = _get(exercise_id)
    if ex is None or not ex.predict:
        print(verdict(exercise_id, None)[1] if ex is None else f"{exercise_id} is not a prediction: use check()")
        return
    unit = f" (in {ex.unit})" if ex.unit else ""
    if value is None or value is Ellipsis:
        _PREDICTIONS[exercise_id] = ex.expected()
        print(f"no prediction written yet: the notebook goes on with the course's own answer; write yours{unit} "
              "in place of None, then run this cell and the next ones")
        return
    problem = _type_problem(value, ex.expected(), ex)
    if problem:
        print(f"{NOT_YET}{problem}")
        return
    _PREDICTIONS[exercise_id] = value
    print(f"your prediction: {_fmt(value, ex.unit)}; the next cells work it out")


def verdict(exercise_id: str, answer: Any = _FROM_PREDICTION) -> tuple[bool, str]:
    """(right, the one line check() prints), without printing; a prediction exercise compares the value written
    with ``predict`` unless an answer is given."""
    ex = _get(exercise_id)
    if ex is None:
        known = ", ".join(exercises(str(exercise_id).split(".")[0]) or exercises())
        return False, f"{NOT_YET}there is no exercise {exercise_id!r}: the ids are {known}"
    if answer is _FROM_PREDICTION:
        if exercise_id not in _PREDICTIONS:
            return False, (f"{NOT_YET}nothing predicted yet: run predict({exercise_id!r}, your number) first"
                           if ex.predict else f"{NOT_YET}give your answer: check({exercise_id!r}, answer)")
        answer = _PREDICTIONS[exercise_id]
    unit = f" (in {ex.unit})" if ex.unit else ""
    if answer is None or answer is Ellipsis:
        return False, f"no answer yet: replace None with your answer{unit}"
    expected = ex.expected()
    problem = _type_problem(answer, expected, ex)
    if problem:
        return False, f"{NOT_YET}{problem}"
    why = f"; {_text(ex.why)}" if ex.why else ""
    if _same(answer, expected, ex):
        return True, f"{RIGHT}{_fmt(expected, ex.unit)}{_within(ex, expected)}{why}"
    if ex.predict and _is_number(answer) and _is_number(expected) and float(expected):
        off = float(answer) / float(expected) - 1
        return False, (f"{NOT_YET}you predicted {_fmt(answer, ex.unit)}, it is {_fmt(expected, ex.unit)} "
                       f"({off:+.0%}): {_miss(answer, expected, ex)}{why}")
    return False, f"{NOT_YET}{_miss(answer, expected, ex)}"


def check(exercise_id: str, answer: Any = _FROM_PREDICTION) -> None:
    """Print one line, "right: ..." or "not yet: <why>" (a prediction exercise without an answer: how far the
    prediction was). It returns nothing, so a cell shows only that line; ``verdict`` returns the result."""
    print(verdict(exercise_id, answer)[1])


def solution_text(exercise_id: str) -> str:
    """The worked solution: the question, the code that computes the answer (its real source), and the answer."""
    ex = _get(exercise_id)
    if ex is None:
        return verdict(exercise_id, None)[1]
    module = inspect.getmodule(ex.solve)
    where = module.__name__.replace(".", "/") + ".py" if module else "?"
    code = textwrap.dedent(inspect.getsource(ex.solve)).rstrip()
    return (f"{ex.id}: {ex.question}\n\nworked solution ({where}, the code the tests check):\n\n{code}\n\n"
            f"answer: {_fmt(ex.expected(), ex.unit)}")


def solution(exercise_id: str) -> None:
    """Print the worked solution of one exercise."""
    print(solution_text(exercise_id))


__all__ = ["Exercise", "ask", "check", "exercises", "predict", "question_text", "register", "registry", "solution",
           "solution_text", "verdict"]
