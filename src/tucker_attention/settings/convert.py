"""The settings of a conversion (:class:`ConvertConfig`: the fields of ``tucker-attn convert``'s flags and of
:func:`~tucker_attention.hf.conversion.command.convert_folder`'s keywords) and :class:`ConvertError`, the
bad-argument error of ``convert`` and of the loaders it shares with ``distill`` (which reports its own as
:class:`~tucker_attention.settings.distill.DistillError`). Kept apart from the conversion
(:mod:`tucker_attention.hf`) so that the command line can be built without transformers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._fields import check_fields, typed
from ..tensors.methods import METHODS, conversion_method

#: The dtypes a converted folder may be written in.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: How a budget's KV is spread across layers (:mod:`tucker_attention.hf.conversion.allocation`).
ALLOCATIONS = ("auto", "measured", "uniform")
#: What ``convert`` does with per-head q/k norms below full rank: keep them (key heads formed from the
#: latent, :class:`~tucker_attention.layers.TuckerHeadsAttention`) or linearize them (the absorbed form).
QK_NORMS = ("keep", "linearize")
#: Tokens per calibration / evaluation piece at most, by default.
SEQ_LEN = 512
BUDGET = "a fraction in (0, 1] of the source's or a whole count > 1"


class ConvertError(ValueError):
    """A bad argument of :func:`~tucker_attention.hf.conversion.command.convert_folder`:
    ``argument`` names it (``src``, ``ranks``, ``budget_params``, ``budget_kv``, ``out``, ``calibration``,
    ``dtype``, ...)."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"{argument}: {message}")
        self.argument, self.message = argument, message


@dataclass
class ConvertConfig:
    """One conversion: ``method`` (a registered conversion method) at ``ranks`` (its setting; 'full': full
    rank) or within a budget (``budget_params`` / ``budget_kv``), and how it is calibrated, chosen and
    measured (see :func:`~tucker_attention.hf.conversion.command.convert_folder`). Checked when built:
    every bad value is a :class:`ConvertError` naming the field."""

    method: str = typed(choices=lambda: tuple(METHODS), help="the attention to convert to")
    ranks: int | tuple[int, ...] | str | None = typed(
        None, low=1, choices=("full",),
        help="tucker: r1,r2,r3 or r1,r2,r3/v1,v2,v3 (value ranks); gqa: n_kv_heads; mla: kv_rank or kv_rank,q_rank; "
             "full: full rank (exact, RoPE included)")
    value_ranks: tuple[int, ...] | None = typed(None, low=1)
    budget_params: int | float | None = typed(
        None, low=0, low_open=True, says=BUDGET,
        help="instead of --ranks: the largest setting within F x the source's attention parameters (0 < F <= 1) "
             "or F parameters (F > 1); may go with --budget-kv")
    budget_kv: int | float | None = typed(
        None, low=0, low_open=True, says=BUDGET,
        help="instead of --ranks: the largest setting within F x the source's KV floats per token (0 < F <= 1) "
             "or F floats (F > 1), all layers")
    dtype: str = typed("auto", choices=("auto", *DTYPES),
                       help="dtype of the written weights and of the reported KV bytes (default auto: the "
                            "source's); the conversion itself runs in float32")
    partial_rope: float | str = typed(
        "auto", low=0, high=1, choices=("auto",), says="'auto' or a share in [0, 1] of the lowest RoPE frequencies",
        help="tucker/mla below full rank: the share in [0, 1] of the lowest RoPE frequencies that stop rotating "
             "(0: RoPE exact), or auto (default): chosen by measurement on held-in calibration text")
    allocation: str = typed(
        "auto", choices=ALLOCATIONS,
        help="under a budget: auto (default) also spreads the KV across layers by each layer's measured effect on "
             "the logits (one layer converted at a time, 2 conversions per layer) and keeps that when it measures "
             "better; uniform: one setting for every layer (one cache width, what a paged-attention server sizes "
             "from); measured: insist on measuring")
    qk_norm: str = typed(
        "keep", choices=QK_NORMS,
        help="per-head q/k norms (Qwen3, Gemma 3) under tucker: keep (default): cache the latent and form each key "
             "head from it, normed and rotated, when attending (exact at full rank; more compute, no more cache); "
             "linearize: the absorbed form, each norm its gain x calibration 1/rms")
    model_text: float | str = typed(
        "auto", low=0, high=1, choices=("auto",),
        says="'auto' or a share in [0, 1] of the pieces the model samples itself",
        help="the share in [0, 1] of the calibration and evaluation pieces that a decoder samples itself (its own "
             "text: chat answers through its chat template, or continuations; the evaluation's from other seeds), "
             "the rest from --calibration; auto (default): 0.5 for a decoder with a tokenizer, else 0. Kept in "
             "--out (samples_*.safetensors), reused by a rerun")
    seed: int = typed(0, help="of the sampled text and of random inputs (default 0)")
    seq_len: int = typed(SEQ_LEN, low=1,
                         help="tokens per piece at most (default 512; capped at the model's positions): partial RoPE "
                              "and the allocation are chosen on pieces this long, so give the contexts you will serve")
    n_calibration: int | None = typed(
        None, low=1, help="calibration pieces (default: 8,192 tokens' worth, 16 at 512 tokens; image models 64)")
    n_eval: int | None = typed(
        None, low=1, help="held-out evaluation pieces (default: 4,096 tokens' worth, 8 at 512; image models 16)")
    batch_size: int | None = typed(None, low=1, help="pieces per batch (default: 1,024 tokens' worth, 2 at 512)")
    progress: bool = True

    def __post_init__(self):
        try:
            check_fields(self)
        except (TypeError, ValueError) as err:              # 'model_text must be ...' -> ConvertError('model_text')
            name, _, message = str(err).partition(" ")
            raise ConvertError(name, message) from None
        self._check_together()

    @property
    def budgets(self) -> dict:
        """{'budget_params': .., 'budget_kv': ..}: the budgets given."""
        return {k: v for k, v in (("budget_params", self.budget_params), ("budget_kv", self.budget_kv))
                if v is not None}

    def _check_together(self) -> None:
        """What the fields allow together (and the budgets' whole counts), before anything is loaded."""
        record, budgets = conversion_method(self.method), self.budgets
        for name, value in budgets.items():
            if value > 1 and value != int(value):
                raise ConvertError(name, f"must be {BUDGET}, got {value!r}")
        if self.allocation == "measured" and (record.levels is None or not budgets):
            why = f"{self.method}'s {record.fixed_kv}" if record.levels is None else "ranks were given"
            spread = ", ".join(m for m in METHODS if conversion_method(m).levels is not None)
            raise ConvertError("allocation", f"measured spreads a budget's KV across layers ({spread} with budget_kv / "
                                             f"budget_params); {why}: use uniform or leave it auto")
        if self.ranks is not None and budgets:
            raise ConvertError("ranks", f"give either ranks or a budget ({', '.join(budgets)}), not both")
        if self.ranks is None and not budgets:
            raise ConvertError("ranks", "give ranks or a budget (budget_params / budget_kv); ranks 'full': full rank")
        if budgets and record.plan is None:
            raise ConvertError(next(iter(budgets)), f"{self.method} has no budget planner; give ranks")
        if self.value_ranks is not None and self.ranks in (None, "full"):
            raise ConvertError("value_ranks", "value ranks go with ranks; full rank and a budget set them")
        if self.value_ranks is not None and "value_ranks" not in record.options:
            takers = " / ".join(m for m in METHODS if "value_ranks" in conversion_method(m).options)
            raise ConvertError("value_ranks", f"value ranks are for --method {takers}, not {self.method}")
