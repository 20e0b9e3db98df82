"""Writing a folder so that a reader never sees it half-written."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path


def sibling(out: Path, tag: str) -> Path:
    """A new empty hidden folder next to ``out``: ``.NAME.TAG-<random>``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = out.parent / f".{out.name}.{tag}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def write_folder(out: Path, write: Callable[[Path], object], *, overwrite: bool,
                 error: Callable[[str, str], Exception]):
    """Run ``write(tmp)`` on a fresh sibling folder of ``out``, then move it into place and return
    what ``write`` returned. An existing ``out`` (only with ``overwrite``; otherwise ``error("out",
    message)`` is raised) is renamed aside first and removed after the move (restored if the move
    fails). A failed or interrupted ``write`` removes the sibling and leaves ``out`` as it was."""
    tmp = sibling(out, "tmp")
    try:
        result = write(tmp)
        if out.exists():
            if not overwrite:
                raise error("out", f"{str(out)!r} appeared while it was being written; pass --overwrite to replace it")
            old = sibling(out, "old")
            old.rmdir()
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
