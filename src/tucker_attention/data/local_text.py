"""English text of other kinds than the plays, found on every machine that runs Python: held-out
text to measure a converted model on (none of it calibrates or distils by default).

- :func:`python_docs`: the reference documentation text CPython ships for ``help()``
  (``pydoc_data.topics``: the language reference's sections in plain English; PSF licence);
- :func:`python_code`: the source of standard-library modules (PSF licence).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

#: Standard-library modules whose source is code of ordinary style (not generated tables).
CODE_MODULES = ("argparse", "calendar", "configparser", "csv", "dataclasses", "difflib", "fractions", "heapq",
                "json.decoder", "json.encoder", "pathlib", "pprint", "shlex", "statistics", "string", "textwrap")


def python_docs() -> dict[str, str]:
    """{topic: text} of CPython's ``help()`` topics (sorted by name)."""
    from pydoc_data.topics import topics

    return {name: topics[name] for name in sorted(topics)}


def python_code(modules: tuple[str, ...] = CODE_MODULES) -> dict[str, str]:
    """{module: source text} of standard-library ``modules`` (those whose source is installed)."""
    out = {}
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and spec.origin.endswith(".py") and Path(spec.origin).is_file():
            out[name] = Path(spec.origin).read_text(encoding="utf-8")
    if not out:
        raise FileNotFoundError(f"none of the standard-library sources {list(modules)} is installed")
    return out
