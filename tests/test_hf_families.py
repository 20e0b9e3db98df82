"""Every decoder family users hold, read from a tiny random model of the real transformers class.

Each family: 2 layers, small widths, a float64 model, every projection bias and norm gain
random. ``find_blocks`` must find every block with the right structure, and the layer read
from it must reproduce the original attention module (called with hidden states, the model's
``position_embeddings`` and a bool or additive mask, causal + padding + the block's sliding
window) to <= 1e-10 under both ``attn_implementation='sdpa'`` and ``'eager'``.

Honest exceptions, each measured here rather than hidden:

- transformers' eager kernels take the softmax in float32 (``softmax(..., dtype=float32)``),
  so against ``eager`` our own SDPA kernel agrees to ~1e-8 only; run through the same eager
  kernel (as a converted model runs, ``kernel=``) our layer agrees to <= 1e-10.
- transformers computes its RMSNorms (Qwen3 / Gemma 3 q_norm, k_norm; DeepSeek's latent
  norms) in float32 even in a float64 model, DeepSeek-V2's complex RoPE too, and every
  rotary embedding builds its cos/sin tables in float32. The exact checks therefore run the
  original module with those computed in float64, the same formula
  (:func:`float64_internals`); the plain float32-internal error is asserted at its real size.
"""

from __future__ import annotations

import inspect
import types
import warnings

import pytest
import torch

T = pytest.importorskip("transformers", reason="the hf integration tests need transformers (extra 'hf')")

from tiny import COMMON, FAMILIES, HEADS, MLA_SIZES, VOCAB, D, build  # noqa: E402

from tucker_attention.hf import SUPPORTED_BLOCKS, attention_layers, find_blocks, read_block  # noqa: E402
from tucker_attention.hf.families.reading import STRUCTURES  # noqa: E402
from tucker_attention.layers import (  # noqa: E402
    Attention,
    GroupedQueryAttention,
    MultiHeadLatentAttention,
    RopeTables,
)
from tucker_attention.tensors import to_tucker  # noqa: E402

SEQ = 7
pytestmark = pytest.mark.usefixtures("one_thread")


ROPE_FAMILIES = [f for f in FAMILIES if f not in ("deepseek_v2", "deepseek_v3", "deepseek_v3_plain")]
HAS_KERNEL_ARG = "kernel" in inspect.signature(Attention.forward).parameters


def float64_internals(model, monkeypatch) -> None:
    """Compute the attention modules' RMSNorms (and DeepSeek-V2's complex RoPE) in float64 with the
    same formula transformers uses in float32: x / sqrt(mean(x^2) + eps) * w, Gemma's * (1 + w)."""
    for module in model.modules():
        if "RMSNorm" not in type(module).__name__:
            continue
        eps = module.variance_epsilon if hasattr(module, "variance_epsilon") else module.eps
        one_plus = type(module).__name__.startswith("Gemma")

        def forward(x, norm=module, eps=eps, one_plus=one_plus):
            gain = 1.0 + norm.weight if one_plus else norm.weight
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain
        monkeypatch.setattr(module, "forward", forward)
    from transformers.models.deepseek_v2 import modeling_deepseek_v2

    def apply_rotary_emb(xq, xk, freqs_cis):
        rotate = lambda t: torch.view_as_real(torch.view_as_complex(        # noqa: E731
            t.reshape(*t.shape[:-1], -1, 2).contiguous()) * freqs_cis.unsqueeze(1)).flatten(3)
        return rotate(xq), rotate(xk)
    monkeypatch.setattr(modeling_deepseek_v2, "apply_rotary_emb", apply_rotary_emb)


def masks(block, *, batch: int = 2):
    """(bool mask True = attend, additive mask): causal, the last 2 keys of row 1 padded, the block's window."""
    keep = torch.ones(batch, 1, SEQ, SEQ, dtype=torch.bool).tril()
    keep[1, ..., -2:] = False
    if block.sliding_window:
        keep &= (torch.arange(SEQ)[:, None] - torch.arange(SEQ)[None]) < block.sliding_window
    additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, torch.finfo(torch.float64).min)
    return keep, additive


