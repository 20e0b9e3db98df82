"""What ``tucker-attn convert`` converts to: ranks checked against every block, budgets turned into
settings (plans), the settings only a measurement settles (:mod:`.choose`), and
:func:`convert_model`, the conversion of a loaded, calibrated model that :mod:`.convert_command`
(and ``benchmarks/pretrained.py``) run.
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from ...accounting import attention_param_count, kv_cache_floats_per_token
from ...tensors import to_tucker
from ..sources.original import DTYPES, ConvertError

METHODS = ("tucker", "gqa", "mla")


# -- settings --------------------------------------------------------------------------------------

def plan_setting(model: nn.Module, method: str, *, params=None, kv=None):
    """The largest GQA n_kv_heads / MLA kv_rank of a transformers model for a budget of
    attention parameters or KV floats per token (count, or fraction in (0, 1) of the model's);
    see :func:`tucker_attention.tensors.plan_setting`."""
    from ...tensors import plan_setting as tensor_plan_setting
    from ..families.reading import attention_layers

    return tensor_plan_setting(attention_layers(model), method, params=params, kv=kv)


def _budget_count(argument: str, value, total: int) -> int:
    """A fraction 0 < F <= 1 of ``total``, or an absolute count F > 1."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0
            or value > 1 and value != int(value)):
        raise ConvertError(argument, f"must be a fraction in (0, 1] of the source's or a whole count > 1, got "
                                     f"{value!r}")
    return max(1, int(value * total)) if value <= 1 else int(value)


def _describe_budget(argument: str, value, limit: int, total: int) -> str:
    what = "attention parameters" if argument == "budget_params" else "KV floats per token"
    share = f"{value:g} of the source's {total:,} {what} = {limit:,}" if value <= 1 else f"{limit:,} {what}"
    return f"{share} ({limit / total:.3f} of the source's)" if value > 1 else share


def tucker_highs(layer) -> tuple[tuple, tuple, bool]:
    """(largest ranks, largest value ranks, whether they are the exact latent-RoPE form's) of a block:
    (n_heads, d_model, d_model), or for a RoPE layer its exact form's ranks (the full-rank conversion)."""
    if layer.rope is None:
        highs = (layer.n_heads, layer.d_model, layer.d_model)
        return highs, highs, False
    exact = to_tucker(layer.linearized())
    return tuple(exact.ranks), tuple(exact.value_ranks), True


def check_setting(layers: dict, method: str, ranks, value_ranks=None) -> bool:
    """Ranks against every block's dimensions; ConvertError('ranks' / 'value_ranks') otherwise.
    Returns whether the ranks are every block's full ranks (:func:`tucker_highs`; tucker only)."""
    def ints(argument, values, n):
        values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
        if len(values) not in n or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise ConvertError(argument, f"{method} takes {' or '.join(map(str, n))} positive integers, got {values}")
        return values

    if method == "tucker":
        checks = [("ranks", ints("ranks", ranks, (3,)))]
        if value_ranks is not None:
            checks.append(("value_ranks", ints("value_ranks", value_ranks, (3,))))
        full = True
        for path, layer in layers.items():
            rank_highs, value_highs, exact = tucker_highs(layer)
            for argument, values in checks:
                highs = rank_highs if argument == "ranks" else value_highs
                for i, (r, high) in enumerate(zip(values, highs)):
                    if r > high:
                        mode = "n_heads" if i == 0 else "d_model" if not exact else "the exact form's"
                        what = "the exact latent-RoPE form's ranks" if exact else "(n_heads, d_model, d_model)"
                        raise ConvertError(argument, f"{values}: r{i + 1}={r} exceeds {mode}={high} of block {path} "
                                                     f"(Tucker ranks are at most {what} = {highs})")
            if layer.rope is not None and checks[0][1][2] % 2:
                raise ConvertError("ranks", f"{checks[0][1]}: r3 must be even, block {path} uses RoPE (latent RoPE "
                                            f"rotates pairs of the r3 coordinates)")
            full = full and checks[0][1] == rank_highs and checks[-1][1] == value_highs
        return full
    if value_ranks is not None:
        raise ConvertError("value_ranks", f"value ranks are for --method tucker, not {method}")
    if method == "gqa":
        (n_kv,) = ints("ranks", ranks, (1,))
        for path, layer in layers.items():
            h = layer.n_heads
            if n_kv > h or h % n_kv:
                raise ConvertError("ranks", f"n_kv_heads={n_kv} must divide n_heads={h} of block {path}; allowed: "
                                            f"{[g for g in range(1, h + 1) if h % g == 0]}")
        return
    values = ints("ranks", ranks, (1, 2))
    for path, layer in layers.items():
        for name, r in zip(("kv_rank", "q_rank"), values):
            high = 2 * layer.d_model if name == "kv_rank" and layer.rope == "head" else layer.d_model
            if r > high:
                what = "2 x d_model (key pairs and value directions)" if high > layer.d_model else "d_model"
                raise ConvertError("ranks", f"{name}={r} exceeds {what}={high} of block {path}")
        if layer.rope is not None and values[0] % 2:
            raise ConvertError("ranks", f"kv_rank={values[0]} must be even: block {path} uses RoPE, which the MLA "
                                        f"layer applies to its latent (pairs of coordinates)")


