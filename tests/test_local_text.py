"""Held-out text of other kinds than the plays (:mod:`tucker_attention.data.local_text`) and the
pretrained benchmark's verbatim pieces of it."""

import importlib.util
import pathlib

import pytest

from tucker_attention.data.local_text import CODE_MODULES, python_code, python_docs


def _bench():
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "pretrained.py"
    spec = importlib.util.spec_from_file_location("bench_pretrained", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_python_docs_and_code_are_english_text_and_source():
    docs, code = python_docs(), python_code()
    assert len(docs) > 20 and "statement" in docs["if"] and list(docs) == sorted(docs)
    assert set(code) <= set(CODE_MODULES) and len(code) >= len(CODE_MODULES) // 2
    assert "def " in code["textwrap"] and "\n    " in code["textwrap"]
    with pytest.raises(FileNotFoundError, match="none of the standard-library sources"):
        python_code(("no_such_module_here",))


def test_pieces_keep_whole_lines_verbatim_and_spread_over_the_text():
    docs = {"a": "".join(f"    line {i}\n" for i in range(100)), "b": "".join(f"\tother {i}\n" for i in range(100))}
    pieces = _bench().line_pieces(docs, 4, 60)
    text = "\n".join(docs.values())
    assert len(pieces) == 4 and all(p in text and p.endswith("\n") and len(p) >= 60 for p in pieces)
    assert pieces[0].startswith("    line 0") and any("\tother" in p for p in pieces)
