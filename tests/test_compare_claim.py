"""``tucker-attn compare`` tests the paper's claim where it makes it: the default presets' settings
(their stated shares of MHA's / the smallest baseline's attention parameters, the KV-matched shared
latent), per-model train settings (rank-adaptive entries) and the parameter ratio at matched quality."""

from __future__ import annotations

import re

import pytest
import torch

from tucker_attention.experiments import compare
from tucker_attention.experiments.compare import (
    PRESETS,
    compare_configs,
    matched_quality,
    matched_quality_ratio,
    split_entry,
)
from tucker_attention.training.tasks import TASK_TYPES

BASELINES = ("gqa", "mqa", "mla")


def sizes(task: str, model: dict, spec: dict) -> tuple[int, int]:
    """(attention parameters, KV floats per token) of the whole model, built on the meta device."""
    task_type = TASK_TYPES[task]
    with torch.device("meta"):
        net = task_type.model_cls(task_type.config_cls(**{**model, "attention": spec}))
    return net.attention_params, net.kv_bytes_per_token(torch.bfloat16) // 2


def preset_sizes(task: str, preset: str) -> dict[str, dict]:
    """label -> {method, params, kv} of the fixed entries, {method, budget} of the rank-adaptive ones."""
    p = PRESETS[task][preset]
    mha = sizes(task, p.model, {"method": "mha"})[0]
    out = {}
    for label, entry in p.attention.items():
        spec, train = split_entry(entry)
        if "rank_budget_params" in train:
            value = train["rank_budget_params"]
            out[label] = {"method": "tucker", "budget": int(value * mha) if value <= 1 else int(value)}
        else:
            params, kv = sizes(task, p.model, spec)
            out[label] = {"method": spec["method"], "params": params, "kv": kv, "shared": spec.get("shared_kv")}
    return out


@pytest.mark.parametrize("task", ["lm", "vit"])
def test_default_presets_hold_the_settings_their_description_states(task):
    entries = preset_sizes(task, "default")
    mha = entries["MHA"]["params"]
    smallest = min(e["params"] for e in entries.values() if e["method"] in BASELINES)
    fixed = {k: e for k, e in entries.items() if e["method"] == "tucker" and "params" in e}
    adaptive = {k: e for k, e in entries.items() if "budget" in e}
    mla = [e for e in entries.values() if e["method"] == "mla"]
    assert len(mla) == 1
    shared = [e for e in fixed.values() if e["shared"]]
    assert shared and all(e["kv"] == mla[0]["kv"] for e in shared)  # one latent of MLA's width d_c
    tenth = [k for k, e in fixed.items() if e["params"] <= 0.1 * mha]
    fifth = [k for k, e in fixed.items() if 0.1 * mha < e["params"] <= smallest / 5]
    assert len(tenth) == 1 and len(fifth) == 1
    assert adaptive["Tucker auto 10%"]["budget"] == int(0.1 * mha)
    assert adaptive["Tucker auto 1/5 MLA"]["budget"] == smallest // 5  # MLA is the smallest baseline
    # the shares the description states, to the percent
    description = PRESETS[task]["default"].description
    share_fifth = int(re.search(r"<= 1/5 of MLA \((\d+)%\)", description).group(1))
    share_tenth = int(re.search(r"<= 1/10 of MHA \((\d+)%\)", description).group(1))
    assert share_fifth == round(100 * fixed[fifth[0]]["params"] / smallest)
    assert share_tenth == round(100 * fixed[tenth[0]]["params"] / mha)
    # the comments next to the entries
    source = open(compare.__file__).read()
    for label in fixed:
        assert f"{fixed[label]['params']:,}" in source, label


@pytest.mark.parametrize("task", ["lm", "vit"])
def test_tiny_presets_exercise_the_same_kinds_of_entries(task):
    entries = preset_sizes(task, "tiny")
    mha = entries["MHA"]["params"]
    smallest = min(e["params"] for e in entries.values() if e["method"] in BASELINES)
    mla_kv = next(e["kv"] for e in entries.values() if e["method"] == "mla")
    fixed = [e for e in entries.values() if e["method"] == "tucker" and "params" in e]
    assert any(e["shared"] and e["kv"] == mla_kv for e in fixed)
    assert any(e["params"] <= 0.1 * mha for e in fixed)
    assert any(0.1 * mha < e["params"] <= smallest / 5 for e in fixed)
    assert any("budget" in e for e in entries.values())


