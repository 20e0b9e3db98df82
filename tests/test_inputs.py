"""Data and generation inputs: text files that are not text, empty documents, token ids and labels
out of range, images that are not float, and the decoding arguments of ``generate`` (API and CLI)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch.nn import functional as F

from tucker_attention._checks import check_ids
from tucker_attention.cli import main
from tucker_attention.data.corpus import load_corpus
from tucker_attention.data.text import read_documents
from tucker_attention.models import GPT, GPTConfig, ViT, ViTConfig

VOCAB, BLOCK = 12, 8

pytestmark = pytest.mark.usefixtures("one_thread")


def gpt(positions="rope") -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layers=1, d_model=16, n_heads=2,
                         positions=positions)).eval()


def vit() -> ViT:
    torch.manual_seed(0)
    return ViT(ViTConfig(image_size=8, patch_size=4, n_classes=3, n_layers=1, d_model=16, n_heads=2)).eval()


# ---------------------------------------------------------------- text files


def test_a_file_that_is_not_utf8_text_is_named(tmp_path):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=re.escape(f"data file {str(latin)!r} is not UTF-8 text (byte 3")):
        read_documents(latin)
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"abc\x00\x00def")
    with pytest.raises(ValueError, match=re.escape(f"data file {str(binary)!r} holds NUL bytes")):
        load_corpus(binary)


def test_a_bad_file_inside_a_folder_is_named_with_the_folder(tmp_path):
    (tmp_path / "good.txt").write_text("some text\n")
    (tmp_path / "sub").mkdir()
    bad = tmp_path / "sub" / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00h\x00i")
    with pytest.raises(ValueError, match=re.escape(f"{str(bad)!r} (in data folder {str(tmp_path)!r}) is not UTF-8")):
        read_documents(tmp_path)
    bad.write_bytes(b"text with a \x00 inside")
    with pytest.raises(ValueError, match=re.escape(f"{str(bad)!r} (in data folder {str(tmp_path)!r}) holds NUL")):
        read_documents(tmp_path)


def test_empty_txt_files_in_a_folder_are_all_named(tmp_path):
    (tmp_path / "a.txt").write_text("real text\n")
    (tmp_path / "b.txt").write_text("")
    (tmp_path / "c.txt").write_text("  \n\t\n")
    with pytest.raises(ValueError, match=re.escape("these .txt files are empty (no text besides whitespace): "
                                                   "['b.txt', 'c.txt']")):
        read_documents(tmp_path)
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(ValueError, match=re.escape("all its .txt files are empty (no text besides whitespace): "
                                                   "['a.txt', 'b.txt', 'c.txt']")):
        load_corpus(tmp_path)


# ---------------------------------------------------------------- GPT token ids and targets


def test_token_ids_outside_the_vocabulary_are_refused():
    model = gpt()
    idx = torch.tensor([[1, 2, 3], [4, 5, 11]])
    model(idx)  # the last id of the vocabulary is fine
    with pytest.raises(ValueError, match=re.escape("idx must hold values in [0, vocab_size=12), got min 1, max 12")):
        model(torch.tensor([[1, 2, 12]]))
    with pytest.raises(ValueError, match=re.escape("idx must hold values in [0, vocab_size=12), got min -1, max 3")):
        model(torch.tensor([[-1, 2, 3]]))
    with pytest.raises(ValueError, match=re.escape("idx must hold at least one token (seq >= 1), got shape (2, 0)")):
        model(torch.zeros(2, 0, dtype=torch.int64))
    with pytest.raises(TypeError, match="idx must be a torch.Tensor of token ids, got list"):
        model([[1, 2]])


def test_targets_must_match_idx_and_hold_ids_or_minus_one():
    model = gpt()
    idx = torch.tensor([[1, 2, 3, 4]])
    targets = torch.tensor([[2, 3, 4, -1]])
    with torch.no_grad():
        logits, loss = model(idx, targets)
        assert float(loss) == pytest.approx(float(F.cross_entropy(logits[0, :3], targets[0, :3])), rel=1e-5)
        assert model(idx, targets.int())[1] == loss  # -1 ignored; int32 targets as good as int64
    for bad, message in [
        (torch.tensor([[2, 3, 4]]), "targets must be an integer tensor of shape (1, 4), got torch.int64 (1, 3)"),
        (torch.tensor([[2.0, 3, 4, 5]]), "targets must be an integer tensor of shape (1, 4), got torch.float32 (1, 4)"),
        (torch.tensor([[2, 3, 4, 12]]), "targets must hold values in [0, vocab_size=12) or -1 (ignored), got min 2, "
                                        "max 12"),
        (torch.tensor([[2, -2, 4, 5]]), "or -1 (ignored), got min -2, max 5"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            model(idx, bad)


def test_the_value_checks_are_skipped_while_compiling(monkeypatch):
    ids = torch.tensor([5, 99])
    with pytest.raises(ValueError, match="got min 5, max 99"):
        check_ids("idx", ids, 10, bound="vocab_size")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    check_ids("idx", ids, 10, bound="vocab_size")  # no data-dependent check in a traced graph
    with pytest.raises(ValueError, match="must be an integer tensor"):  # shape and dtype checks still run
        check_ids("idx", ids.float(), 10, bound="vocab_size")


# ---------------------------------------------------------------- ViT images and labels


def test_vit_images_must_be_float_and_labels_class_ids():
    model = vit()
    images = torch.randn(2, 1, 8, 8)
    _, loss = model(images, torch.tensor([0, 2]))
    assert model(images, torch.tensor([0, 2], dtype=torch.int32))[1] == loss
    with pytest.raises(ValueError, match=re.escape("images must be a floating-point tensor, got torch.uint8; "
                                                   "normalize them to float first")):
        model(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))
    for labels, message in [
        (torch.tensor([0.0, 1.0]), "labels must be an integer tensor of shape (2,), got torch.float32 (2,)"),
        (torch.tensor([[0], [1]]), "labels must be an integer tensor of shape (2,), got torch.int64 (2, 1)"),
        (torch.tensor([0, 1, 2]), "labels must be an integer tensor of shape (2,), got torch.int64 (3,)"),
        (torch.tensor([True, False]), "labels must be an integer tensor of shape (2,), got torch.bool (2,)"),
        (torch.tensor([0, 3]), "labels must hold values in [0, n_classes=3), got min 0, max 3"),
        (torch.tensor([-1, 1]), "labels must hold values in [0, n_classes=3), got min -1, max 1"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            model(images, labels)


# ---------------------------------------------------------------- generate


@pytest.mark.parametrize("kwargs, error, message", [
    ({"top_k": 0}, ValueError, "top_k must be an integer >= 1 or None, got 0"),
    ({"top_k": 2.0}, TypeError, "top_k must be an integer >= 1 or None, got 2.0"),
    ({"top_k": True}, TypeError, "top_k must be an integer >= 1 or None, got True"),
    ({"temperature": -0.5}, ValueError, "temperature must be a finite float >= 0, got -0.5"),
    ({"temperature": math.nan}, ValueError, "temperature must be a finite float >= 0, got nan"),
    ({"temperature": math.inf}, ValueError, "temperature must be a finite float >= 0, got inf"),
    ({"temperature": True}, TypeError, "temperature must be a finite float >= 0, got True"),
    ({"temperature": "0.5"}, TypeError, "temperature must be a finite float >= 0, got '0.5'"),
    ({"max_new_tokens": -1}, ValueError, "max_new_tokens must be an integer >= 0, got -1"),
])
def test_generate_checks_its_decoding_arguments(kwargs, error, message):
    args = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(error, match=re.escape(message)):
        gpt().generate(torch.tensor([[1, 2]]), args.pop("max_new_tokens"), **args)


def test_generate_checks_the_prompt():
    model = gpt()
    for idx, message in [
        (torch.tensor([1, 2]), "idx must be an integer tensor of shape (batch, seq)"),
        (torch.tensor([[1.0, 2.0]]), "idx must be an integer tensor of shape (batch, seq)"),
        (torch.zeros(1, 0, dtype=torch.int64), "idx must hold at least one token (seq >= 1), got shape (1, 0)"),
        (torch.tensor([[1, 40]]), "idx must hold values in [0, vocab_size=12), got min 1, max 40"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            model.generate(idx, 0)  # checked even when nothing is generated
    learned = gpt("learned")
    with pytest.raises(ValueError, match=re.escape(f"the prompt has {BLOCK + 1} tokens but learned positions cover "
                                                   f"only block_size={BLOCK} tokens")):
        learned.generate(torch.ones(1, BLOCK + 1, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match=re.escape("plus max_new_tokens (3) exceeds it")):
        learned.generate(torch.ones(1, BLOCK - 2, dtype=torch.int64), 3)
    assert learned.generate(torch.ones(1, BLOCK - 2, dtype=torch.int64), 2, temperature=0).shape == (1, BLOCK)
    out = model.generate(torch.ones(2, BLOCK, dtype=torch.int64), 5, temperature=0)  # RoPE: past block_size
    assert out.shape == (2, BLOCK + 5) and int(out.max()) < VOCAB
    assert "positions beyond ``block_size`` were never" in GPT.generate.__doc__


def test_generate_reads_the_ids_once_not_every_step(monkeypatch):
    """The value check reads the ids (a device sync on a GPU): generate checks the prompt once; the
    tokens it samples are in range by construction. forward still checks every call."""
    from tucker_attention.models import gpt as gpt_module

    calls = []
    monkeypatch.setattr(gpt_module, "check_ids", lambda name, ids, *a, **k: calls.append(name) or check_ids(
        name, ids, *a, **k))
    model = gpt()
    for use_cache in (True, False):
        calls.clear()
        out = model.generate(torch.tensor([[1, 2]]), 6, use_cache=use_cache)
        assert out.shape == (1, 8) and calls == ["idx"]
    calls.clear()
    model(torch.tensor([[1, 2]]))
    model(torch.tensor([[1, 2]]))
    assert calls == ["idx", "idx"]


@pytest.mark.parametrize("flags, message", [
    (["--top-k", "0"], "--top-k must be an integer >= 1 or None, got 0"),
    (["--temperature", "-1"], "--temperature must be a finite float >= 0, got -1.0"),
    (["--temperature", "nan"], "--temperature must be a finite float >= 0, got nan"),
    (["--tokens", "-5"], "--tokens must be an integer >= 0, got -5"),
])
def test_cli_generate_checks_its_flags_first(tmp_path, capsys, flags, message):
    assert main(["generate", str(tmp_path / "no-run"), *flags]) == 2  # refused before the run is read
    assert capsys.readouterr().err.strip() == f"tucker-attn generate: error: {message}"


def test_cli_generate_names_the_learned_positions_limit(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("abcdefgh " * 40)
    run = str(tmp_path / "run")
    tiny = ["model.d_model=16", "model.n_heads=2", "model.n_layers=1", "model.block_size=8",
            "model.positions=learned", "train.steps=1", "train.batch_size=2", "train.eval_windows=2",
            "train.progress=false"]
    assert main(["train", "--run-dir", run, "--data", str(corpus), *[f"--set={s}" for s in tiny]]) == 0
    capsys.readouterr()
    assert main(["generate", run, "--prompt", "abcdefgha", "--tokens", "1"]) == 2
    assert "the prompt has 9 tokens but learned positions cover only block_size=8 tokens" in capsys.readouterr().err


def test_cli_generate_help_says_what_happens_past_block_size(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "with RoPE generation goes on past block_size" in text and "quality may degrade" in text
