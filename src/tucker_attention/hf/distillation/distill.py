"""Recovery of a converted causal LM: knowledge distillation from the original it was converted from,
a job of the one training loop (:class:`~tucker_attention.training.loop.Loop`).

Two phases, one run (``tucker-attn distill``, :func:`~.command.distill_folder`; the job is :func:`distill`),
each minimizing a loss chosen by name (:data:`~.losses.LOSSES`, :func:`~.losses.register_loss`):

1. **per-layer** (``layer_steps``, ``layer_loss`` default ``"block-error"``): every converted attention
   block learns to give the original block's output on the original's own block inputs (hooks on
   the original's attention modules catch their inputs and outputs). The loss is the mean over
   blocks of the relative squared error ||y_student - y||² / ||y||²; each block's gradient comes
   from its own output only, so nothing is back-propagated through the network (cheap, and every
   block is fixed at once).
2. **end-to-end** (``steps``, ``loss`` default ``"logit-kl"``): the next-token KL(original ‖ converted)
   over every position of the window, back-propagated through the whole converted model.

Only the converted blocks' parameters train by default (``params="all"``: every parameter).
Training windows are random ``seq_len``-token windows of the data's training split (a folder of
``tucker-attn prepare-data`` made with the model's tokenizer, or the built-in Shakespeare plays
outside the held-out ones); held-out KL, top-1 agreement and perplexity are measured on fixed
windows of its validation split before, between and after the phases and every
``eval_interval`` steps. The run folder holds verified checkpoints (only the trained
parameters), ``metrics.jsonl`` and ``summary.json``; ``resume=True`` continues from the newest
intact checkpoint and ends where an uninterrupted run ends. DDP (``torchrun``): every process
draws the same global batch and trains on its slice; DDP averages the gradients of the trained
parameters only (the teacher and the student's frozen weights stay outside it). bf16 autocast on
CUDA (``precision``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from ...settings.distill import LATER_FIELDS, DistillConfig
from ...training.checkpoint import write_json_atomic
from ...training.loop import Job, Loop, adamw, lr_schedule
from ..conversion.convert import converted_blocks
from ..conversion.fidelity import fidelity
from ..families.reading import layer_stack
from .data import TokenData
from .losses import block_errors, check_pair, get_loss, share_frozen, trained_modules

__all__ = ["DistillConfig", "block_errors", "check_pair", "distill", "lr_scales", "trained_modules"]


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
    optimizer = adamw(groups, cfg, torch.device(device))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg, total))


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
    tensors (:func:`~.losses.share_frozen`): both models fit in the memory of one.
    """
    cfg = config or DistillConfig()
    check_pair(teacher, student)
    if cfg.params == "attention":
        share_frozen(teacher, student)
    flags = {p: p.requires_grad for m in (teacher, student) for p in m.parameters()}
    try:
        with Loop(cfg, run_dir, resume=resume, overwrite=overwrite) as loop:
            data.check_seq_len(cfg.seq_len)
            loop.hold()                              # rank 0 holds the folder; the others learn whether it could
            with _checkpointed_layers(student, cfg.activation_checkpointing):
                return loop.run(_DistillJob(teacher, student, data, cfg, loop, on_step))
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


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


class _Objective(nn.Module):
    """What DDP wraps in a distillation: the trained module as its only submodule (so DDP holds the
    trained parameters alone; the frozen teacher and student stay outside), whose forward is the
    phase's loss ``fn(teacher, student, input_ids, blocks)`` of a micro-batch of ids (B, T)."""

    def __init__(self, trained: nn.Module, teacher: nn.Module, student: nn.Module, blocks: list[str]):
        super().__init__()
        self.trained, self.models, self.blocks, self.fn = trained, (teacher, student), blocks, None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.fn(*self.models, input_ids, self.blocks)


