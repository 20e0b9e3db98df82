"""Deprecated: ``tucker_attention.hf.readers`` is now ``tucker_attention.hf.family_readers``.

This path keeps working for one release (with a DeprecationWarning); import from the new module.
"""

import warnings

from . import family_readers as _family_readers

warnings.warn(
    "tucker_attention.hf.readers is deprecated: import from tucker_attention.hf.family_readers",
    DeprecationWarning, stacklevel=2)
_MODULES = (_family_readers,)


def __getattr__(name: str):
    for module in _MODULES:
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
