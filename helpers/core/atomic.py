"""Writing atomically: a file or a folder appears whole, or not at all.

Everything is built under a temporary name beside its destination and renamed into place at the end (a rename
within one folder is atomic), so an interrupted run (Ctrl-C, a full disk, a crash) never leaves half a result
where a finished one is expected. ``atomic_write_text`` does it for one text file, ``atomic_output_dir`` for a
folder (a checkpoint's shards and config).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator

from helpers.core.errors import CourseError, short_reason


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder, renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, *, overwrite: bool = True,
                      replaceable: Callable[[Path], bool] | None = None,
                      what: str = "a folder this course wrote") -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir``; on success it is renamed to ``out_dir``, on any error it is
    deleted. An existing ``out_dir`` is replaced only if ``overwrite`` and it is empty or ``replaceable(out_dir)``
    says it is ``what`` the caller writes (e.g. "an EXL2 checkpoint"). A full disk (or any other OSError) becomes a
    one-line CourseError."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists():
        if not overwrite:
            raise CourseError(f"{out} already exists: choose another directory or allow overwriting")
        if not out.is_dir() or (any(out.iterdir()) and not (replaceable is not None and replaceable(out))):
            raise CourseError(f"refusing to replace {out}: it exists and is not {what}; choose another directory")
    tag = uuid.uuid4().hex[:8]
    tmp = out.parent / f".{out.name}.partial-{tag}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{tag}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and not isinstance(exc, CourseError):
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CourseError(f"the disk is full while writing {out}; nothing was kept. Free some space "
                                  "(or pick a folder on a bigger disk) and run it again") from None
            raise CourseError(f"could not write {out} ({short_reason(exc)}); nothing was kept") from None
        raise
