"""Recovering a converted causal LM by distillation from its original (``tucker-attn distill``):
``distill`` (the two phases, run by the one training loop), ``losses`` (what each phase minimizes,
the pairing check), ``data`` (the token windows), ``command`` (folder in, folder out)."""