@pytest.mark.parametrize("task", ["lm", "vit"])
def test_study_presets_extend_the_defaults(task):
    default, study = PRESETS[task]["default"], PRESETS[task]["study"]
    assert default.attention.items() <= study.attention.items() and len(study.attention) > len(default.attention)
    assert (study.model, study.data) == (default.model, default.data)
    assert {k: v for k, v in study.train.items() if k not in ("steps", "eval_interval", "checkpoint_interval")} == \
        {k: v for k, v in default.train.items() if k not in ("steps", "eval_interval", "checkpoint_interval")}
    assert study.train["steps"] >= default.train["steps"]
    compare_configs("study", task=task)  # every entry is a valid run config


@pytest.mark.parametrize("task", ["lm", "vit"])
def test_budgets_presets_hold_the_study_budgets(task):
    """25 % of MHA's parameters and fractions of MLA's KV, each with a fixed Tucker, a rank-adaptive
    Tucker (where the budget is above the smallest Tucker) and an MLA at or just above it."""
    default, budgets = PRESETS[task]["default"], PRESETS[task]["budgets"]
    assert default.attention.items() <= budgets.attention.items()
    assert (budgets.model, budgets.data, budgets.train) == (default.model, default.data, default.train)
    configs = compare_configs("budgets", task=task)
    p = PRESETS[task]["budgets"]
    mha = sizes(task, p.model, {"method": "mha"})[0]
    mla_kv = next(sizes(task, p.model, e)[1] for e in default.attention.values() if e["method"] == "mla")
    extra = {k: split_entry(e) for k, e in p.attention.items() if k not in default.attention}
    fixed = {k: sizes(task, p.model, spec) for k, (spec, train) in extra.items() if not train}
    auto = {k: train for k, (spec, train) in extra.items() if train}
    assert any(spec["method"] == "tucker" and 0.2 * mha < fixed[k][0] <= 0.25 * mha for k, (spec, _) in extra.items()
               if k in fixed)
    assert any(t.get("rank_budget_params") == 0.25 for t in auto.values())
    quarter = mla_kv // 4
    assert any(t.get("rank_budget_kv") == quarter for t in auto.values())
    for method in ("tucker", "mla"):  # a fixed setting of each at exactly a quarter of MLA's KV
        assert any(extra[k][0]["method"] == method and kv == quarter for k, (_, kv) in fixed.items()), method
    tenth = mla_kv // 10
    smallest = configs["MHA"].model["n_layers"] * 2  # r3 = r3~ = 1 in every layer
    if tenth >= smallest:
        assert any(t.get("rank_budget_kv") == tenth for t in auto.values())
        assert any(extra[k][0]["method"] == "tucker" and kv == tenth for k, (_, kv) in fixed.items())
    assert any(extra[k][0]["method"] == "mla" and max(tenth, smallest) <= kv <= 2 * max(tenth, smallest)
               for k, (_, kv) in fixed.items())
    for k, (_, kv) in fixed.items():  # beside every MLA, a shared-latent Tucker with its KV cache
        if extra[k][0]["method"] == "mla":
            assert any(extra[j][0].get("shared_kv") and w == kv for j, (_, w) in fixed.items()), k


def test_per_model_train_settings_reach_only_their_run_config():
    configs = compare_configs("tiny", steps=7, overrides=["train.lr=0.01"])
    auto = configs["Tucker auto 10%"]
    assert auto.train.rank_budget_params == 0.1 and auto.model["attention"] == {"method": "tucker"}
    assert all(c.train.rank_budget_params is None for k, c in configs.items() if k != "Tucker auto 10%")
    assert {c.train.steps for c in configs.values()} == {7} and {c.train.lr for c in configs.values()} == {0.01}
    configs = compare_configs("default", task="vit")
    assert configs["Tucker auto 1/5 MLA"].train.rank_budget_params == 9011
    assert "train" not in configs["Tucker auto 1/5 MLA"].model["attention"]


