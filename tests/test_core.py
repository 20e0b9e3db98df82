"""The layer core: one forward, transactional caches, no hidden state, shared RoPE tables,
clear errors, one set of conventions."""

import copy

import pytest
import torch
from conftest import LAYER_CONFIGS, randomize_
from reference import reference_forward

from tucker_attention import make_attention
from tucker_attention.layers import ATTENTION_METHODS, RopeTables, RotaryEmbedding
from tucker_attention.models import GPT, GPTConfig
from tucker_attention.tensors import compress, input_transform, mha_to_gqa, mha_to_mla, to_tucker
from tucker_attention.training.config import TrainConfig
from tucker_attention.training.trainer import param_groups

D, H = 32, 4


def build(method, **kwargs):
    torch.manual_seed(0)
    return randomize_(make_attention(method, D, H, causal=True, **kwargs))


def snapshot(cache):
    return cache.length, {name: t.clone() for name, t in cache.tensors.items()}, cache.positions.clone()


# -- transactional caches -------------------------------------------------------------------------

BAD_CALLS = [
    ("mask of the wrong length", lambda x: {"attn_mask": torch.ones(2, 1, 1, 5, dtype=torch.bool)}, ValueError),
    ("float mask", lambda x: {"attn_mask": torch.ones(2, 1, 1, 6)}, ValueError),
    ("mask as a list", lambda x: {"attn_mask": [[True] * 6]}, TypeError),
    ("positions as a list", lambda x: {"positions": [5]}, TypeError),
    ("float positions", lambda x: {"positions": torch.tensor([5.0])}, TypeError),
    ("positions of the wrong length", lambda x: {"positions": torch.arange(2)}, ValueError),
    ("rope tables for other keys", lambda x: {"rope": RopeTables(torch.tensor([5]), torch.arange(3))}, ValueError),
    ("rope as a tuple", lambda x: {"rope": (torch.ones(1, 8), torch.zeros(1, 8))}, TypeError),
]


@pytest.mark.parametrize("config", LAYER_CONFIGS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(LAYER_CONFIGS)])
def test_a_failed_call_leaves_the_cache_unchanged(config):
    method, kwargs = config
    layer = build(method, **kwargs).double()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    cache = layer.make_cache(2, 6)
    layer(x[:, :5], cache=cache)
    before = snapshot(cache)
    calls = list(BAD_CALLS)
    if layer.rope is None:
        calls = [c for c in calls if not c[0].startswith("rope tables")]
    for label, make_kwargs, error in calls:
        with pytest.raises(error):
            layer(x[:, 5:], cache=cache, **make_kwargs(x))
        after = snapshot(cache)
        assert after[0] == before[0], label
        for name in before[1]:
            assert torch.equal(after[1][name], before[1][name]), label
    for bad_x, error in ((x[:, 5:].float(), ValueError), (torch.randn(3, 1, D, dtype=torch.float64), ValueError),
                         (torch.randn(2, 2, D, dtype=torch.float64), ValueError)):  # dtype, batch, overflow
        with pytest.raises(error):
            layer(bad_x, cache=cache)
        assert cache.length == 5
    # a correct retry continues exactly like the full forward
    torch.testing.assert_close(layer(x[:, 5:], cache=cache), layer(x)[:, 5:], atol=1e-10, rtol=1e-10)


# -- no hidden state -------------------------------------------------------------------------------

def _edits():
    def data_write(layer, other):
        for p in layer.parameters():
            p.data.mul_(3.0)

    def no_grad_inplace(layer, other):
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.1)

    def ema(layer, other):                                       # the way EMA / weight averaging writes
        with torch.no_grad():
            for p, q in zip(layer.parameters(), other.parameters()):
                p.lerp_(q, 0.5)

    def load(layer, other):
        layer.load_state_dict(other.state_dict())

    def optimizer_step(layer, other):
        opt = torch.optim.SGD(layer.parameters(), lr=0.5)
        with torch.enable_grad():
            layer(torch.randn(2, 4, D, dtype=next(layer.parameters()).dtype)).square().sum().backward()
        opt.step()

    def swap_data(layer, other):
        for p, q in zip(layer.parameters(), other.parameters()):
            p.data = q.data.clone()

    return [data_write, no_grad_inplace, ema, load, optimizer_step, swap_data]


