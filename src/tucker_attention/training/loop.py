"""The one training loop: training (:func:`~tucker_attention.training.trainer.train`), distillation
(:func:`~tucker_attention.hf.distillation.distill.distill`) and the sentence-embedding fine-tune
(:func:`~tucker_attention.experiments.sentences.distill`) each supply a :class:`Job` (its module,
batches, loss, optimizer and records) and :class:`Loop` does the rest: DDP, the run folder and its
lock, verified checkpoints and resume, metrics, the non-finite guard, the progress bar, teardown.

DDP is switched on by ``torchrun`` (its ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` environment): every
process draws the same global batch from the same seeded generator and trains on its slice, so N
processes follow the single-process run with the same global batch;
:class:`~torch.nn.parallel.DistributedDataParallel` averages the gradients of the parameters that
train (a frozen teacher or frozen weights are not its business). Gradient accumulation
(``grad_accum_steps`` k): a process's share of a step comes in k equal micro-batches, each loss
scaled by 1/k, with DDP's all-reduce only in the backward of the last one (``no_sync``): the step's
gradient is that of the mean loss over the step's examples.
"""

from __future__ import annotations

import abc
import functools
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import save_run_checkpoint, write_json_atomic
from .config import OptimConfig, resolve_device
from .guard import NonFiniteError, NonFiniteGuard
from .lock import RunLock
from .run_folder import MetricsLog, prepare, resume_from, set_aside

# -- the schedule and the optimizer ------------------------------------------------------------------

def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_schedule(settings: OptimConfig, total: int):
    """``step -> lr multiplier`` of ``settings`` (warmup, cosine to ``min_lr_ratio``) over ``total`` steps."""
    return functools.partial(lr_factor, warmup=settings.warmup_steps, total=max(total, 1),
                             min_ratio=settings.min_lr_ratio)


def adamw(groups: list[dict], settings: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW of ``groups`` (each with its ``lr`` and ``weight_decay``) at ``settings``' betas; fused on CUDA."""
    return torch.optim.AdamW(groups, betas=(settings.beta1, settings.beta2), fused=device.type == "cuda" or None)


# -- processes -----------------------------------------------------------------------------------------

def start_processes() -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, whether this call started the process group) of ``torchrun``'s environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = world > 1 and not torch.distributed.is_initialized()
    if started:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")), started


