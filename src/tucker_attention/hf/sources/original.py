"""The original model of ``tucker-attn convert`` / ``distill``: loaded offline from a folder, a GGUF
file or a bundled name (:func:`load_source`, :func:`model_kind`, :func:`check_weights`), and
:class:`ConvertError`, the commands' bad-argument error.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ...settings.convert import DTYPES, ConvertError  # noqa: F401  (the commands' error, read from here)
from .gguf import load_gguf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "merges.txt")


# -- the model -------------------------------------------------------------------------------------

def _mapping_names(name: str) -> set[str]:
    from transformers.models.auto import modeling_auto

    names = set()
    for value in getattr(modeling_auto, name, {}).values():
        names.update(value if isinstance(value, (tuple, list)) else [value])
    return names


def model_kind(architecture: str | None) -> tuple[str, str]:
    """(auto class name, kind) for a config's first ``architectures`` entry: causal LMs ->
    ('AutoModelForCausalLM', 'decoder'); image / sequence classifiers -> their auto class,
    'classifier'; anything else -> ('AutoModel', 'encoder'), or the named class itself when
    transformers has it (so a head such as ``BertForMaskedLM``'s is kept)."""
    if not architecture:
        return "AutoModel", "encoder"
    if architecture.endswith("ForCausalLM") or architecture in _mapping_names("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
        return "AutoModelForCausalLM", "decoder"
    for suffix, mapping, auto in (
            ("ForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
             "AutoModelForImageClassification"),
            ("ForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
             "AutoModelForSequenceClassification")):
        if architecture.endswith(suffix) or architecture in _mapping_names(mapping):
            return auto, "classifier"
    import transformers

    if architecture in _mapping_names("MODEL_MAPPING_NAMES") or not hasattr(transformers, architecture):
        return "AutoModel", "encoder"
    return architecture, "encoder"


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ConvertError("src", f"{str(path)!r}: config.json is not readable JSON ({err})") from None


def source_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(str(name).replace("torch.", ""), torch.float32)


def load_source(src, dtype: torch.dtype | str = torch.float32) -> dict:
    """{'path', 'model' (eval), 'tokenizer' (or None), 'kind', 'class', 'dtype' (stored),
    'generation_config' (or None)} of a local model folder, a GGUF file or a bundled name, offline.
    dtype: the model's (default float32), or 'stored': as its files hold it (bf16 stays bf16; run it
    under :func:`~.compute.float32_compute` to compute in float32). A GGUF file loads in float32
    (transformers dequantizes it)."""
    from .files import model_path, require_transformers

    transformers = require_transformers()
    try:
        path = model_path(src)
    except (FileNotFoundError, ValueError) as err:
        raise ConvertError("src", str(err)) from None
    if path.is_file():
        try:
            return load_gguf(path, transformers)
        except (ImportError, ValueError) as err:
            raise ConvertError("src", str(err)) from None
    config = read_config(path)
    if config.get("tucker_attention"):
        raise ConvertError("src", f"{str(path)!r} is already a converted model (its config has tucker_attention); "
                                  f"convert the original model")
    if dtype == "stored":
        dtype = source_dtype(config)
    architecture = (config.get("architectures") or [None])[0]
    class_name, kind = model_kind(architecture)
    cls = getattr(transformers, class_name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = cls.from_pretrained(path, local_files_only=True, dtype=dtype,
                                              output_loading_info=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ConvertError("src", f"could not load a transformers model from {str(path)!r} with {class_name}: "
                                  f"{err}") from None
    for what in ("missing_keys", "mismatched_keys"):       # transformers would initialize them at random
        keys = sorted(str(k) for k in info.get(what) or ())
        if keys:
            raise ConvertError("src", f"{str(path)!r}: the weights do not match its config.json for "
                                      f"{type(model).__name__}: {len(keys)} {what.replace('_', ' ')} "
                                      f"({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}); "
                                      f"nothing was converted")
    tokenizer = None
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as err:          # tokenizers' and sentencepiece's own errors included
            raise ConvertError("src", f"{str(path)!r} has tokenizer files that AutoTokenizer cannot load: "
                                      f"{' '.join(str(err).split())[:300]}") from None
    generation_config = None
    if (path / "generation_config.json").is_file():
        generation_config = transformers.GenerationConfig.from_pretrained(path, local_files_only=True)
    return {"path": path, "model": model.eval(), "tokenizer": tokenizer, "kind": kind,
            "class": type(model).__name__, "dtype": source_dtype(config), "generation_config": generation_config}


def check_weights(model: nn.Module, where: str = "the model") -> None:
    """Refuse a model with NaN or inf in any weight (named in the error)."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ConvertError("src", f"{where}: weight {name!r} has non-finite values (NaN or inf); "
                                      f"nothing was converted")


