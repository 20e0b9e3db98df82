"""A new conversion method defined here, outside the package, gets every conversion path for free: one
record registered (``tucker_attention.tensors.register``) converts a layer (``convert_layer``), a
transformers model (``tucker_attention.hf.convert``) and a model folder (``tucker-attn convert``, whose
``--method`` offers it), without editing the package.

The method: "narrow heads", every head's W_i and W~_i truncated to rank ``head_dim`` by an SVD, kept
as a GQA layer with as many key heads as heads, ``head_dim`` wide (its KV cache shrinks with the width).
"""

import importlib.util

import pytest
import torch

from tucker_attention.layers import GroupedQueryAttention, MultiHeadAttention
from tucker_attention.tensors import (
    METHODS,
    ConversionMethod,
    SettingError,
    attention_factors,
    convert_layer,
    register,
    relative_error,
    unregister,
)

NAME = "narrow-heads-test"
D, H, W = 32, 4, 8                       # d_model, heads, head width


def narrow_heads(layer, head_dim, *, ignore_rope: bool = False) -> GroupedQueryAttention:
    """Each head's W_i = A_i B_i^T (query / key side) and W~_i (output / value side) at rank ``head_dim``
    (None: the source's head width, exact): its leading SVD pair split as sqrt(S) on each side. The key
    bias term of W moves to the query bias by least squares (exact at full width), the output bias stays."""
    f = attention_factors(layer, ignore_rope=ignore_rope)
    h, d = layer.n_heads, layer.d_model
    k = f.pre.A.shape[2] if head_dim is None else head_dim
    target = GroupedQueryAttention(d, h, h, head_dim=k, causal=layer.causal, dropout=layer.dropout, bias=True,
                                   scale=layer.scale)
    values = {name: torch.zeros(p.shape, dtype=torch.float64) for name, p in target.named_parameters()}
    for i in range(h):
        rows = slice(i * k, (i + 1) * k)
        for side, (left, right) in ((f.pre, ("q_proj", "k_proj")), (f.post, ("o_proj", "v_proj"))):
            U, S, Vh = torch.linalg.svd(side.A[i] @ side.B[i].T)             # (d, d): W_i or W~_i
            a, b = U[:, :k] * S[:k].sqrt(), Vh[:k].T * S[:k].sqrt()           # (d, k) each
            if left == "q_proj":
                values["q_proj.weight"][rows] = a.T
                if f.key_bias is not None:
                    values["q_proj.bias"][rows] = torch.linalg.lstsq(b, f.key_bias[i].unsqueeze(-1)).solution[:, 0]
            else:
                values["o_proj.weight"][:, rows] = a
            values[f"{right}.weight"][rows] = b.T
    if f.out_bias is not None:
        values["o_proj.bias"] = f.out_bias
    return target.assign_parameters(values, like=layer)


def check_narrow(path: str, layer, head_dim: int, value_ranks=None) -> bool:
    """A width at most the head width of block ``path``; whether it is the full (exact) width."""
    width = attention_factors(layer, ignore_rope=True).pre.A.shape[2]
    if head_dim > width:
        raise SettingError("ranks", f"head_dim={head_dim} exceeds the head width {width} of block {path}")
    return head_dim == width


NARROW = ConversionMethod(NAME, names=("head_dim",), counts=(1,), syntax="head_dim", convert=narrow_heads,
                          check=check_narrow, keeps_rope=(), title="narrow heads")


@pytest.fixture(scope="module", autouse=True)
def registered():
    """The new method, registered for this module only."""
    register(NARROW)
    yield NARROW
    unregister(NAME)


def test_convert_layer_through_the_registry():
    torch.manual_seed(0)
    layer = MultiHeadAttention(D, H, bias=True, causal=True).double()
    x = torch.randn(2, 7, D, dtype=torch.float64)
    assert NAME in METHODS
    for setting in (None, W):                                       # full width: exact, biases included
        torch.testing.assert_close(convert_layer(layer, NAME, setting)(x), layer(x), atol=1e-10, rtol=1e-10)
    narrow = convert_layer(layer, NAME, 2)
    assert isinstance(narrow, GroupedQueryAttention) and narrow.cache_spec() == {"k": (H, 2), "v": (H, 2)}
    errors = [relative_error(layer, convert_layer(layer, NAME, k), x) for k in (2, 4, 6)]
    assert errors[0] > errors[1] > errors[2] > 1e-6                 # truncation: better with width
    with pytest.raises(ValueError, match="value_ranks is for method='tucker', got method='narrow-heads-test'"):
        convert_layer(layer, NAME, 4, value_ranks=(2, 8, 8))


