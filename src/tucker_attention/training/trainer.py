"""The training loop shared by every task: AdamW + warmup/cosine, clipping, autocast, DDP, periodic validation,
metrics, atomic checkpoints and bit-for-bit resume.

Distributed data parallel is switched on by ``torchrun`` (its ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` environment):
every process draws the same global batch from the same seeded generator and trains on its slice, so N processes
follow the single-process run with the same global batch.

Gradient accumulation (``train.grad_accum_steps`` k): a step draws one global batch of k × ``batch_size`` examples
and trains on it in k micro-batches of ``batch_size`` (rows j·B:(j+1)·B of the global batch make micro-batch j; each
process takes its slice of every micro-batch), each loss scaled by 1/k, with DDP's all-reduce only after the last
one (``no_sync``). All micro-batches have the same number of examples and the losses are means (the LM's training
windows hold no ignored ``-1`` targets), so the step's gradient is the gradient of the mean loss over the k·B
examples: the step equals one without accumulation and ``batch_size`` k·B. Tokens per step: batch_size ×
grad_accum_steps × block_size, for any number of processes (``batch_size`` is global).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..io import read_metadata
from ..layers import Attention
from . import ranks
from .checkpoint import save_run_checkpoint, write_json_atomic
from .config import DEFAULT_ATTENTION_LR, RunConfig, resolve_device
from .guard import NonFiniteError, NonFiniteGuard
from .lock import RunLock
from .run_folder import MetricsLog, check_resumable, fixed_part, prepare, resume_from, say, set_aside
from .tasks import all_reduce_sum, make_task


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def attention_lr_scales(model: nn.Module, *, attention_lr_scale: float = 1.0,
                        attention_lr: str = DEFAULT_ATTENTION_LR) -> dict[str, float]:
    """{parameter name: lr multiplier} of every attention parameter: ``attention_lr_scale``, times
    each layer's :meth:`~tucker_attention.layers.Attention.lr_scales` when ``attention_lr == "relative"``."""
    scales = {}
    for module_name, m in model.named_modules():
        if isinstance(m, Attention):
            rule = m.lr_scales() if attention_lr == "relative" else {}
            for name, _ in m.named_parameters():
                scales[f"{module_name}.{name}" if module_name else name] = attention_lr_scale * rule.get(name, 1.0)
    return scales


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, attention_lr_scale: float = 1.0,
                 attention_lr: str = DEFAULT_ATTENTION_LR, scales: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups: weight decay on matrices only; attention parameters at their
    :func:`attention_lr_scales` (``scales``: those of another model with the same parameter
    names, e.g. the starting model of a rank-adaptive run, whose scales every rank keeps)."""
    if scales is None:
        scales = attention_lr_scales(model, attention_lr_scale=attention_lr_scale, attention_lr=attention_lr)
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():  # unique parameters (tied weights once)
        if p.requires_grad:
            groups.setdefault((p.dim() >= 2, scales.get(name, 1.0)), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale}
            for (decay, scale), ps in sorted(groups.items())]


def _distributed() -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, whether this call started the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = world > 1 and not torch.distributed.is_initialized()
    if started:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")), started


def _on_rank0(world: int, rank: int, work):
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


def train(config: RunConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          task=None, init_state: dict | None = None) -> dict:
    """Train ``config`` in ``run_dir``; returns the summary (also written to ``summary.json``).

    resume: continue from the newest intact checkpoint in ``run_dir`` (same config and data tokenizer; ``train.steps``
        may grow); damaged newer checkpoints are passed over and named.
    overwrite: start afresh in a ``run_dir`` that holds an earlier run (its checkpoints and metrics are deleted);
        without it such a folder is refused.
    task: a prebuilt task (tests and ``compare`` pass one to share a loaded corpus).
    init_state: weights to start from (a state dict of the config's model), e.g. a converted model to fine-tune; a
        resumed run reads its checkpoint instead.

    Everything is checked (config, device, data, model, ``init_state``) before the folder is touched; then
    ``RUN_DIR/.lock`` keeps out a second writer for the whole run. A step with a non-finite loss or gradient norm is
    skipped, and after ``train.max_bad_steps`` of them the run stops with
    :class:`~tucker_attention.training.guard.NonFiniteError`; checkpoints hold finite values only.
    """
    rank, world, local_rank, started_group = _distributed()
    tc = config.train
    if tc.batch_size % world:
        raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the number of processes ({world})")
    device = resolve_device(tc.device, local_rank)
    run_dir = Path(run_dir)
    if resume:
        check_resumable(run_dir, config)
    task = task or make_task(config)
    torch.manual_seed(tc.seed)
    model = None if resume else task.build_model()   # a resumed run builds its checkpoint's model
    if init_state is not None and not resume:
        model.load_state_dict(init_state)
    lock = RunLock(run_dir)

    def start() -> list[str]:
        lock.acquire()
        try:
            return ([lock.took_over] if lock.took_over else []) + prepare(run_dir, resume=resume, overwrite=overwrite)
        except BaseException:
            lock.release()
            raise

    for note in _on_rank0(world, rank, start) or []:
        say(note)
    try:
        return _Run(config, run_dir, task, model, device, resume, rank, world).run()
    finally:
        lock.release()
        if started_group:
            torch.distributed.destroy_process_group()


class _Run:
    """The loop of :func:`train` in a run folder this process holds, from ``model`` or (``resume``) the newest
    checkpoint: model, optimizer, lr schedule, data generator and counters, which checkpoints save and restore."""

    def __init__(self, config: RunConfig, run_dir: Path, task, model: nn.Module | None, device: torch.device,
                 resume: bool, rank: int, world: int):
        tc = self.tc = config.train
        self.config, self.run_dir, self.task, self.device = config, run_dir, task, device
        self.rank, self.world, self.final = rank, world, None
        self.use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if self.use_bf16 else nullcontext
        with torch.device("meta"):  # the starting model: lr scales by parameter name and the rank cuts come from it
            start = task.build_model()
        self.scales = attention_lr_scales(start, attention_lr_scale=tc.attention_lr_scale, attention_lr=tc.attention_lr)
        self.plan = ranks.schedule(tc, start)
        self.lr_at = lambda s: lr_factor(s, warmup=tc.warmup_steps, total=tc.steps, min_ratio=tc.min_lr_ratio)
        self.generator = torch.Generator().manual_seed(tc.seed + 1)
        self.better = max if task.higher_is_better else min
        self.step, self.best = 0, -math.inf if task.higher_is_better else math.inf
        self.train_time, self.units_done, self.loss_sum, self.loss_count = 0.0, 0, 0.0, 0
        state = self._load_checkpoint() if resume else None  # a resumed run builds its checkpoint's model
        self.model = (self.model if resume else model).to(device)
        self.optimizer = self.make_optimizer()
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_at)
        if resume:
            self._restore(state)
        elif rank == 0:
            write_json_atomic(run_dir / "config.json", config.to_dict())
        self.net, self.ddp = _training_net(self.model, world, tc.compile)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl", rank == 0, self.step if resume else None)
        self.guard = NonFiniteGuard(tc.max_bad_steps, bad_steps=state.get("bad", 0) if resume else 0)
        self.extra = {"task": config.task, "config": config.to_dict(), **task.extra_state(),
                      "model_config": self.model.config.to_dict()}
        if self.plan is not None and not resume:
            self.metrics.log({"step": 0, **ranks.rank_record(self.model)})
        if rank == 0:
            print(self.model.summary())

    def make_optimizer(self) -> torch.optim.Optimizer:
        tc = self.tc
        return torch.optim.AdamW(param_groups(self.model, lr=tc.lr, weight_decay=tc.weight_decay, scales=self.scales),
                                 betas=(tc.beta1, tc.beta2), fused=self.device.type == "cuda" or None)

    def _build(self, model_config: dict | None) -> nn.Module:
        task = self.task
        return task.model_cls(task.config_cls(**model_config)) if model_config else task.build_model()

    def _load_checkpoint(self) -> dict:
        """The newest intact checkpoint's state, checked against the config and the data; sets ``self.model``."""
        ckpt, state, self.model, notes = resume_from(self.run_dir, self._build)
        for note in notes if self.rank == 0 else []:
            say(note)
        if fixed_part(state["config"]) != fixed_part(self.config.to_dict()):
            raise ValueError(f"checkpoint {str(ckpt)!r} was written by a different config; resume it with "
                             f"its own config (only train.steps and train.progress may change)")
        self.task.check_resume(read_metadata(ckpt / "model.safetensors")["extra"])  # e.g. the data's tokenizer
        return state

    def _restore(self, state: dict) -> None:
        """Optimizer, schedule, random states and counters from a checkpoint's ``state``."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["data"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step, self.best = state["step"], state["best_metric"]
        self.train_time, self.units_done = state["train_time"], state["units"]
        self.loss_sum, self.loss_count = state.get("loss_sum", 0.0), state.get("loss_count", 0)
        if self.world > 1:
            torch.distributed.barrier()  # every rank has read its checkpoint
        for note in set_aside(self.run_dir, self.step) if self.rank == 0 else []:
            say(note)

    def run(self) -> dict:
        """Steps up to ``train.steps``, each with its logging, evaluation and checkpoint; returns the summary."""
        tc, task = self.tc, self.task
        self.model.train()
        self.bar = tqdm(total=tc.steps, initial=self.step, disable=not tc.progress or self.rank != 0,
                        desc=self.run_dir.name, dynamic_ncols=True)
        while self.step < tc.steps:
            t0 = time.perf_counter()
            batch = task.sample_batch(self.generator, tc.batch_size * tc.grad_accum_steps, self.rank, self.world)
            norm_value = self.train_step(batch)  # on this process's share of the global batch
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.train_time += time.perf_counter() - t0
            self.units_done += task.batch_units(batch) * self.world
            self.report(norm_value)
            self.bar.update(1)
        self.bar.close()
        return self.summary()

    def train_step(self, batch) -> float:
        """One optimizer step on ``batch`` in micro-batches (skipped if non-finite), then a rank cut if one is
        due; returns the gradient norm."""
        tc, guard, accum, ddp = self.tc, self.guard, self.tc.grad_accum_steps, self.ddp
        step_loss = None  # the sum of the micro-batches' losses
        for j, micro in enumerate(_micro_batches(batch, accum)):
            # DDP all-reduces the accumulated gradients once, in the backward of the last micro-batch
            with nullcontext() if ddp is None or j == accum - 1 else ddp.no_sync():
                with self.autocast():
                    loss = self.task.loss(self.net, micro, self.device)
                (loss / accum if accum > 1 else loss).backward()
            step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
        loss = step_loss / accum if accum > 1 else step_loss  # the mean over the step's micro-batches
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        loss_value, norm_value = NonFiniteGuard.values(loss, grad_norm)
        (loss_value,) = all_reduce_sum([loss_value], self.device)  # a NaN on any rank stays NaN
        try:
            good = guard.check(self.step + 1, loss=loss_value, grad_norm=norm_value)
        except NonFiniteError as err:
            self.step += 1
            self.stop(err)
        if good:
            self.optimizer.step()
            self.loss_sum += loss_value / self.world
            self.loss_count += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.step += 1
        if self.plan is not None and self.plan.budget_at(self.step) is not None:
            self.optimizer, self.schedule = self.cut_ranks(self.plan.budget_at(self.step))
            self.net, self.ddp = _training_net(self.model, self.world, tc.compile)  # new layers: new DDP and compile
        if not good:
            self.metrics.log({"step": self.step, "skipped": f"loss {loss_value}, grad_norm {norm_value}"})
            self.bar.write(f"step {self.step}: skipped (loss {loss_value}, grad norm {norm_value}); "
                           f"{guard.bad_steps} of train.max_bad_steps={tc.max_bad_steps} used")
        return norm_value

    def report(self, norm_value: float) -> None:
        """Metrics, evaluation and checkpoint after a step, each at its interval and after the last step."""
        tc, task, step, bar = self.tc, self.task, self.step, self.bar
        if step % tc.log_interval == 0 or step == tc.steps:
            mean_loss = self.loss_sum / self.loss_count if self.loss_count else None
            self.loss_sum, self.loss_count = 0.0, 0
            speed = self.units_done / max(self.train_time, 1e-9)
            self.metrics.log({"step": step, "train_loss": mean_loss, "lr": tc.lr * self.lr_at(step - 1),
                              f"{task.unit}_per_s": speed, "grad_norm": norm_value})
            bar.set_postfix(loss=f"{mean_loss:.4f}" if mean_loss is not None else "skipped",
                            **{f"{task.unit}/s": f"{speed:.0f}"})
        if step % tc.eval_interval == 0 or step == tc.steps:
            result = self.evaluate()
            self.best = self.better(self.best, result[task.metric])
            self.metrics.log({"step": step, **result})
            if self.rank == 0:
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
            self.final = result if step == tc.steps else None
        if step % tc.checkpoint_interval == 0 or step == tc.steps:
            self.checkpoint()

    def cut_ranks(self, budget: int):
        """Truncate to ``budget``; (a new optimizer keeping every other parameter's state and the lrs, its schedule)."""
        model, optimizer, plan, step = self.model, self.optimizer, self.plan, self.step
        saved = {name: optimizer.state[p] for name, p in model.named_parameters() if p in optimizer.state}
        lrs = [(g["lr"], g["initial_lr"]) for g in optimizer.param_groups]
        replaced = set(ranks.cut(model, budget, plan.kind))
        new = self.make_optimizer()
        if [len(g["params"]) for g in new.param_groups] != [len(g["params"]) for g in optimizer.param_groups]:
            raise RuntimeError("a rank cut changed the optimizer's parameter groups")  # cannot happen: same names
        for group, (lr, initial) in zip(new.param_groups, lrs):
            group["lr"], group["initial_lr"] = lr, initial
        for name, p in model.named_parameters():
            if name in saved and name not in replaced:
                new.state[p] = saved[name]
        self.extra["model_config"] = model.config.to_dict()
        record = {"step": step, **ranks.rank_record(model)}
        self.metrics.log(record)
        if self.rank == 0:
            self.bar.write(f"step {step}: ranks cut to {plan.kind} budget {budget:,}: attention params "
                           f"{record['attention_params']:,}, KV floats/token {record['kv_floats_per_token']}")
        return new, torch.optim.lr_scheduler.LambdaLR(new, self.lr_at, last_epoch=step - 1)

    def evaluate(self) -> dict:
        self.model.eval()
        result = self.task.evaluate(self.model, self.device, self.rank, self.world, self.tc.batch_size, self.autocast)
        self.model.train()
        bad = {k: v for k, v in result.items() if not math.isfinite(v)}
        if bad:
            self.stop(NonFiniteError(f"non-finite validation {bad} at step {self.step}; the run stopped"))
        return result

    def checkpoint(self) -> None:
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                 "rng": {"torch": torch.get_rng_state(), "data": self.generator.get_state(),
                         "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
                 "best_metric": self.best, "train_time": self.train_time, "units": self.units_done,
                 "config": self.config.to_dict(), "loss_sum": self.loss_sum, "loss_count": self.loss_count,
                 "bad": self.guard.bad_steps}
        if self.rank == 0:
            try:
                save_run_checkpoint(self.run_dir, self.step, self.model, state, extra=self.extra,
                                    keep=self.tc.keep_checkpoints)
            except NonFiniteError as err:
                self.stop(err)
        if self.world > 1:
            torch.distributed.barrier()

    def stop(self, err: NonFiniteError):
        self.metrics.log({"step": self.step, "stopped": str(err)})
        self.bar.close()
        raise err

    def summary(self) -> dict:
        """The run's summary (final validation, best metric, sizes, speed), also written to ``summary.json``."""
        task, model, plan, final = self.task, self.model, self.plan, self.final or self.evaluate()
        summary = {"task": self.config.task, "attention": model.config.attention, "steps": self.step, **final,
                   f"best_{task.metric}": self.better(self.best, final[task.metric]), "params": model.n_params,
                   "attention_params": model.attention_params,
                   "kv_bytes_per_token": model.kv_bytes_per_token(torch.bfloat16),
                   f"{task.unit}_per_s": self.units_done / max(self.train_time, 1e-9), "train_time_s": self.train_time,
                   "world_size": self.world, "device": str(self.device),
                   "precision": "bf16" if self.use_bf16 else "fp32", "skipped_steps": self.guard.bad_steps,
                   **task.baselines()}
        if plan is not None:
            summary.update(rank_budget={"kind": plan.kind, "budget": plan.final, "mha": plan.reference},
                           **ranks.rank_record(model))
        if self.rank == 0:
            write_json_atomic(self.run_dir / "summary.json", summary)
            if plan is not None:
                records = [r for r in map(json.loads, (self.run_dir / "metrics.jsonl").open()) if "ranks" in r]
                ranks.plot_ranks(records, self.run_dir / "ranks.png")
        return summary


def _micro_batches(batch, k: int) -> list:
    """``batch`` (a tuple of tensors whose first dimension is the examples) in ``k`` equal parts."""
    if k == 1:
        return [batch]
    n = len(batch[0])
    if n % k or any(len(t) != n for t in batch):
        raise RuntimeError(f"a batch of {[len(t) for t in batch]} examples does not split into {k} micro-batches")
    return [type(batch)(t[j * (n // k):(j + 1) * (n // k)] for t in batch) for j in range(k)]


def _training_net(model: nn.Module, world: int, compile: bool) -> tuple[nn.Module, nn.Module | None]:
    """(what the training forward calls, the DDP wrapper or None): ``model``, compiled when
    ``compile`` and wrapped in DDP when ``world > 1``. The compiled module is the inner one
    (PyTorch's advice for DDP: compile the module DDP wraps); ``model`` itself stays plain, so
    checkpoints, evaluation and rank cuts use it and its parameter names (no ``_orig_mod.``)."""
    net = model
    if compile:
        # A fresh compile per run and after each rank cut (whose layers have new shapes): the old
        # graphs are dropped rather than piling up towards dynamo's recompile limit, beyond which
        # it would fall back to eager (compare trains several models in one process).
        torch.compiler.reset()
        net = torch.compile(model)
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(net)
        return ddp, ddp
    return net, None


_fixed_part = fixed_part            # importable from here as before
