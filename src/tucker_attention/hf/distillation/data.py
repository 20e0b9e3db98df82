"""The token windows a distillation run trains and is measured on (:mod:`.distill`).

:func:`load_data` reads a folder written by ``tucker-attn prepare-data`` (memory-mapped shards, its
own train / validation split; its tokenizer must be the model's), a text file or folder of
``.txt`` files, or by default the built-in Shakespeare plays; text is tokenized with the model's
tokenizer and split as ``convert`` splits its calibration text (the held-out plays are the
validation split, so a distilled model is measured on text neither its conversion nor its
distillation saw).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ...data.text import TextCorpus
from ...settings.distill import DistillError
from ..sources.original import ConvertError

PROBE = "The quick brown fox, 1234 — naïve café! ¿Qué? 東京\n\tdone."
EVAL_BATCH = 4
BUILTIN_JOINED = "the built-in plays and the model's own text that convert kept"


@dataclass
class TokenData:
    """Training and validation token ids (1-D tensors, or a prepared folder's memory-mapped shards)."""

    train: object
    val: object
    source: str
    windows = staticmethod(TextCorpus.windows)   # a prepared folder's instance uses its corpus's own gather
    random_windows = TextCorpus.random_windows
    val_starts = TextCorpus.val_starts
    check_block_size = TextCorpus.check_block_size

    def check_seq_len(self, seq_len: int) -> None:
        self.check_block_size(seq_len)

    def train_batch(self, generator: torch.Generator, n: int, seq_len: int) -> torch.Tensor:
        """(n, seq_len) ids of ``n`` random training windows (drawn from ``generator``)."""
        return self.windows(self.train, self.random_windows(n, seq_len, generator), seq_len)[0]

    def eval_batches(self, seq_len: int, n_windows: int, device) -> list[dict]:
        """Fixed, evenly spaced validation windows, in batches of model inputs (no padding)."""
        ids = self.windows(self.val, self.val_starts(seq_len, n_windows), seq_len)[0].to(device)
        return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(EVAL_BATCH)]


def check_prepared_kind(path, kind: str | None) -> None:
    """A prepared folder holds the ids of a transformers tokenizer (a char or byte one is not the model's)."""
    if kind != "transformers":
        raise DistillError("data", f"{str(path)!r} holds ids of the {kind!r} tokenizer, not the model's; prepare it "
                                   f"again with the model's tokenizer (tucker-attn prepare-data SRC --tokenizer "
                                   f"CONVERTED_FOLDER --out DIR)")


def _check_tokenizer(tokenizer, corpus, path: Path, vocab_size: int) -> None:
    """The prepared folder's tokenizer must encode like the model's and fit its vocabulary."""
    if tokenizer is None:
        raise DistillError("data", "the original model has no tokenizer to check the prepared folder against")
    check_prepared_kind(path, getattr(corpus.tokenizer, "kind", None))
    theirs = corpus.tokenizer.encode_ids(PROBE)
    ours = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    if list(theirs) != list(ours) or corpus.tokenizer.vocab_size > vocab_size:
        raise DistillError("data", f"{str(path)!r} was tokenized with another tokenizer than the model's (a probe "
                                   f"text gives other ids, or its vocabulary of {corpus.tokenizer.vocab_size} exceeds "
                                   f"the model's {vocab_size}); prepare it again with the model's tokenizer "
                                   f"(tucker-attn prepare-data SRC --tokenizer CONVERTED_FOLDER)")


def load_data(path, tokenizer, vocab_size: int, samples: dict | None = None) -> TokenData:
    """:class:`TokenData` of ``path`` (prepared folder, text file or folder; None: the built-in plays).
    ``samples``: the model's own text that ``convert`` kept (:func:`~.model_text.kept_samples`), joined
    to the built-in plays (its calibration samples to training, its evaluation ones to validation)."""
    from ...data.prepared import is_prepared, open_prepared
    from ..conversion.fidelity import text_split

    if path is not None and is_prepared(path):
        try:
            corpus = open_prepared(path)
        except (ValueError, OSError, KeyError) as err:
            raise DistillError("data", f"{str(path)!r} is not a readable prepared folder: {err}") from None
        _check_tokenizer(tokenizer, corpus, Path(path), vocab_size)
        data = TokenData(corpus.train, corpus.val, f"the prepared folder {str(path)!r}")
        data.windows = corpus.windows
        return data
    if tokenizer is None:
        raise DistillError("data", "text needs the model's tokenizer, and the original model has none")
    try:
        train, held_out, what = text_split(path)
    except ConvertError as err:                       # the user typed --data
        raise DistillError("data", err.message) from None

    def ids(text: str) -> torch.Tensor:              # in pieces of whole lines (no over-long sequence warning)
        lines, pieces, size = text.splitlines(keepends=True), [], 0
        for line in lines:
            if not pieces or size > 8192:
                pieces.append([])
                size = 0
            pieces[-1].append(line)
            size += len(line)
        encoded = tokenizer(["".join(p) for p in pieces], add_special_tokens=False)["input_ids"]
        return torch.tensor([i for row in encoded for i in row], dtype=torch.long)

    train_ids, val_ids, what = ids(train), ids(held_out), f"{what} (held-out part for validation)"
    if path is None and samples:
        joined = {name: torch.tensor([i for row in rows for i in row], dtype=torch.long)
                  for name, (rows, _) in samples.items()}
        train_ids = torch.cat([train_ids, joined.get("calibration", train_ids[:0])])
        val_ids = torch.cat([val_ids, joined.get("evaluation", val_ids[:0])])
        counts = ", ".join(f"{len(rows)} {name}" for name, (rows, _) in samples.items())
        what = f"{BUILTIN_JOINED} ({counts} sequences; validation: held-out plays and the evaluation ones)"
    return TokenData(train_ids, val_ids, what)

