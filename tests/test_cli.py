"""The CLI's own contract: a table of commands, one-line errors for unknown ones."""
import subprocess
import sys

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
