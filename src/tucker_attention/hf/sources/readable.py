"""Is this model source readable? One gate every command passes before it loads a model.

:func:`check_readable` opens what transformers would read, cheaply (headers, not tensors): the
safetensors files (their header must parse and cover the file: a cut-off file fails), a GGUF
file (its header and tensor table, read by ``gguf``'s reader, must fit the file), pickled
``.bin`` weights (unpickled with ``weights_only=True`` onto the meta device: a pickle that would
run code is refused), and the JSON files of the config and tokenizer. A damaged file is a
:class:`DamagedFileError` naming the file and the cause, before anything is loaded or written.
What no header can show (a flipped byte inside a tensor's data) stays undetected: the formats
carry no checksums.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import zipfile
from pathlib import Path

#: JSON files a model folder may hold that transformers parses.
JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


class DamagedFileError(ValueError):
    """A model file that cannot be read: ``path`` names it, ``cause`` says why."""

    def __init__(self, path: str | os.PathLike, cause: str):
        super().__init__(f"{str(path)!r} is damaged ({cause}); nothing was loaded")
        self.path, self.cause = Path(path), cause


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def check_safetensors(path: Path) -> None:
    """The header of a safetensors file parses and its tensors fit the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            handle.keys()
    except Exception as err:          # SafetensorError, OSError: the format's own reader says why
        raise DamagedFileError(path, f"not a complete safetensors file: {_one_line(err)}") from None


def check_pickle(path: Path) -> None:
    """A pickled checkpoint unpickles with ``weights_only=True`` (tensors onto the meta device)."""
    import torch

    try:                                # mmap reads a zip checkpoint's structure only; a legacy one has no zip
        torch.load(path, map_location="meta", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        raise DamagedFileError(path, f"a pickle that weights_only loading refuses (it could run code): "
                                     f"{_one_line(err).split(' Check the documentation')[0]}") from None
    except Exception as err:          # a cut-off zip archive, not a checkpoint at all
        raise DamagedFileError(path, f"not a readable PyTorch checkpoint: {_one_line(err)}") from None


def check_gguf(path: Path) -> None:
    """A GGUF file's header and tensor table fit the file (skipped without the ``gguf`` package,
    whose absence the loader reports itself)."""
    if importlib.util.find_spec("gguf") is None:
        return
    import gguf

    try:
        gguf.GGUFReader(path)
    except Exception as err:          # ValueError / struct.error on a cut-off body or a bad header
        raise DamagedFileError(path, f"its GGUF header or tensor data is cut off or invalid: "
                                     f"{_one_line(err)}") from None


def check_json(path: Path) -> None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DamagedFileError(path, f"not readable JSON: {_one_line(err)}") from None


def weight_files(folder: Path) -> list[Path]:
    """The weight files transformers reads from ``folder``: its safetensors files when it has
    any, else its pickled ``.bin`` files."""
    found = sorted(folder.glob("*.safetensors"))
    return found or sorted(folder.glob("pytorch_model*.bin"))


def check_readable(path: str | os.PathLike) -> None:
    """Raise :class:`DamagedFileError` for the first file of the model at ``path`` (a folder or a
    GGUF file) that cannot be read (see the module docstring)."""
    path = Path(path)
    if path.is_file():
        check_gguf(path)
        return
    for name in JSON_FILES:
        if (path / name).is_file():
            check_json(path / name)
    for file in weight_files(path):
        (check_safetensors if file.suffix == ".safetensors" else check_pickle)(file)
