"""One exception type for every mistake a reader can make.

Anything a user can get wrong (a missing directory, an unknown cache mode, no GPU) raises ``CourseError`` with a
single line that says what happened and what to do. The CLI prints it as ``error: ...`` and exits with status 2;
notebooks show it as one line too. Nothing here imports the rest of the package.
"""
import sys
import warnings


class CourseError(Exception):
    """A clear, one-line, user-facing error. The message says what to do next."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class CourseWarning(UserWarning):
    """A warning the course wants the reader to see (e.g. a context beyond what the model was trained for)."""


def short_reason(exc: BaseException) -> str:
    """An exception's message on one line, at most 160 characters, for the end of a CourseError ("... (reason)")."""
    return " ".join(str(exc).split())[:160] or type(exc).__name__


def _print_one_line(shell, etype, value, tb, tb_offset=None):
    """IPython custom exception handler: a CourseError as ``error: <message>``, without a traceback."""
    print(f"error: {value}", file=sys.stderr)


def _one_line_warning(message, category, *args, **kwargs) -> str:
    return f"{category.__name__}: {message}\n"


def notebook_setup() -> bool:
    """The first cell of every notebook: warnings shown as one line (``CourseWarning: ...``, no source line) and
    every CourseError as one line (``one_line_errors``), tables shown whole (``_table_display``). Returns whether a
    kernel was found."""
    warnings.formatwarning = _one_line_warning
    _table_display()
    return one_line_errors()


def _table_display() -> None:
    """pandas' text of a table (``core.tables.table``) up to 160 characters wide, long cells cut at 110: the text
    nbval compares and a terminal shows; JupyterLab draws the HTML. Nothing without pandas."""
    try:
        import pandas as pd
    except ImportError:
        return
    pd.set_option("display.width", 160)
    pd.set_option("display.max_columns", 20)
    pd.set_option("display.max_colwidth", 110)


def one_line_errors() -> bool:
    """In an IPython/Jupyter kernel, show every CourseError as one line (``error: ...``) instead of a traceback, as
    the CLI does (a mistyped GPU or model name then reads as one line with its close matches). Returns whether a
    kernel was found; outside one it does nothing."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False
    shell.set_custom_exc((CourseError,), _print_one_line)
    return True
