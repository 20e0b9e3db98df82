"""Datasets: text corpora (and tokenizers) for the language-model task."""
