"""A converted folder loads as what its config declares, or not at all.

Checked when a converted model is built (:func:`build_layer`, :func:`check_layout`; any way it is
built: ``from_pretrained`` plain or with ``trust_remote_code``, ``from_config``,
:func:`~.convert.load_converted`): every block
of ``config.tucker_attention`` builds its layer, and a serving layout (``num_key_value_heads``,
``head_dim``) in the config is the one the layers cache. Checked when weights are read
(:func:`loaded_checks`, from ``from_pretrained``'s loading report and the files' headers): no
tensor of the model's body is missing, reshaped or left over (a removed block, edited ranks, a
deleted tensor: transformers would fill them with uninitialised memory or random init), and the
converted blocks' tensors are stored in the config's dtype. A mismatch is a
:class:`ConvertedFolderError` naming the folder, the block and what differs.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .blocks import layout_of

EDITED = ("a folder save_pretrained wrote holds exactly the tensors its config declares, so this one was damaged "
          "or edited (a tensor removed or reshaped, a tucker_attention block, method or ranks changed); "
          "nothing is loaded with random weights")


class ConvertedFolderError(ValueError):
    """A converted folder whose files contradict each other (the message names what differs)."""


def where(config) -> str:
    """The folder a config was read from, for messages."""
    name = getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "")
    return repr(str(name)) if name else "this converted config"


def build_layer(config, path: str, facts: dict):
    """The layer of block ``path`` from its spec entry, or a :class:`ConvertedFolderError` saying why not."""
    from ...layers import make_attention

    try:
        return make_attention(**facts["layer"])
    except (TypeError, ValueError, KeyError) as err:
        raise ConvertedFolderError(f"{where(config)}: block {path}: config.json's tucker_attention entry does not "
                                   f"build a layer ({err}); {EDITED}") from None


def check_layout(config, spec: dict, layers: list) -> None:
    """The serving layout the config declares is the one ``layers`` cache (see :func:`~.blocks.layout_of`)."""
    if "serving" not in spec:                   # a folder older than serving layouts: nothing declared
        return
    declared, cached = spec["serving"], layout_of(layers)
    if declared != cached:
        raise ConvertedFolderError(f"{where(config)}: config.json's tucker_attention declares the serving layout "
                                   f"{declared} but its layers cache {cached}; {EDITED}")
    for name, value in (declared or {}).items():
        if getattr(config, name, None) != value:
            raise ConvertedFolderError(
                f"{where(config)}: config.json's {name}={getattr(config, name, None)} contradicts the converted "
                f"layers, which cache one key head and one value head of width {declared['head_dim']} (the serving "
                f"layout {name}={value}); a serving engine would size its KV cache wrongly, so restore {value}")


def in_body(model: nn.Module, key: str) -> bool:
    """Whether ``key`` (model naming, or the checkpoint's for a base model) lies in the model's body."""
    prefix = getattr(model, "base_model_prefix", "")
    if model.base_model is not model:
        return key.startswith(prefix + ".")
    first = key.removeprefix(prefix + ".").split(".")[0]
    return first in dict(model.named_children())


def _block_of(spec: dict, key: str) -> str:
    depth = len(next(iter(spec["blocks"])).split("."))
    parts = key.split(".")
    return ".".join(parts[:depth]) if len(parts) > depth else key


def loaded_checks(model: nn.Module, info: dict, folder: str, *, same_head: bool) -> None:
    """Refuse a model whose weights did not all come from the folder (transformers' loading
    ``info``): missing or unexpected tensors in the body, in the head too when the model is the
    class the folder was saved from (``same_head``), and every reshaped one ``info`` lists."""
    spec = model.config.tucker_attention
    problems = {
        "missing from the file": sorted(k for k in info.get("missing_keys", ()) if same_head or in_body(model, k)),
        "stored with another shape": sorted(f"{k} {tuple(a)} vs {tuple(b)} declared"
                                            for k, a, b in info.get("mismatched_keys", ())),
        "in the file but not declared": sorted(k for k in info.get("unexpected_keys", ())
                                               if same_head or in_body(model, k)),
    }
    found = {what: keys for what, keys in problems.items() if keys}
    if not found:
        check_stored_dtypes(folder, spec)
        return
    blocks = sorted({_block_of(spec, k.split(" ")[0]) for keys in found.values() for k in keys})
    listed = "; ".join(f"{len(keys)} {what} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})"
                       for what, keys in found.items())
    raise ConvertedFolderError(f"{folder!r}: its weights do not match its config.json in {', '.join(blocks[:4])}"
                               f"{', ...' if len(blocks) > 4 else ''}: {listed}; {EDITED}")


def _stored(folder: Path) -> dict[str, str]:
    """{tensor name: safetensors dtype name} of a local folder's safetensors files."""
    from safetensors import safe_open

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            out.update({k: handle.get_slice(k).get_dtype() for k in handle.keys()})
    return out


SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def check_stored_dtypes(folder: str, spec: dict) -> None:
    """Every tensor of a converted block is stored in the dtype the folder's config.json declares
    (checked for local folders of safetensors files)."""
    path = Path(folder)
    config = path / "config.json"
    if not config.is_file():
        return
    fields = json.loads(config.read_text())
    declared = fields.get("dtype") or fields.get("torch_dtype")
    want = SAFETENSORS_DTYPES.get(str(declared).replace("torch.", ""))
    if want is None:
        return
    wrong = sorted(f"{k} ({dtype})" for k, dtype in _stored(path).items() if dtype != want
                   and any(k.startswith(p + ".") for p in spec["blocks"]))
    if wrong:
        raise ConvertedFolderError(f"{folder!r}: config.json declares dtype {declared}, but {len(wrong)} tensors of "
                                   f"its converted blocks are stored in another ({', '.join(wrong[:4])}"
                                   f"{', ...' if len(wrong) > 4 else ''}); {EDITED}")
