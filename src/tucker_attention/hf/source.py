"""Deprecated: ``tucker_attention.hf.source`` is now
``tucker_attention.hf.source_model and tucker_attention.hf.fidelity``.

This path keeps working for one release (with a DeprecationWarning); import from the new module.
"""

import warnings

from . import fidelity as _fidelity
from . import gguf as _gguf
from . import source_model as _source_model

warnings.warn(
    "tucker_attention.hf.source is deprecated: import from tucker_attention.hf.source_model and "
    "tucker_attention.hf.fidelity",
    DeprecationWarning, stacklevel=2)
_MODULES = (_source_model, _gguf, _fidelity,)


def __getattr__(name: str):
    for module in _MODULES:
        if hasattr(module, name):
            return getattr(module, name)
    if name == "_load_gguf":
        return _gguf.load_gguf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
