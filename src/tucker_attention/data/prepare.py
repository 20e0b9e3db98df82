"""``tucker-attn prepare-data``: :func:`prepare_data` tokenizes a corpus once into the memory-mappable
shards of a prepared folder (its layout: :mod:`tucker_attention.data.prepared`).

The source is a text file, a folder of ``.txt`` files (read as ``read_documents`` reads them)
or a ``datasets`` dataset saved with ``save_to_disk`` (one document a row). Validation holds
out whole documents as :func:`~tucker_attention.data.text.split_documents` does (every k-th
file or non-empty row, k = round(1/val_fraction)); a single file is cut at a line break near
its last ``val_fraction`` of characters; a dataset's validation/valid/test split is kept. A
transformers tokenizer's EOS (else SEP) id follows every document. Memory stays bounded: text
is read and tokenized in chunks of ~CHUNK_CHARS characters ended at whitespace
(:func:`~tucker_attention.data.text.safe_cut`), ids are appended to the shard files, and the
folder is built in a hidden sibling ``.OUT.tmp-<random>`` and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .._extras import require
from .._files import write_folder
from . import text as text_module
from .prepared import FORMAT, SPLITS, VERSION, is_prepared
from .text import document_files, empty_files_error
from .tokenizers import Encoder, PrepareError, open_encoder

SHARD_TOKENS = 1 << 30          # ids per shard file (2 GiB of uint16)


def choose_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id of a ``vocab_size`` vocabulary fits, else uint32 (little-endian)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


# ---------------------------------------------------------------- sources


@dataclass
class _Document:
    """One document (or the train/validation part of a single file) as chunks of text."""

    split: str
    chunks: Iterator[tuple[str, int]]  # (text, bytes read for it)
    ends: bool = True                  # the document ends here (the separator follows)


def _held(i: int, n: int, step: int) -> bool:
    """Whether document ``i`` of ``n`` is held out (split_documents' rule: every ``step``-th from step // 2)."""
    return (i >= step // 2 and (i - step // 2) % step == 0) if n > step // 2 else i == n - 1


class _Files:
    """A text file or a folder of ``.txt`` files."""

    def __init__(self, path: Path, val_fraction: float):
        self.path, self.files = path, document_files(path)
        self.step = max(2, round(1 / val_fraction))
        self.val_fraction = val_fraction

    def _chunks(self, file: Path, where: str) -> Iterator[tuple[str, int]]:
        done = 0
        for chunk, read in text_module.iter_text_chunks(file, where):
            yield chunk, read - done
            done = read

    def scan(self, bar, chars: set | None) -> int:
        """Check every file (UTF-8, no NUL, not empty), count its characters and bytes, collect the
        characters into ``chars`` (unless None); returns the bytes read."""
        counts, empty, self.bytes = {}, [], 0
        for name, file, where in self.files:
            n, blank = 0, True
            for chunk, nbytes in self._chunks(file, where):
                n, blank = n + len(chunk), blank and not chunk.strip()
                if chars is not None:
                    chars.update(chunk)
                bar.update(nbytes)
                self.bytes += nbytes
            counts[name] = n
            if blank:
                empty.append(name)
        if len(self.files) == 1 and empty:
            raise PrepareError("src", f"{self.files[0][2]} is empty (no text besides whitespace)")
        if empty:
            raise PrepareError("src", str(empty_files_error(self.path, empty, len(self.files))))
        self.counts = counts
        return self.bytes

    def validation(self) -> dict:
        if len(self.files) == 1:
            return {"rule": f"the last {self.val_fraction:g} of the file's characters, from a line break near there",
                    "documents": []}
        names = [name for i, (name, _, _) in enumerate(self.files) if _held(i, len(self.files), self.step)]
        return {"rule": f"every {self.step}th file by name, from the {self.step // 2 + 1}th", "documents": names}

    def documents(self) -> Iterator[_Document]:
        if len(self.files) >= 2:
            for i, (_, file, where) in enumerate(self.files):
                yield _Document("val" if _held(i, len(self.files), self.step) else "train", self._chunks(file, where))
            return
        (name, file, where), = self.files
        chunks = self._chunks(file, where)
        target, rest = int(self.counts[name] * (1 - self.val_fraction)), []

        def train_part():
            offset = 0
            for chunk, nbytes in chunks:
                if offset + len(chunk) <= target:
                    yield chunk, nbytes
                    offset += len(chunk)
                    continue
                cut = _cut_near(chunk, target - offset, offset > 0)
                yield chunk[:cut], nbytes
                rest.append(chunk[cut:])
                return

        def val_part():
            yield from ((r, 0) for r in rest)
            yield from chunks

        yield _Document("train", train_part(), ends=False)
        yield _Document("val", val_part())


def _cut_near(chunk: str, t: int, start_is_break: bool) -> int:
    """A cut of ``chunk`` near ``t``: the first line break at or after it, else the last before it
    (:func:`~tucker_attention.data.text.is_break`), else the chunk's start if that is one, else ``t``."""
    i = chunk.find("\n", max(t, 1))
    while i != -1 and not text_module.is_break(chunk, i):
        i = chunk.find("\n", i + 1)
    if i != -1:
        return i
    i = text_module.safe_cut(chunk[:t + 1]) if t > 0 else 0
    return i or (0 if start_is_break else t)


class _Dataset:
    """A ``datasets`` dataset saved with ``save_to_disk``: one document a non-empty row of ``column``."""

    def __init__(self, path: Path, column: str, val_fraction: float):
        datasets = require("datasets", "reading a Hugging Face dataset")
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as err:  # datasets raises many types for a folder it cannot read
            raise PrepareError("src", f"could not load the dataset saved in {str(path)!r}: {err}") from None
        self.path, self.column, self.step = path, column, max(2, round(1 / val_fraction))
        if isinstance(getattr(ds, "column_names", None), list):  # one Dataset
            self.train, self.val, self.val_name = ds, None, None
        else:
            splits = list(ds)
            if "train" not in ds:
                raise PrepareError("src", f"dataset {str(path)!r} needs a 'train' split, has {splits}")
            self.val_name = next((s for s in ("validation", "valid", "test") if s in ds), None)
            self.train, self.val = ds["train"], ds[self.val_name] if self.val_name else None
        if column not in self.train.column_names:
            raise PrepareError("text_column", f"dataset {str(path)!r} has no column {column!r}; columns: "
                                              f"{self.train.column_names}")

    def _rows(self, split) -> Iterator[tuple[int, str]]:
        """(row, text) of the non-empty rows of ``split``; a value that is not text is an error naming it."""
        row = 0
        if hasattr(split, "select_columns"):
            split = split.select_columns([self.column])  # read only the text column
        for batch in split.iter(batch_size=1000):
            for value in batch[self.column]:
                if value is not None and not isinstance(value, str):
                    raise PrepareError("src", f"dataset {str(self.path)!r} column {self.column!r} row {row} is "
                                              f"{type(value).__name__}, not text")
                if value and value.strip():
                    text_module._check_text(value, f"dataset {str(self.path)!r} column {self.column!r} row {row}")
                    yield row, value
                row += 1

    def scan(self, bar, chars: set | None) -> int:
        """Check every row, count the train split's documents; returns the bytes of text."""
        self.n_train, total = 0, 0
        for split in (self.train, self.val) if self.val is not None else (self.train,):
            for _, text in self._rows(split):
                self.n_train += split is self.train
                if chars is not None:
                    chars.update(text)
                nbytes = len(text.encode("utf-8"))
                bar.update(nbytes)
                total += nbytes
        if self.n_train == 0:
            raise PrepareError("src", f"dataset {str(self.path)!r} has no text in column {self.column!r} of its "
                                      f"train split")
        return total

    def validation(self) -> dict:
        if self.val is not None:
            return {"rule": f"the dataset's {self.val_name!r} split", "split": self.val_name, "documents": []}
        return {"rule": f"every {self.step}th non-empty row of the train split, from the {self.step // 2 + 1}th",
                "documents": []}

    def documents(self) -> Iterator[_Document]:
        for i, (_, text) in enumerate(self._rows(self.train)):
            held = self.val is None and _held(i, self.n_train, self.step)
            yield _Document("val" if held else "train", _text_chunks(text))
        for _, text in self._rows(self.val) if self.val is not None else ():
            yield _Document("val", _text_chunks(text))


def _text_chunks(text: str) -> Iterator[tuple[str, int]]:
    """``text`` in chunks of about CHUNK_CHARS ended at safe cuts, with their UTF-8 sizes."""
    size = text_module.CHUNK_CHARS
    while len(text) > size:
        cut = text_module.safe_cut(text[:size]) or size
        yield text[:cut], len(text[:cut].encode("utf-8"))
        text = text[cut:]
    yield text, len(text.encode("utf-8"))


def _open_source(src: Path, column: str, val_fraction: float):
    if src.is_dir() and ((src / "dataset_dict.json").is_file() or (src / "state.json").is_file()):
        return _Dataset(src, column, val_fraction)
    try:
        return _Files(src, val_fraction)
    except (ValueError, FileNotFoundError) as err:
        raise PrepareError("src", str(err)) from None


# ---------------------------------------------------------------- writing


class _SplitWriter:
    """Appends one split's ids to its shard files (a new one every SHARD_TOKENS) and document starts."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype):
        self.folder, self.split, self.dtype = folder, split, dtype
        self.shards: list[list] = []  # [file name, ids]
        self.file, self.tokens, self.n_docs = None, 0, 0
        self.docs = (folder / f"{split}-documents.bin").open("wb")

    def begin_document(self) -> None:
        self.docs.write(np.int64(self.tokens).tobytes())
        self.n_docs += 1

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype)
        while len(ids):
            if self.file is None or self.shards[-1][1] >= SHARD_TOKENS:
                self._close_shard()
                self.shards.append([f"{self.split}-{len(self.shards):05d}.bin", 0])
                self.file = (self.folder / self.shards[-1][0]).open("wb")
            part = ids[:SHARD_TOKENS - self.shards[-1][1]]
            self.file.write(part.tobytes())
            self.shards[-1][1] += len(part)
            self.tokens += len(part)
            ids = ids[len(part):]

    def _close_shard(self) -> None:
        for f in (self.file,) if self.file is not None else ():
            f.flush()
            os.fsync(f.fileno())
            f.close()

    def close(self) -> dict:
        self._close_shard()
        self.docs.close()
        return {"tokens": self.tokens, "shards": [{"file": name, "tokens": n} for name, n in self.shards],
                "documents": {"file": f"{self.split}-documents.bin", "dtype": "int64", "count": self.n_docs}}


def _check_ids(ids: np.ndarray, dtype: np.dtype, vocab_size: int) -> None:
    """Refuse ids that overflow ``dtype`` or fall outside the vocabulary, before they are written."""
    if not len(ids):
        return
    low, high = int(ids.min()), int(ids.max())
    if high > np.iinfo(dtype).max or low < 0:
        raise PrepareError("tokenizer", f"token id {high if low >= 0 else low} does not fit {dtype.name} (the dtype "
                                        f"chosen for vocab_size={vocab_size}); nothing was written")
    if high >= vocab_size:
        raise PrepareError("tokenizer", f"token id {high} is outside the tokenizer's vocabulary of {vocab_size} "
                                        f"(len(tokenizer)); nothing was written")


def _check_out(out: Path, src: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PrepareError("out", f"{str(out)!r} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PrepareError("out", f"{str(out)!r} exists and is not empty; choose another folder, or pass "
                                      f"--overwrite to replace a folder prepare-data wrote")
        if not is_prepared(out):
            raise PrepareError("out", f"{str(out)!r} is not a folder prepare-data wrote (no meta.json of ours); "
                                      f"--overwrite replaces only those")
    inner, outer = out.resolve(), src.resolve()
    if inner.is_relative_to(outer) or outer.is_relative_to(inner):
        raise PrepareError("out", f"{str(out)!r} and the source {str(src)!r} must not contain one another")


def prepare_data(src: str | os.PathLike, tokenizer: str, out: str | os.PathLike, *, val_fraction: float = 0.1,
                 text_column: str = "text", overwrite: bool = False, progress: bool = True) -> dict:
    """Tokenize ``src`` (text file, folder of ``.txt`` files, ``save_to_disk`` dataset) with
    ``tokenizer`` (char, byte, minilm or a local transformers folder) into the prepared folder
    ``out``; returns its meta. Two streaming passes: a check (and char alphabet) pass, then
    tokenizing and writing. Bad input raises :class:`PrepareError` naming the argument."""
    src, out = Path(src), Path(out)
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError("val_fraction", f"must be in (0, 1), got {val_fraction}")
    _check_out(out, src, overwrite)
    source = _open_source(src, text_column, val_fraction)
    encoder = open_encoder(tokenizer)
    chars = set() if encoder.kind == "char" else None
    with tqdm(desc="check", unit="B", unit_scale=True, disable=not progress) as bar:
        try:
            total = source.scan(bar, chars)
        except PrepareError:
            raise
        except ValueError as err:  # a file that is not text, named by text.iter_text_chunks
            raise PrepareError("src", str(err)) from None
    if chars is not None:
        encoder = Encoder("char", "".join(sorted(chars)))
    dtype = choose_dtype(encoder.vocab_size)

    def write(tmp: Path) -> dict:
        meta_tokenizer = encoder.save(tmp)
        writers = {split: _SplitWriter(tmp, split, dtype) for split in SPLITS}
        separator = None if encoder.separator is None else np.array([encoder.separator["id"]], np.int64)
        with tqdm(desc="tokenize", total=total, unit="B", unit_scale=True, disable=not progress) as bar:
            for doc in source.documents():
                writer = writers[doc.split]
                writer.begin_document()
                for chunk, nbytes in doc.chunks:
                    ids = encoder.encode(chunk)
                    _check_ids(ids, dtype, encoder.vocab_size)
                    writer.write(ids)
                    bar.update(nbytes)
                if doc.ends and separator is not None:
                    _check_ids(separator, dtype, encoder.vocab_size)
                    writer.write(separator)
        splits = {split: writer.close() for split, writer in writers.items()}
        for split, info in splits.items():
            if info["tokens"] == 0:
                raise PrepareError("src", f"{str(src)!r} gives no {split} tokens (too little text to hold out "
                                          f"val_fraction={val_fraction:g})")
        meta = {"format": FORMAT, "version": VERSION, "source": str(src), "tokenizer": meta_tokenizer,
                "separator": encoder.separator, "vocab_size": encoder.vocab_size, "dtype": dtype.name,
                "byteorder": "little", "val_fraction": val_fraction, "validation": source.validation(),
                "source_bytes": total, "splits": splits}
        with (tmp / "meta.json").open("w") as f:
            f.write(json.dumps(meta, indent=1))
            f.flush()
            os.fsync(f.fileno())
        return meta

    # an empty existing folder (allowed by _check_out) is replaced as with --overwrite
    return write_folder(out, write, overwrite=overwrite or out.exists(), error=PrepareError)


__all__ = ["PrepareError", "choose_dtype", "prepare_data"]