def model_tables(model, module, x):
    """The model's own position_embeddings for positions arange(SEQ) (float32-computed, as in a real forward)."""
    rotary = model.base_model.rotary_emb
    positions = torch.arange(SEQ)[None].expand(x.shape[0], -1)
    layer_type = getattr(module, "layer_type", None)
    if "layer_type" in inspect.signature(rotary.forward).parameters and layer_type is not None:
        return rotary(x, positions, layer_type)
    return rotary(x, positions)


def own_tables(model, layer, x):
    """position_embeddings for the original module computed in float64 from our layer's frequencies
    (times the model's attention scaling), i.e. the tables our standalone layer uses."""
    cos, sin = layer.rotary(torch.arange(SEQ), torch.float64)                    # (T, rope width)
    scaling = float(getattr(model.base_model.rotary_emb, "attention_scaling", 1.0))
    if isinstance(layer, MultiHeadLatentAttention) and type(model).__name__.startswith("DeepseekV2"):
        angles = torch.arange(SEQ, dtype=torch.float64)[:, None] * layer.rotary.inv_freq
        return (torch.polar(torch.ones_like(angles), angles) * scaling).expand(x.shape[0], -1, -1)
    return tuple((t * scaling).expand(x.shape[0], -1, -1) for t in (cos, sin))


def tables_for(model, block, module, x):
    """The model's tables for head-RoPE blocks (and NoPE blocks, which ignore them), ours for MLA."""
    if block.model_rope or block.layer.rotary is None:
        return model_tables(model, module, x)
    return own_tables(model, block.layer, x)


def call_module(module, x, tables, mask):
    with torch.no_grad():
        return module(x, position_embeddings=tables, attention_mask=mask)[0]


