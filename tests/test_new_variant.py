"""A new attention variant defined here, outside the package, gets the whole library for free:
the tensor view, ranks, accounting, caches, decoding and compression, without editing the package."""

import math

import pytest
import torch
from torch import nn

from tucker_attention import attention_param_count, kv_cache_floats_per_token, make_attention
from tucker_attention.layers import ATTENTION_METHODS, Attention, AttentionFactors, HeadFactors
from tucker_attention.tensors import attention_tensors, compress, multilinear_ranks, relative_error

D, H, P, K = 24, 4, 10, 6


@pytest.fixture(scope="module")
def variant():
    """The new class, defined (and so registered under its ``method``) for this module only."""

    class SharedBasisAttention(Attention):
        """Queries through a shared basis: q_i = (x P) Q_i (P (d, p), Q_i (p, k)); one key head x K and one
        value head x V (k wide), shared by all heads; y = sum_i o_i O_i (O_i (k, d)). Caches k and v."""

        method = "shared-basis-test"

        def __init__(self, d_model, n_heads, *, basis=P, width=K, causal=False, dropout=0.0, scale=None,
                     rope=None, rope_base=10000.0):
            super().__init__(d_model, n_heads, causal=causal, dropout=dropout, scale=scale,
                             default_scale=1 / math.sqrt(width), rope=rope, rope_dim=width, rope_base=rope_base)
            self.basis, self.width = basis, width
            self.P = nn.Parameter(torch.empty(d_model, basis))
            self.Q = nn.Parameter(torch.empty(n_heads, basis, width))
            self.K = nn.Parameter(torch.empty(d_model, width))
            self.V = nn.Parameter(torch.empty(d_model, width))
            self.O = nn.Parameter(torch.empty(n_heads, width, d_model))
            self.reset_parameters()

        def config(self):
            return {**self._common_config(), "basis": self.basis, "width": self.width}

        def init_stds(self):
            return {"P": self.d_model ** -0.5, "Q": self.basis ** -0.5, "K": self.d_model ** -0.5,
                    "V": self.d_model ** -0.5, "O": (self.n_heads * self.width) ** -0.5}

        def cache_spec(self):
            return {"k": (1, self.width), "v": (1, self.width)}

        def _project(self, x, rope):
            q = torch.einsum("btp,hpk->bhtk", x @ self.P, self.Q)
            return q, {"k": (x @ self.K).unsqueeze(1), "v": (x @ self.V).unsqueeze(1)}

        def _output(self, o):
            return torch.einsum("bhtk,hkd->btd", o, self.O)

        def tensor_view(self, dtype=torch.float64):
            p = {n: t.detach().to(dtype) for n, t in self.named_parameters()}
            A = p["P"] @ p["Q"]                                                     # (h, d, k)
            return AttentionFactors(HeadFactors(A, p["K"].expand(self.n_heads, -1, -1)),
                                    HeadFactors(p["O"].mT, p["V"].expand(self.n_heads, -1, -1)), None, None)

    yield SharedBasisAttention
    ATTENTION_METHODS.pop(SharedBasisAttention.method)


def dense_reference(layer, x):
    """softmax(scale x W[i] x^T) x W_tilde[i]^T summed over heads, causal, in float64."""
    W, Wt = attention_tensors(layer)
    x = x.double()
    logits = layer.scale * torch.einsum("btp,ipq,bsq->bits", x, W.double(), x)
    T = x.shape[1]
    logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bits,bsq,ipq->btp", torch.softmax(logits, -1), x, Wt.double())


@pytest.fixture
def layer(variant):
    torch.manual_seed(0)
    return make_attention("shared-basis-test", D, H, causal=True).double()


def test_tensor_view_and_ranks(layer):
    x = torch.randn(2, 7, D, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense_reference(layer, x), atol=1e-10, rtol=1e-10)
    W, W_tilde = attention_tensors(layer)
    assert W.shape == W_tilde.shape == (H, D, D)
    assert multilinear_ranks(W) == (H, P, K)          # the variant's query basis and key width show as ranks
    assert multilinear_ranks(W_tilde) == (H, D, K)


def test_accounting_and_cache(layer):
    assert attention_param_count(layer) == D * P + H * P * K + 2 * D * K + H * K * D
    assert kv_cache_floats_per_token(layer) == 2 * K
    x = torch.randn(2, 9, D, dtype=torch.float64)
    cache = layer.make_cache(2, 9)
    assert set(cache.tensors) == {"k", "v"} and cache.tensors["k"].shape == (2, 1, 9, K)
    chunks = [layer(x[:, :4], cache=cache)] + [layer(x[:, t:t + 1], cache=cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(chunks, 1), layer(x), atol=1e-10, rtol=1e-10)


def test_rebuilt_from_its_config(layer):
    rebuilt = make_attention(**layer.config()).double()
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(1, 5, D, dtype=torch.float64)
    torch.testing.assert_close(rebuilt(x), layer(x), atol=0, rtol=0)
    assert layer.lr_scales()["Q"] == pytest.approx((D / P) ** 0.5)


def test_compress_to_tucker(layer):
    x = torch.randn(2, 7, D, dtype=torch.float64)
    exact = compress(layer, (H, P, K), (H, D, K))                 # its own multilinear ranks: exact
    torch.testing.assert_close(exact(x), layer(x), atol=1e-9, rtol=1e-9)
    errors = [relative_error(layer, compress(layer, (r1, r2, 4)), x) for r1, r2 in ((2, 4), (3, 8))]
    assert 1e-6 < errors[1] < errors[0]                            # truncation: approximate, better with rank
