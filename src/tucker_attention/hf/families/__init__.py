"""Model families: which attention blocks we read and how (one module per structure of attention module).

``registry``: :class:`~.registry.Family` and the registry recognition iterates; ``common``: the
reading code the families share; ``reading``: finding blocks in a model and reading them. Each
built-in family module registers itself when imported here, in this order, which is the order
blocks are recognized in (the first family that matches takes a module).
"""

# isort: off
from . import mla, proj, qkv_proj, neox, gpt2, bert  # noqa: F401  (registered in this order)
# isort: on