def setting_label(method: str, ranks, value_ranks=None) -> str:
    if ranks is None:
        return "full rank"
    if method == "tucker":
        if isinstance(ranks, list):
            same = len(set(ranks)) == 1 and (value_ranks is None or len(set(value_ranks)) == 1)
            if not same:
                return f"per-layer ranks ({len(ranks)} layers)"
            ranks, value_ranks = ranks[0], value_ranks[0] if value_ranks is not None else None
        return f"ranks {tuple(ranks)}" + (f" / {tuple(value_ranks)}" if value_ranks is not None else "")
    if isinstance(ranks, list):                          # one setting per layer
        return f"per-layer {'n_kv_heads' if method == 'gqa' else 'kv_rank'} ({len(ranks)} layers)"
    if method == "gqa":
        return f"n_kv_heads {ranks}"
    return f"kv_rank {ranks[0]}, q_rank {ranks[1]}" if isinstance(ranks, (tuple, list)) else f"kv_rank {ranks}"


def _check_arguments(method, ranks, value_ranks, budgets: dict, dtype, partial_rope, counts: dict, calibration,
                     model_text="auto", allocation="auto", qk_norm="keep") -> None:
    """Every argument that needs no model, checked before anything is loaded."""
    from .allocation import ALLOCATIONS
    from .convert import QK_NORMS

    if qk_norm not in QK_NORMS:
        raise ConvertError("qk_norm", f"must be one of {list(QK_NORMS)}, got {qk_norm!r}")
    if method not in METHODS:
        raise ConvertError("method", f"must be one of {list(METHODS)}, got {method!r}")
    if allocation not in ALLOCATIONS:
        raise ConvertError("allocation", f"must be one of {list(ALLOCATIONS)}, got {allocation!r}")
    if allocation == "measured" and (method == "gqa" or not budgets):
        why = "gqa's n_kv_heads must divide the heads" if method == "gqa" else "ranks were given"
        raise ConvertError("allocation", f"measured spreads a budget's KV across layers (tucker, mla with "
                                         f"budget_kv / budget_params); {why}: use uniform or leave it auto")
    if ranks is not None and budgets:
        raise ConvertError("ranks", f"give either ranks or a budget ({', '.join(budgets)}), not both")
    if ranks is None and not budgets:
        raise ConvertError("ranks", "give ranks or a budget (budget_params / budget_kv); ranks 'full': full rank")
    if value_ranks is not None and (ranks is None or ranks == "full"):
        raise ConvertError("value_ranks", "value ranks go with ranks; full rank and a budget set them")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConvertError("dtype", f"must be 'auto' or one of {list(DTYPES)}, got {dtype!r}")
    if partial_rope != "auto" and not (isinstance(partial_rope, (int, float)) and not isinstance(partial_rope, bool)
                                       and 0 <= partial_rope <= 1):
        raise ConvertError("partial_rope", f"must be 'auto' or a share in [0, 1] of the lowest RoPE frequencies, "
                                           f"got {partial_rope!r}")
    for name, value in counts.items():
        if value is None and name != "seq_len":            # a default that follows seq_len
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConvertError(name, f"must be a positive integer, got {value!r}")
    if model_text != "auto" and not (isinstance(model_text, (int, float)) and not isinstance(model_text, bool)
                                     and 0 <= model_text <= 1):
        raise ConvertError("model_text", f"must be 'auto' or a share in [0, 1] of the pieces the model samples itself, "
                                         f"got {model_text!r}")
    if calibration is not None and not Path(calibration).exists():
        raise ConvertError("calibration", f"{str(calibration)!r} does not exist (give a text file or a folder of "
                                          f".txt files)")


