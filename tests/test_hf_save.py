"""Converted models leave the library as ordinary transformers models.

save_pretrained / from_pretrained (registered types and remote code, exact logits and tokens),
the refusal of a plain load that would build random attention, every attention backend and a
user kernel through transformers' attention interface, continuous batching, and the serving
layout a paged-attention server reads from the config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

T = pytest.importorskip("transformers", reason="the hf integration tests need transformers (extra 'hf')")
pytest.importorskip("safetensors", reason="saving converted models needs safetensors (extra 'hf')")

from test_hf import LAYERS, TRUNCATED, VOCAB, _cache, _generate, build, make_inputs, max_err, outputs  # noqa: E402

from tucker_attention.hf import convert, converted_blocks, load_converted, save_converted  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

AUTO = {"gpt2": "AutoModelForCausalLM", "llama": "AutoModelForCausalLM", "bert": "AutoModel",
        "vit": "AutoModelForImageClassification"}


def quiet(model, method="tucker", ranks=TRUNCATED, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RoPE.*", category=UserWarning)
        return convert(model, method, ranks, **kwargs)


def converted_vit():
    torch.manual_seed(0)
    from test_hf import _config, _randomize_biases

    config = _config("vit")
    config.num_labels = 3
    return quiet(_randomize_biases(T.ViTForImageClassification(config)).eval())


def converted(arch: str, method: str = "tucker", ranks=TRUNCATED):
    return converted_vit() if arch == "vit" else quiet(build(arch), method, ranks)


# -- save_pretrained / from_pretrained -------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "vit"])
@pytest.mark.parametrize("remote", [False, True])
def test_save_pretrained_loads_exactly_with_the_auto_classes(arch, remote, tmp_path):
    model = converted(arch)
    inputs = make_inputs(arch)
    want = outputs(model, inputs)
    model.save_pretrained(tmp_path)
    files = {p.name for p in tmp_path.iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "tucker_" + {"vit": "vit", "bert": "bert", "gpt2": "gpt2", "llama": "llama"}[arch]
    assert config["auto_map"][AUTO[arch]].startswith("modeling_tucker_attention.Tucker")
    loader = getattr(T, AUTO[arch])
    loaded = loader.from_pretrained(tmp_path, trust_remote_code=remote, local_files_only=True)
    assert type(loaded).__name__ == type(model).__name__ and not loaded.training
    assert len(converted_blocks(loaded)) == LAYERS
    assert torch.equal(outputs(loaded, inputs), want)
    if arch in ("gpt2", "llama"):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        assert torch.equal(_generate(loaded, ids, mask), _generate(model, ids, mask))


def test_base_model_auto_class_loads_a_causal_lm_folder(tmp_path):
    """AutoModel on a saved TuckerLlamaForCausalLM gives its TuckerLlamaModel (paths without 'model.')."""
    model = converted("llama")
    model.save_pretrained(tmp_path)
    inputs = make_inputs("llama")
    base = T.AutoModel.from_pretrained(tmp_path, local_files_only=True)
    assert type(base).__name__ == "TuckerLlamaModel" and len(converted_blocks(base)) == LAYERS
    with torch.no_grad():
        want = model.model(**inputs).last_hidden_state
        assert torch.equal(base(**inputs).last_hidden_state, want)


def test_save_converted_alias_writes_tokenizer_and_generation_config(tmp_path):
    model = converted("gpt2")
    gen = T.GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0)
    save_converted(model, tmp_path, generation_config=gen)
    assert json.loads((tmp_path / "generation_config.json").read_text())["max_new_tokens"] == 3
    loaded = load_converted(tmp_path)
    assert torch.equal(outputs(loaded, make_inputs("gpt2")), outputs(model, make_inputs("gpt2")))


def test_loaded_model_saves_again_and_the_source_class_is_kept_apart(tmp_path):
    source = build("llama")
    model = quiet(source, inplace=False)
    assert type(source) is T.LlamaForCausalLM and type(model).__name__ == "TuckerLlamaForCausalLM"
    assert type(source.config) is T.LlamaConfig and source.config.num_key_value_heads == 2
    model.save_pretrained(tmp_path / "a")
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path / "a", local_files_only=True)
    again.save_pretrained(tmp_path / "b")
    third = T.AutoModelForCausalLM.from_pretrained(tmp_path / "b", local_files_only=True)
    inputs = make_inputs("llama")
    assert torch.equal(outputs(third, inputs), outputs(model, inputs))


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_MODULES_CACHE": str(cwd / "modules")}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=300)


def test_fresh_python_plain_load_refuses_and_remote_code_loads(tmp_path):
    """In a Python that has not imported tucker_attention: a plain from_pretrained raises (never a
    model with random attention); with trust_remote_code=True the folder's code imports the package."""
    model = converted("gpt2")
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    ids = make_inputs("gpt2", padded=False)["input_ids"]
    torch.save({"ids": ids, "logits": outputs(model, {"input_ids": ids})}, tmp_path / "want.pt")
    plain = _run(f"import transformers\ntransformers.AutoModelForCausalLM.from_pretrained({str(folder)!r})", tmp_path)
    assert plain.returncode != 0
    assert "trust_remote_code=True" in plain.stderr, plain.stderr[-2000:]
    assert "model.safetensors" not in plain.stdout                     # nothing was built or loaded
    remote = _run(
        "import sys, torch, transformers\ntorch.set_num_threads(1)\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)\n"
        f"want = torch.load({str(tmp_path / 'want.pt')!r}, weights_only=True)\n"
        "got = m(want['ids']).logits\n"
        "print('MAXERR', (got - want['logits']).abs().max().item(), type(m).__name__)\n", tmp_path)
    assert remote.returncode == 0, remote.stderr[-3000:]
    line = next(x for x in remote.stdout.splitlines() if x.startswith("MAXERR"))
    assert float(line.split()[1]) < 1e-5 and line.split()[2] == "TuckerGPT2LMHeadModel"   # another process: rounding


