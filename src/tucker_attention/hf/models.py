"""Deprecated: ``tucker_attention.hf.models`` is now ``tucker_attention.hf.model_files``.

This path keeps working for one release (with a DeprecationWarning); import from the new module.
"""

import warnings

from . import model_files as _model_files

warnings.warn(
    "tucker_attention.hf.models is deprecated: import from tucker_attention.hf.model_files",
    DeprecationWarning, stacklevel=2)
_MODULES = (_model_files,)


def __getattr__(name: str):
    for module in _MODULES:
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