def _normalized_ranks(method: str, ranks, value_ranks, layers: dict):
    """The ranks as ``convert`` takes them (None: full rank), checked against every block."""
    if ranks is None or ranks == "full":
        return None, None
    if method == "tucker":
        ranks = tuple(ranks)
        value_ranks = tuple(value_ranks) if value_ranks is not None else None
    elif method == "mla" and isinstance(ranks, (tuple, list)):
        ranks = tuple(ranks) if len(ranks) > 1 else ranks[0]
    elif isinstance(ranks, (tuple, list)) and len(ranks) == 1:
        ranks = ranks[0]
    if check_setting(layers, method, ranks, value_ranks):
        return None, None                              # every block's full ranks: the exact conversion
    return ranks, value_ranks


def _budget(budgets: dict, layers: dict):
    """(argument, value, limit, source total, {'params': .., 'kv': ..}) of the budget given (the KV
    one when both are), or None: the limits of both, each at most the source's (a conversion never
    grows either)."""
    if not budgets:
        return None
    totals = {"params": sum(attention_param_count(layer) for layer in layers.values()),
              "kv": sum(kv_cache_floats_per_token(layer) for layer in layers.values())}
    limits = dict(totals)
    for argument, value in budgets.items():
        name = argument.removeprefix("budget_")
        limits[name] = _budget_count(argument, value, totals[name])
    argument = "budget_kv" if "budget_kv" in budgets else "budget_params"
    name = argument.removeprefix("budget_")
    return argument, budgets[argument], limits[name], totals[name], limits


def _planned(budget, method: str, make_plan):
    argument, value, limit, total, limits = budget
    try:
        return make_plan()
    except ValueError as err:
        other = "params" if argument == "budget_kv" else "kv"
        kept = {"params": "attention parameters", "kv": "KV cache"}[other]
        bound = f"{limits[other]:,} floats of {kept}" if other == "kv" else f"{limits[other]:,} {kept}"
        raise ConvertError(argument, f"{_describe_budget(argument, value, limit, total)} is not achievable by "
                                     f"{method} within {bound} ({err}); nothing was converted") from None


