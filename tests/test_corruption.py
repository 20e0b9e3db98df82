"""Damaged, edited and mismatched inputs of the converted-model path fail loudly (issue 30).

Converted folders (a tensor missing, extra or reshaped, an edited config section, a foreign
``model_type``, a serving layout that contradicts the layers, a tensor in another dtype) are refused
by every way of loading them, naming the folder and the block; sources (cut-off safetensors and
GGUF, an invalid GGUF in a folder, a pickle ``weights_only`` refuses, an unreadable tokenizer) by
every command that reads a model, in one line with exit code 2 and nothing written; distill pairs
bf16/fp16 conversions with their original, refuses another original, and checks the run folder,
the data and its arguments before it loads a model. Each case asserts the exact outcome.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

T = pytest.importorskip("transformers", reason="the converted-folder checks need transformers (extra 'hf')")
from safetensors.torch import load_file, save_file  # noqa: E402
from test_cli_convert import digest  # noqa: E402
from test_distill import FAST, _llama, _tokenizer  # noqa: E402

from tucker_attention.cli import main  # noqa: E402
from tucker_attention.hf import convert, converted_blocks, load_converted  # noqa: E402
from tucker_attention.hf.distillation.command import distill_folder  # noqa: E402
from tucker_attention.hf.distillation.distill import DistillConfig, check_pair  # noqa: E402
from tucker_attention.hf.modeling.folder_checks import ConvertedFolderError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCK = "model.layers.1.self_attn"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An original tiny Llama (with a tokenizer) and its Tucker conversion (one cached key head of width 8:
    a serving layout), saved."""
    root = tmp_path_factory.mktemp("corruption")
    teacher = _llama()
    teacher.save_pretrained(root / "original")
    _tokenizer().save_pretrained(root / "original")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = convert(teacher, "tucker", ranks=(4, 16, 8), inplace=False)
    converted.save_pretrained(root / "converted")
    return root


def _copy(saved, tmp_path, name="edited"):
    folder = tmp_path / name
    shutil.copytree(saved / "converted", folder)
    return folder


def _edit_weights(folder, change):
    weights = load_file(str(folder / "model.safetensors"))
    change(weights)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def _loaders(folder):
    yield "from_pretrained", lambda: T.AutoModelForCausalLM.from_pretrained(folder)
    yield "trust_remote_code", lambda: T.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    yield "load_converted", lambda: load_converted(folder)


def _set_ranks(config):
    config["tucker_attention"]["blocks"][BLOCK]["layer"]["ranks"] = [4, 12, 8]