def hf_kernel(module, mask, block):
    """Our layer's kernel through the module's own attention function (as a converted block runs)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    family = inspect.getmodule(type(module))
    function = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, family.eager_attention_forward)
    extra = {k: v for k, v in (("sliding_window", block.sliding_window), ("softcap", block.softcap)) if v is not None}

    def kernel(q, k, v, *, scale, causal, attn_mask, dropout_p):
        shim = types.SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], training=False, is_causal=causal,
                                     config=module.config, head_dim=q.shape[-1])
        out, _ = function(shim, q, k, v, mask, dropout=dropout_p, scaling=scale, **extra)
        return out.transpose(1, 2)
    return kernel


def run_layer(block, x, tables, keep, kernel=None):
    rope = RopeTables(None, given=tuple(t.unsqueeze(1) for t in tables)) if block.model_rope else None
    with torch.no_grad():
        return block.layer(x, attn_mask=keep, rope=rope, **({"kernel": kernel} if kernel is not None else {}))


# -- 1. every family is found and read exactly -------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_blocks_are_found_and_read_exactly(family, monkeypatch):
    model = build(family)
    _, _, structure, layer_cls = FAMILIES[family]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # nothing attention-like is left unread
        blocks = find_blocks(model)
    assert len(blocks) == 2 and all(b.kind == structure and type(b.layer) is layer_cls for b in blocks)
    assert [b.layer_idx for b in blocks] == [0, 1]
    assert all(type(model.get_submodule(b.path)).__name__ in SUPPORTED_BLOCKS for b in blocks)
    x = torch.randn(2, SEQ, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def cases():
        """(implementation, block, module, bool mask, the mask that implementation gets, RoPE tables)."""
        for impl in ("sdpa", "eager"):
            model.config._attn_implementation = impl
            for block in blocks:
                module = model.get_submodule(block.path)
                keep, additive = masks(block)
                mask = keep if impl == "sdpa" else additive
                yield impl, block, module, keep, mask, tables_for(model, block, module, x)

    float32_errors = {(impl, block.path): (run_layer(block, x, tables, keep) - call_module(module, x, tables, mask))
                      .abs().max().item() for impl, block, module, keep, mask, tables in cases()}
    float64_internals(model, monkeypatch)
    for impl, block, module, keep, mask, tables in cases():
        want = call_module(module, x, tables, mask)
        ours = (run_layer(block, x, tables, keep) - want).abs().max().item()
        if impl == "sdpa":
            assert ours <= 1e-10, (family, block.path, ours)
        else:                                             # transformers' eager softmax is float32
            assert ours <= 1e-7, (family, block.path, ours)
        if HAS_KERNEL_ARG:
            through = (run_layer(block, x, tables, keep, hf_kernel(module, mask, block)) - want).abs().max().item()
            assert through <= 1e-10, (family, impl, block.path, through)
    # transformers' float32 internals (RMSNorms, DeepSeek-V2's complex RoPE, eager's softmax) cost
    # ~1e-8 in a float64 model (measured 1e-9 .. 2e-8); without them the sdpa reads are exact.
    assert max(float32_errors.values()) < 1e-7, float32_errors


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_standalone_layers_use_the_models_rope_frequencies(family, monkeypatch):
    """With its own RoPE table (rope_exact) the layer equals the module fed float64 tables of the
    same frequencies; those frequencies are the model's (per layer type, partial width)."""
    model = build(family)
    float64_internals(model, monkeypatch)
    model.config._attn_implementation = "sdpa"
    blocks = find_blocks(model)
    x = torch.randn(2, SEQ, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for block in blocks:
        module, layer = model.get_submodule(block.path), block.layer
        assert block.rope_exact
        if not block.model_rope:
            assert layer.rotary is None                   # SmolLM3's NoPE layer
            continue
        rotary = model.base_model.rotary_emb
        layer_type = getattr(module, "layer_type", None)
        theirs = getattr(rotary, f"{layer_type}_inv_freq", None) if layer_type else None
        theirs = rotary.inv_freq if theirs is None else theirs
        torch.testing.assert_close(layer.rotary.inv_freq, theirs.double(), rtol=1e-6, atol=0)
        keep, _ = masks(block)
        tables = tuple(t.expand(2, -1, -1) for t in layer.rotary(torch.arange(SEQ), torch.float64))
        with torch.no_grad():
            want = module(x, position_embeddings=tables, attention_mask=keep)[0]
            got = layer(x, attn_mask=keep)
        assert (got - want).abs().max() <= 1e-10


def test_deepseek_yarn_scale_and_attention_factor_are_read():
    v2, v3 = build("deepseek_v2"), build("deepseek_v3")
    for model in (v2, v3):
        module, block = model.model.layers[0].self_attn, find_blocks(model)[0]
        assert block.layer.scale == module.scaling != (8 + 4) ** -0.5          # mscale_all_dim in the scale
        assert block.layer.rope_dim == 4 and block.layer.kv_rank == 16 and block.layer.norm_eps == 1e-6
        torch.testing.assert_close(block.layer.rotary.inv_freq, model.model.rotary_emb.inv_freq.double())
    factor = v2.model.rotary_emb.attention_scaling
    assert abs(factor - 1.0) > 1e-3                                           # folded into the RoPE branch
    layer, module = find_blocks(v2)[0].layer, v2.model.layers[0].self_attn
    perm = torch.cat([torch.arange(0, 4, 2), torch.arange(1, 4, 2)])
    torch.testing.assert_close(layer.k_rope.weight, module.kv_a_proj_with_mqa.weight[16:][perm] * factor)


def test_what_each_family_reads():
    """Structure facts: scale, head widths, biases, partial RoPE, norm gains, windows."""
    blocks = {f: find_blocks(build(f)) for f in ("mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "neox",
                                                  "smollm3")}
    mistral = blocks["mistral"][0].layer
    assert mistral.head_dim == 16 and mistral.n_kv_heads == 2
    assert [b.sliding_window for b in blocks["mistral"]] == [4, 4]
    qwen2 = blocks["qwen2"][0].layer
    assert qwen2.q_proj.bias.abs().sum() > 0 and torch.equal(qwen2.o_proj.bias, torch.zeros(D, dtype=torch.float64))
    qwen3 = blocks["qwen3"][0].layer
    assert qwen3.q_norm is not None and qwen3.config()["qk_norm"] and qwen3.norm_eps == 1e-6
    assert "RMSNorm" in qwen3.nonlinearity()
    g2, g3 = blocks["gemma2"], blocks["gemma3"]
    assert g2[0].layer.scale == 24 ** -0.5 and g2[0].layer.head_dim == 16
    assert [b.sliding_window for b in g2] == [4, None] and [b.sliding_window for b in g3] == [4, None]
    assert [b.layer.rope_base for b in g3] == [10000.0, 1e6]
    gemma3 = build("gemma3").model.layers[0].self_attn
    torch.testing.assert_close(g3[0].layer.q_norm.weight, 1.0 + gemma3.q_norm.weight.detach())   # Gemma's 1 + w
    assert blocks["phi3"][0].layer.rope_dim == 4 and blocks["phi3"][0].layer.rotary.dim == 4   # 0.5 * head_dim 8
    assert blocks["neox"][0].layer.rope_dim == 4 and blocks["neox"][0].layer.config()["rope_dim"] == 4
    assert [b.model_rope for b in blocks["smollm3"]] == [True, False]


def test_gemma2_soft_capping_is_reported_and_reproduced_through_the_kernel(monkeypatch):
    """Soft-capping is the kernel's: the block reports it, attention_layers warns that standalone
    layers do not cap, and our layer through the eager kernel with ``softcap`` is exact."""
    torch.manual_seed(0)
    config = T.Gemma2Config(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=0.5,
                            sliding_window=4, **COMMON)
    config._attn_implementation = "eager"
    model = T.Gemma2ForCausalLM(config).double().eval()
    with pytest.warns(UserWarning, match="soft-cap"):
        layers = attention_layers(model)
    assert len(layers) == 2
    blocks = find_blocks(model)
    assert all(b.softcap == 0.5 for b in blocks)
    x = 3 * torch.randn(2, SEQ, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for block in blocks:
        module = model.get_submodule(block.path)
        keep, additive = masks(block)
        tables = model_tables(model, module, x)
        want = call_module(module, x, tables, additive)
        uncapped = (run_layer(block, x, tables, keep) - want).abs().max().item()
        assert uncapped > 1e-4                               # the cap matters at these logits
        if HAS_KERNEL_ARG:
            capped = (run_layer(block, x, tables, keep, hf_kernel(module, additive, block)) - want).abs().max().item()
            assert capped <= 1e-10


@pytest.mark.parametrize("arch", ["bert", "gpt2", "vit"])
def test_bert_gpt2_vit_blocks_read_exactly_in_float64(arch):
    """The earlier structures at float64: BERT (output projection in the parent), GPT-2 (fused
    Conv1D), ViT (no RoPE, no mask)."""
    torch.manual_seed(0)
    size = {"hidden_size": D, "num_attention_heads": HEADS, "intermediate_size": 2 * D, "num_hidden_layers": 2}
    if arch == "bert":
        model = T.BertModel(T.BertConfig(vocab_size=VOCAB, **size))
    elif arch == "gpt2":
        model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=D, n_head=HEADS, n_layer=2, vocab_size=VOCAB,
                                               bos_token_id=None, eos_token_id=None))
    else:
        model = T.ViTModel(T.ViTConfig(image_size=16, patch_size=4, num_channels=3, qkv_bias=True, **size))
    model = model.double().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "bias", None), torch.Tensor) and not isinstance(module, torch.nn.LayerNorm):
                module.bias.normal_(0.0, 0.5)
    blocks = find_blocks(model)
    assert [b.kind for b in blocks] == [arch if arch != "vit" else "proj"] * 2
    x = torch.randn(2, SEQ, D, dtype=torch.float64)
    keep = torch.ones(2, 1, SEQ, SEQ, dtype=torch.bool)
    keep[1, ..., -2:] = False
    if arch == "gpt2":
        keep &= torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, torch.finfo(torch.float64).min)
    for impl in ("sdpa", "eager"):
        model.config._attn_implementation = impl
        for block in blocks:
            module = model.get_submodule(block.path)
            mask = None if arch == "vit" else (keep if impl == "sdpa" else additive)
            with torch.no_grad():
                want = module(x, attention_mask=mask)[0]
                if arch == "bert":
                    want = model.get_submodule(block.path.rsplit(".", 1)[0]).output.dense(want)
                got = block.layer(x, attn_mask=None if arch == "vit" else keep)
                err = (got - want).abs().max().item()
                assert err <= (1e-10 if impl == "sdpa" else 1e-7), (impl, err)       # eager: float32 softmax
                if HAS_KERNEL_ARG:
                    through = block.layer(x, attn_mask=None if arch == "vit" else keep,
                                          kernel=hf_kernel(module, mask, block))
                    assert (through - want).abs().max() <= 1e-10