def _settings(model, method: str, layers: dict, ranks, value_ranks, budget, stats) -> tuple[list, dict]:
    """The settings to convert with ([(ranks, value_ranks)]: one, or Tucker key widths to measure under a
    parameter budget) and {setting index: plan table}."""
    from ...tensors import plan_setting as tensor_plan_setting
    from .convert import plan_ranks, plan_uniform

    if budget is None:
        return [(ranks, value_ranks)], {}
    limits = budget[4]
    if method != "tucker":
        plan = _planned(budget, method, lambda: tensor_plan_setting(layers, method, **limits,
                                                                   query_latent=budget[0] == "budget_kv"))
        return [(plan.setting, None)], {0: plan.table()}
    if not any(layer.rope is not None for layer in layers.values()):
        plan = _planned(budget, method, lambda: plan_ranks(model, calibration=stats, **limits))
        return [(plan.ranks, plan.value_ranks)], {0: plan.table()}
    widths = [None]
    if budget[0] == "budget_params":                   # the key width is free: measure three
        top = min(to_tucker(layer.linearized()).ranks[2] for layer in layers.values())
        widths = sorted({max(2, top // f // 2 * 2) for f in (8, 4, 2)})
    plans = []
    for width in widths:
        try:
            plans.append(plan_uniform(model, calibration=stats, r3=width, **limits))
        except ValueError:
            continue
    if not plans:                                       # none fits: the smallest one's error names why
        _planned(budget, method, lambda: plan_uniform(model, calibration=stats, r3=widths[0], **limits))
    return [(p.ranks, p.value_ranks) for p in plans], {i: p.table() for i, p in enumerate(plans)}


def _allocation(allocation: str, method: str, settings: list, layers: dict) -> str:
    """'measured' or 'uniform': 'auto' measures where it can move KV (tucker / mla, one setting for every
    layer of two or more); an explicit 'measured' where it cannot is a ConvertError."""
    from .allocation import common_setting

    uniform = all(common_setting(setting) is not None for setting in settings)
    possible = method in ("tucker", "mla") and uniform and len(layers) > 1 and settings != [(None, None)]
    if allocation == "measured" and not possible:
        why = ("the plan already gives each layer its ranks (a source without RoPE: energy-level plan)"
               if not uniform else "the model has one attention block")
        raise ConvertError("allocation", f"measured cannot spread the KV here: {why}; use uniform or leave it auto")
    return "measured" if allocation != "uniform" and possible else "uniform"


def _fit_kept_heads(settings: list, layers: dict, limits: dict, qk_norm: str) -> tuple[list, list[str]]:
    """(settings, notes): Tucker settings with r2 (and r2~) lowered until the layers whose q/k norms are
    kept as key heads (:class:`~tucker_attention.layers.TuckerHeadsAttention`, counted as such) fit the
    parameter limit (the plan counts every layer as the absorbed Tucker form, whose query core is r3
    wide, not head_dim), and a note for each setting lowered."""
    from ...layers import TuckerHeadsAttention
    from ...tensors import heads_form_applies, tucker_param_count
    from .allocation import common_setting

    kept = [layer for layer in layers.values() if heads_form_applies(layer)] if qk_norm == "keep" else []
    if not kept:
        return settings, []

    def cost(ranks, value_ranks) -> int:
        total = 0
        for layer in layers.values():
            if heads_form_applies(layer):
                total += TuckerHeadsAttention.param_count(layer.d_model, layer.n_heads, ranks, value_ranks,
                                                          key_heads=layer.n_kv_heads, head_dim=layer.head_dim)
            else:
                total += tucker_param_count(layer.n_heads, layer.d_model, ranks, value_ranks, bias=False)
        return total

    fitted, notes = [], []
    for setting in settings:
        ranks, value_ranks = common_setting(setting)
        value_ranks = value_ranks or ranks
        low, high = 1, ranks[1]                                     # the largest r2 that fits
        while low < high:
            mid = (low + high + 1) // 2
            fits = cost((ranks[0], mid, ranks[2]), (value_ranks[0], min(mid, value_ranks[1]), value_ranks[2]))
            low, high = (mid, high) if fits <= limits["params"] else (low, mid - 1)
        fitted.append(((ranks[0], low, ranks[2]), (value_ranks[0], min(low, value_ranks[1]), value_ranks[2])))
        if low != ranks[1]:
            notes.append(f"r2 lowered from the plan's {ranks[1]} to {low}: the layers that keep their q/k norms "
                         f"as key heads (head_dim-wide query cores, key up-projections) must fit the parameter "
                         f"budget too")
    return fitted, notes


def convert_model(model: nn.Module, method: str, *, ranks=None, value_ranks=None, budget_params=None,
                  budget_kv=None, partial_rope: str | float = "auto", allocation: str = "auto",
                  qk_norm: str = "keep", statistics, batches, kind: str, progress: bool = False,
                  spill=None) -> tuple[nn.Module, dict]:
    """What :func:`convert_folder` does to a model it has loaded and calibrated: plan the setting,
    choose what only a measurement settles (:mod:`.choose`) and convert a copy.

    model: a loaded transformers model (float32, eval), left unchanged. ranks / value_ranks /
    budget_params / budget_kv / partial_rope: as for :func:`convert_folder` (one of ranks and a
    budget). statistics: :func:`~.calibration.attention_statistics` of ``batches``, the held-in
    calibration batches candidates are measured on. kind: 'decoder' | 'classifier' | 'encoder'.
    allocation: 'auto' | 'measured' | 'uniform': whether a budget's KV is also spread across layers by
    their measured sensitivity (:mod:`.allocation`; 'auto': where it can be) and kept when better.
    qk_norm: 'keep' | 'linearize' per-head q/k norms under Tucker (:func:`~.convert.convert_block`).
    spill: a :class:`~.spill.Spill` for the source's outputs the candidates are measured against.

    Returns (converted model, {'label', 'ranks', 'value_ranks', 'nope_fraction', 'choice' (the
    measurement table or None), 'plan' (the plan table or None), 'notes' (warnings)}).
    """
    from ..families.reading import attention_layers
    from .choose import measured

    budgets = {k: v for k, v in (("budget_params", budget_params), ("budget_kv", budget_kv)) if v is not None}
    _check_arguments(method, ranks, value_ranks, budgets, "auto", partial_rope, {}, None, allocation=allocation,
                     qk_norm=qk_norm)
    layers = attention_layers(model, lazy=True)           # read block by block: one float32 copy at a time
    ranks, value_ranks = _normalized_ranks(method, ranks, value_ranks, layers)
    budget = _budget(budgets, layers)
    settings, plans = _settings(model, method, layers, ranks, value_ranks, budget, statistics)
    layers = {path: layer.to("meta") for path, layer in layers.items()}    # their structure only from here on
    refits = []
    if budget is not None and method == "tucker":
        settings, refits = _fit_kept_heads(settings, layers, budget[4], qk_norm)
    allocation = _allocation(allocation, method, settings, layers)
    choice = measured(model, method, settings, layers, partial_rope, calibration=statistics, batches=batches,
                      kind=kind, allocation=allocation, qk_norm=qk_norm, progress=progress, spill=spill)
    if budget is not None:
        _check_within(budget, method, choice.model)
    ranks, value_ranks = choice.setting
    spread = isinstance(ranks, list) and len(set(ranks)) > 1
    spread_note = ("the layers keep different KV widths (allocated by measured sensitivity), so the folder "
                   "declares no one cache layout a paged-attention server sizes from (num_key_value_heads / "
                   "head_dim); allocation='uniform' keeps one")
    notes = choice.notes + refits[:1] + ([spread_note] if spread and kind == "decoder" else [])
    return choice.model, {"label": setting_label(method, ranks, value_ranks),
                          "ranks": _listed(ranks), "value_ranks": _listed(value_ranks),
                          "nope_fraction": choice.nope_fraction, "choice": choice.table(),
                          "allocation": "measured" if spread else "uniform",
                          "plan": plans.get(choice.index), "notes": notes}


def _check_within(budget, method: str, converted: nn.Module) -> None:
    """Both limits of ``budget`` against what ``converted`` holds (a layer whose parameters the plan counts
    otherwise, e.g. key heads kept for q/k norms, is checked here); ConvertError naming the budget."""
    from .convert import converted_blocks

    layers = [block.layer for block in converted_blocks(converted).values()]
    held = {"params": sum(map(attention_param_count, layers)), "kv": sum(map(kv_cache_floats_per_token, layers))}
    argument, value, limit, total, limits = budget
    for name, what in (("params", "attention parameters"), ("kv", "KV floats per token")):
        if held[name] > limits[name]:
            raise ConvertError(argument, f"{_describe_budget(argument, value, limit, total)}: the {method} "
                                         f"conversion holds {held[name]:,} {what}, over the limit "
                                         f"{limits[name]:,}; nothing was written (give a smaller budget)")


def _listed(ranks):
    """Ranks as JSON keeps them: a tuple as a list, per-layer tuples as lists."""
    if isinstance(ranks, list):
        return [_listed(r) for r in ranks]
    return list(ranks) if isinstance(ranks, tuple) else ranks


