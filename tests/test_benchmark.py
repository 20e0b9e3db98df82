"""The layer benchmark runs end to end (tiny shapes) and counts FLOPs as documented."""

import importlib.util
import json
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "layers.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_layers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_both_tables(bench, tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--quick", "--json", str(out)])                    # contexts 64 and 256
    printed = capsys.readouterr().out
    assert "Training: forward+backward" in printed and "Decode: one token" in printed
    results = json.loads(out.read_text())
    assert [r["label"] for r in results["training"]][0] == "MHA" and len(results["training"]) == 6
    assert len(results["decode"]) == 12 and all(r["time"]["median"] > 0 for r in results["decode"])


def test_flop_count_matches_a_hand_count(bench):
    """MHA forward at B=1, T=64, d=768: 4 projections of 2*T*d*d plus causal attention 2*H*T*T*(2*hd)/2."""
    args = bench.parse_args(["--quick"])
    layer = bench.build("mha", {}, args)
    forward, _ = bench.training_fns(layer, args)
    T, d = 64, 768
    expected = 4 * 2 * T * d * d + 2 * 12 * T * T * (64 + 64) // 2
    assert bench.count_flops(forward, causal=True) == expected


def test_cache_bytes_benchmark_finds_every_cache_exactly_its_spec():
    pytest.importorskip("transformers")
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "cache_bytes.py"
    spec = importlib.util.spec_from_file_location("bench_cache_bytes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [module.measure(arch, *case) for arch in ("gpt2", "llama") for case in module.CASES[:3]]
    assert all(r["held"] == r["cache_spec"] for r in rows)
    assert {r["rope"] for r in rows} == {"None", "latent", "head"}   # GPT-2 none; Llama latent (tucker), head (gqa)


def test_qk_norm_cost_benchmark_compares_the_two_forms_at_one_cache(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_qk_norms", SCRIPT.with_name("qk_norms.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "qk.json"
    module.main(["--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "Tucker, norms kept" in printed and "(1.00x)" in printed
    results = json.loads(out.read_text())["results"]
    kept, absorbed = results["Tucker, norms kept"], results["Tucker, norms linearized"]
    assert kept["kv_floats"] == absorbed["kv_floats"] == 2 * 16 < results["source GQA (q/k norms)"]["kv_floats"]
    assert all(value > 0 for row in results.values() for key, value in row.items() if key.endswith("_s"))
