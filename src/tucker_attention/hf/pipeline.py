"""Deprecated: ``tucker_attention.hf.pipeline`` is now ``tucker_attention.hf.convert_command``.

This path keeps working for one release (with a DeprecationWarning); import from the new module.
"""

import warnings

from . import convert_command as _convert_command

warnings.warn(
    "tucker_attention.hf.pipeline is deprecated: import from tucker_attention.hf.convert_command",
    DeprecationWarning, stacklevel=2)
_MODULES = (_convert_command,)


def __getattr__(name: str):
    for module in _MODULES:
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
