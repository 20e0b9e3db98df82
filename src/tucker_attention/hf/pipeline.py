"""Deprecated: ``tucker_attention.hf.pipeline`` is now ``.convert_command``
(this path works for one release, with a DeprecationWarning).
"""

from . import _moved
from . import convert_command as _convert_command

__getattr__ = _moved.alias("pipeline", _convert_command)
