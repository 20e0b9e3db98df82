"""What ``tucker-attn convert`` converts to: ranks checked against every block, budgets turned into
settings (plans), the settings only a measurement settles (:mod:`.choose`), and
:func:`convert_model`, the conversion of a loaded, calibrated model that :mod:`.convert_command`
(and ``benchmarks/pretrained.py``) run.
"""

from __future__ import annotations

import math

from torch import nn

from ...accounting import attention_param_count, kv_cache_floats_per_token
from ...settings.convert import BUDGET, ConvertConfig, ConvertError
from ...tensors import METHODS, SettingError, conversion_method, tucker_highs  # noqa: F401  (re-exported)

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
        raise ConvertError(argument, f"must be {BUDGET}, got {value!r}")
    return max(1, int(value * total)) if value <= 1 else int(value)


def _describe_budget(argument: str, value, limit: int, total: int) -> str:
    what = "attention parameters" if argument == "budget_params" else "KV floats per token"
    share = f"{value:g} of the source's {total:,} {what} = {limit:,}" if value <= 1 else f"{limit:,} {what}"
    return f"{share} ({limit / total:.3f} of the source's)" if value > 1 else share


def check_setting(layers: dict, method: str, ranks, value_ranks=None) -> bool:
    """Ranks against every block's dimensions (the method's ``check``); ConvertError('ranks' / 'value_ranks')
    otherwise. Returns whether the ranks are every block's full ranks (tucker: :func:`tucker_highs`)."""
    record = conversion_method(method)

    def ints(argument, values):
        values = tuple(values) if isinstance(values, (tuple, list)) else (values,)
        if len(values) not in record.counts or any(isinstance(v, bool) or not isinstance(v, int) or v < 1
                                                   for v in values):
            raise ConvertError(argument, f"{method} takes {' or '.join(map(str, record.counts))} positive integers, "
                                         f"got {values}")
        return values

    if value_ranks is not None and "value_ranks" not in record.options:
        takers = " / ".join(m for m in METHODS if "value_ranks" in conversion_method(m).options)
        raise ConvertError("value_ranks", f"value ranks are for --method {takers}, not {method}")
    setting = record.normal(ints("ranks", ranks))
    value_ranks = ints("value_ranks", value_ranks) if value_ranks is not None else None
    full = True
    for path, layer in layers.items():
        try:
            full = record.check(path, layer, setting, value_ranks) and full
        except SettingError as err:
            raise ConvertError(err.argument, err.message) from None
    return full


def setting_label(method: str, ranks, value_ranks=None) -> str:
    """'full rank', 'ranks (2, 16, 8)', 'n_kv_heads 2', 'kv_rank 8, q_rank 4', 'per-layer ranks (2 layers)', ...;
    per-layer settings that are all equal are labelled as that one setting."""
    if isinstance(ranks, list) and len({str(r) for r in ranks}) == 1 and (
            value_ranks is None or len({str(v) for v in value_ranks}) == 1):
        ranks, value_ranks = ranks[0], value_ranks[0] if value_ranks is not None else None
    return conversion_method(method).label(ranks, value_ranks)


def normalized_ranks(method: str, ranks, value_ranks, layers: dict):
    """The ranks as ``convert`` takes them (None: full rank), checked against every block."""
    if ranks is None or ranks == "full":
        return None, None
    ranks = conversion_method(method).normal(ranks)
    value_ranks = tuple(value_ranks) if value_ranks is not None else None
    if check_setting(layers, method, ranks, value_ranks):
        return None, None                              # every block's full ranks: the exact conversion
    return ranks, value_ranks


def budget_limits(budgets: dict, layers: dict):
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


def conversion_settings(model, method: str, layers: dict, ranks, value_ranks, budget, stats) -> tuple[list, dict]:
    """The settings to convert with ([(ranks, value_ranks)]: one, or the plans at the key widths the
    method measures under a parameter budget, ``plan_widths``) and {setting index: plan table}; a budget
    is planned on the layers whitened by ``stats`` when the method's plan reads the weights."""
    from .convert import planning_layers

    if budget is None:
        return [(ranks, value_ranks)], {}
    record, limits = conversion_method(method), budget[4]
    how = {"query_latent": budget[0] == "budget_kv"} if "query_latent" in record.plan_options else {}
    planning = planning_layers(model, stats, method) if record.plan_reads_weights else layers
    widths = [None]
    if record.plan_widths is not None and budget[0] == "budget_params":     # the key width is free: measure some
        widths = record.plan_widths(layers)

    def plan(width):
        return record.plan(planning, **limits, **how, **({} if width is None else {"r3": width}))

    plans = []
    for width in widths:
        try:
            plans.append(plan(width))
        except ValueError:
            continue
    if not plans:                                       # none fits: the smallest one's error names why
        _planned(budget, method, lambda: plan(widths[0]))
    return [p.pair for p in plans], {i: p.table() for i, p in enumerate(plans)}


def _allocation(allocation: str, method: str, settings: list, layers: dict) -> str:
    """'measured' or 'uniform': 'auto' measures where it can move KV (tucker / mla, one setting for every
    layer of two or more); an explicit 'measured' where it cannot is a ConvertError."""
    from .allocation import common_setting

    uniform = all(common_setting(setting) is not None for setting in settings)
    possible = (conversion_method(method).levels is not None and uniform and len(layers) > 1
                and settings != [(None, None)])
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

    config = ConvertConfig(method, ranks=ranks, value_ranks=value_ranks, budget_params=budget_params,
                           budget_kv=budget_kv, partial_rope=partial_rope, allocation=allocation, qk_norm=qk_norm)
    layers = attention_layers(model, lazy=True)           # read block by block: one float32 copy at a time
    ranks, value_ranks = normalized_ranks(method, config.ranks, config.value_ranks, layers)
    budget = budget_limits(config.budgets, layers)
    settings, plans = conversion_settings(model, method, layers, ranks, value_ranks, budget, statistics)
    layers = {path: layer.to("meta") for path, layer in layers.items()}    # their structure only from here on
    refits = []
    if budget is not None and conversion_method(method).norm_forms:
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


