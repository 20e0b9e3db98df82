"""Per-head q/k norms kept (:class:`TuckerHeadsAttention`): the latent is cached and each key head is
formed from it, normed and rotated when attending.

- The exact form of a q/k-norm GQA layer computes its outputs (float64, with and without a cache),
  and truncation to the current ranks changes nothing.
- On tiny Qwen3- and Gemma 3-structure models (float64 internals), ``convert`` at full rank keeps
  the logits to 1e-9 with nothing linearized, cached generation equals recomputation and
  save/load is exact; below full rank, calibrated, keeping the norms is closer to the source than
  linearizing them at the same ranks.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tucker_attention.accounting import kv_cache_floats_per_token
from tucker_attention.layers import TuckerHeadsAttention, make_attention
from tucker_attention.tensors import heads_form_applies, to_tucker_heads

pytestmark = pytest.mark.usefixtures("one_thread")


def _source(n_kv_heads: int = 2, rope=True, **extra):
    torch.manual_seed(0)
    layer = make_attention("gqa", d_model=32, n_heads=4, n_kv_heads=n_kv_heads, rope=rope, causal=True,
                           qk_norm=True, **extra).double()
    with torch.no_grad():
        layer.q_norm.weight.uniform_(0.5, 1.5)
        layer.k_norm.weight.uniform_(0.5, 1.5)
    return layer


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
@pytest.mark.parametrize("rope", [True, None])
def test_the_exact_form_computes_the_source_with_and_without_a_cache(n_kv_heads, rope):
    source = _source(n_kv_heads, rope)
    layer = to_tucker_heads(source)
    assert isinstance(layer, TuckerHeadsAttention) and layer.kernel_layout() == (n_kv_heads, 8)
    assert kv_cache_floats_per_token(layer) == kv_cache_floats_per_token(source)      # full rank: the same cache
    assert sum(p.numel() for p in layer.parameters()) == TuckerHeadsAttention.param_count(
        32, 4, layer.ranks, layer.value_ranks, key_heads=n_kv_heads, head_dim=8)
    x = torch.randn(2, 9, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = source(x)
    assert (layer(x) - want).abs().max() < 1e-12
    cache = layer.make_cache(2, 16)
    steps = torch.cat([layer(x[:, :5], cache=cache), layer(x[:, 5:7], cache=cache), layer(x[:, 7:], cache=cache)], 1)
    assert (steps - want).abs().max() < 1e-12
    same = layer.truncated(layer.ranks, layer.value_ranks)                  # the current ranks: nothing lost
    assert (same(x) - want).abs().max() < 1e-10
    rebuilt = make_attention(**layer.config()).double()
    rebuilt.load_state_dict(layer.state_dict())
    assert torch.equal(rebuilt(x), layer(x))


def test_truncation_lowers_every_rank_and_the_error_with_them():
    source = _source(2)
    layer = to_tucker_heads(source)
    x = torch.randn(2, 9, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    errors = []
    with torch.no_grad():
        want = source(x)
        for ranks in [(4, 32, 16), (4, 24, 12), (3, 16, 8), (2, 8, 4)]:
            cut = layer.truncated(ranks, ranks)
            assert cut.ranks == ranks and cut.value_ranks == ranks and cut.key_up.shape == (2, ranks[2], 8)
            errors.append(float((cut(x) - want).norm() / want.norm()))
    assert errors[0] < 1e-10 and errors == sorted(errors) and errors[-1] > 0.05
    with pytest.raises(ValueError, match="ranks"):
        layer.truncated((4, 33, 16), (4, 32, 16))


def test_what_the_heads_form_takes():
    assert heads_form_applies(_source(2))
    assert not heads_form_applies(_source(2, bias=True))                    # projection biases: linearized
    assert not heads_form_applies(_source(2, rope_dim=4))                   # partial head RoPE: linearized
    assert not heads_form_applies(make_attention("gqa", d_model=32, n_heads=4, n_kv_heads=2, rope=True))
    with pytest.raises(ValueError, match="biases"):
        to_tucker_heads(_source(2, bias=True))
    with pytest.raises(TypeError, match="no per-head q/k norms"):
        to_tucker_heads(make_attention("mla", d_model=32, n_heads=4, kv_rank=8))
    with pytest.raises(TypeError, match="no tensor view"):
        to_tucker_heads(_source(2)).tensor_view()


# -- converted transformers models ------------------------------------------------------------------

T = pytest.importorskip("transformers", reason="the hf tests need transformers (extra 'hf')")


def _tiny(family: str, monkeypatch):
    """A float64 tiny model of ``family`` without projection biases (as the released Qwen3 / Gemma 3)."""
    import tiny
    from test_hf_convert_families import float64_rope
    from test_hf_families import float64_internals

    name, make_config, structure, cls = tiny.FAMILIES[family]

    def config():
        made = make_config()
        made.attention_bias = False
        return made
    monkeypatch.setitem(tiny.FAMILIES, family, (name, config, structure, cls))
    model = tiny.build(family, unit_scale=True)
    model.set_attn_implementation("sdpa")
    float64_internals(model, monkeypatch)
    float64_rope(model, monkeypatch)
    return model


def _ids(seed: int, batch: int = 2, steps: int = 9) -> torch.Tensor:
    from tiny import VOCAB

    return torch.randint(0, VOCAB, (batch, steps), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_full_rank_keeps_the_q_k_norms_of_every_key_head_exactly(family, monkeypatch, tmp_path):
    from test_hf_convert_families import float64_rope
    from test_hf_families import float64_internals

    from tucker_attention.hf import convert, converted_blocks

    model = _tiny(family, monkeypatch)
    tokens = _ids(1)
    with torch.no_grad():
        want = model(input_ids=tokens).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)                       # exact: nothing linearized
        converted = convert(model, "tucker", inplace=False)
    layers = [b.layer for b in converted_blocks(converted).values()]
    assert all(isinstance(layer, TuckerHeadsAttention) and layer.key_heads == 2 for layer in layers)
    assert converted.config.tucker_attention["serving"] is None             # keys are formed when attending
    with torch.no_grad():
        got = converted(input_ids=tokens).logits
    assert (got - want).abs().max() <= 1e-9
    options = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(converted.generate(tokens, **options), converted.generate(tokens, use_cache=False, **options))
    converted.save_pretrained(tmp_path)
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, attn_implementation="sdpa")
    float64_internals(loaded, monkeypatch)
    float64_rope(loaded, monkeypatch)
    with torch.no_grad():                                   # Gemma's embedding normalizer reloads in float32
        assert (loaded(input_ids=tokens).logits - got).abs().max() <= (1e-5 if family == "gemma3" else 1e-9)


def _kl(want: torch.Tensor, got: torch.Tensor) -> float:
    p = want.double().log_softmax(-1)
    return float((p.exp() * (p - got.double().log_softmax(-1))).sum(-1).mean())


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_below_full_rank_keeping_the_norms_beats_linearizing_them(family, monkeypatch):
    """Calibrated on random tokens, scored on others: at 3/4 and 1/2 of the key dims the kept norms are
    closer to the source (measured: Qwen3 5x and 1.3x, Gemma 3 10x and 2x lower KL). Far below (1/4)
    a tiny random model's keys, spread evenly over every direction, lose so much that the exact norm
    of what is kept is no better than the linearized one (docs/pretrained.md)."""
    from tucker_attention.hf import attention_statistics, convert, converted_blocks

    model = _tiny(family, monkeypatch)
    calibration = [{"input_ids": _ids(seed, 4, 16), "attention_mask": torch.ones(4, 16, dtype=torch.long)}
                   for seed in range(10, 14)]
    stats = attention_statistics(model, calibration)
    held_out = _ids(99, 4, 16)
    with torch.no_grad():
        want = model(input_ids=held_out).logits
    for ranks, factor in (((4, 32, 24), 3.0), ((4, 32, 16), 1.1)):      # key latents of 24 and 16 of 2 x 16
        kl = {}
        for qk_norm in ("keep", "linearize"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                converted = convert(model, "tucker", ranks, calibration=stats, inplace=False, qk_norm=qk_norm)
            layers = [b.layer for b in converted_blocks(converted).values()]
            assert all(kv_cache_floats_per_token(layer) == 2 * ranks[2] for layer in layers)   # the same cache
            assert all(isinstance(layer, TuckerHeadsAttention) == (qk_norm == "keep") for layer in layers)
            with torch.no_grad():
                kl[qk_norm] = _kl(want, converted(input_ids=held_out).logits)
        assert factor * kl["keep"] < kl["linearize"], (ranks, kl)


def test_convert_command_keeps_the_norms_under_a_budget_without_partial_rope(monkeypatch, tmp_path):
    """``tucker-attn convert`` of a q/k-norm model under a KV budget: key-head layers, no partial-RoPE
    candidates (their RoPE is exact at any rank), both budgets held; ``--qk-norm linearize`` measures
    the partial-RoPE shares of the absorbed form instead."""
    from tucker_attention.hf.conversion.choose import NOPE_FRACTIONS
    from tucker_attention.hf.conversion.command import convert_folder

    model = _tiny("gemma3", monkeypatch).float()
    model.save_pretrained(tmp_path / "src")
    sizes = {"n_calibration": 8, "n_eval": 4, "seq_len": 16, "progress": False}
    report = convert_folder(tmp_path / "src", "tucker", budget_kv=0.5, out=tmp_path / "kept", **sizes)
    src, conv = report["source"], report["converted"]
    assert conv["kv_floats_per_token"] <= src["kv_floats_per_token"] // 2
    assert conv["attention_params"] <= src["attention_params"]
    assert report["nope_fraction"] == 0.0 and "partial RoPE" not in report["choice"]
    assert any("r2 lowered" in note for note in report["notes"])          # the plan counted the absorbed form
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "kept", local_files_only=True)
    blocks = [m for m in loaded.modules() if type(m).__name__ == "HFAttention"]
    assert blocks and all(isinstance(b.layer, TuckerHeadsAttention) for b in blocks)
    absorbed = convert_folder(tmp_path / "src", "tucker", budget_kv=0.5, out=tmp_path / "absorbed",
                              qk_norm="linearize", allocation="uniform", **sizes)
    assert absorbed["choice"].count(": kl ") == len(NOPE_FRACTIONS)
    assert any("linearized" in note for note in absorbed["notes"])
