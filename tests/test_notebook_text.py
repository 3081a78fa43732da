"""What the stored notebooks show a learner: a prediction exercise in every lesson (its check run in the stored
notebook), notebook 04's hypothesis exercise, no stray True/False/None and no output past 15 lines, notebook 03's
CPU attention experiment with its figure, notebook 02's agreement with exllamav2's own logits, the current Q4
column of exllamav2's qcache_eval, the one-call preamble, and prose kept within its word budget."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
LESSONS = [p for p in NOTEBOOKS if not p.name.startswith("00")]


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _src(cell: dict) -> str:
    return "".join(cell["source"])


def _text(output: dict) -> str:
    if "text" in output:
        return "".join(output["text"])
    return "".join(output.get("data", {}).get("text/plain", ""))


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name[:2])
def test_each_lesson_predicts_then_checks_in_the_stored_notebook(path):
    code = [c for c in _cells(path) if c["cell_type"] == "code"]
    predicted = {m for c in code for m in re.findall(r'predict\("(\d\d\.\w+)"', _src(c))}
    assert predicted, f"{path.name} has no predict() exercise"
    for pid in predicted:
        checked = [c for c in code if f'check("{pid}")' in _src(c)]
        assert checked, f"{pid} is predicted but never checked"
        out = "".join(_text(o) for o in checked[0]["outputs"] if o.get("output_type") == "stream")   # not a table
        assert out.startswith("right: ") or "\nright: " in out, (pid, out[:200])   # the course's own answer


def test_notebook_04_asks_which_hypothesis_survives():
    code = [_src(c) for c in _cells(ROOT / "notebooks" / "04_windows_sysmem_fallback.ipynb")
            if c["cell_type"] == "code"]
    assert any(re.search(r'check\("04\.hypothesis_\w+", answer\)', s) for s in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_no_stray_booleans_and_no_output_longer_than_15_lines(path):
    for i, c in enumerate(_cells(path)):
        if c["cell_type"] != "code":
            continue
        for o in c["outputs"]:
            if o.get("output_type") == "execute_result":
                assert _text(o).strip() not in ("True", "False", "None"), (path.name, i)
        lines = sum(_text(o).count("\n") for o in c["outputs"] if o.get("output_type") == "stream")
        assert lines <= 15, f"{path.name} cell {i} prints {lines} lines"


def test_notebook_03_runs_the_cpu_attention_experiment_with_a_figure():
    cells = _cells(ROOT / "notebooks" / "03_speed_4k_vs_32k.ipynb")
    run = next(c for c in cells if "attention_cost.measure(" in _src(c))
    assert "relative to GQA" in "".join(_text(o) for o in run["outputs"])
    fig = next(c for c in cells if "plot_attention_cost(" in _src(c))
    assert any("image/png" in o.get("data", {}) for o in fig["outputs"])


def test_notebook_02_prints_the_agreement_with_exllamav2s_own_logits():
    cell = next(c for c in _cells(ROOT / "notebooks" / "02_load_an_exl2_model.ipynb")
                if "converter_agreement(" in _src(c))
    out = "".join(_text(o) for o in cell["outputs"])
    assert re.search(r"largest difference \d\.\d+ .*same top token at (\d+) of \1", out), out


def test_qcache_eval_is_quoted_from_its_current_q4_column():
    for path in NOTEBOOKS + sorted((ROOT / "docs").glob("*.md")):
        assert "12.72" not in path.read_text(encoding="utf-8"), path.name   # the "Q4 cache (old)" column
    nb01 = (ROOT / "notebooks" / "01_kv_cache_math.ipynb").read_text(encoding="utf-8")
    assert "| Mistral 7B Instruct (FP16) | 12.69 | 12.71 | 12.69 |" in nb01
    assert "| Llama2 7B (FP16) | 10.91 | 11.24 | 11.05 |" in nb01


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name[:2])
def test_the_preamble_is_one_call(path):
    first = next(_src(c) for c in _cells(path) if c["cell_type"] == "code" and "import" in _src(c))
    assert "notebook_setup()" in first and "formatwarning" not in first


def test_prose_stays_within_its_word_budget():
    words = sum(len(_src(c).split()) for p in NOTEBOOKS for c in _cells(p) if c["cell_type"] == "markdown")
    assert words <= 9000, f"{words} words of markdown across the notebooks"
    for p in NOTEBOOKS:
        for c in _cells(p):
            if c["cell_type"] == "markdown":
                assert not re.search(r"\bsections? \d|§\d", _src(c)), (p.name, _src(c)[:120])


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name[:2])
def test_tables_are_a_cells_value_and_short(path):
    """Rows of results are a table (a DataFrame as the cell's value), not printed rows; none longer than ~10 rows
    (a longer one is a figure or a summary)."""
    shown = [o["data"]["text/html"] for c in _cells(path) if c["cell_type"] == "code" for o in c["outputs"]
             if o.get("output_type") in ("execute_result", "display_data") and "text/html" in o.get("data", {})
             and "<table" in "".join(o["data"]["text/html"])]
    assert shown, f"{path.name} shows no table as a cell's value"
    for html in shown:
        body = "".join(html).split("<tbody>", 1)[1]
        assert body.count("<tr") <= 12, (path.name, body.count("<tr"))