def on_rank0(world: int, rank: int, work):
    """``work()`` on rank 0; every process raises if it failed there (rank 0 with its own error)."""
    error, result = None, None
    if rank == 0:
        try:
            result = work()
        except Exception as err:  # passed on to the other ranks below
            error = err
    if world > 1:
        message = [repr(error) if error is not None else None]
        torch.distributed.broadcast_object_list(message, src=0)
        if rank != 0 and message[0] is not None:
            raise RuntimeError(f"rank 0 could not start the run: {message[0]}")
    if error is not None:
        raise error
    return result


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum ``values`` over the processes of a distributed run (identity in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def micro_batches(batch, k: int) -> list:
    """``batch`` (a tuple of tensors whose first dimension is the examples) in ``k`` equal parts."""
    if k == 1:
        return [batch]
    n = len(batch[0])
    if n % k or any(len(t) != n for t in batch):
        raise RuntimeError(f"a batch of {[len(t) for t in batch]} examples does not split into {k} micro-batches")
    return [type(batch)(t[j * (n // k):(j + 1) * (n // k)] for t in batch) for j in range(k)]


# -- the loop ------------------------------------------------------------------------------------------

class Job(abc.ABC):
    """What a job supplies to :class:`Loop` (``self.loop``, set by the job's constructor).

    Attributes: ``steps`` (optimizer steps of the whole run), ``label`` (the progress bar's),
    ``data_seed`` (the batch generator's), ``compile`` (``torch.compile`` the objective),
    ``find_unused`` (DDP: a step's loss may leave some trained parameters without gradient),
    ``leave_bar``. Methods: what trains and what the loss calls, the step's batch and loss, the
    (re)start of the optimizer, what follows a step (records, evaluation, checkpoints), the job's
    share of a checkpoint, and the summary.
    """

    loop: Loop
    steps: int
    label: str = "train"
    data_seed: int = 0
    compile: bool = False
    find_unused: bool = False
    leave_bar: bool = True

    @abc.abstractmethod
    def trained(self) -> nn.Module:
        """The module whose parameters train (clipped together) and whose state checkpoints hold."""

    def objective(self) -> nn.Module:
        """What :meth:`loss` calls as ``net``, wrapped in DDP and compiled by the loop (default: :meth:`trained`)."""
        return self.trained()

    def build(self, model_config: dict | None) -> nn.Module:
        """The module a checkpoint (with its recorded ``model_config``) is loaded into (default: :meth:`trained`)."""
        return self.trained()

    def check_resumed(self, path: Path, state: dict, module: nn.Module) -> None:
        """Refuse a checkpoint (folder ``path``, its ``state``) written with other settings; take its ``module``."""
        return None   # by default: nothing

    @abc.abstractmethod
    def start(self, state: dict | None) -> None:
        """Set ``loop.optimizer`` and ``loop.schedule`` (restored from a checkpoint's ``state`` when resuming)."""

    def begin(self) -> None:
        """What comes before the first step, once the metrics and the bar are open."""
        return None   # by default: nothing

    def before_step(self) -> None:
        """What comes before each step (e.g. the next phase's optimizer)."""
        return None   # by default: nothing

    @abc.abstractmethod
    def batch(self, generator: torch.Generator) -> list:
        """This process's share of the next step's global batch (drawn from ``generator``), as micro-batches."""

    @abc.abstractmethod
    def loss(self, net: nn.Module, micro) -> torch.Tensor:
        """The mean loss of one micro-batch (under autocast), ``net`` the wrapped :meth:`objective`."""

    def after_step(self, loss: float, grad_norm: float, good: bool) -> None:
        """Records, evaluation and checkpoints after a step (``good``: it was applied)."""
        return None   # by default: nothing

    def state(self) -> dict:
        """The job's share of a checkpoint's state (counters, its settings)."""
        return {}

    def extra(self) -> dict:
        """Metadata of a checkpoint's weights file."""
        return {}

    def config_record(self) -> dict | None:
        """The settings ``config.json`` records (None: no file)."""
        return None

    @abc.abstractmethod
    def summary(self) -> dict:
        """The run's result, after the last step (rank 0 writes it where the job keeps it)."""


class Loop:
    """The run of a :class:`Job`, used as a context manager (the processes and the folder are given
    back at its end): ``Loop(settings, run_dir)`` starts the process group (torchrun) and resolves
    the device, :meth:`hold` takes the run folder, :meth:`run` trains the job.

    settings: the job's optimization section; run_dir: the run folder (None: no folder, no
    checkpoints and no metrics file); resume / overwrite: see :func:`~.run_folder.prepare`;
    distributed: False keeps one process whatever the environment; device: a given one instead
    of ``settings.device``. Attributes the job uses: ``rank``, ``world``, ``device``,
    ``autocast``, ``step``, ``seconds`` (training time), ``optimizer``, ``schedule``, ``metrics``,
    ``bar``, ``generator``.
    """

    def __init__(self, settings: OptimConfig, run_dir=None, *, resume: bool = False, overwrite: bool = False,
                 distributed: bool = True, device: torch.device | None = None):
        self.settings, self.resume, self.overwrite = settings, resume, overwrite
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.rank, self.world, self.local_rank, self._started = start_processes() if distributed else (0, 1, 0, False)
        self.lock = None if self.run_dir is None else RunLock(self.run_dir)
        self.step, self.seconds, self.bar, self.ddp, self.optimizer, self.schedule = 0, 0.0, None, None, None, None
        try:
            if settings.batch_size % self.world:
                raise ValueError(f"{settings.name('batch_size')}={settings.batch_size} must be divisible by the number "
                                 f"of processes ({self.world})")
            self.device = device if device is not None else resolve_device(settings.device, self.local_rank,
                                                                           settings.name("device"))
        except BaseException:
            self.close()
            raise
        self.use_bf16 = settings.precision == "bf16" or (settings.precision == "auto" and self.device.type == "cuda")
        self.generator = torch.Generator()
        self.guard = NonFiniteGuard(settings.max_bad_steps, setting=settings.name("max_bad_steps"))
        self.metrics = MetricsLog(None, False, None)

    def __enter__(self) -> Loop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the bar, release the run folder, end the process group this loop started (again: nothing)."""
        if self.bar is not None:
            self.bar.close()
        if self.lock is not None:
            self.lock.release()
        if self._started:
            self._started = False
            torch.distributed.destroy_process_group()

    def autocast(self):
        """bf16 autocast (``precision``), or no context."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.use_bf16 else nullcontext()

    def say(self, message: str) -> None:
        print(f"{self.settings.SECTION or 'train'}: {message}", file=sys.stderr, flush=True)

    def hold(self) -> None:
        """Rank 0 takes the run folder's lock (taking over a stale one, which is said) and prepares the
        folder (:func:`~.run_folder.prepare`); every process learns whether it could."""
        if self.lock is None:
            return

        def start() -> list[str]:
            self.lock.acquire()
            try:
                took_over = [self.lock.took_over] if self.lock.took_over else []
                return took_over + prepare(self.run_dir, resume=self.resume, overwrite=self.overwrite)
            except BaseException:
                self.lock.release()
                raise

        for note in on_rank0(self.world, self.rank, start) or []:
            self.say(note)

    def run(self, job: Job) -> dict:
        """Train ``job`` up to its ``steps`` (from the newest intact checkpoint when resuming); its summary."""
        self.job = job
        self.generator.manual_seed(job.data_seed)
        state = self._resume() if self.resume else None
        job.start(state)
        self.optimizer.zero_grad(set_to_none=True)
        if state is not None:
            self._barrier()                                  # every rank has read its checkpoint
            for note in set_aside(self.run_dir, self.step) if self.rank == 0 else []:
                self.say(note)
        if self.run_dir is not None:
            if self.rank == 0 and job.config_record() is not None:   # the settings it runs with now
                write_json_atomic(self.run_dir / "config.json", job.config_record())
            self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.rank == 0,
                                      None if state is None else self.step)
        self.wrap()
        self.bar = tqdm(total=job.steps, initial=self.step, disable=not self.settings.progress or self.rank != 0,
                        desc=job.label, dynamic_ncols=True, leave=job.leave_bar)
        job.begin()
        while self.step < job.steps:
            job.before_step()
            t0 = time.perf_counter()
            loss, norm, good = self._step(job.batch(self.generator))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds += time.perf_counter() - t0
            if not good:
                self._skipped(loss, norm)
            job.after_step(loss, norm, good)
            self.bar.update(1)
        self.bar.close()
        return job.summary()

    def wrap(self) -> None:
        """(Re)build ``net``, what the loss calls: the job's objective, compiled (``job.compile``) and in
        DDP with several processes; again after the trained layers change. The compiled module is the
        inner one (PyTorch's advice for DDP); the job's modules stay plain, so checkpoints and
        evaluation use their parameter names (no ``_orig_mod.``)."""
        net = self.job.objective()
        if self.job.compile:
            # a fresh compile each time (new layers have new shapes): old graphs are dropped rather than
            # piling up towards dynamo's recompile limit, beyond which it would fall back to eager
            torch.compiler.reset()
            net = torch.compile(net)
        self.ddp = None
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(net, find_unused_parameters=self.job.find_unused)
        self.net = net if self.ddp is None else self.ddp

    def _step(self, micros: list) -> tuple[float, float, bool]:
        """One optimizer step on this process's ``micros``; (mean loss over processes, gradient norm, applied).
        A step whose loss or gradient norm is not finite is not applied (:class:`~.guard.NonFiniteGuard`)."""
        k, total = len(micros), None
        for j, micro in enumerate(micros):
            # DDP all-reduces the accumulated gradients once, in the backward of the last micro-batch
            with nullcontext() if self.ddp is None or j == k - 1 else self.ddp.no_sync():
                with self.autocast():
                    loss = self.job.loss(self.net, micro)
                (loss / k if k > 1 else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        clip = self.settings.grad_clip
        norm = nn.utils.clip_grad_norm_(self.job.trained().parameters(), clip if clip > 0 else math.inf)
        loss_value, norm_value = NonFiniteGuard.values(total / k if k > 1 else total, norm)
        (loss_value,) = all_reduce_sum([loss_value], self.device)   # a NaN on any rank stays NaN
        loss_value /= self.world
        try:
            good = self.guard.check(self.step + 1, loss=loss_value, grad_norm=norm_value)
        except NonFiniteError as err:
            self.step += 1
            self.stop(err)
        if good:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            if not good:   # a skipped step advances the schedule on purpose: the lr of step n is that of step n
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.schedule.step()
        self.step += 1
        return loss_value, norm_value, good

    def _skipped(self, loss: float, norm: float) -> None:
        self.metrics.log({"step": self.step, "skipped": f"loss {loss}, grad_norm {norm}"})
        if self.rank == 0:
            self.bar.write(f"step {self.step}: skipped (loss {loss}, grad norm {norm}); {self.guard.bad_steps} of "
                           f"{self.guard.setting}={self.guard.max_bad_steps} used")

    def stop(self, err: Exception):
        """Record why the run stops, and raise ``err``."""
        self.metrics.log({"step": self.step, "stopped": str(err)})
        if self.bar is not None:
            self.bar.close()
        raise err

    def checkpoint(self) -> None:
        """A verified checkpoint of the job's trained module and the run's state (rank 0 writes it; all wait)."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                 "rng": {"torch": torch.get_rng_state(), "data": self.generator.get_state(), "cuda": cuda},
                 "train_time": self.seconds, "bad": self.guard.bad_steps, **self.job.state()}
        if self.rank == 0:
            try:
                save_run_checkpoint(self.run_dir, self.step, self.job.trained(), state, extra=self.job.extra(),
                                    keep=self.settings.keep_checkpoints)
            except NonFiniteError as err:
                self.stop(err)
        self._barrier()

    def _resume(self) -> dict:
        """The newest intact checkpoint's state, checked by the job; the loop's counters and random states from it."""
        path, state, module, notes = resume_from(self.run_dir, self.job.build)
        for note in notes if self.rank == 0 else []:
            self.say(note)
        self.job.check_resumed(path, state, module)
        self.step, self.guard.bad_steps = state["step"], state.get("bad", 0)
        self.seconds = state.get("train_time", state.get("seconds", 0.0))   # "seconds": older distillation runs
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["data"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        return state

    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()
