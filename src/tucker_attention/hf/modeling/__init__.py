"""Converted models as ordinary transformers models: ``blocks`` (:class:`~.blocks.HFAttention`, the
drop-in block that runs our layer's one forward), ``cache`` (our cache over transformers' ``Cache``),
``auto`` (the ``Tucker<Base>`` config and model classes, Auto registration, the folders' code
files), ``folder_checks`` (a folder loads as its config declares, or not at all)."""
