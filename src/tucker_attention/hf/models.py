"""Deprecated: ``tucker_attention.hf.models`` is now ``.model_files``
(this path works for one release, with a DeprecationWarning).
"""

from . import _moved
from . import model_files as _model_files

__getattr__ = _moved.alias("models", _model_files)
