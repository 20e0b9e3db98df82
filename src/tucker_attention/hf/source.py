"""The source model of ``tucker-attn convert`` and how a converted copy is measured against it.

Loading a local model folder offline (:func:`load_source`, :func:`model_kind`,
:func:`check_weights`), the calibration and held-out evaluation inputs (:func:`make_inputs`:
text pieces, random token ids or random images), the fidelity of a converted copy
(:func:`fidelity`) and its attention accounting (:func:`attention_summary`); with
:class:`ConvertError` and the defaults that :mod:`.pipeline` uses and re-exports.
"""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import torch
from torch import nn

from ..accounting import attention_param_count, kv_cache_floats_per_token

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "merges.txt")
BUILTIN_TEXT = "the built-in Shakespeare plays"
# defaults: 64 calibration pieces of <= 128 tokens (~8k tokens, what the MiniLM calibration of `compress` uses),
# 16 held-out evaluation pieces
N_CALIBRATION, N_EVAL, SEQ_LEN, BATCH_SIZE = 64, 16, 128, 8


class ConvertError(ValueError):
    """A bad argument of :func:`~.pipeline.convert_folder`: ``argument`` names it (``src``, ``ranks``,
    ``budget_params``, ``budget_kv``, ``out``, ``calibration``, ``dtype``, ...)."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")
        self.argument, self.message = argument, message


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


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ConvertError("src", f"{str(path)!r}: config.json is not readable JSON ({err})") from None


def _source_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(str(name).replace("torch.", ""), torch.float32)


def load_source(src) -> dict:
    """{'path', 'model' (float32, eval), 'tokenizer' (or None), 'kind', 'class', 'dtype' (stored),
    'generation_config' (or None)} of a local model folder, a GGUF file or a bundled name, offline."""
    from .models import _require_transformers, model_path

    transformers = _require_transformers()
    try:
        path = model_path(src)
    except (FileNotFoundError, ValueError) as err:
        raise ConvertError("src", str(err)) from None
    if path.is_file():
        return _load_gguf(path, transformers)
    config = _read_config(path)
    if config.get("tucker_attention"):
        raise ConvertError("src", f"{str(path)!r} is already a converted model (its config has tucker_attention); "
                                  f"convert the original model")
    architecture = (config.get("architectures") or [None])[0]
    class_name, kind = model_kind(architecture)
    cls = getattr(transformers, class_name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, info = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32,
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
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConvertError("src", f"{str(path)!r} has tokenizer files that AutoTokenizer cannot load: "
                                      f"{err}") from None
    generation_config = None
    if (path / "generation_config.json").is_file():
        generation_config = transformers.GenerationConfig.from_pretrained(path, local_files_only=True)
    return {"path": path, "model": model.eval(), "tokenizer": tokenizer, "kind": kind,
            "class": type(model).__name__, "dtype": _source_dtype(config), "generation_config": generation_config}


def _load_gguf(path: Path, transformers) -> dict:
    """A causal LM from a GGUF file (transformers' reader dequantizes it to float32), as a plain
    model of its transformers class (no quantization config: it saves and converts as any other),
    with the tokenizer and generation config the file describes."""
    if importlib.util.find_spec("gguf") is None:
        raise ConvertError("src", f"reading the GGUF file {str(path)!r} needs the package gguf: pip install gguf "
                                  f"accelerate")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = transformers.AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name,
                                                                   local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as err:
        raise ConvertError("src", f"could not read a causal LM from the GGUF file {str(path)!r}: {err}") from None
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


def check_weights(model: nn.Module, where: str = "the model") -> None:
    """Refuse a model with NaN or inf in any weight (named in the error)."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise ConvertError("src", f"{where}: weight {name!r} has non-finite values (NaN or inf); "
                                      f"nothing was converted")


# -- calibration and evaluation inputs -------------------------------------------------------------

def _max_positions(model: nn.Module) -> int | None:
    config = model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _text_split(calibration) -> tuple[str, str, str]:
    """(calibration text, held-out evaluation text, description)."""
    from ..data.text import read_documents, shakespeare_plays, split_documents

    if calibration is None:
        docs, what = shakespeare_plays(), BUILTIN_TEXT
    else:
        path = Path(calibration)
        if not path.exists():
            raise ConvertError("calibration", f"{str(path)!r} does not exist (give a text file or a folder of .txt "
                                              f"files)")
        try:
            docs = read_documents(path)
        except (ValueError, OSError, UnicodeDecodeError) as err:
            raise ConvertError("calibration", f"{str(path)!r} cannot be read as text: {err}") from None
        what = repr(str(path))
    if not any(t.split() for t in docs.values()):
        raise ConvertError("calibration", f"{what} holds no text")
    train, held_out, _ = split_documents(docs, 0.1)
    return train, held_out, what