def test_plain_folder_of_an_unconverted_model_is_refused_by_load_converted(tmp_path):
    build("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not converted"):
        load_converted(tmp_path)


def test_a_converted_model_cannot_be_built_without_its_spec():
    from tucker_attention.hf.modeling.auto import model_class

    with pytest.raises(ValueError, match="needs a converted config"):
        model_class("LlamaForCausalLM")(T.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4,
                                                     num_hidden_layers=1, intermediate_size=64))


# -- attention backends ----------------------------------------------------------------------------

BACKEND_CASES = [("llama", "tucker", TRUNCATED), ("llama", "mla", 12), ("llama", "gqa", None),
                 ("gpt2", "tucker", TRUNCATED), ("bert", "tucker", TRUNCATED)]


@pytest.mark.parametrize("arch,method,ranks", BACKEND_CASES)
def test_eager_sdpa_and_flex_attention_agree(arch, method, ranks):
    model = converted(arch, method, ranks)
    inputs = make_inputs(arch)                              # padded rows: left (decoders) or right (BERT)
    got = {}
    for implementation in ("eager", "sdpa", "flex_attention"):
        model.set_attn_implementation(implementation)
        got[implementation] = outputs(model, inputs)
    assert max_err(got["sdpa"], got["eager"], inputs) < 1e-5
    assert max_err(got["flex_attention"], got["eager"], inputs) < 1e-5


def test_a_registered_kernel_receives_multi_query_shapes_of_width_r3():
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    seen = []

    def kernel(module, query, key, value, attention_mask, **kwargs):
        seen.append((tuple(query.shape), tuple(key.shape), tuple(value.shape), module.layer_idx))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("recording_kernel", kernel)
    AttentionMaskInterface.register("recording_kernel", sdpa_mask)
    model = converted("llama")
    inputs = make_inputs("llama")
    want = outputs(model, inputs)
    model.set_attn_implementation("recording_kernel")
    got = outputs(model, inputs)
    assert max_err(got, want, inputs) < 1e-6
    batch, steps = inputs["input_ids"].shape
    r3 = TRUNCATED[2]
    assert seen == [((batch, 4, steps, r3), (batch, 1, steps, r3), (batch, 1, steps, r3), i) for i in range(LAYERS)]


def test_generate_decodes_through_the_attention_interface_with_the_model_cache():
    model = converted("llama")
    inputs = make_inputs("llama")
    for implementation in ("eager", "sdpa"):
        model.set_attn_implementation(implementation)
        cached = _generate(model, inputs["input_ids"], inputs["attention_mask"])
        fresh = _generate(model, inputs["input_ids"], inputs["attention_mask"], use_cache=False)
        assert torch.equal(cached, fresh), implementation


