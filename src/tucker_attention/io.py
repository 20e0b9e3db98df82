"""Checkpoints: weights in safetensors, every attention layer's config in the file's metadata.

Loading never executes code from the file: tensors come from safetensors and the layer
configs from JSON, so any module's attention layers can be rebuilt and analysed without
the code of the model around them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .layers import Attention, make_attention

METADATA_KEY = "tucker_attention"


def save_checkpoint(path: str | os.PathLike, module: torch.nn.Module, *, extra: dict | None = None) -> Path:
    """Write ``module``'s state dict to ``path`` (safetensors), atomically (temporary file + rename).

    The header records ``{"attention": {name: layer.config()}}`` for every attention layer
    inside ``module`` (name "" for the module itself), and ``{"extra": extra}`` (JSON-serializable).
    """
    path = Path(path)
    layers = {name: layer.config() for name, layer in module.named_modules() if isinstance(layer, Attention)}
    metadata = {METADATA_KEY: json.dumps({"format": 1, "attention": layers, "extra": extra or {}})}
    tensors = {name: t.detach().cpu().contiguous().clone() for name, t in module.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """The tucker-attention metadata of a checkpoint (raises if the file is not one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for non-safetensors files
        raise ValueError(f"{str(path)!r} is not a safetensors checkpoint: {err}") from None
    if METADATA_KEY not in header:
        raise ValueError(f"{str(path)!r} is a safetensors file without tucker-attention metadata "
                         f"(not written by tucker_attention.io.save_checkpoint)")
    return json.loads(header[METADATA_KEY])


def load_attention_layers(path: str | os.PathLike) -> dict[str, Attention]:
    """Rebuild every attention layer recorded in a checkpoint, with its weights: {name: layer}."""
    layers = {}
    configs = read_metadata(path)["attention"]
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        for name, config in configs.items():
            layer = make_attention(**config)
            prefix = f"{name}." if name else ""
            wanted = set(layer.state_dict()) | set(layer.legacy_state_keys)
            state = {key[len(prefix):]: f.get_tensor(key) for key in keys
                     if key.startswith(prefix) and key[len(prefix):] in wanted}
            layer.load_state_dict(state)
            layers[name] = layer.to(next(iter(state.values())).dtype) if state else layer
    return layers