def _pieces(text: str, n: int, words: int) -> list[str]:
    """Up to ``n`` pieces of consecutive lines with about ``words`` words each (long lines are cut)."""
    pieces, current, count = [], [], 0
    for line in text.splitlines():
        tokens = line.split()
        while tokens:
            take = tokens[:words - count]
            tokens = tokens[len(take):]
            current.append(" ".join(take))
            count += len(take)
            if count >= words:
                pieces.append("\n".join(current))
                current, count = [], 0
                if len(pieces) == n:
                    return pieces
    if current:
        pieces.append("\n".join(current))
    return pieces


def _token_batches(tokenizer, pieces: list[str], seq_len: int, batch_size: int) -> list[dict]:
    """Tokenizer output (with special tokens, truncated to ``seq_len``), right-padded by hand with
    an attention mask (so tokenizers without a pad token work)."""
    encoded = tokenizer(pieces, truncation=True, max_length=seq_len)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = []
    for i in range(0, len(encoded), batch_size):
        rows = [list(r) for r in encoded[i:i + batch_size] if len(r)]
        if not rows:
            continue
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :len(r)], mask[j, :len(r)] = torch.tensor(r), 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def _random_id_batches(vocab: int, n: int, seq_len: int, batch_size: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, n, batch_size):
        ids = torch.randint(0, vocab, (min(batch_size, n - i), seq_len), generator=gen)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def _image_batches(config, n: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    size = getattr(config, "image_size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    channels = getattr(config, "num_channels", 3)
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(min(batch_size, n - i), channels, *size, generator=gen) for i in range(0, n, batch_size)]


def _tokens(batches) -> int:
    return sum(int(b["attention_mask"].sum()) for b in batches)


def make_inputs(model: nn.Module, tokenizer, calibration=None, *, n_calibration: int = N_CALIBRATION,
                n_eval: int = N_EVAL, seq_len: int = SEQ_LEN, batch_size: int = BATCH_SIZE, seed: int = 0):
    """(calibration batches, evaluation batches, description): text pieces of the calibration
    text (default: the built-in Shakespeare plays; evaluation on its held-out part) for models
    with a tokenizer, random token ids for text models without one, random N(0, 1) images for
    image models (which take no calibration text)."""
    main_input = getattr(model, "main_input_name", "input_ids")
    if main_input == "pixel_values":
        if calibration is not None:
            raise ConvertError("calibration", f"{type(model).__name__} takes images, and calibration is a text file; "
                                              f"image models calibrate on random N(0, 1) images (leave it out)")
        cal = _image_batches(model.config, n_calibration, batch_size, seed)
        ev = _image_batches(model.config, n_eval, batch_size, seed + 1)
        return cal, ev, (f"calibration: {n_calibration} random N(0, 1) images (no calibration data for image models); "
                         f"evaluation: {n_eval} other random images")
    if main_input != "input_ids":
        raise ConvertError("src", f"{type(model).__name__} takes {main_input!r}; convert handles text (input_ids) "
                                  f"and image (pixel_values) models")
    limit = _max_positions(model)
    seq_len = min(seq_len, limit) if limit else seq_len
    if tokenizer is None:
        if calibration is not None:
            raise ConvertError("calibration", "the source folder has no tokenizer, so calibration text cannot be "
                                              "tokenized; add the tokenizer files to the folder or leave it out")
        vocab = model.get_input_embeddings().num_embeddings
        cal = _random_id_batches(vocab, n_calibration, seq_len, batch_size, seed)
        ev = _random_id_batches(vocab, n_eval, seq_len, batch_size, seed + 1)
        return cal, ev, (f"calibration: {n_calibration} random token-id sequences of {seq_len} tokens (no tokenizer "
                         f"in SRC); evaluation: {n_eval} other random sequences")
    train, held_out, what = _text_split(calibration)
    words = max(1, int(seq_len * 0.75))
    cal_pieces = _pieces(train, n_calibration, words)
    eval_pieces = _pieces(held_out, n_eval, words)
    where = "held-out part"
    if not eval_pieces:
        eval_pieces, where = cal_pieces[:n_eval], "calibration text (too short to hold out a part)"
    cal = _token_batches(tokenizer, cal_pieces, seq_len, batch_size)
    ev = _token_batches(tokenizer, eval_pieces, seq_len, batch_size)
    if not cal or not ev:
        raise ConvertError("calibration", f"{what} gives no tokens")
    return cal, ev, (f"calibration: {len(cal_pieces)} pieces ({_tokens(cal):,} tokens) of {what}; "
                     f"evaluation: {len(eval_pieces)} pieces ({_tokens(ev):,} tokens) of its {where}")


def _run(model: nn.Module, batch, kind: str):
    if isinstance(batch, torch.Tensor):
        out = model(pixel_values=batch, output_hidden_states=kind == "encoder")
    else:
        extra = {"use_cache": False} if kind == "decoder" else {"output_hidden_states": kind == "encoder"}
        out = model(**batch, **extra)
    if kind == "encoder":
        hidden = getattr(out, "last_hidden_state", None)
        return hidden if hidden is not None else out.hidden_states[-1]
    return out.logits


@torch.no_grad()
def reference_outputs(source: nn.Module, batches, kind: str) -> list[torch.Tensor]:
    """The source's outputs on ``batches`` (what :func:`fidelity` compares against), to measure several
    converted models without running the source again."""
    return [_run(source, batch, kind).detach() for batch in batches]


@torch.no_grad()
def fidelity(source: nn.Module | list, converted: nn.Module, batches, kind: str, *, progress: bool = False) -> dict:
    """Source vs converted on ``batches``: decoder {'kl', 'top1'} (next-token, over non-padding
    positions) and each model's perplexity of the text itself ('ppl' converted, 'source_ppl'),
    classifier {'kl', 'top1'} (class distribution), encoder {'cosine'} (mean-pooled last hidden
    states). ``source``: the model, or its :func:`reference_outputs` on ``batches``."""
    from tqdm.auto import tqdm

    sums = {"kl": 0.0, "top1": 0.0, "cosine": 0.0, "nll": 0.0, "source_nll": 0.0}
    count = tokens = 0
    given = isinstance(source, list)
    for i, batch in enumerate(tqdm(batches, desc="evaluate", disable=not progress, leave=False)):
        a = (source[i] if given else _run(source, batch, kind)).double()
        b = _run(converted, batch, kind).double()
        mask = None if isinstance(batch, torch.Tensor) else batch["attention_mask"].bool()
        if kind == "encoder":
            weights = (torch.ones(a.shape[:2], dtype=a.dtype) if mask is None else mask.to(a.dtype)).unsqueeze(-1)
            pa, pb = (a * weights).sum(1) / weights.sum(1), (b * weights).sum(1) / weights.sum(1)
            sums["cosine"] += float(torch.nn.functional.cosine_similarity(pa, pb, dim=-1).sum())
            count += pa.shape[0]
            continue
        la, lb = a.log_softmax(-1), b.log_softmax(-1)
        if kind == "decoder":
            for key, logp in (("source_nll", la), ("nll", lb)):
                nll, n = _next_token_nll(logp, batch)
                sums[key] += nll
            tokens += n
        if kind == "decoder" and mask is not None:
            la, lb = la[mask], lb[mask]                           # (tokens, vocab)
        else:
            la, lb = la.reshape(-1, la.shape[-1]), lb.reshape(-1, lb.shape[-1])
        sums["kl"] += float((la.exp() * (la - lb)).sum(-1).clamp(min=0).sum())
        sums["top1"] += float((la.argmax(-1) == lb.argmax(-1)).sum())
        count += la.shape[0]
    if kind == "encoder":
        return {"cosine": sums["cosine"] / count}
    scores = {"kl": sums["kl"] / count, "top1": sums["top1"] / count}
    if kind == "decoder" and tokens:
        scores.update(ppl=math.exp(sums["nll"] / tokens), source_ppl=math.exp(sums["source_nll"] / tokens))
    return scores


def _next_token_nll(logp: torch.Tensor, batch) -> tuple[float, int]:
    """(summed negative log-likelihood of each next token, their count) over non-padding positions;
    logp (B, T, vocab) log-probabilities."""
    targets, keep = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:].bool()
    picked = logp[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return float(-picked[keep].sum()), int(keep.sum())


def greedy_reply(model: nn.Module, tokenizer, prompt: str, tokens: int = 24) -> str:
    """The model's greedy reply to ``prompt`` (through its chat template when the tokenizer has
    one), ``tokens`` new tokens at most, special tokens dropped."""
    inputs = tokenizer(prompt, return_tensors="pt")
    if getattr(tokenizer, "chat_template", None):
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# -- accounting ------------------------------------------------------------------------------------

def attention_summary(model: nn.Module, dtype: torch.dtype) -> dict:
    """Attention parameters, KV floats and bytes per token (all layers, cached in ``dtype``) of a
    source or converted model."""
    from .convert import converted_blocks
    from .read import attention_layers

    blocks = converted_blocks(model)
    layers = [b.layer for b in blocks.values()] if blocks else list(attention_layers(model).values())
    floats = sum(kv_cache_floats_per_token(layer) for layer in layers)
    return {"attention_params": sum(attention_param_count(layer) for layer in layers), "kv_floats_per_token": floats,
            "kv_bytes_per_token": floats * torch.empty((), dtype=dtype).element_size(), "n_layers": len(layers)}