# -- serving layout and continuous batching ---------------------------------------------------------

def test_tucker_decoder_declares_the_serving_layout(tmp_path):
    model = converted("llama")
    assert (model.config.num_key_value_heads, model.config.head_dim) == (1, TRUNCATED[2])
    assert model.config.tucker_attention["serving"] == {"num_key_value_heads": 1, "head_dim": TRUNCATED[2]}
    assert type(model)._supports_attention_backend is True
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["num_key_value_heads"], config["head_dim"]) == (1, TRUNCATED[2])
    # the skeleton is rebuilt with the source layout (2 key heads): the load is exact, not rebuilt at r3
    assert torch.equal(outputs(T.AutoModelForCausalLM.from_pretrained(tmp_path), make_inputs("llama")),
                       outputs(model, make_inputs("llama")))
    shared = quiet(build("llama"), "mla", 12)               # one shared latent: no K/V serving layout
    assert shared.config.tucker_attention["serving"] is None and shared.config.num_key_value_heads == 2


def test_static_cache_sized_from_the_serving_layout_decodes_like_the_dynamic_cache():
    model = converted("llama")
    ids = make_inputs("llama", padded=False)["input_ids"]
    dynamic = _generate(model, ids)
    static = _generate(model, ids, cache_implementation="static")
    assert torch.equal(static, dynamic)


#: transformers 5.0's paged cache cannot size itself on CPU (its memory probe needs a GPU or psutil);
#: 5.24's runs on CPU (HF.md), which is what these two tests check.
NEEDS_CPU_PAGED = pytest.mark.skipif(tuple(int(p) for p in T.__version__.split(".")[:2]) < (5, 24),
                                     reason="continuous batching on CPU needs transformers >= 5.24")
SMALL_PAGES = T.ContinuousBatchingConfig(page_size=16, num_blocks=8, max_batch_tokens=64) \
    if hasattr(T, "ContinuousBatchingConfig") else None


@NEEDS_CPU_PAGED
def test_generate_batch_runs_a_converted_decoder_with_paged_attention():
    pytest.importorskip("transformers.generation.continuous_batching")
    model = converted("llama")
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    config = T.GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    results = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=SMALL_PAGES)
    got = [results[k].generated_tokens for k in sorted(results)]
    want = [_generate(model, torch.tensor([p]))[0, len(p):len(p) + 4].tolist() for p in prompts]
    assert got == want


@NEEDS_CPU_PAGED
def test_paged_cache_refuses_a_layout_it_cannot_hold(caplog):
    """A shared MLA latent does not fit K/V pages sized from the config: the request fails with our
    message (generate_batch logs a request's error and returns no tokens for it)."""
    model = quiet(build("llama"), "mla", 12)
    config = T.GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)
    results = model.generate_batch(inputs=[[5, 6, 7]], generation_config=config, continuous_batching_config=SMALL_PAGES)
    assert all(not r.generated_tokens for r in results.values())
    assert "only a serving layout fits a paged cache" in caplog.text


# -- the cache the accounting promises -----------------------------------------------------------

def test_cache_bytes_after_generate_equal_the_accounting():
    from tucker_attention.accounting import kv_cache_floats_per_token

    for arch, method, ranks in [("llama", "tucker", TRUNCATED), ("llama", "mla", 12), ("gpt2", "gqa", 2)]:
        model = converted(arch, method, ranks)
        ids = make_inputs(arch, padded=False)["input_ids"][:1, :5]
        cache = _cache(_generate(model, ids, return_dict_in_generate=True))
        for layer, block in zip(cache.layers, converted_blocks(model).values()):
            per_token = (layer.keys.numel() * layer.keys.element_size()
                         + layer.values.numel() * layer.values.element_size()) // layer.keys.shape[2]
            assert per_token == kv_cache_floats_per_token(block.layer) * 4, (arch, method)


def test_a_model_class_that_is_not_transformers_own_is_refused_before_any_change():
    class MyLlama(T.LlamaForCausalLM):
        pass

    torch.manual_seed(0)
    model = MyLlama(build("llama").config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="not a transformers model class"):
        quiet(model)
    assert type(model) is MyLlama and not converted_blocks(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
