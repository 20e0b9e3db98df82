"""Deprecated: ``tucker_attention.hf.read`` is now ``.reading``
(this path works for one release, with a DeprecationWarning).
"""

from . import _moved
from . import reading as _reading

__getattr__ = _moved.alias("read", _reading)
