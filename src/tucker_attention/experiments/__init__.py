"""Experiments built on the layers and the tensor view: rank studies, comparisons, plots."""