# -- 2. the layer features the families need ---------------------------------------------------------

def _partial_rope_reference(layer, x, positions):
    """Explicit float64 GQA with RoPE on the first rope_dim dims of each head (pairs (j, j + r/2))."""
    p = {k: v.detach().double() for k, v in layer.named_parameters()}
    B, S, _ = x.shape
    h, g, hd, r = layer.n_heads, layer.n_kv_heads, layer.head_dim, layer.rope_dim
    heads = lambda t, n: t.view(B, S, n, hd).transpose(1, 2)                       # noqa: E731
    q = heads(x @ p["q_proj.weight"].T + p["q_proj.bias"], h)
    k = heads(x @ p["k_proj.weight"].T + p["k_proj.bias"], g).repeat_interleave(h // g, 1)
    v = heads(x @ p["v_proj.weight"].T + p["v_proj.bias"], g).repeat_interleave(h // g, 1)

    def rotate(t):                                                                 # (B, n, S, hd)
        out = t.clone()
        for j in range(r // 2):
            angle = positions.double() * layer.rope_base ** (-2 * j / r)                  # (S,)
            c, s = angle.cos(), angle.sin()
            a, b = t[..., j], t[..., j + r // 2]
            out[..., j], out[..., j + r // 2] = a * c - b * s, b * c + a * s
        return out
    logits = rotate(q) @ rotate(k).transpose(-1, -2) * layer.scale
    logits = logits.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    o = torch.softmax(logits, -1) @ v
    return o.transpose(1, 2).reshape(B, S, -1) @ p["o_proj.weight"].T + p["o_proj.bias"]


def test_partial_rope_matches_an_explicit_float64_reference():
    torch.manual_seed(0)
    layer = GroupedQueryAttention(D, HEADS, 2, head_dim=12, rope=True, rope_dim=4, bias=True, causal=True,
                                  rope_base=100.0).double()
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    assert layer.rotary.dim == 4 and layer.config()["rope_dim"] == 4
    x = torch.randn(2, 9, D, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _partial_rope_reference(layer, x, torch.arange(9)), rtol=0, atol=1e-12)
    # the unrotated dims carry no position: a layer rotating nothing but those 4 dims differs from full RoPE
    full = GroupedQueryAttention(D, HEADS, 2, head_dim=12, rope=True, bias=True, causal=True, rope_base=100.0).double()
    full.load_state_dict(layer.state_dict())
    assert (full(x) - layer(x)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="rope_dim must be even"):
        GroupedQueryAttention(D, HEADS, 2, head_dim=12, rope=True, rope_dim=3)
    with pytest.raises(ValueError, match="rope_dim"):
        GroupedQueryAttention(D, HEADS, 2, head_dim=12, rope=True, rope_dim=14)
    tucker = to_tucker(layer)                                   # partial RoPE: unrotated dims are pairs of frequency 0
    torch.testing.assert_close(tucker(x), _partial_rope_reference(layer, x, torch.arange(9)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("options", [{"qk_norm": True}, {"rope_dim": 4}, {"qk_norm": True, "rope_dim": 2}])
def test_cache_decode_equals_full_forward(options):
    torch.manual_seed(0)
    layer = GroupedQueryAttention(D, HEADS, 2, head_dim=16, rope=True, causal=True, bias=True, **options).double()
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0, 0.5)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    full = layer(x)
    cache = layer.make_cache(2, 9)
    parts = [layer(x[:, a:b], cache=cache) for a, b in ((0, 4), (4, 5), (5, 9))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-12)


def test_old_configs_without_the_new_options_still_build():
    from tucker_attention.layers import make_attention

    layer = GroupedQueryAttention(D, HEADS, 2, rope=True, qk_norm=True, rope_dim=4)
    config = layer.config()
    assert (config["rope_dim"], config["qk_norm"], config["norm_eps"]) == (4, True, 1e-6)
    assert make_attention(**config).config() == config
    old = {k: v for k, v in config.items() if k not in ("rope_dim", "qk_norm", "norm_eps")}
    rebuilt = make_attention(**old)
    assert rebuilt.rope_dim is None and rebuilt.q_norm is None and rebuilt.rotary.dim == D // HEADS
    assert set(layer.init_stds()) == {f"{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    assert set(layer.input_weights()) == {"q_proj.weight", "k_proj.weight", "v_proj.weight"}
    assert layer.lr_scales()["q_norm.weight"] == 1.0


# -- 3. non-linear layers: what they say, and their linearization ----------------------------------------

def _selection(rows: int, cols: int, start: int = 0) -> torch.Tensor:
    """(rows, cols) weight picking input coordinates start .. start+rows-1."""
    w = torch.zeros(rows, cols, dtype=torch.float64)
    w[torch.arange(rows), torch.arange(start, start + rows)] = 1.0
    return w


def _signs(*shape, scale=1.0, seed=0):
    return scale * (torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(seed)).double() * 2 - 1)


def test_gqa_qk_norm_nonlinearity_and_linearized():
    torch.manual_seed(0)
    layer = GroupedQueryAttention(D, HEADS, 2, causal=True, rope=True, rope_dim=4, qk_norm=True, norm_eps=1e-5).double()
    assert "RMSNorm" in layer.nonlinearity() and "Qwen3" in layer.nonlinearity()
    plain = GroupedQueryAttention(D, HEADS, 2)
    assert plain.nonlinearity() is None and plain.linearized() is plain
    for call in (layer.tensor_view, layer.exact_tucker):
        with pytest.raises(ValueError, match="not linear in x.*linearized"):
            call()
    # q and k pick input coordinates, so on inputs of entries +-c every head's q and k have rms
    # exactly c: the norm is then the constant 1/sqrt(c^2 + eps), and linearized() is exact when
    # told the second moment c^2 I (None means c = 1).
    with torch.no_grad():
        layer.q_proj.weight.copy_(_selection(D, D))
        layer.k_proj.weight.copy_(_selection(16, D, start=8))
        layer.q_norm.weight.normal_(1.0, 0.5)
        layer.k_norm.weight.normal_(1.0, 0.5)
    for c, cov in ((1.0, None), (2.0, 4.0 * torch.eye(D, dtype=torch.float64))):
        linear = layer.linearized(cov)
        assert linear.nonlinearity() is None and linear.q_norm is None and linear.rope_dim == 4
        assert {k: v for k, v in linear.config().items() if k != "qk_norm"} == \
               {k: v for k, v in layer.config().items() if k != "qk_norm"}
        x = _signs(2, SEQ, D, scale=c)
        torch.testing.assert_close(linear(x), layer(x), rtol=0, atol=1e-12)
        linear.tensor_view()                                      # the tensor view now applies
    wrong = layer.linearized(None)                                # told rms 1 for inputs of rms 2
    assert (wrong(_signs(2, SEQ, D, scale=2.0)) - layer(_signs(2, SEQ, D, scale=2.0))).abs().max() > 1e-3


@pytest.mark.parametrize("shared_kv", [True, False])
def test_mla_latent_norm_nonlinearity_and_linearized(shared_kv):
    torch.manual_seed(0)
    kv = 8
    layer = MultiHeadLatentAttention(D, HEADS, kv, q_rank=8, rope="decoupled", rope_dim=4, latent_norm=True,
                                     shared_kv=shared_kv, down_bias=False, causal=True).double()
    assert "latent" in layer.nonlinearity()
    assert MultiHeadLatentAttention(D, HEADS, kv).nonlinearity() is None
    with pytest.raises(ValueError, match="not linear in x"):
        layer.tensor_view()
    with torch.no_grad():
        layer.kv_down.weight.copy_(_selection(kv if shared_kv else 2 * kv, D))
        layer.q_down.weight.copy_(_selection(8, D, start=16))
        layer.kv_norm.weight.normal_(1.0, 0.5)
        layer.q_norm.weight.normal_(1.0, 0.5)
    linear = layer.linearized()
    assert linear.nonlinearity() is None and linear.kv_norm is None and linear.q_norm is None
    x = _signs(2, SEQ, D)
    torch.testing.assert_close(linear(x), layer(x), rtol=0, atol=1e-12)


# -- 4. what is not read, and why ------------------------------------------------------------------------

class LookAlikeAttention(torch.nn.Module):
    """Attention-like (q, k, v, o) but of no supported structure."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Linear(D, D) for _ in range(4))


def test_unsupported_attention_like_modules_raise_naming_what_they_hold():
    with pytest.raises(TypeError, match=r"unsupported attention block LookAlikeAttention\(q: Linear\(32->32\)") as info:
        read_block(LookAlikeAttention())
    assert all(name in str(info.value) for name in STRUCTURES)
    model = torch.nn.Sequential(torch.nn.Linear(D, D), LookAlikeAttention())
    found = r"no supported attention blocks \(found: LookAlikeAttention\(q: Linear"
    with pytest.raises(ValueError, match=found) as info:
        find_blocks(model)
    assert all(name in str(info.value) for name in SUPPORTED_BLOCKS)


@pytest.mark.parametrize("family,config,match", [
    ("CohereForCausalLM", lambda: T.CohereConfig(num_key_value_heads=2, **COMMON), "interleaved pairs"),
    ("Olmo2ForCausalLM", lambda: T.Olmo2Config(num_key_value_heads=2, **COMMON), "whole projection"),
    ("GptOssForCausalLM", lambda: T.GptOssConfig(num_key_value_heads=2, num_local_experts=2, head_dim=8,
                                                 **COMMON), "sinks"),
    ("DeepseekV3ForCausalLM", lambda: T.DeepseekV3Config(**{**MLA_SIZES, "v_head_dim": 4},
                                                         num_key_value_heads=HEADS, **COMMON),
     "needs them equal"),
])
def test_families_that_compute_something_else_are_refused(family, config, match):
    torch.manual_seed(0)
    model = getattr(T, family)(config()).eval()
    with pytest.raises(TypeError, match=match) as info:
        find_blocks(model)
    assert "unsupported attention block" in str(info.value)


def test_a_model_with_unread_attention_like_modules_warns():
    model = torch.nn.ModuleDict({"llama": build("llama"), "other": LookAlikeAttention()})
    with pytest.warns(UserWarning, match=r"other \(LookAlikeAttention\)"):
        blocks = find_blocks(model)
    assert len(blocks) == 2

