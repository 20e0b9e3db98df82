"""How a converted model is measured against its original: the calibration and held-out
evaluation inputs (:func:`make_inputs`: text pieces, random token ids or random images), the
fidelity of a converted copy (:func:`fidelity`: KL, top-1, perplexity, cosine), a greedy reply
(:func:`greedy_reply`) and the attention accounting (:func:`attention_summary`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ...accounting import attention_param_count, kv_cache_floats_per_token
from ...settings.convert import SEQ_LEN
from ..sources.original import ConvertError
from .model_text import model_samples

BUILTIN_TEXT = "the built-in Shakespeare plays"
#: Default pieces of at most SEQ_LEN tokens (a chat turn: the choices a conversion measures are measured on
#: pieces as long as the ones it will see), as many as fill CALIBRATION_TOKENS (~8k, what the MiniLM calibration
#: of `compress` uses) and EVAL_TOKENS, BATCH_TOKENS a batch; image models: IMAGES (calibration, evaluation, batch).
CALIBRATION_TOKENS, EVAL_TOKENS, BATCH_TOKENS = 8192, 4096, 1024
IMAGES = (64, 16, 8)
#: elements of one (positions, vocabulary) block of logits scored at once (float64: 64 MB a tensor)
CHUNK_ELEMENTS = 1 << 23


# -- calibration and evaluation inputs -------------------------------------------------------------

def _max_positions(model: nn.Module) -> int | None:
    config = model.config
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def text_split(calibration) -> tuple[str, str, str]:
    """(calibration text, held-out evaluation text, description)."""
    from ...data.text import read_documents, shakespeare_plays, split_documents

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


def _encoded(tokenizer, pieces: list[str], seq_len: int) -> list[list[int]]:
    """Tokenizer output (with special tokens, truncated to ``seq_len``)."""
    return tokenizer(pieces, truncation=True, max_length=seq_len)["input_ids"] if pieces else []


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def token_batches(tokenizer, pieces: list[str], seq_len: int, batch_size: int) -> list[dict]:
    """:func:`_encoded` pieces in batches (:func:`id_batches`)."""
    return id_batches(_encoded(tokenizer, pieces, seq_len), pad_id(tokenizer), batch_size)


def id_batches(rows: list[list[int]], pad: int, batch_size: int) -> list[dict]:
    """Token-id rows right-padded by hand with an attention mask (so tokenizers without a pad token
    work), ``batch_size`` rows a batch; empty rows are dropped."""
    batches = []
    for i in range(0, len(rows), batch_size):
        chunk = [list(r) for r in rows[i:i + batch_size] if len(r)]
        if not chunk:
            continue
        width = max(len(r) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, r in enumerate(chunk):
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


def default_sizes(seq_len: int, images: bool = False) -> tuple[int, int, int]:
    """(n_calibration, n_eval, batch_size) by default: :data:`IMAGES`, or pieces of ``seq_len`` tokens
    filling :data:`CALIBRATION_TOKENS`, :data:`EVAL_TOKENS` and :data:`BATCH_TOKENS`."""
    if images:
        return IMAGES
    return tuple(max(1, tokens // seq_len) for tokens in (CALIBRATION_TOKENS, EVAL_TOKENS, BATCH_TOKENS))


def make_inputs(model: nn.Module, tokenizer, calibration=None, *, n_calibration: int | None = None,
                n_eval: int | None = None, seq_len: int = SEQ_LEN, batch_size: int | None = None, seed: int = 0,
                model_text: float = 0.0, cache=None, samples: dict | None = None, progress: bool = False):
    """(calibration batches, evaluation batches, description): text pieces of the calibration
    text (default: the built-in Shakespeare plays; evaluation on its held-out part) for models
    with a tokenizer, random token ids for text models without one, random N(0, 1) images for
    image models (which take no calibration text). n_calibration / n_eval / batch_size: None for
    :func:`default_sizes` (of ``seq_len`` capped at the model's positions).

    model_text: the share of the calibration and of the evaluation pieces that the model samples
    itself (:mod:`.model_text`; a decoder with a tokenizer), the evaluation ones from other seeds
    than the calibration's. cache: a folder where such samples were kept (reused when they were made
    the same way); ``samples``, a dict, receives {'calibration' | 'evaluation': (ids, settings)} to
    keep (:func:`~.model_text.save_sample_ids`)."""
    main_input = getattr(model, "main_input_name", "input_ids")
    limit = _max_positions(model)
    seq_len = min(seq_len, limit) if limit else seq_len
    defaults = default_sizes(seq_len, images=main_input == "pixel_values")
    n_calibration, n_eval, batch_size = (given if given is not None else default
                                         for given, default in zip((n_calibration, n_eval, batch_size), defaults))
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
    if tokenizer is None:
        if calibration is not None:
            raise ConvertError("calibration", "the source folder has no tokenizer, so calibration text cannot be "
                                              "tokenized; add the tokenizer files to the folder or leave it out")
        vocab = model.get_input_embeddings().num_embeddings
        cal = _random_id_batches(vocab, n_calibration, seq_len, batch_size, seed)
        ev = _random_id_batches(vocab, n_eval, seq_len, batch_size, seed + 1)
        return cal, ev, (f"calibration: {n_calibration} random token-id sequences of {seq_len} tokens (no tokenizer "
                         f"in SRC); evaluation: {n_eval} other random sequences")
    sampled = {"calibration": round(n_calibration * model_text), "evaluation": round(n_eval * model_text)}
    train, held_out, what = text_split(calibration)
    words = max(1, int(seq_len * 0.75))
    cal_pieces = _pieces(train, n_calibration - sampled["calibration"], words)
    if calibration is not None and len(cal_pieces) < n_calibration - sampled["calibration"]:
        raise ConvertError("calibration", f"{what} is too short: it fills {len(cal_pieces)} of the "
                                          f"{n_calibration - sampled['calibration']} pieces of about {words} words "
                                          f"asked for (give more text, or fewer pieces with --n-calibration, or "
                                          f"shorter ones with --seq-len)")
    eval_pieces = _pieces(held_out, n_eval - sampled["evaluation"], words)
    where = "held-out part"
    if not eval_pieces and not sampled["evaluation"]:
        eval_pieces, where = cal_pieces[:n_eval], "calibration text (too short to hold out a part)"
    own = model_samples(model, tokenizer, sampled, seq_len, batch_size=batch_size, seed=seed, cache=cache,
                        keep=samples, progress=progress)
    cal = id_batches(_interleaved(_encoded(tokenizer, cal_pieces, seq_len), own["calibration"]), pad_id(tokenizer),
                      batch_size)
    ev = id_batches(_interleaved(_encoded(tokenizer, eval_pieces, seq_len), own["evaluation"]), pad_id(tokenizer),
                     batch_size)
    if not cal or not ev:
        raise ConvertError("calibration", f"{what} gives no tokens")
    text = "" if not cal_pieces else f"{len(cal_pieces)} pieces of {what}"
    model_part = "" if not sampled["calibration"] else f"{sampled['calibration']} sequences the model sampled itself"
    held = "" if not eval_pieces else f"{len(eval_pieces)} pieces of its {where}"
    model_held = "" if not sampled["evaluation"] else f"{sampled['evaluation']} sequences it sampled from other seeds"
    return cal, ev, (f"calibration: {' and '.join(p for p in (text, model_part) if p)} ({_tokens(cal):,} tokens); "
                     f"evaluation: {' and '.join(p for p in (held, model_held) if p)} ({_tokens(ev):,} tokens)")


def _interleaved(text: list, own: list) -> list:
    """The rows of both kinds alternating (then the rest of the longer), so that every batch, and the
    held-in batches the conversion's choices are measured on (:mod:`.choose`), hold both."""
    out = [row for pair in zip(text, own) for row in pair]
    n = min(len(text), len(own))
    return out + text[n:] + own[n:]


