"""Deprecated: ``tucker_attention.hf.readers`` is now ``.family_readers``
(this path works for one release, with a DeprecationWarning).
"""

from . import _moved
from . import family_readers as _family_readers

__getattr__ = _moved.alias("readers", _family_readers)
