"""The model's own text: sequences a decoder samples itself, as calibration that follows what the
model produces rather than one book (data-free calibration, as LLM-QAT distils on its model's samples).

:func:`sample_ids` draws ``n`` sequences of at most ``seq_len`` tokens at ``temperature`` / ``top_p``:
a chat model answers varied requests (:data:`PROMPTS`, through its chat template), any other decoder
continues from its BOS token and a varied first word (:data:`STARTS`). The draw is reproducible by
``seed`` and leaves the caller's random state alone. :func:`cached_sample_ids` keeps them in a
safetensors file whose metadata records what made them (model, settings), reused only when all of it
matches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..sources.original import ConvertError

TEMPERATURE, TOP_P = 1.0, 0.95
#: Seeds of the evaluation samples start here (the calibration's at ``seed``: never the same draws).
EVAL_SEED_OFFSET = 1_000_000
#: Where a converted folder keeps the samples it was calibrated and measured on.
SAMPLE_FILES = {"calibration": "samples_calibration.safetensors", "evaluation": "samples_evaluation.safetensors"}
#: Requests a chat model answers (sample i answers PROMPTS[i % len]): facts, explanations, code,
#: arithmetic, writing and advice, so that the samples span what a chat model is used for.
PROMPTS = (
    "What is the capital of France?", "Explain how a rainbow forms.", "Write a Python function that reverses a string.",
    "Give me three tips for a job interview.", "What causes the seasons on Earth?",
    "Summarize the plot of a famous novel you like.", "How do I make a simple tomato sauce?",
    "Write a short poem about the sea.", "What is the difference between a list and a tuple in Python?",
    "Explain photosynthesis to a ten-year-old.", "Write an email asking my manager for a day off.",
    "What is 17 times 23? Show your steps.", "Describe the water cycle.", "Write a haiku about autumn.",
    "How does a computer store numbers?", "Who was Marie Curie?", "Write a SQL query that counts the rows of a table.",
    "Give me a plan for learning to play the guitar.", "What are the benefits of regular exercise?",
    "Explain what a neural network is.", "Translate 'good morning, how are you?' into French.",
    "Write a JavaScript function that checks whether a number is prime.", "Why is the sky blue?",
    "Tell me a short story about a robot who learns to paint.", "How do vaccines work?",
    "What should I pack for a weekend hiking trip?", "Explain recursion with an example.",
    "What were the main causes of the First World War?", "Write a bash command that finds large files.",
    "How can I improve my sleep?", "Describe how the stock market works.",
    "Write a limerick about a cat.", "What is the Pythagorean theorem?", "How do I center a div in CSS?",
    "Compare electric cars and petrol cars.", "Give me a recipe for pancakes.",
    "Explain the difference between weather and climate.", "Write a thank-you note to a teacher.",
    "What is machine learning?", "How do airplanes stay in the air?",
)
#: First words of sequences a model without a chat template continues (sample i starts with STARTS[i % len]).
STARTS = ("The", "In", "A", "When", "def", "It", "We", "Once", "This", "How", "#", "I", "There", "import",
          "According", "After", "Chapter", "Dear", "If", "One")


def _draw_inputs(tokenizer, index: int) -> list[int]:
    """The prompt of sample ``index``: a request through the chat template, or BOS and a first word."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
                                            add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids                  # a BatchEncoding
        return list(ids)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(STARTS[index % len(STARTS)], add_special_tokens=False)["input_ids"]


def sample_ids(model: nn.Module, tokenizer, n: int, seq_len: int, *, seed: int = 0, temperature: float = TEMPERATURE,
               top_p: float = TOP_P, batch_size: int = 8, progress: bool = False) -> list[list[int]]:
    """``n`` token-id sequences (prompt included) of at most ``seq_len`` tokens that ``model`` samples
    itself (module docstring); a sequence ends early at the end-of-sequence token. Batch b draws
    from ``torch.manual_seed(seed + b)`` inside a forked RNG (the caller's state is unchanged)."""
    from ..sources.compute import float32_compute

    if tokenizer is None:
        raise ConvertError("calibration", "sampling the model's own text needs its tokenizer, and the model has none")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    prompts = [_draw_inputs(tokenizer, i) for i in range(n)]
    if max(len(p) for p in prompts) >= seq_len:
        raise ConvertError("seq_len", f"the sampling prompts take up to {max(len(p) for p in prompts)} tokens, so "
                                      f"seq_len must be larger; got {seq_len}")
    out = []
    device = next(model.parameters()).device
    starts = range(0, n, batch_size)
    for b, start in enumerate(tqdm(starts, desc="sampling the model's text", disable=not progress, leave=False)):
        rows = prompts[start:start + batch_size]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)    # left-padded
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        with torch.random.fork_rng(devices=[]), torch.no_grad(), float32_compute():
            torch.manual_seed(seed + b)
            drawn = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                   top_p=top_p, top_k=0, max_new_tokens=seq_len - width, pad_token_id=pad,
                                   eos_token_id=eos)
        for r, row in zip(rows, drawn[:, width:].tolist()):
            if eos is not None and eos in row:
                row = row[:row.index(eos) + 1]
            out.append(r + row)
    return out