def run_model(model: nn.Module, batch, kind: str):
    """``model``'s output on ``batch`` as fidelity compares it: a decoder's / classifier's logits, an
    encoder's last hidden states (a tensor batch is pixel values)."""
    from ..sources.compute import head_in_chunks

    with head_in_chunks(model):                  # a bf16 head: float32 rows a few thousand at a time
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
def reference_outputs(source: nn.Module, batches, kind: str, *, spill=None):
    """The source's outputs on ``batches`` (what :func:`fidelity` compares against), to measure several
    converted models without running the source again: a list, or with a :class:`~.spill.Spill` a
    :class:`~.spill.SpilledList` on disk (one batch's logits in memory at a time)."""
    if spill is None:
        return [run_model(source, batch, kind).detach() for batch in batches]
    from .spill import SpilledList

    outputs = SpilledList(spill, "reference")
    for batch in batches:
        outputs.append(run_model(source, batch, kind))
    return outputs


@torch.no_grad()
def fidelity(source: nn.Module | Sequence, converted: nn.Module, batches, kind: str, *, progress: bool = False,
             dtype: torch.dtype = torch.float64) -> dict:
    """Source vs converted on ``batches``: decoder {'kl', 'top1'} (next-token, over non-padding
    positions) and each model's perplexity of the text itself ('ppl' converted, 'source_ppl'),
    classifier {'kl', 'top1'} (class distribution), encoder {'cosine'} (mean-pooled last hidden
    states). ``source``: the model, or its :func:`reference_outputs` on ``batches``. Logits are
    scored :data:`CHUNK_ELEMENTS` at a time (float64 within a chunk, sums in float64): the memory
    does not grow with the vocabulary beyond the models' own float32 logits. ``dtype``: of that scoring
    (float32 is ~3x faster, its KL accurate to ~1e-6: enough to rank small differences, as
    :mod:`.allocation` does)."""
    from tqdm.auto import tqdm

    sums = dict.fromkeys(("kl", "top1", "cosine", "nll", "source_nll", "count", "tokens"), 0.0)
    given = not isinstance(source, nn.Module)
    for i, batch in enumerate(tqdm(batches, desc="evaluate", disable=not progress, leave=False)):
        a = source[i] if given else run_model(source, batch, kind)
        b = run_model(converted, batch, kind)
        if kind == "encoder":
            mask = None if isinstance(batch, torch.Tensor) else batch["attention_mask"]
            a, b = a.double(), b.double()
            weights = (torch.ones(a.shape[:2], dtype=a.dtype) if mask is None else mask.to(a.dtype)).unsqueeze(-1)
            pa, pb = (a * weights).sum(1) / weights.sum(1), (b * weights).sum(1) / weights.sum(1)
            sums["cosine"] += float(torch.nn.functional.cosine_similarity(pa, pb, dim=-1).sum())
            sums["count"] += pa.shape[0]
            continue
        for key, value in _logit_sums(a, b, batch if kind == "decoder" else None, dtype).items():
            sums[key] += value
    if kind == "encoder":
        return {"cosine": sums["cosine"] / sums["count"]}
    scores = {"kl": sums["kl"] / sums["count"], "top1": sums["top1"] / sums["count"]}
    if kind == "decoder" and sums["tokens"]:
        scores.update(ppl=math.exp(sums["nll"] / sums["tokens"]),
                      source_ppl=math.exp(sums["source_nll"] / sums["tokens"]))
    return scores