@pytest.mark.parametrize("edit", _edits(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("method,kwargs", [("tucker", {"ranks": (2, 16, 8)}),
                                           ("tucker", {"ranks": (4, 8, 8), "shared_kv": True, "rope": True}),
                                           ("tucker", {"ranks": (4, 32, 32)}),
                                           ("mla", {"kv_rank": 16, "q_rank": 12, "rope": "latent"})])
def test_outputs_follow_every_parameter_change(method, kwargs, edit):
    """In eval mode without autograd (decoding), every way of changing the weights shows at once."""
    layer = build(method, **kwargs).double().eval()
    other = build(method, **kwargs).double()
    with torch.no_grad():
        torch.manual_seed(1)
        for p in other.parameters():
            p.normal_(0.0, 0.3)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    with torch.no_grad():
        before = layer(x)
        cache = layer.make_cache(2, 6)
        layer(x[:, :5], cache=cache)                     # decoding has run once before the change
        edit(layer, other)
        after = layer(x)
    assert (after - before).abs().amax() > 1e-3
    torch.testing.assert_close(after, reference_forward(layer, x), atol=1e-9, rtol=1e-9)
    with torch.no_grad():                                # .to(): another dtype, the same function
        torch.testing.assert_close(layer.float()(x.float()).double(), after, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method,kwargs", [("tucker", {"ranks": (2, 16, 8)}), ("mla", {"kv_rank": 8, "q_rank": 12}),
                                           ("gqa", {"n_kv_heads": 2, "head_dim": 6})])
def test_lr_scales_come_from_the_configuration(method, kwargs):
    layer = make_attention(method, D, H, **kwargs)
    scales = layer.lr_scales()
    assert len(set(scales.values())) > 1 or method == "gqa"
    assert copy.deepcopy(layer).lr_scales() == scales
    assert make_attention(**layer.config()).lr_scales() == scales
    fresh = make_attention(**layer.config())
    fresh.load_state_dict(layer.state_dict())
    assert fresh.lr_scales() == scales
    if method == "tucker":
        assert scales["core"] == pytest.approx((D / 16) ** 0.5) and scales["U1"] == pytest.approx((D / 2) ** 0.5)
    if method == "gqa":                                   # o_proj has fan-in H * head_dim = 24, not d = 32
        assert scales["o_proj.weight"] == pytest.approx((D / 24) ** 0.5) and scales["q_proj.weight"] == 1.0


def test_one_attention_lr_default():
    model = GPT(GPTConfig(vocab_size=8, block_size=8, d_model=D, n_heads=H, n_layers=1,
                          attention={"method": "tucker", "ranks": (2, 8, 8)}))
    default = {g["lr"] for g in param_groups(model, lr=1.0, weight_decay=0.0)}
    chosen = {g["lr"] for g in param_groups(model, lr=1.0, weight_decay=0.0, lr_rule=TrainConfig().lr_rule)}
    assert default == chosen and len(default) > 1


# -- conventions --------------------------------------------------------------------------------

@pytest.mark.parametrize("method,kwargs,mode", [("mha", {}, "head"), ("gqa", {"n_kv_heads": 2}, "head"),
                                                ("mqa", {}, "head"), ("mla", {"kv_rank": 8}, "latent"),
                                                ("tucker", {"ranks": (2, 8, 8)}, "latent")])
def test_rope_means_one_thing_on_every_layer(method, kwargs, mode):
    cls = ATTENTION_METHODS[method]
    assert cls.positional_rope == mode and mode in cls.rope_modes and None in cls.rope_modes
    for given, want in ((True, mode), (mode, mode), (False, None), (None, None)):
        layer = make_attention(method, D, H, rope=given, **kwargs)
        assert layer.rope == want and layer.config()["rope"] == want
        assert (layer.rotary is not None) == (want is not None)
        assert make_attention(**layer.config()).config() == layer.config()


def test_shared_kv_defaults_are_each_methods_published_form():
    assert make_attention("mla", D, H, kv_rank=8).shared_kv is True
    assert make_attention("tucker", D, H, ranks=(2, 8, 8)).shared_kv is False


def test_mla_norm_eps_and_down_biases():
    layer = make_attention("mla", D, H, kv_rank=8, q_rank=12, latent_norm=True, norm_eps=1e-3, down_bias=True)
    assert layer.kv_norm.eps == 1e-3 and layer.q_norm.eps == 1e-3
    assert layer.q_down.bias is not None and layer.kv_down.bias is not None
    assert make_attention("mla", D, H, kv_rank=8, latent_norm=True).kv_norm.eps == 1e-6   # DeepSeek's
    assert make_attention(**layer.config()).config() == layer.config()


# -- RoPE tables once per model forward ----------------------------------------------------------

@pytest.mark.parametrize("attention,tables", [({"method": "tucker", "ranks": (2, 8, 8)}, 1),
                                              ({"method": "tucker", "ranks": (2, 8, 8), "shared_kv": True}, 2),
                                              ({"method": "gqa", "n_kv_heads": 2}, 1),
                                              ({"method": "mla", "kv_rank": 8}, 2)])
def test_gpt_computes_rope_tables_once_per_forward(monkeypatch, attention, tables):
    """One table for the queries (and one for the keys of a shared latent, rotated on read)."""
    calls = []
    original = RotaryEmbedding.forward
    monkeypatch.setattr(RotaryEmbedding, "forward", lambda self, *a: calls.append(1) or original(self, *a))
    model = GPT(GPTConfig(vocab_size=16, block_size=16, d_model=D, n_heads=H, n_layers=4, attention=attention))
    idx = torch.randint(0, 16, (2, 6))
    model(idx)
    assert len(calls) == tables
    calls.clear()
    caches = model.make_caches(2, 8)
    model(idx, caches=caches)
    model(idx[:, :1], caches=caches)
    assert len(calls) == 2 * tables
    torch.manual_seed(0)
    want, _ = model(torch.cat([idx, idx[:, :1]], 1))
    caches = model.make_caches(2, 8)
    model(idx, caches=caches)
    got, _ = model(idx[:, :1], caches=caches)
    torch.testing.assert_close(got[:, -1], want[:, -1], atol=1e-5, rtol=1e-5)


# -- clear errors --------------------------------------------------------------------------------

def test_inputs_of_another_dtype_or_device_are_refused_by_name():
    layer = make_attention("tucker", D, H, ranks=(2, 8, 8))
    with pytest.raises(ValueError, match=r"x has dtype torch.float64 but the layer's weights are torch.float32"):
        layer(torch.randn(1, 3, D, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x is on meta but the layer's weights are on cpu"):
        layer(torch.randn(1, 3, D, device="meta"))
    with pytest.raises(TypeError, match=r"attn_mask must be a bool torch.Tensor"):
        layer(torch.randn(1, 3, D), attn_mask=[[True, True, True]])
    with pytest.raises(TypeError, match=r"positions must be an integer torch.Tensor of shape \(3,\)"):
        layer(torch.randn(1, 3, D), positions=[0, 1, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):                  # autocast is the one allowed mix
        assert layer(torch.randn(1, 3, D, dtype=torch.bfloat16)).shape == (1, 3, D)


def test_converters_give_finite_results_on_degenerate_layers():
    mha = make_attention("mha", D, H)
    with torch.no_grad():
        mha.v_proj.weight.zero_()                                   # no values at all
        mha.q_proj.weight[:, D // 2:] = 0.0                         # rank-deficient queries
    x = torch.randn(2, 5, D)
    for converted in (mha_to_mla(mha, 8), mha_to_mla(mha, 8, 4), mha_to_gqa(mha, 2), compress(mha, (2, 8, 8)),
                      to_tucker(mha)):
        assert all(torch.isfinite(p).all() for p in converted.parameters())
        assert torch.isfinite(converted(x)).all()
    torch.testing.assert_close(mha_to_mla(mha, 8)(x), torch.zeros(2, 5, D))      # zero values give zero output


@pytest.mark.parametrize("convert", [to_tucker, lambda m: compress(m, (2, 8, 8)), lambda m: mha_to_gqa(m, 2),
                                     lambda m: mha_to_mla(m, 8), lambda m: input_transform(m, torch.eye(D))])
@pytest.mark.parametrize("method,kwargs", [("mha", {}), ("tucker", {"ranks": (2, 8, 8)})])
def test_every_converter_refuses_non_finite_weights(convert, method, kwargs):
    layer = make_attention(method, D, H, **kwargs)
    with torch.no_grad():
        next(layer.parameters())[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite values"):
        convert(layer)


def test_state_dicts_with_the_old_value_factor_name_still_load(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from tucker_attention.io import load_attention_layers, save_checkpoint

    layer = make_attention("tucker", D, H, ranks=(2, 8, 8))
    old = {("_U3_tilde" if k == "U3_tilde" else k): v for k, v in layer.state_dict().items()}
    fresh = make_attention("tucker", D, H, ranks=(2, 8, 8))
    fresh.load_state_dict(old)
    assert torch.equal(fresh.U3_tilde, layer.U3_tilde)
    path = save_checkpoint(tmp_path / "layer.safetensors", layer)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = {("_U3_tilde" if k == "U3_tilde" else k): v for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata=metadata)                       # as tucker-attention 0.1 wrote it
    loaded = load_attention_layers(path)[""]
    assert torch.equal(loaded.U3_tilde, layer.U3_tilde)


# -- the explicit inference-time switch ----------------------------------------------------------

def test_frozen_weights_gives_the_same_outputs_and_refuses_changes():
    from tucker_attention.layers import frozen_weights

    layer = build("tucker", ranks=(2, 16, 8), rope=True).double()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    with torch.no_grad():
        want = layer(x)
        with frozen_weights(layer):
            cache = layer.make_cache(2, 6)
            got = torch.cat([layer(x[:, :4], cache=cache), layer(x[:, 4:5], cache=cache),
                             layer(x[:, 5:], cache=cache)], 1)
            torch.testing.assert_close(layer(x), want, atol=1e-12, rtol=1e-12)
            layer.core.mul_(2.0)                                  # a change the layer can see
            with pytest.raises(RuntimeError, match="changed inside frozen_weights"):
                layer(x)
        changed = layer(x)                                        # outside: follows the parameters again
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(changed, reference_forward(layer, x), atol=1e-9, rtol=1e-9)
    with frozen_weights(layer), pytest.raises(RuntimeError, match="is for inference"):
        layer(x)                                                  # autograd on: refused


def test_gpt_generate_is_unchanged_by_decoding_inside_frozen_weights():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=16, block_size=32, d_model=D, n_heads=H, n_layers=2,
                          attention={"method": "tucker", "ranks": (2, 8, 8)}))
    idx = torch.randint(0, 16, (2, 4))
    cached = model.generate(idx, 6, temperature=0)
    recomputed = model.generate(idx, 6, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed)
    with torch.no_grad():
        logits, _ = model(cached[:, :-1])
    assert torch.equal(logits[:, 3:].argmax(-1), cached[:, 4:])           # every new token is the argmax