class _DistillJob(Job):
    """What :func:`distill` gives the loop: the trained blocks (or model), windows of the data, each
    phase's loss and optimizer, the held-out records and block errors, the summary."""

    def __init__(self, teacher, student, data: TokenData, cfg: DistillConfig, loop: Loop, on_step):
        self.teacher, self.student, self.data, self.cfg, self.loop, self.on_step = (teacher, student, data, cfg,
                                                                                     loop, on_step)
        self.steps, self.label, self.data_seed = cfg.layer_steps + cfg.steps, f"distill {loop.run_dir.name}", cfg.seed
        self.blocks = list(converted_blocks(student))
        self.holder = trained_modules(student, cfg.params)
        teacher.to(loop.device).eval().requires_grad_(False)
        student.to(loop.device).eval().requires_grad_(False)     # dropout off: the teacher's outputs are exact
        self.trainable = [p.requires_grad_(True) for p in self.holder.parameters()]
        d_model = next(iter(converted_blocks(student).values())).layer.d_model
        self.scales = lr_scales(self.trainable, d_model, cfg.lr_rule)
        self.eval_batches = data.eval_batches(cfg.seq_len, cfg.eval_windows, loop.device)
        self._objective = _Objective(self.holder, teacher, student, self.blocks)
        self.tokens, self.history, self.errors, self.phase = 0, [], {}, None

    def trained(self) -> nn.Module:
        return self.holder

    def objective(self) -> nn.Module:
        return self._objective

    def check_resumed(self, path: Path, state: dict, module: nn.Module) -> None:
        stored, fixed = {**LATER_FIELDS, **state["config"]}, self.cfg.fixed()   # runs written before a field existed
        if stored != fixed:
            changed = sorted(k for k in fixed if stored.get(k) != fixed[k])
            raise ValueError(f"run folder {str(self.loop.run_dir)!r} was distilled with other settings "
                             f"({', '.join(changed)} differ); resume it with its own (only steps may change)")

    def start(self, state: dict | None) -> None:
        loop = self.loop
        if state is not None:
            self.tokens, self.history = state["tokens"], json.loads(state["history"])
            self.errors = json.loads(state["errors"])
        self._start_phase(_phase(loop.step, self.cfg))
        if state is not None and state["phase"] == self.phase:   # a checkpoint at a phase's end starts the next afresh
            try:
                loop.optimizer.load_state_dict(state["optimizer"])
            except ValueError as err:
                raise ValueError(f"run folder {str(loop.run_dir)!r}: its optimizer state does not fit this version's "
                                 f"optimizer ({err}); start a new run (another --run-dir)") from None
            loop.schedule.load_state_dict(state["schedule"])

    def _start_phase(self, phase: str) -> None:
        self.phase = phase
        self.find_unused = self.cfg.params == "all" and phase == "layer"   # the rest of the model gets no gradient
        self.loop.optimizer, self.loop.schedule = _make_optimizer(self.trainable, self.scales, self.cfg, phase,
                                                                  self.loop.device)
        self._objective.fn = get_loss(self.cfg.layer_loss if phase == "layer" else self.cfg.loss)

    def begin(self) -> None:
        if self.loop.step == 0:
            self._record("converted")
            if self.cfg.layer_steps:
                self.errors["before"] = block_errors(self.teacher, self.student, self.eval_batches[:2])

    def before_step(self) -> None:
        if _phase(self.loop.step, self.cfg) != self.phase:
            self._start_phase(_phase(self.loop.step, self.cfg))
            self.loop.wrap()                          # DDP of the new phase

    def batch(self, generator: torch.Generator) -> list:
        """This process's rows of the step's global batch of ids (batch_size × grad_accum_steps, seq_len)."""
        cfg, loop = self.cfg, self.loop
        ids = self.data.train_batch(generator, cfg.batch_size * cfg.grad_accum_steps, cfg.seq_len)
        self.tokens += ids.numel()
        return list(ids[loop.rank::loop.world].to(loop.device).chunk(cfg.grad_accum_steps))

    def loss(self, net: nn.Module, micro: torch.Tensor) -> torch.Tensor:
        return net(micro)

    def after_step(self, loss: float, grad_norm: float, good: bool) -> None:
        """The step's record; held-out scores at the end of a phase and every ``eval_interval`` steps;
        a checkpoint every ``checkpoint_interval`` steps and at the end of each phase."""
        cfg, loop = self.cfg, self.loop
        loop.metrics.log({"step": loop.step, "phase": self.phase, "loss": loss, "grad_norm": grad_norm,
                          "lr": loop.optimizer.param_groups[0]["lr"]})
        loop.bar.set_postfix(phase=self.phase, loss=f"{loss:.4g}")
        end_of_layers = cfg.layer_steps and loop.step == cfg.layer_steps
        if end_of_layers:
            self.errors["after"] = block_errors(self.teacher, self.student, self.eval_batches[:2])
            self._record("per-layer")
        elif loop.step == self.steps or loop.step % cfg.eval_interval == 0:
            self._record("end-to-end" if loop.step == self.steps else self.phase)
        if loop.step % cfg.checkpoint_interval == 0 or loop.step == self.steps or end_of_layers:
            loop.checkpoint()
        if self.on_step is not None:
            self.on_step(loop.step)

    def _record(self, label: str) -> dict:
        loop = self.loop
        scores = _evaluate(self.teacher, self.student, self.eval_batches, loop.autocast)
        record = {"step": loop.step, "phase": label, "tokens": self.tokens, "seconds": round(loop.seconds, 3),
                  **scores}
        self.history.append(record)
        loop.metrics.log(record)
        if loop.rank == 0:
            loop.bar.write(f"step {loop.step} ({label}): held-out KL {scores['kl']:.4f}, top-1 {scores['top1']:.3f}, "
                           f"ppl {scores['ppl']:.2f}")
        return record

    def state(self) -> dict:
        return {"phase": self.phase, "config": self.cfg.fixed(), "tokens": self.tokens,
                "history": json.dumps(self.history), "errors": json.dumps(self.errors)}

    def extra(self) -> dict:
        return {"kind": "distill", "params": self.cfg.params, "blocks": self.blocks}

    def config_record(self) -> dict:
        return dataclasses.asdict(self.cfg)

    def summary(self) -> dict:
        loop = self.loop
        summary = {"steps": loop.step, "layer_steps": self.cfg.layer_steps, "tokens": self.tokens,
                   "seconds": loop.seconds, "params": self.cfg.params,
                   "trained_params": sum(p.numel() for p in self.trainable),
                   "precision": "bf16" if loop.use_bf16 else "fp32", "device": str(loop.device),
                   "world_size": loop.world, "skipped_steps": loop.guard.bad_steps, "history": self.history,
                   "block_errors": self.errors, "converted": self.history[0], "final": self.history[-1]}
        if loop.rank == 0:
            write_json_atomic(loop.run_dir / "summary.json", summary)
        return summary
