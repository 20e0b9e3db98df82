"""Tasks: what the trainer trains. A task builds its model and data from a :class:`RunConfig`,
draws training batches, computes the loss and evaluates; the trainer does the rest."""

from __future__ import annotations

import torch
from torch import nn

from ..data.corpus import load_corpus
from ..data.images import ImageDataset, augment, load_images
from ..data.prepared import PreparedCorpus, check_run_tokenizer
from ..data.text import TextCorpus
from .config import RunConfig
from .loop import all_reduce_sum
from .task_models import LMModel, TaskModel, VisionModel


class Task(TaskModel):
    """What the tasks share: the model class built from ``self.model_config`` and the loss of a
    ``(inputs, targets)`` batch (the model returns ``(outputs, loss)``); the model side
    (:meth:`check_model`, :meth:`model_config_of`) is :class:`~tucker_attention.training.task_models.TaskModel`'s."""

    def build_model(self) -> nn.Module:
        return self.model_cls(self.model_config)

    def check_resume(self, extra: dict) -> None:
        """Refuse to resume from a checkpoint (its ``extra``) that does not fit this task's data."""

    def loss(self, model: nn.Module, batch, device) -> torch.Tensor:
        x, y = (t.to(device, non_blocking=True) for t in batch)
        return model(x, y)[1]


class LMTask(LMModel, Task):
    """Next-token prediction on a text corpus with a :class:`GPT`.

    Training batches are random windows of ``block_size + 1`` tokens; validation is the mean
    loss over fixed, evenly spaced windows of the held-out text (``train.eval_windows`` of them).
    ``data.path`` may be a folder written by ``tucker-attn prepare-data``: a
    :class:`~tucker_attention.data.prepared.PreparedCorpus` whose windows are read from its
    memory-mapped shards per batch, with the folder's tokenizer (stored in checkpoints).
    """

    name = "lm"
    unit = "tokens"
    metric = "val_loss"
    higher_is_better = False

    def __init__(self, config: RunConfig, data: TextCorpus | PreparedCorpus | None = None):
        d = self.data_config = config.data
        self.corpus = self.data = data or load_corpus(d.path, tokenizer=d.tokenizer, val_fraction=d.val_fraction,
                                                      hf_dataset=d.hf_dataset, hf_text_column=d.hf_text_column)
        model = dict(config.model)
        vocab = self.corpus.tokenizer.vocab_size
        if model.setdefault("vocab_size", vocab) < vocab:
            raise ValueError(f"model.vocab_size={model['vocab_size']} is smaller than the tokenizer's {vocab}")
        self.model_config = self.model_config_of(model, config.train)
        self.block_size = self.model_config.block_size
        self.corpus.check_block_size(self.block_size)
        self.eval_windows = config.train.eval_windows

    def sample_batch(self, generator: torch.Generator, batch_size: int, rank: int, world: int):
        """This process's share of a global batch of random windows: (x, y), each (B/world, T)."""
        starts = self.corpus.random_windows(batch_size, self.block_size, generator)
        return self.corpus.windows(self.corpus.train, starts[rank::world], self.block_size)

    def batch_units(self, batch) -> int:
        return batch[0].numel()

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

    def check_resume(self, extra: dict) -> None:
        """A prepared folder must still hold ids of the checkpoint's tokenizer (not prepared again with another)."""
        if isinstance(self.corpus, PreparedCorpus):
            check_run_tokenizer(extra, self.corpus.path)

    def extra_state(self) -> dict:
        """What a checkpoint needs beyond the weights to use the model (the tokenizer)."""
        return {"tokenizer": self.corpus.tokenizer.state(), "model_config": self.model_config.to_dict()}

    def baselines(self) -> dict:
        return {"unigram_val_loss": self.corpus.unigram_loss()}


class VisionTask(VisionModel, Task):
    """Image classification with a :class:`ViT`.

    Training batches are random images (augmented: random crop with padding, flips where the
    dataset allows them), normalized by the training split's mean/std; validation is the
    accuracy and mean loss over the whole validation split.
    """

    name = "vit"
    unit = "images"
    metric = "val_accuracy"
    higher_is_better = True

    def __init__(self, config: RunConfig, data: ImageDataset | None = None):
        d = self.data_config = config.data
        self.data = data or load_images(d.source, d.path, val_fraction=d.val_fraction)
        self.augment, self.pad = d.augment, d.pad
        channels, height, width = self.data.image_shape
        if height != width:
            raise ValueError(f"images must be square, got {height}x{width} from {self.data.source}")
        model = dict(config.model)
        for key, value in (("image_size", height), ("in_channels", channels), ("n_classes", self.data.n_classes)):
            if model.setdefault(key, value) != value:
                raise ValueError(f"model.{key}={model[key]} does not fit the data ({self.data.source}: "
                                 f"{key} {value})")
        self.model_config = self.model_config_of(model, config.train)

    def sample_batch(self, generator: torch.Generator, batch_size: int, rank: int, world: int):
        """This process's share of a global batch: (images (B/world, C, H, W) float, labels)."""
        idx = torch.randint(len(self.data.train_y), (batch_size,), generator=generator)
        x = self.data.train_x[idx]
        if self.augment:
            x = augment(x, generator, pad=self.pad, flip=self.data.flip)
        return self.data.normalize(x[rank::world]), self.data.train_y[idx][rank::world]

    def batch_units(self, batch) -> int:
        return batch[0].shape[0]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, device, rank: int, world: int, batch_size: int, autocast) -> dict:
        idx = torch.arange(len(self.data.val_y))[rank::world]
        loss_sum, correct = 0.0, 0.0
        for chunk in idx.split(max(batch_size, 256)):
            x, y = self.data.normalize(self.data.val_x[chunk]).to(device), self.data.val_y[chunk].to(device)
            with autocast():
                logits, loss = model(x, y)
            loss_sum += float(loss) * len(chunk)
            correct += float((logits.argmax(-1) == y).sum())
        loss_sum, correct, count = all_reduce_sum([loss_sum, correct, float(len(idx))], device)
        return {"val_accuracy": correct / count, "val_loss": loss_sum / count}

    def extra_state(self) -> dict:
        return {"model_config": self.model_config.to_dict(), "mean": self.data.mean.tolist(),
                "std": self.data.std.tolist(), "source": self.data.source}

    def baselines(self) -> dict:
        counts = torch.bincount(self.data.train_y, minlength=self.data.n_classes)
        majority = int(counts.argmax())
        return {"majority_val_accuracy": float((self.data.val_y == majority).double().mean())}


TASK_TYPES = {"lm": LMTask, "vit": VisionTask}


def make_task(config: RunConfig, reuse=None):
    """The task of ``config``; ``reuse``: an earlier task whose loaded data is reused when its
    task and data config are the same (``compare`` trains many models on one dataset)."""
    cls = TASK_TYPES[config.task]
    if isinstance(reuse, cls) and reuse.data_config == config.data:
        return cls(config, reuse.data)
    return cls(config)
