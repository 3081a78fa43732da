"""The CLI's own contract: a table of commands, one-line errors for unknown ones and for missing packages."""
import subprocess
import sys
from pathlib import Path

from fixture_dirs import EXL2

from helpers.__main__ import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_suggests_a_close_one(capsys):
    assert main(["plna"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Did you mean 'plan'" in err


def test_every_command_target_resolves():
    """Each CLI entry names a module:function that exists (imports must not need a GPU or exllamav2)."""
    import importlib

    for name, (target, _) in COMMANDS.items():
        assert target == f"helpers.cli.{name}:main", name   # each command's parsing and printing in helpers/cli/
        mod, fn = target.split(":")
        assert callable(getattr(importlib.import_module(mod), fn)), name


def test_no_module_imports_exllamav2_at_import_time():
    code = ("import importlib, sys, pkgutil, helpers\n"
            "for m in pkgutil.walk_packages(helpers.__path__, 'helpers.'):\n"
            "    importlib.import_module(m.name)\n"
            "print('exllamav2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_missing_dependency_is_one_line_that_says_what_to_do():
    """`python -m helpers` run by a Python without the course's packages (-S: no site-packages, as outside .venv)."""
    repo = Path(__file__).resolve().parents[1]
    code = (f"import sys; sys.path.insert(0, {str(repo)!r}); from helpers.__main__ import main; "
            "sys.exit(main(['devices']))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: the package '")
    assert "not installed for this Python" in out.stderr and "-m helpers" in out.stderr
    assert "Traceback" not in out.stderr


def test_generate_says_when_the_model_is_not_exl2_and_inspect_refuses_it(tmp_path, capsys):
    """generate runs a float folder on purpose (one line says so); inspect reads EXL2 only and refuses it."""
    import json

    import torch
    from safetensors.torch import save_file

    from helpers.cli.generate import float_model_note

    fixture = EXL2["tiny_llama_b3.0"]
    assert float_model_note(fixture) is None
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, str(tmp_path / "model.safetensors"))
    note = float_model_note(tmp_path)
    assert note.startswith("note: ") and "non-EXL2" in note and "\n" not in note
    capsys.readouterr()
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