def cached_sample_ids(path: Path | None, model: nn.Module, tokenizer, n: int, seq_len: int, *, identity: str,
                      seed: int = 0, temperature: float = TEMPERATURE, top_p: float = TOP_P, batch_size: int = 8,
                      progress: bool = False) -> tuple[list[list[int]], dict, bool]:
    """(samples, their settings, whether they were read from ``path``): :func:`sample_ids`, read from
    ``path`` (a safetensors file) when it holds samples made with these settings by the model
    ``identity`` names (e.g. its path and config), else drawn (not written: see :func:`save_sample_ids`)."""
    settings = sample_settings(identity, n, seq_len, seed, temperature, top_p)
    if path is not None and Path(path).is_file():
        cached = load_sample_ids(path)
        if cached is not None and cached[1] == settings:
            return cached[0], settings, True
    ids = sample_ids(model, tokenizer, n, seq_len, seed=seed, temperature=temperature, top_p=top_p,
                     batch_size=batch_size, progress=progress)
    return ids, settings, False


def sample_settings(identity: str, n: int, seq_len: int, seed: int, temperature: float = TEMPERATURE,
                    top_p: float = TOP_P) -> dict:
    """What made a set of samples (stored with them, compared before reuse)."""
    return {"model": identity, "n": n, "seq_len": seq_len, "seed": seed, "temperature": temperature, "top_p": top_p,
            "prompts": len(PROMPTS)}


def save_sample_ids(path: Path, ids: list[list[int]], settings: dict) -> None:
    """Write samples (right-padded with -1) and their settings to a safetensors file."""
    from safetensors.torch import save_file

    width = max(len(r) for r in ids)
    table = torch.full((len(ids), width), -1, dtype=torch.long)
    for i, r in enumerate(ids):
        table[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    save_file({"ids": table}, str(path), metadata={"tucker_attention.samples": json.dumps(settings, sort_keys=True)})


def load_sample_ids(path: Path) -> tuple[list[list[int]], dict] | None:
    """(samples, settings) of a file :func:`save_sample_ids` wrote, or None for any other file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            settings = json.loads((f.metadata() or {}).get("tucker_attention.samples", "null"))
            table = f.get_tensor("ids") if settings is not None else None
    except (OSError, ValueError, SafetensorError):
        return None
    if settings is None or table is None or table.dim() != 2:
        return None
    return [[int(i) for i in row if i >= 0] for row in table.tolist()], settings


def kept_samples(folder) -> dict:
    """{'calibration' | 'evaluation': (ids, settings)} of the samples ``convert`` kept in ``folder``
    (empty when it kept none)."""
    out = {}
    for name, file in SAMPLE_FILES.items():
        path = Path(folder) / file
        loaded = load_sample_ids(path) if path.is_file() else None
        if loaded is not None:
            out[name] = loaded
    return out


def model_samples(model: nn.Module, tokenizer, counts: dict, seq_len: int, *, batch_size: int = 8, seed: int = 0,
                  cache=None, keep: dict | None = None, progress: bool = False) -> dict:
    """{'calibration' | 'evaluation': token-id rows}: ``counts[name]`` samples of each set (the evaluation's
    from seeds :data:`EVAL_SEED_OFFSET` on), read from the folder ``cache`` when kept there from the same
    model and settings; ``keep`` receives {name: (rows, settings)} for :func:`save_sample_ids`."""
    out = {"calibration": [], "evaluation": []}
    if not any(counts.values()):
        return out
    if not hasattr(model, "generate"):
        raise ConvertError("model_text", f"{type(model).__name__} cannot generate text; sampling the model's own "
                                         f"text is for decoders (set it to 0)")
    identity = model_identity(model)
    for name, start in (("calibration", seed), ("evaluation", seed + EVAL_SEED_OFFSET)):
        if not counts[name]:
            continue
        path = None if cache is None else Path(cache) / SAMPLE_FILES[name]
        ids, settings, _ = cached_sample_ids(path, model, tokenizer, counts[name], seq_len, identity=identity,
                                             seed=start, batch_size=batch_size, progress=progress)
        out[name] = ids
        if keep is not None:
            keep[name] = (ids, settings)
    return out


def model_identity(model: nn.Module) -> str:
    """Which model made a set of samples: its loading path and a digest of its config."""
    config = model.config
    digest = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:16]
    return f"{getattr(config, '_name_or_path', '')}#{digest}"
