"""Training: a task's model (:mod:`.tasks`) trained by the one loop (:class:`~.loop.Loop`): AdamW +
warmup/cosine, clipping, autocast, DDP, periodic validation, metrics, atomic checkpoints and
bit-for-bit resume; a rank-adaptive Tucker run truncates its ranks on the way (:mod:`.ranks`).

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
from pathlib import Path

import torch
from torch import nn

from ..io import read_metadata
from ..layers import Attention
from . import ranks
from .checkpoint import write_json_atomic
from .config import DEFAULT_LR_RULE, RunConfig
from .guard import NonFiniteError
from .loop import Job, Loop, adamw, lr_schedule, micro_batches
from .run_folder import check_resumable, fixed_part
from .tasks import make_task


def attention_lr_scales(model: nn.Module, *, attention_lr_scale: float = 1.0,
                        lr_rule: str = DEFAULT_LR_RULE) -> dict[str, float]:
    """{parameter name: lr multiplier} of every attention parameter: ``attention_lr_scale``, times
    each layer's :meth:`~tucker_attention.layers.Attention.lr_scales` when ``lr_rule == "relative"``."""
    scales = {}
    for module_name, m in model.named_modules():
        if isinstance(m, Attention):
            rule = m.lr_scales() if lr_rule == "relative" else {}
            for name, _ in m.named_parameters():
                scales[f"{module_name}.{name}" if module_name else name] = attention_lr_scale * rule.get(name, 1.0)
    return scales


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, attention_lr_scale: float = 1.0,
                 lr_rule: str = DEFAULT_LR_RULE, scales: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups: weight decay on matrices only; attention parameters at their
    :func:`attention_lr_scales` (``scales``: those of another model with the same parameter
    names, e.g. the starting model of a rank-adaptive run, whose scales every rank keeps)."""
    if scales is None:
        scales = attention_lr_scales(model, attention_lr_scale=attention_lr_scale, lr_rule=lr_rule)
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():  # unique parameters (tied weights once)
        if p.requires_grad:
            groups.setdefault((p.dim() >= 2, scales.get(name, 1.0)), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale}
            for (decay, scale), ps in sorted(groups.items())]


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
    tc, run_dir = config.train, Path(run_dir)
    with Loop(tc, run_dir, resume=resume, overwrite=overwrite) as loop:
        if resume:
            check_resumable(run_dir, config)
        task = task or make_task(config)
        torch.manual_seed(tc.seed)
        model = None if resume else task.build_model()   # a resumed run builds its checkpoint's model
        if init_state is not None and not resume:
            model.load_state_dict(init_state)
        job = _TrainJob(config, task, model, loop)
        loop.hold()
        return loop.run(job)


class _TrainJob(Job):
    """What :func:`train` gives the loop: the task's model (from ``model`` or, resuming, the newest checkpoint),
    its batches and loss, the optimizer with the attention lr scales, logging, validation, rank cuts, summary."""

    def __init__(self, config: RunConfig, task, model: nn.Module | None, loop: Loop):
        tc = self.tc = config.train
        self.config, self.task, self.model, self.loop = config, task, model, loop
        self.steps, self.label, self.data_seed, self.compile = tc.steps, loop.run_dir.name, tc.seed + 1, tc.compile
        with torch.device("meta"):  # the starting model: lr scales by parameter name and the rank cuts come from it
            start = task.build_model()
        self.scales = attention_lr_scales(start, attention_lr_scale=tc.attention_lr_scale, lr_rule=tc.lr_rule)
        self.plan = ranks.schedule(tc, start)
        self.lr_at = lr_schedule(tc, tc.steps)
        self.better = max if task.higher_is_better else min
        self.best, self.final = (-math.inf if task.higher_is_better else math.inf), None
        self.units, self.loss_sum, self.loss_count = 0, 0.0, 0

    def trained(self) -> nn.Module:
        return self.model

    def build(self, model_config: dict | None) -> nn.Module:
        task = self.task
        return task.model_cls(task.config_cls(**model_config)) if model_config else task.build_model()

    def check_resumed(self, path: Path, state: dict, module: nn.Module) -> None:
        if fixed_part(state["config"]) != fixed_part(self.config.to_dict()):
            raise ValueError(f"checkpoint {str(path)!r} was written by a different config; resume it with "
                             f"its own config (only train.steps and train.progress may change)")
        self.task.check_resume(read_metadata(path / "model.safetensors")["extra"])  # e.g. the data's tokenizer
        self.model = module

    def make_optimizer(self) -> torch.optim.Optimizer:
        groups = param_groups(self.model, lr=self.tc.lr, weight_decay=self.tc.weight_decay, scales=self.scales)
        return adamw(groups, self.tc, self.loop.device)

    def start(self, state: dict | None) -> None:
        loop = self.loop
        self.model = self.model.to(loop.device)
        loop.optimizer = self.make_optimizer()
        loop.schedule = torch.optim.lr_scheduler.LambdaLR(loop.optimizer, self.lr_at)
        if state is not None:
            loop.optimizer.load_state_dict(state["optimizer"])
            loop.schedule.load_state_dict(state["schedule"])
            self.best, self.units = state["best_metric"], state["units"]
            self.loss_sum, self.loss_count = state.get("loss_sum", 0.0), state.get("loss_count", 0)
        self.extra_state = {"task": self.config.task, "config": self.config.to_dict(), **self.task.extra_state(),
                            "model_config": self.model.config.to_dict()}

    def begin(self) -> None:
        self.model.train()
        if self.plan is not None and not self.loop.resume:
            self.loop.metrics.log({"step": 0, **ranks.rank_record(self.model)})
        if self.loop.rank == 0:
            print(self.model.summary())

    def batch(self, generator: torch.Generator) -> list:
        tc, loop = self.tc, self.loop
        batch = self.task.sample_batch(generator, tc.batch_size * tc.grad_accum_steps, loop.rank, loop.world)
        self.units += self.task.batch_units(batch) * loop.world
        return micro_batches(batch, tc.grad_accum_steps)

    def loss(self, net: nn.Module, micro) -> torch.Tensor:
        return self.task.loss(net, micro, self.loop.device)

    def after_step(self, loss: float, grad_norm: float, good: bool) -> None:
        """The loss into the logged mean, a rank cut if one is due, then :meth:`report`."""
        loop = self.loop
        if good:
            self.loss_sum += loss
            self.loss_count += 1
        if self.plan is not None and self.plan.budget_at(loop.step) is not None:
            loop.optimizer, loop.schedule = self.cut_ranks(self.plan.budget_at(loop.step))
            loop.wrap()                              # new layers: a new DDP wrapper and compile
        self.report(grad_norm)

    def report(self, norm_value: float) -> None:
        """Metrics, evaluation and checkpoint after a step, each at its interval and after the last step."""
        tc, task, loop = self.tc, self.task, self.loop
        step, bar = loop.step, loop.bar
        if step % tc.log_interval == 0 or step == tc.steps:
            mean_loss = self.loss_sum / self.loss_count if self.loss_count else None
            self.loss_sum, self.loss_count = 0.0, 0
            speed = self.units / max(loop.seconds, 1e-9)
            loop.metrics.log({"step": step, "train_loss": mean_loss, "lr": tc.lr * self.lr_at(step - 1),
                              f"{task.unit}_per_s": speed, "grad_norm": norm_value})
            bar.set_postfix(loss=f"{mean_loss:.4f}" if mean_loss is not None else "skipped",
                            **{f"{task.unit}/s": f"{speed:.0f}"})
        if step % tc.eval_interval == 0 or step == tc.steps:
            result = self.evaluate()
            self.best = self.better(self.best, result[task.metric])
            loop.metrics.log({"step": step, **result})
            if loop.rank == 0:
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
            self.final = result if step == tc.steps else None
        if step % tc.checkpoint_interval == 0 or step == tc.steps:
            loop.checkpoint()

    def cut_ranks(self, budget: int):
        """Truncate to ``budget``; (a new optimizer keeping every other parameter's state and the lrs, its schedule)."""
        model, optimizer, plan, step = self.model, self.loop.optimizer, self.plan, self.loop.step
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
        self.extra_state["model_config"] = model.config.to_dict()
        record = {"step": step, **ranks.rank_record(model)}
        self.loop.metrics.log(record)
        if self.loop.rank == 0:
            self.loop.bar.write(f"step {step}: ranks cut to {plan.kind} budget {budget:,}: attention params "
                                f"{record['attention_params']:,}, KV floats/token {record['kv_floats_per_token']}")
        return new, torch.optim.lr_scheduler.LambdaLR(new, self.lr_at, last_epoch=step - 1)

    def evaluate(self) -> dict:
        loop = self.loop
        self.model.eval()
        result = self.task.evaluate(self.model, loop.device, loop.rank, loop.world, self.tc.batch_size, loop.autocast)
        self.model.train()
        bad = {k: v for k, v in result.items() if not math.isfinite(v)}
        if bad:
            loop.stop(NonFiniteError(f"non-finite validation {bad} at step {loop.step}; the run stopped"))
        return result

    def state(self) -> dict:
        return {"best_metric": self.best, "units": self.units, "config": self.config.to_dict(),
                "loss_sum": self.loss_sum, "loss_count": self.loss_count}

    def extra(self) -> dict:
        return self.extra_state

    def config_record(self) -> dict:
        return self.config.to_dict()

    def summary(self) -> dict:
        """The run's summary (final validation, best metric, sizes, speed), also written to ``summary.json``."""
        task, model, plan, loop, final = self.task, self.model, self.plan, self.loop, self.final or self.evaluate()
        summary = {"task": self.config.task, "attention": model.config.attention, "steps": loop.step, **final,
                   f"best_{task.metric}": self.better(self.best, final[task.metric]), "params": model.n_params,
                   "attention_params": model.attention_params,
                   "kv_bytes_per_token": model.kv_bytes_per_token(torch.bfloat16),
                   f"{task.unit}_per_s": self.units / max(loop.seconds, 1e-9), "train_time_s": loop.seconds,
                   "world_size": loop.world, "device": str(loop.device),
                   "precision": "bf16" if loop.use_bf16 else "fp32", "skipped_steps": loop.guard.bad_steps,
                   **task.baselines()}
        if plan is not None:
            summary.update(rank_budget={"kind": plan.kind, "budget": plan.final, "mha": plan.reference},
                           **ranks.rank_record(model))
        if loop.rank == 0:
            write_json_atomic(loop.run_dir / "summary.json", summary)
            if plan is not None:
                records = [r for r in map(json.loads, (loop.run_dir / "metrics.jsonl").open()) if "ranks" in r]
                ranks.plot_ranks(records, loop.run_dir / "ranks.png")
        return summary
