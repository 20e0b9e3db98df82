"""Per-layer budgets by measured sensitivity (:mod:`tucker_attention.hf.conversion.allocation`): the greedy
allocation against an exhaustive search, the levels a layer allows, and ``convert`` keeping both
budgets exactly while spreading the KV across layers of a tiny Llama; and the default pieces such
choices are measured on (as long as ``seq_len``, 512 tokens, capped at the model's positions)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from tucker_attention.hf.conversion.allocation import STEPS, allocate, level_setting, levels_allowed
from tucker_attention.layers import make_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def _modelled(damage, levels) -> float:
    total = 0.0
    for (d0, dm), j in zip(damage, levels):
        rho = min(1.0, d0 / dm) if dm > 0 else 1.0
        total += d0 * rho ** j
    return total


@pytest.mark.parametrize("seed", range(20))
def test_allocate_finds_the_least_modelled_damage_that_keeps_the_total(seed):
    """Exhaustive search over every level combination summing to 0 is the reference."""
    rng = random.Random(seed)
    n = rng.randint(2, 5)
    damage = [(d0, d0 * rng.uniform(0.9, 6.0)) for d0 in (rng.uniform(0.01, 2.0) for _ in range(n))]
    allowed = [(rng.randint(-STEPS, 0), rng.randint(0, STEPS)) for _ in range(n)]
    levels = allocate(damage, allowed)
    assert sum(levels) == 0 and all(low <= j <= high for j, (low, high) in zip(levels, allowed))
    combos = [c for c in itertools.product(*(range(lo, hi + 1) for lo, hi in allowed)) if sum(c) == 0]
    best = min(_modelled(damage, c) for c in combos)
    assert _modelled(damage, levels) == pytest.approx(best, rel=1e-12)


def test_allocate_gives_the_sensitive_layer_the_steps():
    assert allocate([(1.0, 1.0), (1.0, 1.0)], [(-2, 2), (-2, 2)]) == [0, 0]            # nothing to gain
    assert allocate([(1.0, 3.0), (0.1, 0.11), (0.2, 0.3)], [(-2, 2)] * 3) == [2, -2, 0]
    with pytest.raises(ValueError, match="one entry per layer"):
        allocate([(1.0, 2.0)], [(-1, 1), (-1, 1)])


def test_levels_change_the_kv_width_by_even_steps_within_the_source():
    source = make_attention("gqa", d_model=32, n_heads=4, n_kv_heads=2, rope=True)   # keys and values 16 wide
    setting = ((4, 16, 8), (4, 16, 8))
    assert [level_setting("tucker", setting, j)[0][2] for j in range(-2, 3)] == [4, 6, 8, 10, 12]
    assert levels_allowed("tucker", setting, source) == (-2, 2)
    wide = ((4, 16, 14), (4, 16, 14))                            # 14 + 4 > 16: no wider level
    assert levels_allowed("tucker", wide, source) == (-2, 0)
    assert level_setting("mla", ((12, 20), None), 1) == ((16, 20), None)      # steps of 4
    assert level_setting("mla", (12, None), -2) == (4, None)
    assert levels_allowed("mla", (30, None), source) == (-2, 0)  # kv_rank at most keys + values = 32
    shared = make_attention("mla", d_model=32, n_heads=4, kv_rank=16)  # one latent serves keys and values
    assert levels_allowed("mla", (8, None), shared) == (-2, 2) and levels_allowed("mla", (16, None), shared) == (-2, 0)


@pytest.fixture(scope="module")
def llama_data():
    T = pytest.importorskip("transformers", reason="needs transformers (extra 'hf')")
    from tucker_attention.hf.conversion.calibration import attention_statistics
    from tucker_attention.hf.conversion.fidelity import make_inputs

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=64, num_hidden_layers=3,
                                             max_position_embeddings=64, initializer_range=0.3, bos_token_id=None,
                                             eos_token_id=None)).eval()
    cal, _, _ = make_inputs(model, None, n_calibration=8, n_eval=4, seq_len=16)
    return model, cal, attention_statistics(model, cal)


@pytest.mark.parametrize("method", ["tucker", "mla"])
def test_measured_allocation_keeps_both_budgets_and_is_kept_only_when_better(llama_data, method):
    import warnings

    from tucker_attention.accounting import attention_param_count, kv_cache_floats_per_token
    from tucker_attention.hf.conversion.convert import converted_blocks
    from tucker_attention.hf.conversion.settings import convert_model

    model, cal, stats = llama_data
    before = {n: p.clone() for n, p in model.state_dict().items()}
    runs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for allocation in ("uniform", "measured"):
            converted, info = convert_model(model, method, budget_kv=0.5, partial_rope=0.0, allocation=allocation,
                                            statistics=stats, batches=cal, kind="decoder")
            layers = [b.layer for b in converted_blocks(converted).values()]
            runs[allocation] = (info, sum(map(attention_param_count, layers)),
                                sum(map(kv_cache_floats_per_token, layers)))
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())        # the source is untouched
    (uniform, u_params, u_kv), (spread, s_params, s_kv) = runs["uniform"], runs["measured"]
    assert uniform["choice"] is None and uniform["allocation"] == "uniform"
    lines = spread["choice"].splitlines()
    kept = [line for line in lines if "<- kept" in line]
    assert len(kept) == 1 and "per-layer allocation by measured sensitivity" in spread["choice"]
    scores = [float(line.split("kl ")[1].split()[0]) for line in lines if ": kl " in line]
    assert len(scores) == 2 and float(kept[0].split("kl ")[1].split()[0]) == min(scores)
    if spread["allocation"] == "measured":                    # the spread won: other widths, the same totals
        assert isinstance(spread["ranks"], list) and len({str(r) for r in spread["ranks"]}) > 1
        assert s_kv == u_kv and s_params == u_params
        assert any("no one cache layout" in note for note in spread["notes"])
    else:
        assert spread["ranks"] == uniform["ranks"] and (s_params, s_kv) == (u_params, u_kv)


def test_measured_allocation_is_refused_where_it_cannot_move_the_kv(llama_data):
    from tucker_attention.hf.conversion.settings import ConvertError, convert_model

    model, cal, stats = llama_data
    with pytest.raises(ConvertError, match="ranks were given"):
        convert_model(model, "tucker", ranks=(2, 16, 8), allocation="measured", statistics=stats, batches=cal,
                      kind="decoder")
    with pytest.raises(ConvertError, match="gqa's n_kv_heads"):
        convert_model(model, "gqa", budget_kv=0.5, allocation="measured", statistics=stats, batches=cal,
                      kind="decoder")
    with pytest.raises(ConvertError, match="must be one of"):
        convert_model(model, "tucker", budget_kv=0.5, allocation="greedy", statistics=stats, batches=cal,
                      kind="decoder")


def test_default_pieces_are_as_long_as_seq_len_and_fill_a_token_budget(llama_data):
    from tucker_attention.hf.conversion.fidelity import SEQ_LEN, default_sizes, make_inputs

    assert SEQ_LEN == 512 and default_sizes(512) == (16, 8, 2) and default_sizes(128) == (64, 32, 8)
    assert default_sizes(512, images=True) == (64, 16, 8)
    model = llama_data[0]                                    # 64 positions: pieces of 64 tokens, 16 a batch
    cal, ev, described = make_inputs(model, None)
    assert [tuple(b["input_ids"].shape) for b in cal] == [(16, 64)] * 8
    assert [tuple(b["input_ids"].shape) for b in ev] == [(16, 64)] * 4
    assert "128 random token-id sequences of 64 tokens" in described
    cal, _, _ = make_inputs(model, None, seq_len=32, n_calibration=3, batch_size=2)      # given sizes win
    assert [tuple(b["input_ids"].shape) for b in cal] == [(2, 32), (1, 32)]


def test_measuring_from_a_layer_on_equals_running_every_layer(llama_data):
    """The layers before a swapped block replay their recorded outputs: the same logits as a full run."""
    import copy

    from tucker_attention.hf.conversion.allocation import _Prefix
    from tucker_attention.hf.conversion.convert import block_facts, convert_block
    from tucker_attention.hf.conversion.fidelity import run_model
    from tucker_attention.hf.families.reading import find_blocks
    from tucker_attention.hf.modeling.auto import place_block
    from tucker_attention.hf.modeling.cache import SharedRope

    model, cal, stats = llama_data
    probe = copy.deepcopy(model)
    blocks = find_blocks(probe)
    prefix = _Prefix(probe, [b.path for b in blocks], cal[0], "decoder")
    assert len(prefix.layers) == 3 and len(prefix.outputs) == 3
    block = blocks[2]
    layer = convert_block(block.layer, "tucker", (2, 16, 4), input_cov=stats[block.path])
    place_block(probe, block.path, layer, block_facts(block, layer), SharedRope())
    calls = []
    first = probe.model.layers[0]
    handle = first.mlp.register_forward_pre_hook(lambda *args: calls.append(1))      # inside the layer
    with torch.no_grad():
        full = run_model(probe, cal[0], "decoder")
        with prefix.skipping(block.path):
            skipped = run_model(probe, cal[0], "decoder")
    handle.remove()
    assert len(calls) == 1                                      # the first layer ran once: not in the skipped run
    assert torch.equal(full, skipped) and not torch.equal(full, run_model(model, cal[0], "decoder"))
    assert "forward" not in vars(first)                         # the stand-ins are gone


def test_a_swapped_block_is_restored_with_everything_placing_it_changed():
    """A BERT block's converted layer holds the output projection, so placing it replaces that too."""
    T = pytest.importorskip("transformers")
    from tucker_attention.hf.conversion.convert import block_facts, convert_block
    from tucker_attention.hf.families.reading import find_blocks
    from tucker_attention.hf.modeling.auto import block_swapped

    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(vocab_size=40, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                     num_hidden_layers=2, max_position_embeddings=32)).eval()
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
        block = find_blocks(model)[0]
        layer = convert_block(block.layer, "tucker", (2, 16, 4))
        with block_swapped(model, block.path, layer, block_facts(block, layer)):
            inside = model(input_ids=ids).last_hidden_state
            assert isinstance(model.encoder.layer[0].attention.output.dense, torch.nn.Identity)
        after = model(input_ids=ids).last_hidden_state
    assert not torch.allclose(inside, want) and torch.equal(after, want)
    assert isinstance(model.encoder.layer[0].attention.output.dense, torch.nn.Linear)
