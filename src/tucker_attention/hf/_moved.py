"""The deprecated module paths of ``hf/`` (``read``, ``readers``, ``pipeline``, ``models``, ``source``):
each keeps importing for one release, with a DeprecationWarning, by forwarding to its new modules."""

from __future__ import annotations

import warnings
from types import ModuleType


def alias(old: str, *modules: ModuleType, renamed: dict[str, str] | None = None):
    """Warn that ``tucker_attention.hf.<old>`` moved to ``modules`` and return the module ``__getattr__``
    that finds every name (``renamed``: old name -> new name) in them."""
    new = " and ".join(m.__name__ for m in modules)
    warnings.warn(f"tucker_attention.hf.{old} is deprecated: import from {new}", DeprecationWarning, stacklevel=3)
    renamed = renamed or {}

    def __getattr__(name: str):
        for module in modules:
            if hasattr(module, renamed.get(name, name)):
                return getattr(module, renamed.get(name, name))
        raise AttributeError(f"module 'tucker_attention.hf.{old}' has no attribute {name!r}")

    return __getattr__
