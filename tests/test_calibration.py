"""Activation-aware conversion: input transforms, whitening, block input statistics."""

import pytest
import torch
from conftest import randomize_

from tucker_attention import make_attention
from tucker_attention.layers import MultiHeadAttention
from tucker_attention.tensors import input_transform, whitening

D, H = 32, 4


def _anisotropic(n: int, seed: int) -> torch.Tensor:
    """(1, n, D) inputs whose directions have scales 3 ... 0.003 (like real hidden states)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(99), dtype=torch.float64)).Q
    scales = 3.0 * 0.8 ** torch.arange(D, dtype=torch.float64)
    return ((torch.randn(n, D, generator=g, dtype=torch.float64) * scales) @ basis.T)[None]


def test_input_transform_is_the_layer_on_transformed_inputs(config):
    method, kwargs = config
    torch.manual_seed(0)
    layer = randomize_(make_attention(method, D, H, **kwargs)).double().eval()
    M = torch.randn(D, D, dtype=torch.float64)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    moved = input_transform(layer, M)
    torch.testing.assert_close(moved(x), layer(x @ M), atol=1e-10, rtol=1e-9)
    assert type(moved) is type(layer) and moved.config() == layer.config()
    torch.testing.assert_close(layer(x), input_transform(layer, torch.eye(D))(x), atol=0, rtol=0)


def test_input_transform_keeps_dtype_and_checks_shape():
    layer = MultiHeadAttention(D, H)
    assert input_transform(layer, torch.eye(D, dtype=torch.float64)).q_proj.weight.dtype == torch.float32
    with pytest.raises(ValueError, match=r"matrix must be \(d_model, d_model\) = \(32, 32\), got \(32, 31\)"):
        input_transform(layer, torch.eye(D)[:, :31])


def test_whitening_is_a_regularized_square_root_and_its_inverse():
    x = _anisotropic(500, 0)[0]
    sigma = x.T @ x / len(x)
    S, S_inv = whitening(sigma, eps=1e-3)
    mean = torch.linalg.eigvalsh(sigma).mean()
    torch.testing.assert_close(S @ S, sigma + 1e-3 * mean * torch.eye(D, dtype=torch.float64))
    torch.testing.assert_close(S @ S_inv, torch.eye(D, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(S, S.T)
    rank_one = torch.outer(torch.ones(D), torch.ones(D))          # singular: still invertible after eps
    S, S_inv = whitening(rank_one)
    assert torch.isfinite(S_inv).all()
    with pytest.raises(ValueError, match="no inputs were recorded"):
        whitening(torch.zeros(D, D))
    with pytest.raises(ValueError, match="finite square"):
        whitening(torch.ones(D, D - 1))


@pytest.mark.parametrize("method, ranks", [("tucker", (4, 8, 6)), ("gqa", 1), ("mla", 6)])
def test_calibrated_truncation_is_closer_on_such_inputs(method, ranks):
    """Truncating in whitened coordinates beats truncating the weights, on fresh inputs of the same law."""
    from tucker_attention.hf import convert_block

    torch.manual_seed(0)
    layer = randomize_(MultiHeadAttention(D, H, bias=True)).double().eval()
    calib, fresh = _anisotropic(2000, 1), _anisotropic(400, 2)
    sigma = calib[0].T @ calib[0] / calib.shape[1]
    errors = {}
    with torch.no_grad():
        want = layer(fresh)
        for name, cov in (("weights", None), ("calibrated", sigma)):
            converted = convert_block(layer, method, ranks, input_cov=cov)
            errors[name] = float((converted(fresh) - want).norm() / want.norm())
    assert errors["calibrated"] < 0.7 * errors["weights"], errors


@pytest.mark.parametrize("method", ["tucker", "gqa", "mla"])
def test_calibrated_full_rank_stays_exact(method):
    from tucker_attention.hf import convert_block

    torch.manual_seed(0)
    layer = randomize_(MultiHeadAttention(D, H, bias=True)).double().eval()
    x = _anisotropic(300, 3)
    sigma = x[0].T @ x[0] / x.shape[1]
    torch.testing.assert_close(convert_block(layer, method, None, input_cov=sigma)(x), layer(x), atol=1e-8, rtol=1e-7)


def test_attention_statistics_match_the_models_own_attention_weights():
    """mixed = E[z^T z], z = a_i x for every head i, with a the weights transformers itself returns."""
    transformers = pytest.importorskip("transformers")
    from tucker_attention.hf import attention_statistics, input_statistics

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=D, num_attention_heads=H, num_key_value_heads=2,
                                      intermediate_size=2 * D, num_hidden_layers=2, vocab_size=50,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).double().eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0                                               # right padding
    batches = [{"input_ids": ids, "attention_mask": mask}]
    stats = attention_statistics(model, batches)
    inputs = {}
    hooks = [model.model.layers[i].self_attn.register_forward_pre_hook(
        lambda m, a, kw, i=i: inputs.__setitem__(i, kw["hidden_states"]), with_kwargs=True) for i in range(2)]
    with torch.no_grad():
        weights = model(**batches[0], output_attentions=True).attentions   # (B, H, T, T) per layer
    for hook in hooks:
        hook.remove()
    keep = mask.bool()
    for i, path in enumerate(stats):
        x = inputs[i]
        z = (weights[i] @ x[:, None]).transpose(1, 2)[keep].reshape(-1, D)  # (tokens * heads, d)
        # transformers computes RoPE angles in float32 (by design), our layer in float64: ~1e-6 apart
        torch.testing.assert_close(stats[path].mixed, z.T @ z / len(z), rtol=1e-5, atol=1e-7)
        rows = x[keep]
        torch.testing.assert_close(stats[path].inputs, rows.T @ rows / len(rows), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(input_statistics(model, batches)[path], stats[path].inputs, rtol=0, atol=0)


def test_values_truncated_on_the_mixed_inputs_are_closer():
    """Value truncation weighted by what values reach the output through (attention-mixed inputs)."""
    from tucker_attention.hf import BlockStatistics, convert_block

    torch.manual_seed(0)
    layer = randomize_(MultiHeadAttention(D, H, causal=True)).double().eval()
    x = _anisotropic(64, 4).reshape(8, 8, D)
    with torch.no_grad():                                         # the mixed inputs, from the layer's own weights
        q = layer.q_proj(x).view(8, 8, H, -1).transpose(1, 2)
        k = layer.k_proj(x).view(8, 8, H, -1).transpose(1, 2)
        a = (q @ k.transpose(-1, -2) * layer.scale).masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(),
                                                                 float("-inf")).softmax(-1)
        z = (a @ x[:, None]).reshape(-1, D)
    rows = x.reshape(-1, D)
    plain = BlockStatistics(rows.T @ rows / len(rows))
    mixed = BlockStatistics(plain.inputs, z.T @ z / len(z))
    ranks, value_ranks = (4, 32, 32), (4, 32, 6)                  # values only
    with torch.no_grad():
        want = layer(x)
        errors = {name: float((convert_block(layer, "tucker", ranks, value_ranks, input_cov=stats)(x) - want).norm())
                  for name, stats in (("inputs", plain), ("mixed", mixed))}
    assert errors["mixed"] < errors["inputs"], errors
