"""Deprecated: ``tucker_attention.hf.read`` is now ``tucker_attention.hf.reading``.

This path keeps working for one release (with a DeprecationWarning); import from the new module.
"""

import warnings

from . import reading as _reading

warnings.warn(
    "tucker_attention.hf.read is deprecated: import from tucker_attention.hf.reading",
    DeprecationWarning, stacklevel=2)
_MODULES = (_reading,)


def __getattr__(name: str):
    for module in _MODULES:
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
