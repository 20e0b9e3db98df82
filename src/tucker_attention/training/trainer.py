"""The training loop shared by every task: AdamW + warmup/cosine, clipping, autocast, DDP,
periodic validation, metrics, atomic checkpoints and bit-for-bit resume.

Distributed data parallel is switched on by ``torchrun`` (its ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``
environment): every process draws the same global batch from the same seeded generator and
trains on its slice, so N processes follow the single-process run with the same global batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..layers import Attention
from .checkpoint import latest_checkpoint, load_run_checkpoint, save_run_checkpoint
from .config import DEFAULT_ATTENTION_LR, RunConfig
from .tasks import all_reduce_sum, make_task


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, *, lr: float, weight_decay: float, attention_lr_scale: float = 1.0,
                 attention_lr: str = DEFAULT_ATTENTION_LR) -> list[dict]:
    """AdamW groups: weight decay on matrices only; attention parameters at ``attention_lr_scale·lr``,
    times each layer's :meth:`~tucker_attention.layers.Attention.lr_scales` when
    ``attention_lr == "relative"``."""
    scales = {}
    for m in model.modules():
        if isinstance(m, Attention):
            rule = m.lr_scales() if attention_lr == "relative" else {}
            for name, p in m.named_parameters():
                scales[id(p)] = attention_lr_scale * rule.get(name, 1.0)
    groups: dict[tuple[bool, float], list] = {}
    for p in model.parameters():  # unique parameters (tied weights once)
        if p.requires_grad:
            groups.setdefault((p.dim() >= 2, scales.get(id(p), 1.0)), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale}
            for (decay, scale), ps in sorted(groups.items())]


def _distributed() -> tuple[int, int, int, bool]:
    """(rank, world size, local rank, whether this call started the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    started = world > 1 and not torch.distributed.is_initialized()
    if started:
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")), started


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


class _Metrics:
    """``metrics.jsonl`` on rank 0; on resume, records after the resumed step are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        elif enabled and resume_step is None:
            path.write_text("")

    def log(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def train(config: RunConfig, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
          task=None, init_state: dict | None = None) -> dict:
    """Train ``config`` in ``run_dir``; returns the summary (also written to ``summary.json``).

    resume: continue from the latest checkpoint in ``run_dir`` (same config; ``train.steps`` may grow).
    overwrite: start afresh in a ``run_dir`` that holds an earlier run (its checkpoints and
        metrics are deleted); without it such a folder is refused.
    task: a prebuilt task (tests and ``compare`` pass one to share a loaded corpus).
    init_state: weights to start from (a state dict of the config's model), e.g. a converted
        model to fine-tune; a resumed run reads its checkpoint instead.
    """
    rank, world, local_rank, started_group = _distributed()
    tc = config.train
    if tc.batch_size % world:
        raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the number of processes ({world})")
    device = _device(tc.device, local_rank)
    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    run_dir = Path(run_dir)
    if not resume and (run_dir / "checkpoints").exists():
        if not overwrite:
            raise ValueError(f"run folder {str(run_dir)!r} already holds a run; continue it with --resume, "
                             f"choose another --run-dir, or pass --overwrite to start it afresh")
        if rank == 0:
            shutil.rmtree(run_dir / "checkpoints")
            for name in ("metrics.jsonl", "summary.json"):
                (run_dir / name).unlink(missing_ok=True)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    task = task or make_task(config)
    torch.manual_seed(tc.seed)
    model = task.build_model()
    if init_state is not None and not resume:
        model.load_state_dict(init_state)
    model = model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, lr=tc.lr, weight_decay=tc.weight_decay,
                                               attention_lr_scale=tc.attention_lr_scale,
                                               attention_lr=tc.attention_lr),
                                  betas=(tc.beta1, tc.beta2), fused=device.type == "cuda" or None)

    def lr_at(s: int) -> float:
        return lr_factor(s, warmup=tc.warmup_steps, total=tc.steps, min_ratio=tc.min_lr_ratio)

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    generator = torch.Generator().manual_seed(tc.seed + 1)
    better = max if task.higher_is_better else min
    step, best, train_time, units_done = 0, -math.inf if task.higher_is_better else math.inf, 0.0, 0
    if resume:
        ckpt = latest_checkpoint(run_dir)
        state = load_run_checkpoint(ckpt, model)
        if _fixed_part(state["config"]) != _fixed_part(config.to_dict()):
            raise ValueError(f"checkpoint {str(ckpt)!r} was written by a different config; resume it with "
                             f"its own config (only train.steps and train.progress may change)")
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"]["torch"])
        generator.set_state(state["rng"]["data"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        step, best = state["step"], state["best_metric"]
        train_time, units_done = state["train_time"], state["units"]
    elif rank == 0:
        (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    metrics = _Metrics(run_dir / "metrics.jsonl", rank == 0, step if resume else None)
    extra = {"task": config.task, "config": config.to_dict(), **task.extra_state()}
    if rank == 0:
        print(model.summary())

    def evaluate() -> dict:
        model.eval()
        result = task.evaluate(model, device, rank, world, tc.batch_size, autocast)
        model.train()
        return result

    def checkpoint():
        state = {"step": step, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                 "rng": {"torch": torch.get_rng_state(), "data": generator.get_state(),
                         "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                 "best_metric": best, "train_time": train_time, "units": units_done, "config": config.to_dict()}
        if rank == 0:
            save_run_checkpoint(run_dir, step, model, state, extra=extra)
        if world > 1:
            torch.distributed.barrier()

    model.train()
    bar = tqdm(total=tc.steps, initial=step, disable=not tc.progress or rank != 0, desc=run_dir.name,
               dynamic_ncols=True)
    final, loss_sum, loss_count = None, torch.zeros((), device=device), 0
    while step < tc.steps:
        t0 = time.perf_counter()
        batch = task.sample_batch(generator, tc.batch_size, rank, world)
        with autocast():
            loss = task.loss(net, batch, device)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip) if tc.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        step += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.perf_counter() - t0
        units_done += task.batch_units(batch) * world
        loss_sum += loss.detach()
        loss_count += 1
        if step % tc.log_interval == 0 or step == tc.steps:
            (mean_loss,) = all_reduce_sum([float(loss_sum) / loss_count / world], device)
            loss_sum.zero_()
            loss_count = 0
            speed = units_done / max(train_time, 1e-9)
            record = {"step": step, "train_loss": mean_loss, "lr": tc.lr * lr_at(step - 1),
                      f"{task.unit}_per_s": speed}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            metrics.log(record)
            bar.set_postfix(loss=f"{mean_loss:.4f}", **{f"{task.unit}/s": f"{speed:.0f}"})
        if step % tc.eval_interval == 0 or step == tc.steps:
            result = evaluate()
            best = better(best, result[task.metric])
            metrics.log({"step": step, **result})
            if rank == 0:
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
            final = result if step == tc.steps else None
        if step % tc.checkpoint_interval == 0 or step == tc.steps:
            checkpoint()
        bar.update(1)
    bar.close()
    final = final or evaluate()
    summary = {"task": config.task, "attention": model.config.attention, "steps": step, **final,
               f"best_{task.metric}": better(best, final[task.metric]), "params": model.n_params,
               "attention_params": model.attention_params,
               "kv_bytes_per_token": model.kv_bytes_per_token(torch.bfloat16),
               f"{task.unit}_per_s": units_done / max(train_time, 1e-9), "train_time_s": train_time,
               "world_size": world, "device": str(device), "precision": "bf16" if use_bf16 else "fp32",
               **task.baselines()}
    if rank == 0:
        _write_json(run_dir / "summary.json", summary)
    if started_group:
        torch.distributed.destroy_process_group()
    return summary


def _fixed_part(config: dict) -> dict:
    """A config without the keys a resumed run may change."""
    train = {k: v for k, v in config["train"].items() if k not in ("steps", "progress")}
    return {**config, "train": train}


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
