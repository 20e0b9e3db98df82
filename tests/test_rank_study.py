"""benchmarks/rank_study.py: the mean ± std table over seeds and the adaptive runs' ranks."""

import importlib.util
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "rank_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("rank_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def record(label, method, params, value, ranks=None):
    adaptive = ranks is not None and isinstance(ranks[0], list)
    return {"label": label, "method": method, "attention_params": params, "kv_bytes_per_token": 64,
            "val_loss": value, "ranks": ranks, **({"rank_budget": {"kind": "params"}} if adaptive else {})}


def test_mean_std_and_change_against_mha(study):
    found = {0: [[[2, 4, 4], [2, 4, 4]]], 1: [[[2, 3, 4], [1, 4, 4]]]}
    per_seed = {seed: [record("MHA", "mha", 1000, 2.0 + 0.2 * seed),
                       record("Tucker auto", "tucker", 100, 2.2 + 0.2 * seed, found[seed]),
                       record("Tucker [2,4,4]", "tucker", 90, 2.5, [2, 4, 4])] for seed in (0, 1)}
    table, ranks = study.summarize(per_seed, "val_loss", higher_is_better=False)
    lines = table.splitlines()
    assert lines[2].split()[0] == "MHA" and "2.1000 ± 0.1414" in lines[2] and "+0.0%" in lines[2]
    assert "Tucker auto" in lines[3] and "0.100" in lines[3] and "2.3000 ± 0.1414" in lines[3]
    assert f"{100 * (2.3 / 2.1 - 1):+.1f}%" in lines[3]
    assert ranks.splitlines() == ["Tucker auto, seed 0: L0: (2, 4, 4) / (2, 4, 4)",
                                  "Tucker auto, seed 1: L0: (2, 3, 4) / (1, 4, 4)"]


def test_accuracy_changes_are_points(study):
    per_seed = {0: [{**record("MHA", "mha", 10, 0.0), "val_accuracy": 0.80},
                    {**record("T", "tucker", 1, 0.0), "val_accuracy": 0.78}]}
    table, _ = study.summarize(per_seed, "val_accuracy", higher_is_better=True)
    assert "-2.0 pts" in table and "± 0.0000" in table
