"""Prepared folders (written by :func:`~tucker_attention.data.prepare.prepare_data`, ``tucker-attn
prepare-data``) as training reads them: :class:`PreparedCorpus` gathers windows from memory maps.

A prepared folder::

    meta.json              format, tokenizer (kind, sha256 identity), vocab_size, dtype, splits
    train-00000.bin ...    token ids, raw little-endian uint16 (vocab_size <= 65536) or uint32
    val-00000.bin ...      (a new shard every prepare.SHARD_TOKENS ids; windows may span two shards)
    train-documents.bin    int64: the offset of each document's first id in its split
    val-documents.bin
    tokenizer/             a transformers tokenizer's files (``save_pretrained``), if one was used
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .text import TextCorpus
from .tokenizers import ByteTokenizer, CharTokenizer, TransformersTokenizer, tokenizer_identity

FORMAT, VERSION = "tucker-attention/prepared-tokens", 1
SPLITS = ("train", "val")


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder written by ``prepare-data`` (its meta.json says so)."""
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("format") == FORMAT
    except (ValueError, OSError, AttributeError):
        return False


class TokenShards:
    """One split's ids across its memory-mapped shard files (nothing is read until asked):
    ``len()``, :meth:`gather` of windows (which may span two shards) and :meth:`chunks`."""

    def __init__(self, files: list[Path], counts: list[int], dtype: np.dtype):
        self.maps = [np.memmap(f, dtype=dtype, mode="r", shape=(n,)) for f, n in zip(files, counts)]
        self.bounds = np.cumsum([0, *counts])

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """The ``length`` ids from ``start``, (length,) int64."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"ids [{start}, {start + length}) are outside the split's {len(self)}")
        parts, i = [], int(np.searchsorted(self.bounds, start, side="right")) - 1
        while length > 0:
            offset = start - int(self.bounds[i])
            part = self.maps[i][offset:offset + length]
            parts.append(part)
            start, length, i = start + len(part), length - len(part), i + 1
        return np.concatenate(parts).astype(np.int64)

    def gather(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        """(B, length) int64 windows at ``starts`` (B,), read from the memory maps."""
        starts = np.asarray(starts, dtype=np.int64)
        if len(self.maps) == 1:
            rows = self.maps[0][starts[:, None] + np.arange(length)]  # reads those pages only
        else:
            rows = np.stack([self.read(int(s), length) for s in starts]) if len(starts) else np.zeros((0, length))
        return torch.from_numpy(np.array(rows, dtype=np.int64))

    def chunks(self, size: int = 1 << 22) -> Iterator[np.ndarray]:
        """All ids in order, ``size`` at a time (fewer at shard ends)."""
        for m in self.maps:
            for i in range(0, len(m), size):
                yield m[i:i + size]


@dataclass
class PreparedCorpus:
    """A prepared folder as the LM task uses a :class:`~tucker_attention.data.text.TextCorpus`:
    ``train``/``val`` are :class:`TokenShards`; windows are gathered per batch from the maps."""

    train: TokenShards
    val: TokenShards
    tokenizer: CharTokenizer | ByteTokenizer | TransformersTokenizer
    source: str
    val_documents: list[str]
    path: Path
    meta: dict

    # what needs only len(train), len(val): TextCorpus's own code
    check_block_size = TextCorpus.check_block_size
    random_windows = TextCorpus.random_windows
    val_starts = TextCorpus.val_starts

    @staticmethod
    def windows(ids: TokenShards, starts: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, both (B, block_size), of the windows at ``starts``."""
        chunk = ids.gather(starts, block_size + 1)
        return chunk[:, :-1], chunk[:, 1:]

    def unigram_loss(self) -> float:
        """TextCorpus's unigram baseline, counted over the maps in chunks (np.bincount)."""
        vocab = self.tokenizer.vocab_size
        counts = np.ones(vocab, np.float64)
        for chunk in self.train.chunks():
            counts += np.bincount(chunk, minlength=vocab)
        logp = np.log(counts / counts.sum())
        return float(-sum(logp[chunk].sum() for chunk in self.val.chunks()) / len(self.val))


