"""Layer-by-layer calibration and what ``convert`` keeps on disk, pinned on tiny models: the
statistics of the layer-by-layer pass are the whole-model pass's bit for bit (every family), the
model's head never runs in it, statistics and reference logits read back from disk are the ones
written, conversions and scores from them equal the in-memory ones, and a block's layer is read
from the module's current weights."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

T = pytest.importorskip("transformers", reason="the conversion needs transformers (extra 'hf')")

import tiny  # noqa: E402

from tucker_attention.hf import attention_layers, convert, find_blocks  # noqa: E402
from tucker_attention.hf.conversion import calibration as calibration_module  # noqa: E402
from tucker_attention.hf.conversion.calibration import attention_statistics  # noqa: E402
from tucker_attention.hf.conversion.fidelity import _random_id_batches, fidelity, reference_outputs  # noqa: E402
from tucker_attention.hf.conversion.spill import Spill  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _encoders() -> dict:
    torch.manual_seed(0)
    small = {"hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64, "num_hidden_layers": 2}
    return {"bert": lambda: T.BertModel(T.BertConfig(vocab_size=100, **small)),
            "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_head=4, n_layer=2, vocab_size=100,
                                                           bos_token_id=0, eos_token_id=0)),
            "vit": lambda: T.ViTModel(T.ViTConfig(image_size=16, patch_size=4, **small))}


MODELS = {**{name: (lambda name=name: tiny.build(name)) for name in tiny.FAMILIES}, **_encoders()}


def _batches(model) -> list:
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        gen = torch.Generator().manual_seed(0)
        return [torch.randn(2, 3, 16, 16, generator=gen), torch.randn(1, 3, 16, 16, generator=gen)]
    batches = _random_id_batches(model.config.vocab_size, 5, 12, 2, 0)
    batches[1]["attention_mask"][1, 8:] = 0                           # padding is left out of the statistics
    return batches


def _whole_model(monkeypatch) -> None:
    monkeypatch.setattr(calibration_module, "layer_stack", lambda model, paths: None)


@pytest.mark.parametrize("name", list(MODELS))
def test_layer_by_layer_statistics_are_the_whole_model_passes(name, monkeypatch):
    """Each layer run on the previous layer's outputs, with the arguments the model gave it, sees what it
    sees in the model's own forward: the same statistics, bit for bit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MODELS[name]().eval()
        batches = _batches(model)
        paths = [b.path for b in find_blocks(model)]
        assert calibration_module.layer_stack(model, paths) is not None     # the layer-by-layer path is taken
        streamed = attention_statistics(model, batches)
        _whole_model(monkeypatch)
        whole = attention_statistics(model, batches)
    assert list(streamed) == list(whole) == paths
    for path in paths:                         # torch.equal is False on NaN: finite, e.g. Mistral's padding
        assert torch.equal(streamed[path].inputs, whole[path].inputs)
        assert torch.equal(streamed[path].mixed, whole[path].mixed)


def test_layer_by_layer_calibration_never_runs_the_head(monkeypatch):
    """The head (a 262k-vocabulary model's largest matrix and logits) is not run to gather statistics."""
    model = tiny.build("llama").eval()
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda *args: calls.append(1))
    batches = _batches(model)
    attention_statistics(model, batches)
    assert calls == []
    _whole_model(monkeypatch)
    attention_statistics(model, batches)
    assert len(calls) == len(batches)                                   # the whole-model pass does run it


def test_spilled_statistics_convert_as_the_in_memory_ones():
    model = tiny.build("llama").eval()
    batches = _batches(model)
    in_memory = attention_statistics(model, batches)
    with Spill() as spill:
        folder = spill._folder.name
        spilled = attention_statistics(model, batches, spill=spill)
        assert not isinstance(spilled, dict) and list(spilled) == list(in_memory)
        assert sorted(os.listdir(folder)) == [f"{i}.safetensors" for i in range(len(in_memory))]
        for path in in_memory:
            assert torch.equal(spilled[path].inputs, in_memory[path].inputs)
            assert torch.equal(spilled[path].mixed, in_memory[path].mixed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = convert(model, "tucker", (4, 16, 8), calibration=spilled, inplace=False)
            b = convert(model, "tucker", (4, 16, 8), calibration=in_memory, inplace=False)
    assert not os.path.exists(folder)                                   # removed with the spill
    want = b.state_dict()
    assert all(torch.equal(tensor, want[name]) for name, tensor in a.state_dict().items())
    with pytest.raises(KeyError):
        spilled["no.such.block"]


def test_spilled_reference_scores_as_the_in_memory_one():
    model = tiny.build("llama").eval()
    batches = _batches(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert(model, "tucker", (4, 16, 8), inplace=False)
    with Spill() as spill:
        spilled = reference_outputs(model, batches, "decoder", spill=spill)
        assert len(spilled) == len(batches) and not isinstance(spilled, list)
        got = fidelity(spilled, converted, batches, "decoder")
        with pytest.raises(IndexError):
            spilled[len(batches)]
    assert got == fidelity(reference_outputs(model, batches, "decoder"), converted, batches, "decoder")
    assert got == fidelity(model, converted, batches, "decoder")


def test_block_layers_are_read_from_the_modules_current_weights():
    """No copy goes stale: a block's layer (and a lazy attention_layers entry) is read when it is used."""
    model = tiny.build("llama").eval()
    block = find_blocks(model)[0]
    lazy, eager = attention_layers(model, lazy=True), attention_layers(model)
    assert list(lazy) == list(eager) and len(lazy) == len(eager)
    for path, layer in eager.items():
        assert all(torch.equal(a, b) for a, b in zip(lazy[path].state_dict().values(), layer.state_dict().values()))
    x = torch.randn(1, 5, model.config.hidden_size, dtype=block.layer.q_proj.weight.dtype)
    with torch.no_grad():
        before = block.layer(x)
        model.get_submodule(block.path).q_proj.weight.mul_(2.0)
        after = block.layer(x)
        assert not torch.allclose(before, after)
        assert torch.equal(after, lazy[block.path](x))


def test_spilled_statistics_keep_their_whitenings_and_refuse_none_later():
    """A block's whitenings are stored with its statistics and read back equal to a fresh computation;
    statistics that have none (all zero: no inputs) are stored without, and the conversion refuses them."""
    from tucker_attention.hf.conversion.calibration import BlockStatistics

    torch.manual_seed(0)
    x = torch.randn(64, 8, dtype=torch.float64)
    good = BlockStatistics(x.T @ x / 64, (x[:, :8] * 0.5).T @ x / 64)
    with Spill() as spill:
        from tucker_attention.hf.conversion.calibration import SpilledStatistics

        kept = SpilledStatistics(spill)
        kept.store("good", good)
        kept.store("zero", BlockStatistics(torch.zeros(8, 8, dtype=torch.float64)))
        (S, S_inv), (V, V_inv) = kept["good"].whitenings()
        (S2, S2_inv), (V2, V2_inv) = good.whitenings()
        assert kept["good"].whitened is not None
        assert all(torch.equal(a, b) for a, b in ((S, S2), (S_inv, S2_inv), (V, V2), (V_inv, V2_inv)))
        assert kept["good"].whitenings(mixed=False)[1] is None
        assert kept["zero"].whitened is None
        with pytest.raises(ValueError, match="no inputs were recorded"):
            kept["zero"].whitenings()
