"""The tensor view of attention (PAPER.md §1-§4): tensors, ranks, exact and truncated conversions."""

from .algebra import (
    TuckerTensor,
    energy_rank,
    hooi,
    hosvd,
    mode_product,
    mode_spectra,
    multilinear_ranks,
    numerical_rank,
    top_eigenvectors,
    tucker_to_tensor,
    unfold,
)
from .budget import (
    RankPlan,
    SettingPlan,
    allocate_ranks,
    converted_cost,
    layer_cost,
    plan_ranks,
    plan_setting,
    plan_uniform,
    tucker_param_count,
)
from .builtin_methods import STEP_SHARE, even_step, tucker_highs
from .convert import (
    compress,
    input_transform,
    mha_to_gqa,
    mha_to_mla,
    relative_error,
    to_tucker,
    whitening,
)
from .heads import heads_form_applies, to_tucker_heads, truncate_heads
from .methods import (
    CONVERSIONS,
    METHODS,
    ConversionMethod,
    SettingError,
    conversion_method,
    convert_layer,
    register,
    unregister,
)
from .view import AttentionFactors, HeadFactors, attention_factors, attention_tensors, check_finite, factored_hosvd

__all__ = ["AttentionFactors", "CONVERSIONS", "ConversionMethod", "HeadFactors", "METHODS", "RankPlan", "STEP_SHARE",
           "SettingError", "SettingPlan", "TuckerTensor", "allocate_ranks", "attention_factors", "attention_tensors",
           "check_finite", "compress", "conversion_method", "convert_layer", "converted_cost", "energy_rank",
           "even_step", "factored_hosvd", "heads_form_applies", "hooi", "hosvd", "input_transform", "layer_cost",
           "mha_to_gqa", "mha_to_mla", "mode_product", "mode_spectra", "multilinear_ranks", "numerical_rank",
           "plan_ranks", "plan_setting", "plan_uniform", "register", "relative_error", "to_tucker",
           "to_tucker_heads", "top_eigenvectors", "truncate_heads", "tucker_highs", "tucker_param_count",
           "tucker_to_tensor", "unfold", "unregister", "whitening"]
