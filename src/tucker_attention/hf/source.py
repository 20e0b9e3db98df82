"""Deprecated: ``tucker_attention.hf.source`` is now ``.source_model`` and ``.gguf`` and ``.fidelity``
(this path works for one release, with a DeprecationWarning).
"""

from . import _moved
from . import fidelity as _fidelity
from . import gguf as _gguf
from . import source_model as _source_model

__getattr__ = _moved.alias("source", _source_model, _gguf, _fidelity, renamed={"_load_gguf": "load_gguf"})
