"""The GPT language model (`tucker_attention.models`) with every attention method: cached decoding,
loss, causality, training, accounting, positions and config validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tucker_attention.layers import GroupedQueryAttention, MultiHeadLatentAttention, TuckerAttention
from tucker_attention.models import GPT, GPTConfig, attention_spec, build_attention

VOCAB, BLOCK, D_MODEL, N_HEADS, N_LAYERS = 20, 32, 32, 4, 2

# (spec, KV-cache floats one token leaves in one layer, worked out by hand at d_model=32, n_heads=4)
SPECS = [
    ("mha", 2 * D_MODEL),
    ({"method": "gqa", "n_kv_heads": 2}, 2 * 2 * (D_MODEL // N_HEADS)),
    ("mqa", 2 * (D_MODEL // N_HEADS)),
    ({"method": "mla", "kv_rank": 8}, 8),
    ({"method": "mla", "kv_rank": 8, "rope": "decoupled", "rope_dim": 4}, 8 + 4),
    ({"method": "tucker", "ranks": (2, 16, 8)}, 8 + 8),
    ({"method": "tucker", "ranks": (2, 16, 8), "shared_kv": True}, 8),
]
SPEC_IDS = ["mha", "gqa", "mqa", "mla", "mla-decoupled", "tucker", "tucker-shared"]
POSITIONS = ["rope", "learned"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(spec, positions="rope", seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layers=N_LAYERS, d_model=D_MODEL, n_heads=N_HEADS,
                       attention=spec, positions=positions, **overrides)
    return GPT(config).eval()


def tokens(batch, steps, seed=1) -> torch.Tensor:
    return torch.randint(VOCAB, (batch, steps), generator=torch.Generator().manual_seed(seed))


def sharpen_(model: GPT) -> GPT:
    """3x larger embeddings (tied to the head): the top two logits of every greedy step in these
    tests differ by > 5e-4, far above rounding, while the generated tokens stay varied (a much
    larger scale makes the model just repeat its input token)."""
    with torch.no_grad():
        model.wte.weight.mul_(3.0)
        if model.wpe is not None:
            model.wpe.weight.mul_(3.0)
    return model


spec_params = pytest.mark.parametrize("spec,kv_floats", SPECS, ids=SPEC_IDS)
position_params = pytest.mark.parametrize("positions", POSITIONS)


# ---------------------------------------------------------------- decoding with and without caches


@spec_params
@position_params
def test_greedy_generate_is_the_same_with_and_without_cache(spec, kv_floats, positions):
    model = sharpen_(make_model(spec, positions))
    prompt = tokens(2, 5)
    cached = model.generate(prompt, 12, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 12, temperature=0, use_cache=False)
    assert cached.shape == (2, 5 + 12) and cached.dtype == torch.int64
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, uncached)
    assert ((cached >= 0) & (cached < VOCAB)).all()
    # each greedy token is the argmax of the full forward's last logits
    logits, _ = model(cached[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), cached[:, 5:])


@spec_params
@position_params
def test_cached_chunks_give_the_full_forward_logits(spec, kv_floats, positions):
    model = make_model(spec, positions)
    idx = tokens(3, BLOCK)
    with torch.no_grad():
        full, _ = model(idx)
        caches = model.make_caches(3, BLOCK)
        assert len(caches) == N_LAYERS
        parts = [model(idx[:, :13], caches=caches)[0], model(idx[:, 13:14], caches=caches)[0],
                 model(idx[:, 14:], caches=caches)[0]]
    assert all(cache.length == BLOCK for cache in caches)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = sharpen_(make_model("mha"))
    prompt = tokens(2, 4)
    a = model.generate(prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(3))
    b = model.generate(prompt, 8, temperature=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    greedy = model.generate(prompt, 8, temperature=0)
    assert torch.equal(model.generate(prompt, 8, temperature=0.7, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 0), prompt)
    with pytest.raises(ValueError, match="temperature must be a finite float >= 0, got -1.0"):
        model.generate(prompt, 2, temperature=-1.0)


# ---------------------------------------------------------------- loss, causality, training


@pytest.mark.parametrize("spec", ["mha", {"method": "tucker", "ranks": (2, 16, 8)}], ids=["mha", "tucker"])
def test_loss_is_the_cross_entropy_of_the_logits(spec):
    model = make_model(spec)
    idx, targets = tokens(2, 16, seed=1), tokens(2, 16, seed=2)
    targets[0, :3] = -1  # ignored
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 16, VOCAB)
    logp = logits.double() - logits.double().exp().sum(-1, keepdim=True).log()
    keep = targets != -1
    picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = -(picked[keep]).sum() / keep.sum()
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert model(idx)[1] is None


@spec_params
@position_params
def test_changing_a_future_token_leaves_earlier_logits_unchanged(spec, kv_floats, positions):
    model = make_model(spec, positions)
    idx = tokens(2, 24)
    changed = idx.clone()
    changed[:, 15] = (idx[:, 15] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(after[:, :15], before[:, :15], atol=1e-6, rtol=0)
    assert (after[:, 15:] - before[:, 15:]).abs().amax() > 1e-4


@spec_params
def test_a_few_adamw_steps_fit_one_batch(spec, kv_floats):
    model = make_model(spec).train()
    idx, targets = tokens(2, BLOCK, seed=1), tokens(2, BLOCK, seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        _, loss = model(idx, targets)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        if step == 0:  # gradients reach every attention parameter
            for block in model.blocks:
                for name, p in block.attn.named_parameters():
                    assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
    first = losses[0]
    with torch.no_grad():
        final = model(idx, targets)[1].item()
    assert first == pytest.approx(torch.log(torch.tensor(float(VOCAB))).item(), abs=0.2)  # near-uniform start
    assert final < 0.7 * first


# ---------------------------------------------------------------- weights and accounting


@spec_params
def test_tied_embeddings_and_accounting(spec, kv_floats):
    model = make_model(spec)
    assert model.lm_head.weight is model.wte.weight
    every = list(model.named_parameters(remove_duplicate=False))
    assert model.n_params == sum(p.numel() for _, p in every) - VOCAB * D_MODEL  # the tied matrix counted once
    assert model.n_params == sum(p.numel() for p in {id(p): p for _, p in every}.values())
    attention = sum(p.numel() for block in model.blocks for p in block.attn.parameters())
    assert model.attention_params == attention
    layer_floats = [sum(h * w for h, w in block.attn.cache_spec().values()) for block in model.blocks]
    assert layer_floats == [kv_floats] * N_LAYERS
    assert model.kv_bytes_per_token(torch.bfloat16) == N_LAYERS * kv_floats * 2
    assert model.kv_bytes_per_token() == N_LAYERS * kv_floats * 4  # float32 weights
    caches = model.make_caches(1, 10)
    assert sum(c.bytes_per_token for c in caches) == model.kv_bytes_per_token()
    method = attention_spec(spec)["method"]
    summary = model.summary()
    assert summary.startswith(f"GPT ({method}): ")
    assert f"{model.n_params / 1e6:.3f}M params" in summary
    assert f"attention {attention / 1e6:.3f}M ({100 * attention / model.n_params:.1f}%)" in summary
    assert f"KV cache {N_LAYERS * kv_floats * 4} B/token (float32)" in summary


def test_mha_parameter_count_by_hand():
    model = make_model("mha", positions="learned", norm="layernorm")
    d, hidden = D_MODEL, 4 * D_MODEL
    per_block = 4 * d * d + 2 * d * hidden + 2 * (2 * d)  # attention, MLP, two LayerNorms (weight + bias)
    assert model.attention_params == N_LAYERS * 4 * d * d
    assert model.n_params == VOCAB * d + BLOCK * d + N_LAYERS * per_block + 2 * d


# ---------------------------------------------------------------- positions and norms


def test_learned_positions_cover_at_most_block_size_tokens():
    model = make_model("mha", positions="learned")
    model(tokens(1, BLOCK))  # exactly block_size is fine
    with pytest.raises(ValueError, match=f"block_size={BLOCK}"):
        model(tokens(1, BLOCK + 1))
    caches = model.make_caches(1, BLOCK + 8)
    model(tokens(1, BLOCK - 2), caches=caches)
    with pytest.raises(ValueError, match=f"block_size={BLOCK}.*got {BLOCK + 3}"):
        model(tokens(1, 5), caches=caches)
    rope_model = make_model("mha", positions="rope")
    assert rope_model(tokens(1, BLOCK + 8))[0].shape == (1, BLOCK + 8, VOCAB)  # RoPE has no length limit


def test_bad_input_tokens_raise():
    model = make_model("mha")
    with pytest.raises(ValueError, match="integer tensor of shape"):
        model(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="integer tensor of shape"):
        model(torch.zeros(4, dtype=torch.int64))


def test_layernorm_option_builds_layernorms():
    model = make_model("mha", norm="layernorm")
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
    assert len(norms) == 2 * N_LAYERS + 1
    assert all(type(m) is nn.LayerNorm for m in norms)
    default = make_model("mha")
    assert all(type(m) is nn.RMSNorm for m in default.modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm)))


def test_rope_positions_switch_on_each_methods_rope():
    mla = make_model({"method": "mla", "kv_rank": 8}, positions="rope").blocks[0].attn
    assert isinstance(mla, MultiHeadLatentAttention) and mla.rope == "latent"
    tucker = make_model({"method": "tucker", "ranks": (2, 16, 8)}, positions="rope").blocks[0].attn
    assert isinstance(tucker, TuckerAttention) and tucker.config()["rope"] == "latent" and tucker.rotary is not None
    assert make_model("mqa", positions="rope").blocks[0].attn.config()["rope"] == "head"
    # learned positions: no RoPE anywhere
    assert make_model({"method": "mla", "kv_rank": 8}, positions="learned").blocks[0].attn.rope is None
    assert make_model({"method": "tucker", "ranks": (2, 16, 8)}, positions="learned").blocks[0].attn.rotary is None
    assert make_model("mha", positions="learned").blocks[0].attn.rotary is None
    # an explicit spec wins over the model's positions
    explicit = make_model({"method": "mla", "kv_rank": 8, "rope": "decoupled", "rope_dim": 4}).blocks[0].attn
    assert explicit.rope == "decoupled" and explicit.rope_dim == 4
    assert make_model({"method": "tucker", "ranks": (2, 16, 8), "rope": False}).blocks[0].attn.rotary is None
    assert make_model({"method": "mla", "kv_rank": 8, "rope": None}).blocks[0].attn.rope is None
    assert make_model({"method": "tucker", "ranks": (2, 16, 8), "rope": True},
                      positions="learned").blocks[0].attn.rotary is not None


def test_build_attention_uses_the_model_owned_arguments():
    layer = build_attention({"method": "gqa", "n_kv_heads": 2}, 32, 4, causal=True, rope=True, bias=True)
    assert isinstance(layer, GroupedQueryAttention) and layer.method == "gqa"
    config = layer.config()
    assert (config["d_model"], config["n_heads"], config["n_kv_heads"]) == (32, 4, 2)
    assert config["causal"] is True and config["rope"] == "head" and config["bias"] is True
    plain = build_attention("mha", 32, 4, causal=False, rope=False)
    assert plain.config()["causal"] is False and plain.rotary is None and plain.q_proj.bias is None


# ---------------------------------------------------------------- config validation


def test_attention_spec_normalizes_and_checks_keys():
    assert attention_spec("mha") == {"method": "mha"}
    spec = attention_spec({"method": "tucker", "ranks": [2, 16, 8], "value_ranks": [2, 8, 8]})
    assert spec == {"method": "tucker", "ranks": (2, 16, 8), "value_ranks": (2, 8, 8)}
    assert type(spec["ranks"]) is tuple and type(spec["value_ranks"]) is tuple
    config = GPTConfig(attention={"method": "tucker", "ranks": [2, 16, 8]}, d_model=32, n_heads=4)
    assert config.attention["ranks"] == (2, 16, 8) and type(config.attention["ranks"]) is tuple
    assert GPTConfig(attention="mqa").attention == {"method": "mqa"}
    assert config.to_dict()["attention"] == {"method": "tucker", "ranks": (2, 16, 8)}
    with pytest.raises(ValueError, match=r"'method' key"):
        attention_spec({"kv_rank": 8})
    with pytest.raises(ValueError, match=r"'method' key"):
        attention_spec(("mha",))


def test_config_errors():
    methods = r"\['gqa', 'mha', 'mla', 'mqa', 'tucker', 'tucker_heads'\]"
    with pytest.raises(ValueError, match=r"attention method must be one of " + methods):
        GPTConfig(attention="flash")
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['ranks'\] for attention method 'gqa'; "
                                         r"allowed: \[.*'n_kv_heads'.*\]"):
        GPTConfig(attention={"method": "gqa", "ranks": (1, 2, 3)})
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['causal', 'd_model'\]"):  # the model sets these
        attention_spec({"method": "mha", "d_model": 64, "causal": False})
    with pytest.raises(ValueError, match="positions must be one of"):
        GPTConfig(positions="alibi")
    with pytest.raises(ValueError, match="norm must be one of"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="d_model must be divisible by n_heads"):
        GPTConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.0)
    with pytest.raises(TypeError, match="n_layers must be an int"):
        GPTConfig(n_layers=2.0)
    with pytest.raises(ValueError, match="block_size must be an integer"):
        GPTConfig(block_size=0)
    config = GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layers=1, d_model=D_MODEL, n_heads=N_HEADS,
                       attention={"method": "tucker", "ranks": (2, 64, 8)})  # r2 > d_model: caught by the layer
    with pytest.raises(ValueError, match=r"ranks\[1\] \(r2\) must be an integer in \[1, 32\], got 64"):
        GPT(config)