def _logit_sums(a: torch.Tensor, b: torch.Tensor, batch: dict | None, dtype: torch.dtype = torch.float64) -> dict:
    """Summed KL(a || b), top-1 agreements and their count over the rows of logits a, b (..., vocab);
    with a decoder's ``batch``: only non-padding positions, and each model's summed negative
    log-likelihood of the next token ('source_nll', 'nll') over the 'tokens' that have one."""
    vocab = a.shape[-1]
    a, b = a.reshape(-1, vocab), b.reshape(-1, vocab)
    scored = torch.ones(a.shape[0], dtype=torch.bool)
    counted = targets = None
    if batch is not None:
        mask = batch["attention_mask"].bool()
        scored = mask.reshape(-1)
        counted, targets = torch.zeros_like(mask), torch.zeros_like(batch["input_ids"])
        counted[:, :-1], targets[:, :-1] = mask[:, 1:], batch["input_ids"][:, 1:]
        counted, targets = counted.reshape(-1), targets.reshape(-1)
    sums = dict.fromkeys(("kl", "top1", "count", "nll", "source_nll", "tokens"), 0.0)
    rows = (scored if counted is None else scored | counted).nonzero().squeeze(-1)
    step = max(1, CHUNK_ELEMENTS // vocab)
    for part in rows.split(step):
        la, lb = a[part].to(dtype).log_softmax(-1), b[part].to(dtype).log_softmax(-1)
        keep = scored[part]
        kl = (la.exp() * (la - lb)).sum(-1).clamp(min=0)
        sums["kl"] += float(kl[keep].sum())
        sums["top1"] += float((la.argmax(-1) == lb.argmax(-1))[keep].sum())
        sums["count"] += int(keep.sum())
        if counted is not None:
            has, picked = counted[part], targets[part].unsqueeze(-1)
            sums["source_nll"] -= float(la.gather(-1, picked).squeeze(-1)[has].sum())
            sums["nll"] -= float(lb.gather(-1, picked).squeeze(-1)[has].sum())
            sums["tokens"] += int(has.sum())
    return sums


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
    from ..families.reading import attention_layers
    from .convert import converted_blocks

    blocks = converted_blocks(model)
    layers = [b.layer for b in blocks.values()] if blocks else list(attention_layers(model).values())
    floats = sum(kv_cache_floats_per_token(layer) for layer in layers)
    return {"attention_params": sum(attention_param_count(layer) for layer in layers), "kv_floats_per_token": floats,
            "kv_bytes_per_token": floats * torch.empty((), dtype=dtype).element_size(), "n_layers": len(layers)}
