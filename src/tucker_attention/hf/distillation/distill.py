"""Recovery of a converted causal LM: knowledge distillation from the original it was converted from.

Two phases, one run (``tucker-attn distill``, :func:`~.distill_command.distill_folder`; the loop is :func:`distill`):

1. **per-layer** (``layer_steps``): every converted attention block learns to give the original
   block's output on the original's own block inputs (hooks on the original's attention modules
   catch their inputs and outputs). The loss is the mean over blocks of the relative squared
   error ||y_student - y||² / ||y||²; each block's gradient comes from its own output only, so
   nothing is back-propagated through the network (cheap, and every block is fixed at once).
2. **end-to-end** (``steps``): the next-token KL(original ‖ converted) over every position of
   the window, back-propagated through the whole converted model.

Only the converted blocks' parameters train by default (``params="all"``: every parameter).
Training windows are random ``seq_len``-token windows of the data's training split (a folder of
``tucker-attn prepare-data`` made with the model's tokenizer, or the built-in Shakespeare plays
outside the held-out ones); held-out KL, top-1 agreement and perplexity are measured on fixed
windows of its validation split before, between and after the phases and every
``eval_interval`` steps. The run folder holds verified checkpoints (only the trained
parameters), ``metrics.jsonl`` and ``summary.json``; ``resume=True`` continues from the newest
intact checkpoint and ends where an uninterrupted run ends. DDP (``torchrun``): every process
draws the same global batch and trains on its slice; gradients are averaged across processes
(an all-reduce per step). bf16 autocast on CUDA (``precision``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from ...training.checkpoint import save_run_checkpoint, write_json_atomic
from ...training.config import resolve_device
from ...training.distill_config import LATER_FIELDS, DistillConfig
from ...training.guard import NonFiniteError, NonFiniteGuard
from ...training.lock import RunLock
from ...training.run_folder import MetricsLog, prepare, resume_from, set_aside
from ...training.tasks import all_reduce_sum
from ...training.trainer import _distributed, _on_rank0, lr_factor
from ..conversion.convert import converted_blocks
from ..conversion.fidelity import fidelity
from ..families.reading import layer_stack
from .data import TokenData
from .losses import block_errors, check_pair, layer_loss, logit_kl, share_frozen, trained_modules

# -- the loop --------------------------------------------------------------------------------------

def _phase(step: int, cfg: DistillConfig) -> str:
    return "layer" if step < cfg.layer_steps else "e2e"


def lr_scales(trainable: list, d_model: int, rule: str) -> list[float]:
    """Each trained parameter's lr multiplier: ``relative``: its RMS × sqrt(d_model) for matrices and
    cores (under Adam every weight then moves by the same fraction of its own scale per step as a
    projection of RMS 1/sqrt(d_model) at multiplier 1; a converted Tucker's factors differ in
    scale by 1000x), 1 for vectors; ``uniform``: 1. Taken from the converted weights, before any step."""
    if rule == "uniform":
        return [1.0] * len(trainable)
    return [float(p.detach().float().pow(2).mean().sqrt()) * d_model ** 0.5 if p.dim() >= 2 else 1.0
            for p in trainable]


def _make_optimizer(trainable: list, scales: list[float], cfg: DistillConfig, phase: str, device) -> tuple:
    """(AdamW, its LambdaLR) of ``phase``: its own peak lr (times each parameter's scale), warmup and
    cosine over its own steps."""
    peak, total = (cfg.layer_lr, cfg.layer_steps) if phase == "layer" else (cfg.lr, cfg.steps)
    groups = [{"params": [p], "lr": peak * scale, "weight_decay": cfg.weight_decay if p.dim() >= 2 else 0.0}
              for p, scale in zip(trainable, scales)]
    optimizer = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.95), fused=device.type == "cuda" or None)
    factor = functools.partial(lr_factor, warmup=cfg.warmup_steps, total=max(total, 1), min_ratio=cfg.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _evaluate(teacher, student, batches, autocast) -> dict:
    with autocast():
        scores = fidelity(teacher, student, batches, "decoder")
    return {"kl": scores["kl"], "top1": scores["top1"], "ppl": scores["ppl"], "source_ppl": scores["source_ppl"]}


def distill(teacher: nn.Module, student: nn.Module, data: TokenData, run_dir, config: DistillConfig | None = None,
            *, resume: bool = False, overwrite: bool = False, on_step=None) -> dict:
    """Distil ``teacher`` (the original) into ``student`` (its converted model, changed in place) on
    ``data``; returns the summary (also ``run_dir/summary.json``): the held-out scores of every
    evaluation (``history``: step, phase, tokens, seconds, kl, top1, ppl), the per-block output
    errors before and after the per-layer phase, and the run's totals.

    resume: continue from the newest intact checkpoint in ``run_dir`` (same config but for
        ``steps``); overwrite: start afresh in a folder that holds a run. ``on_step(step)`` is
        called after every optimizer step (a test stops a run with it).
    With ``params="attention"`` the student's weights outside attention become the teacher's own
    tensors (:func:`~.distill_losses.share_frozen`): both models fit in the memory of one.
    """
    cfg = config or DistillConfig()
    check_pair(teacher, student)
    if cfg.params == "attention":
        share_frozen(teacher, student)
    rank, world, local_rank, started_group = _distributed()
    if cfg.batch_size % world:
        raise ValueError(f"distill: batch_size={cfg.batch_size} must be divisible by the number of processes ({world})")
    data.check_seq_len(cfg.seq_len)
    device = resolve_device(cfg.device, local_rank)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    run_dir = Path(run_dir)
    flags = {p: p.requires_grad for m in (teacher, student) for p in m.parameters()}
    lock = RunLock(run_dir)

    def start() -> list[str]:                   # rank 0 holds the folder; the others learn whether it could
        lock.acquire()
        try:
            return prepare(run_dir, resume=resume, overwrite=overwrite)
        except BaseException:
            lock.release()
            raise

    for note in _on_rank0(world, rank, start) or []:
        print(f"distill: {note}", flush=True)
    try:
        with _checkpointed_layers(student, cfg.activation_checkpointing):
            return _Run(teacher, student, data, run_dir, cfg, device, use_bf16, rank, world).go(resume, on_step)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        if rank == 0:
            lock.release()
        if started_group:
            torch.distributed.destroy_process_group()


@contextlib.contextmanager
def _checkpointed_layers(student: nn.Module, enabled: bool):
    """With ``enabled``, each of the student's layers (the list holding its attention blocks) keeps no
    activations for the backward pass and recomputes them in it (``torch.utils.checkpoint``,
    non-reentrant); restored after. transformers' own gradient checkpointing needs train mode, which
    distillation does not use (dropout stays off)."""
    if not enabled:
        yield
        return
    stack = layer_stack(student, list(converted_blocks(student)))
    if stack is None:
        raise ValueError(f"distill: activation_checkpointing=True needs the attention blocks of "
                         f"{type(student).__name__} in one list of layers; leave it False")

    def checkpointed(forward):
        def run(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return run

    layers = [layer for layer, _ in stack]
    for layer in layers:
        layer.forward = checkpointed(layer.forward)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


class _Run:
    """The state of one distillation run and its steps (see :func:`distill`)."""

    def __init__(self, teacher, student, data, run_dir: Path, cfg: DistillConfig, device, use_bf16: bool,
                 rank: int, world: int):
        from ..conversion.convert import converted_blocks

        self.teacher, self.student, self.data, self.run_dir, self.cfg = teacher, student, data, run_dir, cfg
        self.device, self.rank, self.world = device, rank, world
        self.autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16
                         else contextlib.nullcontext)
        self.paths = list(converted_blocks(student))
        self.holder = trained_modules(student, cfg.params)
        teacher.to(device).eval().requires_grad_(False)
        student.to(device).eval().requires_grad_(False)        # dropout off: the teacher's outputs are exact
        self.trainable = [p.requires_grad_(True) for p in self.holder.parameters()]
        d_model = next(iter(converted_blocks(student).values())).layer.d_model
        self.scales = lr_scales(self.trainable, d_model, cfg.lr_rule)
        self.eval_batches = data.eval_batches(cfg.seq_len, cfg.eval_windows, device)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step, self.tokens, self.seconds, self.history, self.errors, self.bad = 0, 0, 0.0, [], {}, 0
        self.precision = "bf16" if use_bf16 else "fp32"

    # bookkeeping
    def _state(self) -> dict:
        return {"step": self.step, "phase": self.phase, "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "config": self.cfg.fixed(),
                "rng": {"torch": torch.get_rng_state(), "data": self.generator.get_state()},
                "tokens": self.tokens, "seconds": self.seconds, "bad": self.guard.bad_steps,
                "history": json.dumps(self.history), "errors": json.dumps(self.errors)}

    def _checkpoint(self) -> None:
        if self.rank == 0:
            save_run_checkpoint(self.run_dir, self.step, self.holder, self._state(), keep=self.cfg.keep_checkpoints,
                                extra={"kind": "distill", "params": self.cfg.params, "blocks": self.paths})
        if self.world > 1:
            torch.distributed.barrier()

    def _resume(self) -> None:
        path, state, _, notes = resume_from(self.run_dir, lambda _: self.holder)
        for note in notes if self.rank == 0 else []:
            print(f"distill: {note}", flush=True)
        stored = {**LATER_FIELDS, **state["config"]}          # runs written before a field existed
        if stored != self.cfg.fixed():
            changed = sorted(k for k in self.cfg.fixed() if stored.get(k) != self.cfg.fixed()[k])
            raise ValueError(f"run folder {str(self.run_dir)!r} was distilled with other settings ({', '.join(changed)}"
                             f" differ); resume it with its own (only steps may change)")
        self.step, self.tokens, self.seconds, self.bad = state["step"], state["tokens"], state["seconds"], state["bad"]
        self.history, self.errors = json.loads(state["history"]), json.loads(state["errors"])
        torch.set_rng_state(state["rng"]["torch"])
        self.generator.set_state(state["rng"]["data"])
        self._start_phase(_phase(self.step, self.cfg))
        if state["phase"] == self.phase:                  # a checkpoint at a phase's end starts the next afresh
            try:
                self.optimizer.load_state_dict(state["optimizer"])
            except ValueError as err:
                raise ValueError(f"run folder {str(self.run_dir)!r}: its optimizer state does not fit this version's "
                                 f"optimizer ({err}); start a new run (another --run-dir)") from None
            self.schedule.load_state_dict(state["schedule"])
        if self.world > 1:
            torch.distributed.barrier()
        for note in set_aside(self.run_dir, self.step) if self.rank == 0 else []:
            print(f"distill: {note}", flush=True)

    def _start_phase(self, phase: str) -> None:
        self.phase = phase
        self.optimizer, self.schedule = _make_optimizer(self.trainable, self.scales, self.cfg, phase, self.device)

    def _record(self, label: str) -> dict:
        scores = _evaluate(self.teacher, self.student, self.eval_batches, self.autocast)
        record = {"step": self.step, "phase": label, "tokens": self.tokens, "seconds": round(self.seconds, 3), **scores}
        self.history.append(record)
        self.metrics.log(record)
        if self.rank == 0:
            self.bar.write(f"step {self.step} ({label}): held-out KL {scores['kl']:.4f}, top-1 {scores['top1']:.3f}, "
                           f"ppl {scores['ppl']:.2f}")
        return record

    # the steps
    def _loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            if self.phase == "layer":
                return layer_loss(self.teacher, self.student, self.paths, input_ids)
            return logit_kl(self.teacher, self.student, input_ids)

    def _train_step(self) -> None:
        cfg, k = self.cfg, self.cfg.grad_accum_steps
        t0 = time.perf_counter()
        ids = self.data.train_batch(self.generator, cfg.batch_size * k, cfg.seq_len)
        mine = ids[self.rank::self.world].to(self.device)            # this process's share, micro-batches below
        total = None
        for micro in mine.chunk(k):
            loss = self._loss(micro)
            (loss / k).backward()
            total = loss.detach() / k if total is None else total + loss.detach() / k
        if self.world > 1:
            for p in self.trainable:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.world
        norm = nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        loss_value, norm_value = NonFiniteGuard.values(total, norm)
        (loss_value,) = all_reduce_sum([loss_value], self.device)
        loss_value /= self.world
        try:
            good = self.guard.check(self.step + 1, loss=loss_value, grad_norm=norm_value)
        except NonFiniteError:
            self.metrics.log({"step": self.step + 1, "stopped": "non-finite loss or gradient"})
            raise
        if good:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        self.step += 1
        self.tokens += ids.numel()
        self.seconds += time.perf_counter() - t0
        self.metrics.log({"step": self.step, "phase": self.phase, "loss": loss_value, "grad_norm": norm_value,
                          "lr": self.optimizer.param_groups[0]["lr"], **({} if good else {"skipped": True})})
        self.bar.set_postfix(phase=self.phase, loss=f"{loss_value:.4g}")
        self.bar.update(1)

    def go(self, resume: bool, on_step) -> dict:
        cfg, last = self.cfg, self.cfg.layer_steps + self.cfg.steps
        self.guard = NonFiniteGuard(cfg.max_bad_steps, setting="max_bad_steps")
        if resume:
            self._resume()
            self.guard = NonFiniteGuard(cfg.max_bad_steps, setting="max_bad_steps", bad_steps=self.bad)
        else:
            self._start_phase(_phase(0, cfg))
        if self.rank == 0:                       # a resumed run records the settings it now runs with
            write_json_atomic(self.run_dir / "config.json", dataclasses.asdict(cfg))
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.rank == 0, self.step if resume else None)
        self.bar = _bar(last, self.step, cfg.progress and self.rank == 0, self.run_dir.name)
        try:
            if self.step == 0:
                self._record("converted")
                if cfg.layer_steps:
                    self.errors["before"] = block_errors(self.teacher, self.student, self.eval_batches[:2])
            while self.step < last:
                if _phase(self.step, cfg) != self.phase:
                    self._start_phase(_phase(self.step, cfg))
                self._train_step()
                end_of_layers = cfg.layer_steps and self.step == cfg.layer_steps
                if end_of_layers:
                    self.errors["after"] = block_errors(self.teacher, self.student, self.eval_batches[:2])
                    self._record("per-layer")
                elif self.step == last or self.step % cfg.eval_interval == 0:
                    self._record("end-to-end" if self.step == last else self.phase)
                if self.step % cfg.checkpoint_interval == 0 or self.step == last or end_of_layers:
                    self._checkpoint()
                if on_step is not None:
                    on_step(self.step)
        finally:
            self.bar.close()
        return self._summary()

    def _summary(self) -> dict:
        final = self.history[-1]
        summary = {"steps": self.step, "layer_steps": self.cfg.layer_steps, "tokens": self.tokens,
                   "seconds": self.seconds, "params": self.cfg.params,
                   "trained_params": sum(p.numel() for p in self.trainable), "precision": self.precision,
                   "device": str(self.device), "world_size": self.world, "skipped_steps": self.guard.bad_steps,
                   "history": self.history, "block_errors": self.errors,
                   "converted": self.history[0], "final": final}
        if self.rank == 0:
            write_json_atomic(self.run_dir / "summary.json", summary)
        return summary


def _bar(total: int, initial: int, enabled: bool, name: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=f"distill {name}", dynamic_ncols=True)
