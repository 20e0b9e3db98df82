"""Tasks: what the trainer trains. A task builds its model and data from a :class:`RunConfig`,
draws training batches, computes the loss and evaluates; the trainer does the rest."""

from __future__ import annotations

import torch
from torch import nn

from ..data.text import TextCorpus, load_corpus
from ..models import GPT, GPTConfig
from .config import RunConfig


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum ``values`` over the processes of a distributed run (identity in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


class LMTask:
    """Next-token prediction on a text corpus with a :class:`GPT`.

    Training batches are random windows of ``block_size + 1`` tokens; validation is the mean
    loss over fixed, evenly spaced windows of the held-out text (``train.eval_windows`` of them).
    """

    name = "lm"
    unit = "tokens"
    metric = "val_loss"  # lower is better

    def __init__(self, config: RunConfig, corpus: TextCorpus | None = None):
        d = config.data
        self.corpus = corpus or load_corpus(d.path, tokenizer=d.tokenizer, val_fraction=d.val_fraction,
                                            hf_dataset=d.hf_dataset, hf_text_column=d.hf_text_column)
        model = dict(config.model)
        vocab = self.corpus.tokenizer.vocab_size
        if model.setdefault("vocab_size", vocab) < vocab:
            raise ValueError(f"model.vocab_size={model['vocab_size']} is smaller than the tokenizer's {vocab}")
        self.model_config = GPTConfig(**model)
        self.block_size = self.model_config.block_size
        self.corpus.check_block_size(self.block_size)
        self.eval_windows = config.train.eval_windows

    @staticmethod
    def model_keys() -> list[str]:
        return list(GPTConfig.__dataclass_fields__)

    def build_model(self) -> GPT:
        return GPT(self.model_config)

    def sample_batch(self, generator: torch.Generator, batch_size: int, rank: int, world: int):
        """This process's share of a global batch of random windows: (x, y), each (B/world, T)."""
        starts = self.corpus.random_windows(batch_size, self.block_size, generator)
        return self.corpus.windows(self.corpus.train, starts[rank::world], self.block_size)

    def batch_units(self, batch) -> int:
        return batch[0].numel()

    def loss(self, model: nn.Module, batch, device) -> torch.Tensor:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        return model(x, y)[1]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device, rank: int, world: int, batch_size: int, autocast) -> dict:
        starts = self.corpus.val_starts(self.block_size, self.eval_windows)[rank::world]
        total, count = 0.0, 0
        for chunk in starts.split(batch_size):
            x, y = self.corpus.windows(self.corpus.val, chunk, self.block_size)
            with autocast():
                _, loss = model(x.to(device), y.to(device))
            total += float(loss) * y.numel()
            count += y.numel()
        total, count = all_reduce_sum([total, float(count)], device)
        return {"val_loss": total / count}

    def extra_state(self) -> dict:
        """What a checkpoint needs beyond the weights to use the model (the tokenizer)."""
        return {"tokenizer": self.corpus.tokenizer.state(), "model_config": self.model_config.to_dict()}

    def baselines(self) -> dict:
        return {"unigram_val_loss": self.corpus.unigram_loss()}


TASK_TYPES = {"lm": LMTask}


def make_task(config: RunConfig, **kwargs):
    return TASK_TYPES[config.task](config, **kwargs)
