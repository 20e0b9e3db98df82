"""Tiny random models of every decoder family the reader supports (transformers classes).

For tests, benchmarks and examples: 2 layers, d_model 32, 4 heads, every projection bias and
norm gain random, float64, eager attention (Gemma 2 builds with nothing else; switch with
``model.set_attn_implementation``). Nothing is downloaded.
"""

from __future__ import annotations

import torch

from tucker_attention.hf.modeling.blocks import window_mask  # noqa: F401 (tests import it from here)
from tucker_attention.layers import GroupedQueryAttention, MultiHeadAttention, MultiHeadLatentAttention


def _transformers():
    import transformers

    return transformers


D, HEADS, VOCAB, SEQ = 32, 4, 64, 7
COMMON = {"hidden_size": D, "num_attention_heads": HEADS, "intermediate_size": 2 * D, "num_hidden_layers": 2,
          "vocab_size": VOCAB, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
MLA_SIZES = {"kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8, "v_head_dim": 8,
             "n_routed_experts": 4, "moe_intermediate_size": 16, "num_experts_per_tok": 2, "n_group": 1,
             "topk_group": 1, "first_k_dense_replace": 2, "attention_bias": True}

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "mscale": 1.0,
        "mscale_all_dim": 1.0, "rope_theta": 10000.0, "beta_fast": 32, "beta_slow": 1}


def _family_configs():
    """{family: (model class name, config factory, attention structure, our layer class)}."""
    T = _transformers()
    return {
        "llama": ("LlamaForCausalLM", lambda: T.LlamaConfig(num_key_value_heads=2, attention_bias=True,
                                                            rope_theta=500.0, **COMMON), "proj", GroupedQueryAttention),
        "mistral": ("MistralForCausalLM", lambda: T.MistralConfig(num_key_value_heads=2, head_dim=16, sliding_window=4,
                                                                  **COMMON), "proj", GroupedQueryAttention),
        "qwen2": ("Qwen2ForCausalLM", lambda: T.Qwen2Config(num_key_value_heads=2, **COMMON), "proj",
                  GroupedQueryAttention),
        "qwen3": ("Qwen3ForCausalLM", lambda: T.Qwen3Config(num_key_value_heads=2, head_dim=16, attention_bias=True,
                                                            **COMMON), "proj", GroupedQueryAttention),
        "gemma2": ("Gemma2ForCausalLM", lambda: T.Gemma2Config(num_key_value_heads=2, head_dim=16,
                                                               query_pre_attn_scalar=24, attn_logit_softcapping=None,
                                                               sliding_window=4, **COMMON), "proj",
                   GroupedQueryAttention),
        "gemma3": ("Gemma3ForCausalLM", lambda: T.Gemma3TextConfig(
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}},
            **COMMON), "proj", GroupedQueryAttention),
        "smollm3": ("SmolLM3ForCausalLM", lambda: T.SmolLM3Config(num_key_value_heads=2, no_rope_layers=[1, 0],
                                                                  **COMMON), "proj", GroupedQueryAttention),
        "phi3": ("Phi3ForCausalLM", lambda: T.Phi3Config(num_key_value_heads=2, partial_rotary_factor=0.5, **COMMON),
                 "qkv_proj", GroupedQueryAttention),
        "neox": ("GPTNeoXForCausalLM", lambda: T.GPTNeoXConfig(rotary_pct=0.5, attention_bias=True, **COMMON),
                 "neox", MultiHeadAttention),
        "deepseek_v2": ("DeepseekV2ForCausalLM", lambda: T.DeepseekV2Config(   # YaRN attention factor != 1
            q_lora_rank=12, rope_parameters={**YARN, "mscale_all_dim": 0.5}, **MLA_SIZES, **COMMON),
                        "mla", MultiHeadLatentAttention),
        "deepseek_v3": ("DeepseekV3ForCausalLM", lambda: T.DeepseekV3Config(
            num_key_value_heads=HEADS, q_lora_rank=12, rope_parameters=YARN, **MLA_SIZES, **COMMON),
            "mla", MultiHeadLatentAttention),
        "deepseek_v3_plain": ("DeepseekV3ForCausalLM", lambda: T.DeepseekV3Config(
            num_key_value_heads=HEADS, q_lora_rank=None, rope_interleave=False, **MLA_SIZES, **COMMON),
            "mla", MultiHeadLatentAttention),
    }





FAMILIES = _family_configs()


def build(family: str, *, seed: int = 0, unit_scale: bool = False):
    """A tiny float64 model of ``family`` in eval mode, biases and norm gains random.

    unit_scale: every Linear weight N(0, 1/fan_in) and bias N(0, 0.1^2), so attention shapes the
    outputs (the default init, std 0.02 with biases 0.5, leaves them to the biases: conversion
    errors would hardly show).
    """
    cls_name, make_config, _, _ = FAMILIES[family]
    torch.manual_seed(seed)
    config = make_config()
    config._attn_implementation = "eager"                 # Gemma 2 refuses to build with sdpa
    model = getattr(_transformers(), cls_name)(config).double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.5)
            if "RMSNorm" in type(module).__name__:
                module.weight.normal_(0.0, 0.5)
        if unit_scale:
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.normal_(0.0, module.in_features ** -0.5)
                    if module.bias is not None:
                        module.bias.normal_(0.0, 0.1)
    return model


def block_io(model, **inputs) -> dict:
    """{block path: (input (B, T, d), output (B, T, d))} of every attention block in one forward."""
    from tucker_attention.hf.families.reading import find_blocks

    captured, handles = {}, []
    for block in find_blocks(model):
        def hook(module, args, kwargs, out, path=block.path):
            x = args[0] if args else kwargs["hidden_states"]
            captured[path] = (x.detach(), out[0].detach())
        handles.append(model.get_submodule(block.path).register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured
