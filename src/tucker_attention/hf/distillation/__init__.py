"""Recovering a converted causal LM by distillation from its original (``tucker-attn distill``):
``distill`` (the two phases, a job of the one training loop), ``losses`` (what each phase minimizes,
by name: :func:`~.losses.register_loss` adds one; the pairing check), ``data`` (the token windows),
``command`` (folder in, folder out)."""