def read_meta(path: str | os.PathLike) -> dict:
    """The meta.json of prepared folder ``path``, its files checked against it."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"prepared folder {str(path)!r}: cannot read meta.json ({err})") from None
    if meta.get("format") != FORMAT or not isinstance(meta.get("version"), int) or meta["version"] > VERSION:
        raise ValueError(f"prepared folder {str(path)!r} is of format {meta.get('format')!r} version "
                         f"{meta.get('version')!r}; this tucker-attention reads {FORMAT!r} version <= {VERSION}")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in SPLITS:
        for shard in meta["splits"][split]["shards"]:
            file = path / shard["file"]
            size = file.stat().st_size if file.is_file() else None
            if size != shard["tokens"] * itemsize:
                raise ValueError(f"prepared folder {str(path)!r}: {shard['file']} has {size} bytes, meta.json says "
                                 f"{shard['tokens'] * itemsize} (missing or damaged; run prepare-data again)")
    return meta


def open_prepared(path: str | os.PathLike, tokenizer: str = "char") -> PreparedCorpus:
    """The :class:`PreparedCorpus` of a prepared folder. The tokenizer is the folder's:
    ``tokenizer`` (``data.tokenizer``) must name its kind, or be ``char``, the default."""
    path = Path(path)
    meta = read_meta(path)
    kind = meta["tokenizer"]["kind"]
    if tokenizer not in (kind, "char"):
        raise ValueError(f"data.tokenizer={tokenizer!r} does not match the prepared folder {str(path)!r}, which "
                         f"holds ids of a {kind!r} tokenizer; leave data.tokenizer unset (the folder's is used)")
    if kind == "char":
        tok = CharTokenizer(meta["tokenizer"]["alphabet"])
    elif kind == "byte":
        tok = ByteTokenizer()
    else:
        tok = TransformersTokenizer.from_folder(path / meta["tokenizer"]["folder"], meta)
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    shards = {split: TokenShards([path / s["file"] for s in meta["splits"][split]["shards"]],
                                 [s["tokens"] for s in meta["splits"][split]["shards"]], dtype) for split in SPLITS}
    return PreparedCorpus(shards["train"], shards["val"], tok, f"prepared folder {str(path)!r}",
                          list(meta["validation"].get("documents") or []), path, meta)


def document_starts(path: str | os.PathLike, split: str) -> np.ndarray:
    """(n_documents,) int64 offsets of each document's first id in ``split`` (memory-mapped)."""
    path = Path(path)
    info = read_meta(path)["splits"][split]["documents"]
    return np.memmap(path / info["file"], dtype="<i8", mode="r") if info["count"] else np.zeros(0, np.int64)


def check_run_tokenizer(extra: dict, path: str | os.PathLike) -> None:
    """Refuse to resume a run whose checkpoint (``extra``) was trained on prepared folder ``path``
    with another tokenizer than the folder now holds (it was prepared again)."""
    stored, meta = extra.get("tokenizer"), read_meta(path)
    if stored is None or tokenizer_identity(stored) == tokenizer_identity(meta["tokenizer"]):
        return
    raise ValueError(f"data.path {str(path)!r} now holds ids of another tokenizer ({meta['tokenizer']['kind']}, "
                     f"sha256 {tokenizer_identity(meta['tokenizer'])[:12]}) than the run was trained with "
                     f"({stored.get('kind')}, sha256 {tokenizer_identity(stored)[:12]}); prepare the data again "
                     f"with the run's tokenizer, or start a new run")


__all__ = ["PreparedCorpus", "TokenShards", "check_run_tokenizer", "document_starts", "is_prepared", "open_prepared",
           "read_meta"]
