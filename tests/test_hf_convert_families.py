"""Converting every decoder family, end to end, on the tiny float64 models of ``tests/tiny.py``.

- Converting to the family's own structure (GQA with its key heads, DeepSeek's MLA with its
  kv_rank) is a copy: the model's logits are unchanged (<= 1e-10 with transformers' float32
  norm internals computed in float64, as in test_hf_families).
- Tucker and MLA at full rank keep head RoPE exactly (latent pairs with the heads' frequencies):
  with transformers' float32 RoPE tables also computed in float64, the logits of every head-RoPE
  family equal the original's to 1e-9 (partial RoPE, scaled frequencies, sliding windows and
  NoPE layers included), and nothing is warned about.
- Families with norms inside the attention (DeepSeek's latent norms; Qwen3 / Gemma 3 q/k norms when
  ``qk_norm='linearize'``, test_tucker_heads has them kept) are linearized: ``convert`` warns once
  per reason, the model runs, and the block errors on a calibration batch are pinned.
- Cached generation equals recomputation (sliding windows shorter than the prompt included),
  the cache holds exactly ``kv_cache_floats_per_token`` per layer, and save/load is exact.
"""

from __future__ import annotations

import warnings

import pytest
import torch

T = pytest.importorskip("transformers", reason="the hf integration tests need transformers (extra 'hf')")

from test_hf_families import float64_internals  # noqa: E402
from tiny import FAMILIES, VOCAB, block_io, build, window_mask  # noqa: E402

from tucker_attention.accounting import kv_cache_floats_per_token  # noqa: E402
from tucker_attention.hf import attention_layers, convert, convert_block, converted_blocks, find_blocks  # noqa: E402
from tucker_attention.tensors import to_tucker  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 9                                                  # longer than the sliding windows (4)
MLA_FAMILIES = ("deepseek_v2", "deepseek_v3", "deepseek_v3_plain")
NORM_FAMILIES = ("qwen3", "gemma3") + MLA_FAMILIES        # norms inside the attention: linearized
HEAD_ROPE = [f for f in FAMILIES if f not in NORM_FAMILIES]

#: Mean relative error of the blocks' outputs after a full-rank Tucker conversion of the families with
#: norms inside the attention (calibration batch of random tokens, unit-scale weights), measured; a
#: change beyond 5 % is a regression.
LINEARIZED_TUCKER_ERROR = {"qwen3": 0.0557, "gemma3": 0.1635, "deepseek_v2": 0.6286, "deepseek_v3": 0.6303,
                           "deepseek_v3_plain": 0.4581}


def ids(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, STEPS), generator=torch.Generator().manual_seed(1))


def implementation(family: str) -> str:
    return "eager" if family == "gemma2" else "sdpa"      # Gemma 2 runs eager only


def float64_rope(model, monkeypatch) -> None:
    """transformers' RoPE tables (float32 angles by design) computed in float64 from the same frequencies."""
    for module in model.modules():
        if "RotaryEmbedding" not in type(module).__name__ or not type(module).__module__.startswith("transformers"):
            continue

        def forward(x, position_ids, layer_type=None, module=module):
            prefix = f"{layer_type}_" if layer_type else ""
            inv_freq = getattr(module, prefix + "inv_freq").double()
            scaling = getattr(module, prefix + "attention_scaling")
            angles = position_ids[..., None].double() * inv_freq
            angles = torch.cat((angles, angles), dim=-1)
            return (angles.cos() * scaling).to(x.dtype), (angles.sin() * scaling).to(x.dtype)
        monkeypatch.setattr(module, "forward", forward)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_familys_own_structure_converts_exactly(family, monkeypatch):
    model = build(family, unit_scale=True)
    model.set_attn_implementation(implementation(family))
    float64_internals(model, monkeypatch)
    tokens = ids()
    with torch.no_grad():
        want = model(input_ids=tokens).logits
    native = "mla" if family in MLA_FAMILIES else "gqa"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)       # exact: no warning
        converted = convert(model, native, inplace=False)
    with torch.no_grad():
        got = converted(input_ids=tokens).logits
    tolerance = 1e-10 if family not in MLA_FAMILIES else 1e-6   # DeepSeek: its RoPE tables are float32 in HF
    assert (got - want).abs().max() <= tolerance


def _float64_source(family: str, attention: str, monkeypatch):
    """(tiny model of ``family`` computing in float64 throughout, token ids, its logits on them)."""
    model = build(family, unit_scale=True)
    model.set_attn_implementation(attention)
    float64_internals(model, monkeypatch)
    float64_rope(model, monkeypatch)
    tokens = ids()
    with torch.no_grad():
        return model, tokens, model(input_ids=tokens).logits


