"""The built-in conversion methods, registered in :mod:`.methods`: 'tucker' (truncated HOSVD,
:func:`~.convert.compress`), 'gqa' and 'mla' (the SVD baselines, :func:`~.convert.mha_to_gqa`,
:func:`~.convert.mha_to_mla`), each with its setting's checks against a source layer, its planner
(:mod:`.budget`) and its KV steps (a measured per-layer allocation, ``tucker_attention.hf``).
"""

from __future__ import annotations

from ..layers import Attention, make_attention
from .budget import plan_ranks, plan_setting, plan_uniform
from .convert import compress, mha_to_gqa, mha_to_mla
from .exact import to_tucker
from .methods import ConversionMethod, SettingError, register

#: A KV step's share of a setting's KV width (r3 and r3~; MLA's kv_rank) in a per-layer allocation.
STEP_SHARE = 0.25


def even_step(width: int) -> int:
    """The KV step of a width: :data:`STEP_SHARE` of it, even, at least 2."""
    return max(2, round(width * STEP_SHARE / 2) * 2)


def _rope(layer, ignore_rope: bool) -> bool:
    return isinstance(layer, Attention) and layer.rope is not None and not ignore_rope


def _target_options(layer: Attention) -> dict:
    """What an SVD baseline keeps of its source: head width, biases, RoPE (as the target's own), causality."""
    return {"head_dim": getattr(layer, "head_dim", None), "bias": bool(layer.config().get("bias", False)),
            "rope": True if layer.rope is not None else None, "causal": layer.causal}


# -- tucker ----------------------------------------------------------------------------------------

def _to_tucker(layer: Attention, setting, *, ignore_rope: bool = False, value_ranks=None, hosvd: str = "hosvd",
               n_iter: int = 10, nope_fraction: float = 0.0):
    exact_form = _rope(layer, ignore_rope) or (isinstance(layer, Attention) and layer.exact_with_norms())
    if setting is None and not exact_form:                  # full rank: (h, d, d), else the exact form
        setting = (layer.n_heads, layer.d_model, layer.d_model)
    return compress(layer, None if setting is None else tuple(setting), value_ranks, method=hosvd, n_iter=n_iter,
                    ignore_rope=ignore_rope, nope_fraction=nope_fraction)


def tucker_highs(layer: Attention) -> tuple[tuple, tuple, bool]:
    """(largest ranks, largest value ranks, whether they are the exact latent-RoPE form's) of a layer:
    (n_heads, d_model, d_model), or for a RoPE layer its exact form's ranks (the full-rank conversion)."""
    if layer.rope is None:
        highs = (layer.n_heads, layer.d_model, layer.d_model)
        return highs, highs, False
    exact = to_tucker(layer.linearized())
    return tuple(exact.ranks), tuple(exact.value_ranks), True


def _check_tucker(path: str, layer: Attention, ranks: tuple, value_ranks) -> bool:
    rank_highs, value_highs, exact = tucker_highs(layer)
    for argument, values, highs in (("ranks", ranks, rank_highs), ("value_ranks", value_ranks, value_highs)):
        for i, (r, high) in enumerate(zip(values or (), highs)):
            if r > high:
                mode = "n_heads" if i == 0 else "d_model" if not exact else "the exact form's"
                what = "the exact latent-RoPE form's ranks" if exact else "(n_heads, d_model, d_model)"
                raise SettingError(argument, f"{values}: r{i + 1}={r} exceeds {mode}={high} of block {path} "
                                             f"(Tucker ranks are at most {what} = {highs})")
    if layer.rope is not None and ranks[2] % 2:
        raise SettingError("ranks", f"{ranks}: r3 must be even, block {path} uses RoPE (latent RoPE rotates pairs "
                                    f"of the r3 coordinates)")
    return ranks == rank_highs and (value_ranks or ranks) == value_highs


def _plan_tucker(layers, *, params=None, kv=None, r3: int | None = None):
    """Energy-level ranks per layer (:func:`~.budget.plan_ranks`), or one setting for every layer
    (:func:`~.budget.plan_uniform`, key width ``r3``) when a layer uses RoPE or ``r3`` is given."""
    if r3 is not None or any(layer.rope is not None for layer in layers.values()):
        return plan_uniform(layers, params=params, kv=kv, r3=r3)
    return plan_ranks(layers, params=params, kv=kv)


def tucker_widths(layers) -> list[int | None]:
    """The key widths (r3) a parameter budget's plan is measured at: three below the exact forms' for
    RoPE layers (the key width is free there), else [None] (the plan's own)."""
    if not any(layer.rope is not None for layer in layers.values()):
        return [None]
    top = min(to_tucker(layer.linearized()).ranks[2] for layer in layers.values())
    return sorted({max(2, top // f // 2 * 2) for f in (8, 4, 2)})


class TuckerLevels:
    """KV steps of a Tucker setting ((ranks, value_ranks)): r3 and r3~ by :func:`even_step` of r3
    (r3~ by its own step when it differs)."""

    @staticmethod
    def setting(pair: tuple, level: int) -> tuple:
        ranks, value_ranks = pair
        (r1, r2, r3), (v1, v2, v3) = ranks, value_ranks if value_ranks is not None else ranks
        step = even_step(r3)
        value_step = step if v3 == r3 else max(1, round(v3 * STEP_SHARE))
        return (r1, r2, r3 + level * step), (v1, v2, v3 + level * value_step)

    @staticmethod
    def fits(layer, pair: tuple) -> bool:
        """A valid setting for ``layer`` whose key and value widths each stay within the source's cache."""
        (r1, r2, r3), (v1, v2, v3) = pair
        spec = layer.cache_spec()
        total = sum(h * w for h, w in spec.values())
        keys, values = (sum(h * w for name, (h, w) in spec.items() if name in side) for side in (("k",), ("v",)))
        if not keys:                                       # one shared latent serves as both
            keys = values = total
        return 2 <= r3 <= min(layer.d_model, r1 * r2, keys) and 1 <= v3 <= min(layer.d_model, v1 * v2, values)

    @staticmethod
    def width(pair: tuple) -> str:
        return f"r3 {pair[0][2]}, r3~ {pair[1][2]}"


TUCKER = ConversionMethod(
    "tucker", names=("ranks",), counts=(3,), syntax="r1,r2,r3", convert=_to_tucker, check=_check_tucker,
    plan=_plan_tucker, plan_options=frozenset({"r3"}), plan_reads_weights=True, plan_widths=tucker_widths,
    options=frozenset({"value_ranks", "hosvd", "n_iter", "nope_fraction"}), keeps_rope=None, norm_forms=True,
    levels=TuckerLevels(), spec_keys=("ranks",), title="Tucker")


# -- gqa -------------------------------------------------------------------------------------------

def _to_gqa(layer: Attention, setting, *, ignore_rope: bool = False):
    native = layer.native_setting("gqa") if setting is None else None      # full rank: the source's key heads
    return mha_to_gqa(layer, setting if setting is not None else native or layer.n_heads, ignore_rope=ignore_rope)


def _check_gqa(path: str, layer: Attention, n_kv: int, value_ranks=None) -> bool:
    h = layer.n_heads
    if n_kv > h or h % n_kv:
        raise SettingError("ranks", f"n_kv_heads={n_kv} must divide n_heads={h} of block {path}; allowed: "
                                    f"{[g for g in range(1, h + 1) if h % g == 0]}")
    return False


def _valid_gqa(layers: list) -> list[int]:
    return [g for g in range(1, min(layer.n_heads for layer in layers) + 1)
            if all(layer.n_heads % g == 0 for layer in layers)]


def _build_gqa(layer: Attention, setting: int) -> Attention:
    return make_attention("gqa", layer.d_model, layer.n_heads, n_kv_heads=setting, **_target_options(layer))


GQA = ConversionMethod(
    "gqa", names=("n_kv_heads",), counts=(1,), syntax="n_kv_heads", convert=_to_gqa, check=_check_gqa,
    plan=lambda layers, **budget: plan_setting(layers, "gqa", **budget), valid=_valid_gqa, build=_build_gqa,
    fixed_kv="n_kv_heads must divide the heads", spec_keys=("n_kv_heads",), short="n_kv", title="GQA")


# -- mla -------------------------------------------------------------------------------------------

def _to_mla(layer: Attention, setting, *, ignore_rope: bool = False, nope_fraction: float = 0.0):
    kv_rank, q_rank = tuple(setting) if isinstance(setting, (tuple, list)) else (setting, None)
    if kv_rank is None and not _rope(layer, ignore_rope):
        kv_rank = layer.d_model
    return mha_to_mla(layer, kv_rank, q_rank, ignore_rope=ignore_rope, nope_fraction=nope_fraction)


def _check_mla(path: str, layer: Attention, setting, value_ranks=None) -> bool:
    values = setting if isinstance(setting, tuple) else (setting,)
    for name, r in zip(("kv_rank", "q_rank"), values):
        high = 2 * layer.d_model if name == "kv_rank" and layer.rope == "head" else layer.d_model
        if r > high:
            what = "2 x d_model (key pairs and value directions)" if high > layer.d_model else "d_model"
            raise SettingError("ranks", f"{name}={r} exceeds {what}={high} of block {path}")
    if layer.rope is not None and values[0] % 2:
        raise SettingError("ranks", f"kv_rank={values[0]} must be even: block {path} uses RoPE, which the MLA layer "
                                    f"applies to its latent (pairs of coordinates)")
    return False


def _valid_mla(layers: list) -> list[int]:
    """Even kv_ranks under RoPE (latent RoPE rotates pairs), up to 2 d_model for head-RoPE sources."""
    step = 2 if any(layer.rope is not None for layer in layers) else 1
    d = min(layer.d_model for layer in layers)
    top = 2 * d if all(layer.rope == "head" for layer in layers) else d
    return list(range(step, top + 1, step))


def _build_mla(layer: Attention, setting) -> Attention:
    kv_rank, q_rank = tuple(setting) if isinstance(setting, (tuple, list)) else (setting, None)
    options = _target_options(layer)
    return make_attention("mla", layer.d_model, layer.n_heads, kv_rank=kv_rank, q_rank=q_rank,
                          down_bias=options["bias"] and layer.rope == "head", **options)


class MLALevels:
    """KV steps of an MLA setting ((kv_rank or (kv_rank, q_rank), None)): kv_rank by :func:`even_step`,
    the query rank kept."""

    @staticmethod
    def setting(pair: tuple, level: int) -> tuple:
        ranks = pair[0]
        kv_rank, rest = (ranks[0], tuple(ranks[1:])) if isinstance(ranks, tuple) else (ranks, ())
        wider = kv_rank + level * even_step(kv_rank)
        return ((wider, *rest) if rest else wider), None

    @staticmethod
    def fits(layer, pair: tuple) -> bool:
        """A kv_rank of at least 2 and at most the source's cache width."""
        kv_rank = pair[0][0] if isinstance(pair[0], tuple) else pair[0]
        return 2 <= kv_rank <= sum(h * w for h, w in layer.cache_spec().values())

    @staticmethod
    def width(pair: tuple) -> str:
        return f"kv_rank {pair[0][0] if isinstance(pair[0], tuple) else pair[0]}"


MLA = ConversionMethod(
    "mla", names=("kv_rank", "q_rank"), counts=(1, 2), syntax="kv_rank or kv_rank,q_rank", convert=_to_mla,
    check=_check_mla, plan=lambda layers, **budget: plan_setting(layers, "mla", **budget),
    plan_options=frozenset({"query_latent"}), valid=_valid_mla, build=_build_mla,
    options=frozenset({"nope_fraction"}), shared_latent=True, levels=MLALevels(), spec_keys=("kv_rank", "q_rank"),
    title="MLA")


for _method in (TUCKER, GQA, MLA):
    register(_method)
