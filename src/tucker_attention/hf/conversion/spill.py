"""Tensors kept on disk while a conversion runs, so its memory does not grow with the model.

:class:`Spill` is a temporary folder of safetensors files (removed on :meth:`Spill.close` or at the
end of a ``with``); :meth:`Spill.put` writes a named group of tensors, :meth:`Spill.get` reads it
back (a fresh copy each time). ``convert`` keeps each block's calibration statistics with their
whitenings (:class:`~.calibration.SpilledStatistics`, a read-only mapping) and the source's reference
logits (:class:`SpilledList`) there, and loads one block's / one batch's at a time.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch


class Spill:
    """A temporary folder (in ``dir``, default the system's temporary folder) of named groups of tensors."""

    def __init__(self, dir: str | Path | None = None):
        self._folder = tempfile.TemporaryDirectory(prefix="tucker-attn-spill-", dir=dir)
        self._names: dict[str, Path] = {}

    def put(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        path = Path(self._folder.name) / f"{len(self._names)}.safetensors"
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
        self._names[name] = path

    def get(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self._names[name]))

    def close(self) -> None:
        self._folder.cleanup()
        self._names.clear()

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SpilledList(Sequence):
    """A list of tensors kept in a :class:`Spill`, read back one at a time."""

    def __init__(self, spill: Spill, prefix: str):
        self._spill, self._prefix, self._length = spill, prefix, 0

    def append(self, tensor: torch.Tensor) -> None:
        self._spill.put(f"{self._prefix}/{self._length}", {"t": tensor})
        self._length += 1

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -self._length <= index < self._length:
            raise IndexError(index)
        return self._spill.get(f"{self._prefix}/{index % self._length}")["t"]