def test_a_set_that_clashes_with_a_per_model_setting_is_refused(monkeypatch):
    with pytest.raises(ValueError, match=r"--set train.rank_budget_params is a per-model setting.*Tucker auto 10%"):
        compare_configs("tiny", overrides=["train.rank_budget_params=0.2"])
    with pytest.raises(ValueError, match="--set train.rank_budget_kv is a per-model setting"):
        compare_configs("tiny", overrides=["train.rank_budget_kv=0.2"])
    # any train key an entry sets itself, not only the budgets
    entries = {**PRESETS["lm"]["tiny"].attention,
               "Tucker auto 3 cuts": {"method": "tucker", "train": {"rank_budget_params": 0.2, "rank_cuts": 3}}}
    monkeypatch.setattr(PRESETS["lm"]["tiny"], "attention", entries)
    assert compare_configs("tiny")["Tucker auto 3 cuts"].train.rank_cuts == 3
    with pytest.raises(ValueError, match="the preset sets it for Tucker auto 3 cuts"):
        compare_configs("tiny", overrides=["train.rank_cuts=2"])
    # a train key no entry sets applies to every model, the rank-adaptive ones included
    assert compare_configs("tiny", overrides=["train.rank_until=0.25"])["Tucker auto 3 cuts"].train.rank_until == 0.25


def rec(label, method, params, **metrics):
    return {"label": label, "method": method, "attention_params": params, **metrics}


LM_RECORDS = [rec("MHA", "mha", 1000, val_loss=1.70), rec("GQA", "gqa", 750, val_loss=1.68),
              rec("MLA", "mla", 700, val_loss=1.75), rec("T big", "tucker", 300, val_loss=1.685),
              rec("T auto", "tucker", 90, val_loss=1.695), rec("T small", "tucker", 50, val_loss=1.80)]


def test_matched_quality_ratio_takes_the_smallest_tucker_within_tolerance():
    ratio, tucker, base = matched_quality_ratio(LM_RECORDS, "val_loss", False, 0.01)
    assert base["label"] == "GQA" and tucker["label"] == "T auto" and ratio == pytest.approx(90 / 750)
    # MHA is not a baseline here, even when it is the best
    records = [dict(r) for r in LM_RECORDS]
    records[0]["val_loss"] = 1.0
    assert matched_quality_ratio(records, "val_loss", False, 0.01)[2]["label"] == "GQA"
    # a tighter tolerance leaves only the bigger Tucker
    ratio, tucker, _ = matched_quality_ratio(LM_RECORDS, "val_loss", False, 0.005)
    assert tucker["label"] == "T big" and ratio == pytest.approx(300 / 750)
    report = matched_quality(LM_RECORDS, "val_loss", False, 0.01)
    assert report["ratio"] == pytest.approx(0.12) and report["within_paper_ratio"] is False
    assert report["text"].startswith("parameter ratio at matched quality: T auto (90) / GQA (750) = 0.120")
    assert "1% val loss" in report["text"] and report["text"].endswith("<= 0.1: NO)")


def test_matched_quality_with_no_tucker_within_tolerance_names_the_closest():
    records = [r for r in LM_RECORDS if r["label"] not in ("T big", "T auto")]
    assert matched_quality_ratio(records, "val_loss", False, 0.01) is None
    report = matched_quality(records, "val_loss", False, 0.01)
    assert report["ratio"] is None and report["closest"]["label"] == "T small"
    assert report["gap"] == pytest.approx(1.80 / 1.68 - 1)
    assert "none - no Tucker setting is within 1% val loss of GQA" in report["text"] and "+7.1%" in report["text"]
    assert matched_quality_ratio([r for r in LM_RECORDS if r["method"] not in BASELINES]) is None
    assert "needs a GQA/MLA and a Tucker record" in matched_quality(records[:1])["text"]


def test_matched_quality_of_accuracy_is_higher_is_better_and_absolute():
    records = [rec("MHA", "mha", 1000, val_accuracy=0.80), rec("GQA", "gqa", 750, val_accuracy=0.77),
               rec("MLA", "mla", 700, val_accuracy=0.78), rec("T", "tucker", 200, val_accuracy=0.776),
               rec("T tiny", "tucker", 60, val_accuracy=0.771), rec("T worse", "tucker", 40, val_accuracy=0.70)]
    ratio, tucker, base = matched_quality_ratio(records, "val_accuracy", True, 0.01)
    assert base["label"] == "MLA" and tucker["label"] == "T tiny" and ratio == pytest.approx(60 / 700)
    report = matched_quality(records, "val_accuracy", True, 0.01)
    assert "1 point of accuracy" in report["text"] and report["text"].endswith("<= 0.1: yes)")
    report = matched_quality(records, "val_accuracy", True, 0.005)
    assert report["tucker"]["label"] == "T" and report["ratio"] == pytest.approx(200 / 700)
    assert "0.5 points of accuracy" in report["text"]
    report = matched_quality(records[:3] + records[5:], "val_accuracy", True, 0.01)
    assert report["closest"]["label"] == "T worse" and "8.0 points lower" in report["text"]
