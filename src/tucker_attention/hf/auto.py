"""The import path a converted folder's code files name (``from tucker_attention.hf.auto import
model_class``): kept stable for folders already saved. The classes live in :mod:`.modeling.auto`."""

from .modeling.auto import config_class, model_class, register

__all__ = ["config_class", "model_class", "register"]