def test_registering_twice_or_unknown_names_are_refused():
    with pytest.raises(ValueError, match="already registered"):
        register(NARROW)
    with pytest.raises(ValueError, match=f"method must be one of .*'{NAME}'"):
        convert_layer(MultiHeadAttention(D, H), "no-such-method", 2)


def test_the_command_line_offers_it():
    from tucker_attention.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["convert", "src", "--method", NAME, "--ranks", "4", "--out", "o"])
    assert args.method == NAME and list(args.ranks[0]) == [4]
    assert parser.parse_args(["compress", "--method", NAME]).method == NAME


def test_convert_settings_from_a_config_file_and_flags(tmp_path):
    """``--config FILE`` holds ConvertConfig's fields; the flags given override them."""
    import json

    from tucker_attention.cli import build_parser
    from tucker_attention.cli.config_flags import config_values
    from tucker_attention.settings.convert import ConvertConfig, ConvertError

    (tmp_path / "c.json").write_text(json.dumps({"method": NAME, "ranks": [4], "seed": 1, "seq_len": 32}))
    args = build_parser().parse_args(["convert", "src", "--config", str(tmp_path / "c.json"), "--seed", "3",
                                      "--out", "o"])
    config = ConvertConfig(**config_values(args, ConvertConfig))
    assert (config.method, config.ranks, config.seed, config.seq_len) == (NAME, (4,), 3, 32)
    with pytest.raises(ConvertError, match=f"value_ranks: value ranks are for --method tucker, not {NAME}"):
        ConvertConfig(NAME, ranks=4, value_ranks=(2, 8, 8))


# -- through tucker_attention.hf (tiny GPT-2) --------------------------------------------------------

needs_hf = pytest.mark.skipif(importlib.util.find_spec("transformers") is None or
                              importlib.util.find_spec("safetensors") is None, reason="needs transformers (extra 'hf')")


def _gpt2():
    import transformers as T

    torch.manual_seed(0)
    config = T.GPT2Config(n_embd=D, n_head=H, n_layer=2, vocab_size=64, n_positions=64, initializer_range=0.3,
                          bos_token_id=None, eos_token_id=None)
    return T.GPT2LMHeadModel(config).eval()


@needs_hf
@pytest.mark.usefixtures("one_thread")
def test_hf_convert_and_reload(tmp_path):
    from tucker_attention.hf import convert, converted_blocks, load_converted

    model = _gpt2()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        exact = convert(model, NAME, W, inplace=False)
        torch.testing.assert_close(exact(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
        narrow = convert(model, NAME, 4, inplace=False)
        assert all(b.layer.cache_spec() == {"k": (H, 4), "v": (H, 4)} for b in converted_blocks(narrow).values())
        assert narrow.config.tucker_attention["method"] == NAME
        narrow.save_pretrained(tmp_path / "narrow")
        torch.testing.assert_close(load_converted(tmp_path / "narrow")(input_ids=ids).logits,
                                   narrow(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@needs_hf
@pytest.mark.usefixtures("one_thread")
def test_tucker_attn_convert_runs_it(tmp_path, capsys):
    from tucker_attention.cli import main

    _gpt2().save_pretrained(tmp_path / "gpt2")
    fast = ["--n-calibration", "4", "--n-eval", "2", "--seq-len", "16", "--no-progress"]
    assert main(["convert", str(tmp_path / "gpt2"), "--method", NAME, "--ranks", "4", "--out", str(tmp_path / "o"),
                 *fast]) == 0
    printed = capsys.readouterr().out
    assert f"{NAME} head_dim 4" in printed and (tmp_path / "o" / "config.json").is_file()
    for argv, says in ((["--ranks", "9"], "--ranks: head_dim=9 exceeds the head width 8"),
                       (["--budget-kv", "0.5"], f"--budget-kv: {NAME} has no budget planner")):
        assert main(["convert", str(tmp_path / "gpt2"), "--method", NAME, *argv, "--out", str(tmp_path / "x"),
                     *fast]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unregistered_it_is_gone():
    unregister(NAME)
    try:
        assert NAME not in METHODS
        with pytest.raises(ValueError, match="method must be one of"):
            convert_layer(MultiHeadAttention(D, H), NAME, 2)
    finally:
        register(NARROW)
