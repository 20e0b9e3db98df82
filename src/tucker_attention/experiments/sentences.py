"""Sentence embeddings of a (converted) transformers encoder, how close two sets of them are,
and the short distillation that recovers a compressed model.

The embedding is the sentence-transformers recipe of all-MiniLM-L6-v2: the last hidden
states mean-pooled over the attention mask, then L2-normalized. Sentences come from the
Shakespeare corpus (or the user's text) with evaluation sentences drawn from held-out plays,
so a fine-tune on the training sentences never sees them.
"""

from __future__ import annotations

import os
import random

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_int
from ..settings.distill import PARAMS
from ..training.config import OptimConfig
from ..training.loop import Job, Loop, adamw, lr_schedule

SPLITS = ("train", "val")


def _documents(path) -> dict[str, str]:
    from ..data.text import read_documents, shakespeare_plays

    return shakespeare_plays() if path is None else read_documents(path)


def _lines(texts, min_words: int, max_words: int) -> set[str]:
    lines = (line.strip() for text in texts for line in text.splitlines())
    return {line for line in lines if min_words <= len(line.split()) <= max_words}


def corpus_sentences(path: str | os.PathLike | None = None, *, split: str = "val", n: int = 256, min_words: int = 6,
                     max_words: int = 40, seed: int = 0) -> list[str]:
    """``n`` distinct lines of ``min_words``..``max_words`` words from a corpus split.

    path: a text file or folder of ``.txt`` files (None: the built-in Shakespeare plays).
    split: 'val' (the documents :func:`~tucker_attention.data.text.split_documents` holds out,
    ``val_fraction`` 0.1) or 'train' (the others). A line found in both splits belongs to
    neither, so train and val sentences are always disjoint. The sample is deterministic
    (``seed``) and sorted-set based, so it does not depend on hash order.
    """
    from ..data.text import split_documents

    check_choice("split", split, SPLITS)
    check_int("n", n)
    check_int("min_words", min_words)
    check_int("max_words", max_words, low=min_words)
    docs = _documents(path)
    train_text, val_text, held = split_documents(docs, 0.1)
    if held:   # per document, so that a file not ending in a newline does not merge two lines
        train_texts, val_texts = [t for k, t in docs.items() if k not in held], [docs[k] for k in held]
    else:
        train_texts, val_texts = [train_text], [val_text]
    train, val = _lines(train_texts, min_words, max_words), _lines(val_texts, min_words, max_words)
    pool = sorted((val - train) if split == "val" else (train - val))
    if len(pool) < n:
        where = "the built-in Shakespeare corpus" if path is None else repr(str(path))
        raise ValueError(f"asked for n={n} {split} sentences but {where} has only {len(pool)} distinct {split} lines "
                         f"of {min_words}-{max_words} words; lower n or give a larger corpus")
    return random.Random(seed).sample(pool, n)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def embed(model: nn.Module, tokenizer, sentences: list[str], *, batch_size: int = 64, max_length: int = 128,
          grad: bool = False) -> torch.Tensor:
    """Sentence embeddings (N, d): last hidden state (N, T, d) mean-pooled over the attention
    mask, L2-normalized. ``grad=True`` keeps the graph (for :func:`distill`); the model's
    train/eval mode is left as it is (call ``model.eval()`` for deterministic embeddings)."""
    if isinstance(sentences, str) or not sentences:
        raise ValueError("sentences must be a non-empty list of strings")
    check_int("batch_size", batch_size)
    device, out = _device(model), []
    with torch.set_grad_enabled(grad):
        for i in range(0, len(sentences), batch_size):
            enc = tokenizer(list(sentences[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt").to(device)
            hidden = model(**enc).last_hidden_state                              # (B, T, d)
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)          # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)        # (B, d)
            out.append(F.normalize(pooled, p=2, dim=1))
    return torch.cat(out)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, ties sharing their average rank."""
    values, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)                                    # last rank of each value
    return (ends - (counts.to(torch.float64) - 1) / 2)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (Pearson of their average ranks)."""
    x, y = torch.as_tensor(x).flatten(), torch.as_tensor(y).flatten()
    if x.numel() != y.numel() or x.numel() < 2:
        raise ValueError(f"spearman needs two tensors of the same length >= 2, got {x.numel()} and {y.numel()}")
    rx, ry = _average_ranks(x.double()), _average_ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = rx.norm() * ry.norm()
    return float(rx @ ry / denom) if denom > 0 else float("nan")


def similarity(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """How close embeddings ``candidate`` (N, d) are to ``reference`` (N, d), row i = sentence i.

    cosine: mean cosine similarity of matching rows. spearman: rank correlation between the
    upper triangles (N (N - 1) / 2 pairs) of the two pairwise cosine-similarity matrices
    (needs N >= 3).
    """
    if reference.ndim != 2 or reference.shape != candidate.shape:
        raise ValueError(f"reference and candidate must both be (N, d) with the same shape, got "
                         f"{tuple(reference.shape)} and {tuple(candidate.shape)}")
    if reference.shape[0] < 3:
        raise ValueError(f"similarity needs at least 3 sentences (for the pairwise Spearman), got {reference.shape[0]}")
    ref, cand = reference.detach().double().cpu(), candidate.detach().double().cpu()
    cosine = F.cosine_similarity(ref, cand, dim=1).mean()
    iu = torch.triu_indices(len(ref), len(ref), offset=1)
    pairs = [(F.normalize(e, dim=1) @ F.normalize(e, dim=1).T)[iu[0], iu[1]] for e in (ref, cand)]
    return {"cosine": float(cosine), "spearman": spearman(*pairs)}


def _trainable(student: nn.Module, params: str) -> nn.Module:
    """The module whose parameters train: the converted blocks (``"attention"``) or the whole student."""
    from ..hf.distillation.losses import trained_modules

    check_choice("params", params, PARAMS)
    try:
        return trained_modules(student, params)
    except ValueError as err:                          # a hint for calls in the old (student, teacher) order
        raise ValueError(f"{err} (the arguments are distill(teacher, student, ...))") from None


def _targets(teacher, tokenizer, sentences: list[str], max_length: int, name: str) -> torch.Tensor:
    """The teacher's embeddings (N, d) of ``sentences``: computed from a model, or checked."""
    if isinstance(teacher, nn.Module):
        teacher.eval()
        return embed(teacher, tokenizer, sentences, max_length=max_length)
    targets = torch.as_tensor(teacher).detach()
    if targets.ndim != 2 or targets.shape[0] != len(sentences):
        raise ValueError(f"{name} embeddings must be (N, d) with N = len(sentences) = {len(sentences)}, "
                         f"got {tuple(targets.shape)}")
    return targets


def _check_distill(sentences, *, steps: int, batch_size: int, eval_every: int, max_bad_steps: int) -> None:
    """The argument checks of :func:`distill` (before any embedding is computed)."""
    check_int("steps", steps, low=0)
    check_int("batch_size", batch_size)
    check_int("eval_every", eval_every)
    check_int("max_bad_steps", max_bad_steps, low=0)
    if isinstance(sentences, str) or not sentences:
        raise ValueError("sentences must be a non-empty list of strings")


def _val_targets(teacher, val_teacher, tokenizer, val_sentences: list[str] | None, max_length: int):
    """The validation targets (M, d) of :func:`distill`, None without ``val_sentences``."""
    if val_sentences is None:
        return None
    val_teacher = teacher if val_teacher is None else val_teacher
    if not isinstance(val_teacher, nn.Module) and val_teacher is teacher:
        raise ValueError("val_sentences with teacher embeddings needs val_teacher (the model or their embeddings)")
    return _targets(val_teacher, tokenizer, val_sentences, max_length, "val_teacher")


def _next_batch(order: list[int], generator: torch.Generator, n: int, batch_size: int) -> tuple[list[int], list[int]]:
    """(the next ``batch_size`` indices, the rest of ``order``), walking seeded permutations of range(n)."""
    while len(order) < batch_size:
        order += torch.randperm(n, generator=generator).tolist()
    return order[:batch_size], order[batch_size:]


@torch.no_grad()
def _copy_into(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    """Copy each of ``values`` into the parameter of the same shape in ``params``, in place."""
    for p, value in zip(params, values):
        p.copy_(value)


def distill(teacher, student: nn.Module, tokenizer, sentences: list[str], *, steps: int = 100, lr: float = 3e-4,
            batch_size: int = 32, seed: int = 0, params: str = "attention", max_length: int = 128,
            val_sentences: list[str] | None = None, val_teacher=None, eval_every: int = 25,
            max_bad_steps: int = 0, progress: bool = True) -> dict:
    """Recovery fine-tune: minimize 1 - cosine(student embedding, teacher embedding) on ``sentences``
    (the arguments in the order of :func:`tucker_attention.hf.distill`: teacher, then student).

    teacher: the original model, or its embeddings (N, d) of ``sentences`` (row i = sentence i).
    params: 'attention' (only the converted blocks' parameters, the default) or 'all'.
    val_sentences: held-out training sentences (never evaluation ones); their mean cosine to
    the teacher (``val_teacher``: model or embeddings, default ``teacher`` if it is a model)
    is measured before training and every ``eval_every`` steps, and the best state is kept,
    so the fine-tune never ends worse than it started on them.
    A job of the one training loop (:class:`~tucker_attention.training.loop.Loop`) in one process
    and without a run folder: AdamW (betas 0.9, 0.999), no weight decay, constant lr, no clipping;
    dropout off (the model runs in eval mode, to match the teacher's deterministic embeddings);
    batches walk seeded permutations of the sentences.
    A step with a non-finite loss or gradient norm is not applied; after ``max_bad_steps`` of
    them :class:`~tucker_attention.training.guard.NonFiniteError` stops the fine-tune (the
    student keeps its last finite weights).
    Returns {'losses': per step, 'val_cosine': {step: cosine}, 'best_step': step kept}; the
    student is left in eval mode.
    """
    _check_distill(sentences, steps=steps, batch_size=batch_size, eval_every=eval_every, max_bad_steps=max_bad_steps)
    settings = OptimConfig(batch_size=batch_size, lr=lr, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0,
                           beta2=0.999, grad_clip=0.0, lr_rule="uniform", eval_interval=eval_every, seed=seed,
                           precision="fp32", max_bad_steps=max_bad_steps, progress=progress)
    targets = _targets(teacher, tokenizer, sentences, max_length, "teacher")
    val_targets = _val_targets(teacher, val_teacher, tokenizer, val_sentences, max_length)
    trained = _trainable(student, params)
    saved = {p: p.requires_grad for p in student.parameters()}
    try:
        chosen = {id(p) for p in trained.parameters()}
        for p in student.parameters():
            p.requires_grad_(id(p) in chosen)
        student.eval()
        with Loop(settings, distributed=False, device=_device(student)) as loop:
            return loop.run(_SentenceJob(student, trained, tokenizer, (sentences, targets),
                                         (val_sentences, val_targets), steps, max_length, loop))
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        student.eval()


class _SentenceJob(Job):
    """What :func:`distill` gives the loop: the student's trained module, batches of sentence indices,
    the cosine loss against the teacher's embeddings, validation with the best state kept."""

    label, leave_bar = "distill", False

    def __init__(self, student: nn.Module, trained: nn.Module, tokenizer, fit: tuple, validation: tuple, steps: int,
                 max_length: int, loop):
        """fit: (sentences, their targets (N, d)); validation: (sentences, their targets (M, d)) or (None, None)."""
        self.student, self.holder, self.tokenizer, self.loop = student, trained, tokenizer, loop
        (self.sentences, targets), (self.val_sentences, self.val_targets) = fit, validation
        self.targets, self.steps, self.max_length = targets.to(loop.device), steps, max_length
        self.data_seed, self.order, self.best = loop.settings.seed, [], None
        self.result = {"losses": [], "val_cosine": {}, "best_step": steps}

    def trained(self) -> nn.Module:
        return self.holder

    def start(self, state: dict | None) -> None:
        loop, settings = self.loop, self.loop.settings
        group = {"params": list(self.holder.parameters()), "lr": settings.lr, "weight_decay": settings.weight_decay}
        loop.optimizer = adamw([group], settings, loop.device)
        loop.schedule = torch.optim.lr_scheduler.LambdaLR(loop.optimizer, lr_schedule(settings, self.steps))

    def begin(self) -> None:
        self.validate(0)

    def batch(self, generator: torch.Generator) -> list:
        idx, self.order = _next_batch(self.order, generator, len(self.sentences), self.loop.settings.batch_size)
        return [idx]

    def loss(self, net: nn.Module, idx: list[int]) -> torch.Tensor:
        out = embed(self.student, self.tokenizer, [self.sentences[i] for i in idx], batch_size=len(idx),
                    max_length=self.max_length, grad=True)
        return 1 - F.cosine_similarity(out, self.targets[idx], dim=1).mean()

    def after_step(self, loss: float, grad_norm: float, good: bool) -> None:
        step = self.loop.step
        self.result["losses"].append(loss)
        self.loop.bar.set_postfix(loss=f"{loss:.2e}")
        if step % self.loop.settings.eval_interval == 0 or step == self.steps:
            self.validate(step)

    def validate(self, step: int) -> None:
        """The mean cosine of the validation sentences to their targets; the best state so far is kept."""
        if self.val_targets is None:
            return
        got = embed(self.student, self.tokenizer, self.val_sentences, max_length=self.max_length)
        cosine = float(F.cosine_similarity(got, self.val_targets.to(got.device), dim=1).mean())
        self.result["val_cosine"][step] = cosine
        if self.best is None or cosine > self.best[0]:
            self.best = (cosine, step, [p.detach().clone() for p in self.holder.parameters()])

    def summary(self) -> dict:
        if self.best is not None:
            _copy_into(list(self.holder.parameters()), self.best[2])
            self.result["best_step"] = self.best[1]
        return self.result


def sentence_statistics(model: nn.Module, tokenizer, sentences: list[str], *, batch_size: int = 64,
                        max_length: int = 128) -> dict[str, torch.Tensor]:
    """Input statistics of every attention block (:func:`~.calibration.input_statistics`) over
    the tokens of ``sentences``: what ``convert(..., calibration=...)`` needs."""
    from ..hf.conversion.calibration import input_statistics

    if isinstance(sentences, str) or not sentences:
        raise ValueError("sentences must be a non-empty list of strings")
    device = _device(model)
    batches = (tokenizer(list(sentences[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                         return_tensors="pt").to(device) for i in range(0, len(sentences), batch_size))
    return input_statistics(model, batches)
