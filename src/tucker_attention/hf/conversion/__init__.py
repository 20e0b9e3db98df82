"""Converting a transformers model's attention to Tucker / GQA / MLA.

``convert`` (:func:`~.convert.convert` on a loaded model, save/load), ``settings`` (ranks checked,
budgets planned: what ``tucker-attn convert`` converts to), ``command`` (``tucker-attn convert``:
folder in, folder out), ``calibration`` (activation statistics), ``model_text`` (the model's own
text as calibration), ``choose`` / ``allocation`` (settings and per-layer budgets settled by
measurement), ``fidelity`` (a conversion measured against its original), ``spill`` (tensors kept on
disk while a conversion runs).
"""
