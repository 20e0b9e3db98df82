"""GGUF files (llama.cpp's format) as transformers models: recognizing one (:func:`is_gguf`) and
reading it (:func:`load_gguf`) through transformers' GGUF reader, which dequantizes to float.
``smollm2`` (:mod:`.model_files`) is such a file.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch

from ..._extras import missing

GGUF_MAGIC = b"GGUF"


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that starts as a GGUF file does (its magic bytes)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return path.is_file() and handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def load_gguf(path: Path, transformers) -> dict:
    """A causal LM from a GGUF file (transformers' reader dequantizes it to float32), as a plain
    model of its transformers class (no quantization config: it saves and converts as any other),
    with the tokenizer and generation config the file describes."""
    if importlib.util.find_spec("gguf") is None:
        raise missing("gguf", f"reading the GGUF file {str(path)!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = transformers.AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                                                   local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as err:
        raise ValueError(f"could not read a causal LM from the GGUF file {str(path)!r}: {err}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config                    # the weights are float now
    with torch.device("meta"):
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    for name, buffer in loaded.named_buffers():           # non-persistent ones too (RoPE frequencies)
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = buffer
    model.tie_weights()
    model.generation_config = loaded.generation_config
    return {"path": path, "model": model.float().eval(), "tokenizer": tokenizer, "kind": "decoder",
            "class": type(model).__name__, "dtype": torch.float32, "generation_config": model.generation_config}