FOLDER_CASES = {
    "missing tensor": (lambda w: w.pop(f"{BLOCK}.layer.U1"), None, ["1 missing from the file", f"{BLOCK}.layer.U1"]),
    "extra tensor": (lambda w: w.__setitem__(f"{BLOCK}.layer.stray", torch.zeros(3)), None,
                     ["1 in the file but not declared", f"{BLOCK}.layer.stray"]),
    "reshaped tensor": (lambda w: w.__setitem__(f"{BLOCK}.layer.U3", torch.zeros(32, 6)), None,
                        ["stored with another shape", "(32, 6) vs (32, 8) declared"]),
    "edited ranks": (None, _set_ranks, ["stored with another shape", f"{BLOCK}.layer.U2"]),
    "removed block": (None, lambda c: c["tucker_attention"]["blocks"].pop(BLOCK),
                      ["missing from the file", f"{BLOCK}.q_proj.weight", "in the file but not declared"]),
    "another method": (None, lambda c: c["tucker_attention"]["blocks"][BLOCK]["layer"].update(method="mla"),
                       [f"block {BLOCK}", "does not build a layer"]),
    "edited num_key_value_heads": (None, lambda c: c.update(num_key_value_heads=2),
                                   ["num_key_value_heads=2 contradicts the converted layers", "restore 1"]),
    "edited head_dim": (None, lambda c: c.update(head_dim=16), ["head_dim=16 contradicts"]),
    "a tensor in another dtype": (lambda w: w.__setitem__(f"{BLOCK}.layer.U1", w[f"{BLOCK}.layer.U1"].half()), None,
                                  ["declares dtype float32", f"{BLOCK}.layer.U1 (F16)"]),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_a_damaged_or_edited_converted_folder_is_refused_by_every_loader(saved, tmp_path, case):
    weights, config, expected = FOLDER_CASES[case]
    folder = _copy(saved, tmp_path)
    if weights:
        _edit_weights(folder, weights)
    if config:
        _edit_config(folder, config)
    for how, load in _loaders(folder):
        with pytest.raises(ConvertedFolderError) as caught:
            load()
        message = str(caught.value)
        assert str(folder) in message, (how, message)
        for text in expected:
            assert text in message, (how, message)


def test_an_intact_folder_loads_exactly_and_a_new_head_may_differ(saved):
    model, info = T.AutoModelForCausalLM.from_pretrained(saved / "converted", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    stored, loaded = load_file(str(saved / "converted" / "model.safetensors")), model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in stored.items())
    ids = torch.randint(0, 89, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_converted(saved / "converted")(ids).logits)
    base = T.AutoModel.from_pretrained(saved / "converted")                 # the body alone: lm_head left out
    assert converted_blocks(base)
    classifier = T.AutoModelForSequenceClassification.from_pretrained(saved / "converted", num_labels=3)
    assert classifier.score.weight.shape == (3, 32)                          # a new head, as transformers makes


def test_a_foreign_model_type_is_refused_by_load_converted_and_distill(saved, tmp_path, capsys):
    folder = _copy(saved, tmp_path)
    _edit_config(folder, lambda c: c.update(model_type="llama"))
    with pytest.raises(ConvertedFolderError, match="model_type 'llama'.*restore model_type 'tucker_llama'"):
        load_converted(folder)
    assert main(["distill", str(saved / "original"), str(folder), "--out", str(tmp_path / "o"), "--no-progress",
                 "--seq-len", "16"]) == 2
    assert "CONVERTED: " in capsys.readouterr().err and not (tmp_path / "o").exists()


# -- sources -------------------------------------------------------------------------------------

def _tiny_gguf(path):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", torch.randn(64, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


class Executes:
    """Not a tensor: a pickle of it names this class, which ``weights_only`` refuses to build."""


def _damaged_source(kind, saved, tmp_path):
    folder = tmp_path / "src"
    shutil.copytree(saved / "original", folder)
    weights = folder / "model.safetensors"
    if kind == "cut-off safetensors":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return folder, weights
    if kind == "refused pickle":
        weights.unlink()
        torch.save({"model.embed_tokens.weight": Executes()}, folder / "pytorch_model.bin")
        return folder, folder / "pytorch_model.bin"
    if kind == "unreadable tokenizer":
        (folder / "tokenizer_config.json").write_text("{not json")
        return folder, folder / "tokenizer_config.json"
    gguf_folder = tmp_path / "gguf"
    gguf_folder.mkdir()
    file = gguf_folder / "model.gguf"
    if kind == "cut-off GGUF":
        _tiny_gguf(file)
        file.write_bytes(file.read_bytes()[:-4000])
    else:                                                     # an invalid .gguf alone in a folder
        file.write_bytes(b"NOTGGUF" + bytes(100))
    return gguf_folder, file


SOURCE_CASES = {"cut-off safetensors": "not a complete safetensors file",
                "refused pickle": "a pickle that weights_only loading refuses",
                "unreadable tokenizer": "not readable JSON",
                "cut-off GGUF": "its GGUF header or tensor data is cut off or invalid",
                "invalid GGUF in a folder": "is a file but not a GGUF file"}


@pytest.mark.parametrize("case", list(SOURCE_CASES))
@pytest.mark.parametrize("command", ["convert", "distill", "ranks"])
def test_a_damaged_source_is_one_line_naming_the_file_exit_2_nothing_written(saved, tmp_path, capsys, case,
                                                                             command):
    folder, file = _damaged_source(case, saved, tmp_path)
    before = digest(folder)
    out = tmp_path / "out"
    argv = {"convert": ["convert", str(folder), "--method", "gqa", "--ranks", "1", "--out", str(out)],
            "distill": ["distill", str(folder), str(saved / "converted"), "--out", str(out), "--no-progress",
                        "--seq-len", "16"],
            "ranks": ["ranks", "--hf", str(folder)]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert repr(str(file)) in err and SOURCE_CASES[case] in err, err
    assert not out.exists() and not (tmp_path / "out.run").exists() and digest(folder) == before


# -- distill -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_distill_pairs_a_lower_precision_conversion_and_refuses_another_original(saved, tmp_path, dtype):
    converted = load_converted(saved / "converted").to(getattr(torch, dtype))
    converted.save_pretrained(tmp_path / "low")
    teacher = T.AutoModelForCausalLM.from_pretrained(saved / "original")
    student = load_converted(tmp_path / "low", dtype=getattr(torch, dtype))
    check_pair(teacher, student)
    with pytest.raises(ValueError, match="converted from another model"):
        check_pair(_llama(seed=1), student)
    cfg = DistillConfig(layer_steps=1, steps=1, **{**FAST, "batch_size": 2, "eval_windows": 2})
    report = distill_folder(saved / "original", tmp_path / "low", out=tmp_path / "out", config=cfg, prompt=None)
    assert report["dtype"] == dtype and report["summary"]["steps"] == 2


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if distill loads a model (what it must check first needs none)."""
    from tucker_attention.hf.distillation import command as distill_command

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(distill_command, "load_source", refuse)
    monkeypatch.setattr(distill_command, "_load_student", refuse)


def test_distill_checks_the_run_folder_data_and_arguments_before_loading(saved, tmp_path, capsys, no_model_loads):
    from tucker_attention.training.lock import RunLock

    def refused(extra, *expected):
        argv = ["distill", str(saved / "original"), str(saved / "converted"), "--out", str(tmp_path / "o"),
                "--no-progress", "--seq-len", "16", *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err
        for text in expected:
            assert text in err, err
        assert not (tmp_path / "o").exists()

    with RunLock(tmp_path / "busy"):
        refused(["--run-dir", str(tmp_path / "busy")], "--run-dir: ", "is in use by process")
    refused(["--data", str(tmp_path / "nowhere.txt")], "--data: ", "does not exist")
    (tmp_path / "empty.txt").write_text("  \n")
    refused(["--data", str(tmp_path / "empty.txt")], "--data: ", "holds no text")
    text = tmp_path / "text.txt"
    text.write_text("some words of text\n" * 200)
    prepared = tmp_path / "chars"
    assert main(["prepare-data", str(text), "--tokenizer", "char", "--out", str(prepared)]) == 0
    capsys.readouterr()
    refused(["--data", str(prepared)], "--data: ", "the 'char' tokenizer, not the model's",
            "prepare it again with the model's tokenizer")
    refused(["--seq-len", "129"], "--seq-len: 129 tokens exceed the model's 128 positions")
    assert not (tmp_path / "o.run").exists()


def test_a_resumed_run_records_the_settings_it_runs_with(saved, tmp_path):
    cfg = DistillConfig(layer_steps=1, steps=1, **{**FAST, "batch_size": 2, "eval_windows": 2})
    distill_folder(saved / "original", saved / "converted", out=tmp_path / "a", config=cfg, prompt=None)
    more = DistillConfig(layer_steps=1, steps=3, **{**FAST, "batch_size": 2, "eval_windows": 2})
    distill_folder(saved / "original", saved / "converted", out=tmp_path / "b", run_dir=tmp_path / "a.run",
                   config=more, resume=True, prompt=None)
    assert json.loads((tmp_path / "a.run" / "config.json").read_text())["steps"] == 3


# -- convert arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["1.5", "0", "-0.5", "nan"])
def test_a_budget_that_is_neither_a_fraction_nor_a_whole_count_is_refused(saved, tmp_path, capsys, value):
    assert main(["convert", str(saved / "original"), "--method", "tucker", "--budget-kv", value,
                 "--out", str(tmp_path / "o")]) == 2
    assert "--budget-kv: must be a fraction in (0, 1] of the source's or a whole count > 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_explicit_full_ranks_are_the_exact_conversion(tmp_path, monkeypatch):
    """On a tiny q/k-norm model with one key head, ranks written out equal to the full ranks give the
    folder ``--ranks full`` gives: exact logits, norms kept, no partial RoPE."""
    import tiny
    from test_tucker_heads import _tiny

    from tucker_attention.hf.conversion.command import convert_folder

    name, make_config, structure, cls = tiny.FAMILIES["qwen3"]

    def one_key_head():
        config = make_config()
        config.num_key_value_heads = 1
        return config
    monkeypatch.setitem(tiny.FAMILIES, "qwen3", (name, one_key_head, structure, cls))
    model = _tiny("qwen3", monkeypatch).float()
    model.save_pretrained(tmp_path / "src")
    sizes = {"n_calibration": 8, "n_eval": 4, "seq_len": 16, "progress": False}
    full = convert_folder(tmp_path / "src", "tucker", ranks="full", out=tmp_path / "full", **sizes)
    layer = json.loads((tmp_path / "full" / "config.json").read_text())["tucker_attention"]["blocks"]
    ranks = next(iter(layer.values()))["layer"]["ranks"]
    written = convert_folder(tmp_path / "src", "tucker", ranks=ranks, value_ranks=ranks, out=tmp_path / "written",
                             **sizes)
    assert written["converted"]["kl"] < 1e-8 and written["nope_fraction"] == 0.0 and not written["notes"]
    assert written["label"] == full["label"]
    a, b = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "written" /
                                                                                  "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("zipped", [True, False])
def test_the_gate_reads_intact_pickled_checkpoints_of_either_format(tmp_path, zipped):
    """A legacy (non-zip) checkpoint has no zip to memory-map: it is read without, not called damaged."""
    from tucker_attention.hf.sources.readable import check_pickle

    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.randn(3, 3)}, path, _use_new_zipfile_serialization=zipped)
    check_pickle(path)
