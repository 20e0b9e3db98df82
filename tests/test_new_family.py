"""A new attention family defined here, outside the package, is found, read and converted like the built-in
ones: one :class:`~tucker_attention.hf.families.common.GQAFamily` subclass, registered for the tests that
use it, without editing the package.

The model: a tiny random Llama (tests/tiny.py) whose attention modules are replaced by a custom one with
``query``/``key``/``value``/``out`` projections (grouped key heads, biases, the model's head RoPE), as a
remote-code model might have. ``bert``'s test (``query``/``key``/``value``) would take such a module, so
the family is registered before it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

T = pytest.importorskip("transformers", reason="the hf integration tests need transformers (extra 'hf')")

from test_hf_convert_families import float64_rope  # noqa: E402
from tiny import VOCAB, D, build  # noqa: E402
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # noqa: E402  (the family's RoPE)

from tucker_attention.hf import convert, converted_blocks, find_blocks, read_block  # noqa: E402
from tucker_attention.hf.families.common import GQAFamily, Projections, weight_and_bias  # noqa: E402
from tucker_attention.hf.families.registry import families, register, registered  # noqa: E402
from tucker_attention.layers import GroupedQueryAttention, RopeTables  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SEQ = 7


class QKVOAttention(nn.Module):
    """Causal attention with query/key/value/out projections, key heads shared by groups of query heads,
    head RoPE from the model's ``position_embeddings``; softmax in the model's dtype."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx, self.is_causal = config, layer_idx, True
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.groups = config.num_attention_heads // config.num_key_value_heads
        kv_width = config.num_key_value_heads * self.head_dim
        self.query, self.out = nn.Linear(config.hidden_size, config.hidden_size), nn.Linear(D, D)
        self.key, self.value = nn.Linear(config.hidden_size, kv_width), nn.Linear(config.hidden_size, kv_width)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, **kwargs):
        b, t, _ = hidden_states.shape
        heads = lambda y: y.view(b, t, -1, self.head_dim).transpose(1, 2)            # noqa: E731
        q, k = apply_rotary_pos_emb(heads(self.query(hidden_states)), heads(self.key(hidden_states)),
                                    *position_embeddings)
        k, v = (y.repeat_interleave(self.groups, dim=1) for y in (k, heads(self.value(hidden_states))))
        logits = (q @ k.transpose(-1, -2)) * self.head_dim ** -0.5
        keep = torch.ones(t, t, dtype=torch.bool, device=logits.device).tril()
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            keep = keep & attention_mask[..., -t:]
        elif attention_mask is not None:
            logits = logits + attention_mask[..., -t:]
        out = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1) @ v
        return self.out(out.transpose(1, 2).reshape(b, t, -1)), None


class QKVO(GQAFamily):
    """The new family: everything the package needs to know about it."""

    name = "qkvo"
    description = "query/key/value/out, head RoPE"
    tested_on = ("QKVOAttention",)
    linears = ("query", "key", "value", "out")
    parts = frozenset(linears)
    head_rope = True

    def projections(self, module, parent):
        return Projections([weight_and_bias(getattr(module, name)) for name in self.linears], module.head_dim)


@pytest.fixture
def family():
    with registered(QKVO(), before="bert"):
        yield


@pytest.fixture
def model():
    """The tiny Llama (float64, unit-scale weights) with QKVOAttention blocks, sdpa kernels (float64 softmax)."""
    model = build("llama", unit_scale=True)
    torch.manual_seed(1)
    for i, layer in enumerate(model.model.layers):
        layer.self_attn = QKVOAttention(model.config, i).double()
        with torch.no_grad():
            for linear in layer.self_attn.children():
                linear.bias.normal_(0.0, 0.1)
    model.set_attn_implementation("sdpa")
    return model


def test_the_new_family_is_found_and_read_exactly(family, model):
    assert [f.name for f in families()].index("qkvo") == [f.name for f in families()].index("bert") - 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # nothing attention-like is left unread
        blocks = find_blocks(model)
    assert [b.path for b in blocks] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(b.kind == "qkvo" and b.model_rope and b.rope_exact and b.layer_idx == i for i, b in enumerate(blocks))
    x = torch.randn(2, SEQ, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    tables = model.model.rotary_emb(x, torch.arange(SEQ)[None].expand(2, -1))
    for block in blocks:
        module = model.get_submodule(block.path)
        layer, info = read_block(module)
        assert type(layer) is GroupedQueryAttention and layer.n_kv_heads == 2 and info["kind"] == "qkvo"
        with torch.no_grad():
            want = module(x, tables)[0]
            got = layer(x, rope=RopeTables(None, given=tuple(t.unsqueeze(1) for t in tables)))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_a_model_of_the_new_family_converts_exactly(family, model, monkeypatch):
    float64_rope(model, monkeypatch)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=tokens).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)            # exact at full rank: nothing to warn about
        converted = convert(model, "tucker", inplace=False)
    blocks = converted_blocks(converted)
    assert type(converted).__name__ == "TuckerLlamaForCausalLM" and len(blocks) == 2
    assert all(b.kind == "qkvo" and b.layer.method == "tucker" for b in blocks.values())
    with torch.no_grad():
        assert (converted(input_ids=tokens).logits - want).abs().max() <= 1e-9
    smaller = convert(model, "tucker", (2, 16, 8), inplace=False)
    cached = smaller.generate(tokens, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(cached, smaller.generate(tokens, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                                use_cache=False))


def test_outside_its_registration_the_family_is_unknown(model):
    assert "qkvo" not in [f.name for f in families()]
    with pytest.raises(TypeError, match=r"parts the 'bert' structure does not have: out"):
        find_blocks(model)                                     # bert's test takes it, and refuses it
    with registered(QKVO()) as new, pytest.raises(ValueError, match="already registered"):
        register(new)
    assert "qkvo" not in [f.name for f in families()]