@pytest.mark.parametrize("method", ["tucker", "mla"])
@pytest.mark.parametrize("family", HEAD_ROPE)
def test_full_rank_keeps_head_rope_exactly(family, method, monkeypatch):
    model, tokens, want = _float64_source(family, implementation(family), monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)       # exact: no warning
        converted = convert(model, method, inplace=False)
    assert all(b.layer.rope == "latent" for b in converted_blocks(converted).values() if b.layer.rope)
    with torch.no_grad():
        got = converted(input_ids=tokens).logits
    assert (got - want).abs().max() <= 1e-9
    cached = converted.generate(tokens, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, converted.generate(tokens, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                                  use_cache=False))


@pytest.mark.parametrize("family", NORM_FAMILIES)
def test_linearized_families_warn_once_per_reason_and_their_error_is_pinned(family):
    model = build(family, unit_scale=True)
    model.set_attn_implementation(implementation(family))
    io = block_io(model, input_ids=ids())
    layers = attention_layers(model)
    masks = {b.path: window_mask(STEPS, b.sliding_window) for b in find_blocks(model)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = convert(model, "tucker", inplace=False, qk_norm="linearize")
    messages = [str(w.message) for w in caught if "full rank" in str(w.message)]
    assert len(messages) == 1 and "in 2 of 2 blocks" in messages[0] and "linearized" in messages[0]
    with torch.no_grad():
        assert torch.isfinite(converted(input_ids=ids()).logits).all()
        errors = [((convert_block(layers[p], "tucker", qk_norm="linearize")(x, attn_mask=masks[p]) - y).norm()
                   / y.norm()).item()
                  for p, (x, y) in io.items()]
    assert sum(errors) / len(errors) == pytest.approx(LINEARIZED_TUCKER_ERROR[family], rel=0.05)


def _kv_quarter(layer) -> tuple[int, int, int]:
    """The exact latent form's head and query ranks, and a key latent of 1/8 of the layer's KV floats."""
    exact = to_tucker(layer.linearized())
    return (*exact.ranks[:2], max(2, kv_cache_floats_per_token(layer) // 8 // 2 * 2))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_4x_smaller_cache_generates_like_recomputation_and_holds_what_it_promises(family, tmp_path):
    model = build(family, unit_scale=True)
    model.set_attn_implementation(implementation(family))
    ranks = {path: _kv_quarter(layer) for path, layer in attention_layers(model).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        converted = convert(model, "tucker", ranks, inplace=False)
    tokens = ids()
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0                                         # left padding
    options = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    out = converted.generate(tokens, return_dict_in_generate=True, **options)
    assert torch.equal(out.sequences, converted.generate(tokens, use_cache=False, **options))
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    blocks = list(converted_blocks(converted).values())
    for layer, block in zip(cache.layers, blocks):
        held = layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        assert held // (layer.keys.shape[0] * layer.keys.shape[2]) == kv_cache_floats_per_token(block.layer) * 8
        assert 4 * kv_cache_floats_per_token(block.layer) <= kv_cache_floats_per_token(
            attention_layers(model)[next(p for p, b in converted_blocks(converted).items() if b is block)])
    converted.save_pretrained(tmp_path)
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True,
                                                    attn_implementation=implementation(family))
    with torch.no_grad():
        # Gemma: transformers' own save/load of the float64 original already differs by ~1e-6 (its
        # non-persistent embedding normalizer is rebuilt in float32); every other family: rounding only.
        tolerance = 1e-5 if family.startswith("gemma") else 1e-12
        assert (loaded(input_ids=tokens).logits - converted(input_ids=tokens).logits).abs().max() < tolerance


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_one_key_head_keeps_its_q_k_norms_exactly(family, monkeypatch, tmp_path):
    """With one key head the latent is that head, so the q/k norms stay: full-rank Tucker is exact."""
    import tiny

    name, make_config, structure, cls = FAMILIES[family]
    monkeypatch.setitem(tiny.FAMILIES, family, (name, lambda: _one_key_head(make_config()), structure, cls))
    model, tokens, want = _float64_source(family, "sdpa", monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)       # exact: nothing linearized
        converted = convert(model, "tucker", inplace=False)
    assert all(b.layer.q_norm is not None for b in converted_blocks(converted).values())
    with torch.no_grad():
        got = converted(input_ids=tokens).logits
    assert (got - want).abs().max() <= 1e-9
    converted.save_pretrained(tmp_path)                     # the norms travel in the saved config and weights
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, attn_implementation="sdpa")
    float64_internals(loaded, monkeypatch)
    float64_rope(loaded, monkeypatch)
    with torch.no_grad():                                   # Gemma's embedding normalizer reloads in float32
        assert (loaded(input_ids=tokens).logits - got).abs().max() <= (1e-5 if family == "gemma3" else 1e-9)
    with pytest.warns(UserWarning, match="linearized"):    # truncated, absorbed: linearized, and said so
        convert(model, "tucker", ranks=(4, 16, 8), inplace=False, qk_norm="linearize")


def _one_key_head(config):
    config.num_key_value_heads = 1
    return config
