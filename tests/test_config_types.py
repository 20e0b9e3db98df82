"""Typed configuration: fields declare their type and range, ``--set`` text is parsed by the declared
type, config files and devices are checked, and a config error leaves no run folder behind."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

import pytest
import torch

from tucker_attention._fields import NO_RULE, Rule, check_value, field_types, parse_text
from tucker_attention.cli import main
from tucker_attention.models import GPTConfig, ViTConfig, attention_spec
from tucker_attention.training import DataConfig, RunConfig, TrainConfig, apply_overrides, load_config_file
from tucker_attention.training.config import offered_devices, resolve_device

TINY_MODEL = {"d_model": 16, "n_heads": 2, "n_layers": 1, "block_size": 8}


# ---------------------------------------------------------------- parse_text: every field kind


@pytest.mark.parametrize("annotation, text, value", [
    (bool, "true", True), (bool, "FALSE", False), (bool, " True ", True),
    (int, "12", 12), (int, "-3", -3), (int, "+7", 7),
    (float, "0.5", 0.5), (float, "1e-3", 1e-3), (float, "3", 3.0), (float, ".25", 0.25), (float, "-2.5E2", -250.0),
    (int | None, "null", None), (int | None, "None", None), (int | None, "4", 4),
    (float | None, "none", None), (float | None, "2", 2.0),
    (str | None, "null", None), (str | None, "word", "word"),
    (tuple[int, ...], "4,32,16", (4, 32, 16)), (tuple[int, ...], "[4, 32, 16]", (4, 32, 16)),
    (tuple[int, ...], "[]", ()), (tuple[int, int, int], "2,8,8", (2, 8, 8)),
    (tuple[int, int, int] | None, "null", None), (tuple[int, int, int] | None, "1,2,3", (1, 2, 3)),
    (dict | str, '{"method": "gqa", "n_kv_heads": 2}', {"method": "gqa", "n_kv_heads": 2}),
    (dict | str, "tucker", "tucker"),
    (str | bool | None, "true", True), (str | bool | None, "none", None), (str | bool | None, "latent", "latent"),
    (str, "some file.txt", "some file.txt"), (str, "12", "12"),
    (Any, "[1, 2]", [1, 2]), (Any, "plain", "plain"),
])
def test_parse_text_reads_the_declared_type(annotation, text, value):
    parsed = parse_text("k", text, annotation)
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize("annotation, text, message", [
    (bool, "maybe", "k must be true or false, got 'maybe'"),
    (bool, "1", "k must be true or false, got '1'"),
    (bool, "yes", "k must be true or false, got 'yes'"),
    (int, "1e3", "k must be an integer, got '1e3'"),
    (int, "1.0", "k must be an integer, got '1.0'"),
    (int, "", "k must be an integer, got ''"),
    (float, "fast", "k must be a finite float, got 'fast'"),
    (float, "nan", "k must be a finite float, got 'nan'"),
    (float, "inf", "k must be a finite float, got 'inf'"),
    (int | None, "nil", "k must be an integer or None, got 'nil'"),
    (tuple[int, ...], "4,x,16", "k must be a tuple of integers, got '4,x,16'"),
    (tuple[int, int, int], "4,32", "k must be a tuple of 3 integers, got '4,32'"),
    (dict | str, "{bad", "k: '{bad' is not a valid JSON object"),
])
def test_parse_text_refuses_text_of_another_type(annotation, text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_text("k", text, annotation)


def test_parse_text_names_the_range_in_its_error():
    with pytest.raises(ValueError, match=re.escape("train.lr must be a finite float > 0, got 'fast'")):
        parse_text("train.lr", "fast", float, Rule(low=0, low_open=True))


# ---------------------------------------------------------------- check_value: every field kind


@pytest.mark.parametrize("annotation, value, expected", [
    (int, 3, 3), (float, 3, 3.0), (float, 0.5, 0.5), (bool, False, False), (str, "x", "x"),
    (int | None, None, None), (tuple[int, ...], [1, 2], (1, 2)), (tuple[int, int, int], (1, 2, 3), (1, 2, 3)),
    (dict | str, {"method": "mha"}, {"method": "mha"}), (dict | str, "mha", "mha"), (Any, object, object),
])
def test_check_value_accepts_and_normalizes(annotation, value, expected):
    checked = check_value("k", value, annotation)
    assert checked == expected and type(checked) is type(expected)


@pytest.mark.parametrize("annotation, rule, value, error, message", [
    (int, NO_RULE, True, TypeError, "k must be an integer, got True"),
    (int, NO_RULE, 2.0, TypeError, "k must be an integer, got 2.0"),
    (int, NO_RULE, "3", TypeError, "k must be an integer, got '3'"),
    (int, Rule(low=1), 0, ValueError, "k must be an integer >= 1, got 0"),
    (int, Rule(low=0, high=5, high_open=True), 5, ValueError, "k must be an integer in [0, 5), got 5"),
    (float, NO_RULE, True, TypeError, "k must be a finite float, got True"),
    (float, NO_RULE, math.nan, ValueError, "k must be a finite float, got nan"),
    (float, NO_RULE, -math.inf, ValueError, "k must be a finite float, got -inf"),
    (float, NO_RULE, 10**400, ValueError, "k must be a finite float, got 1000"),
    (float, Rule(low=0, low_open=True), 0, ValueError, "k must be a finite float > 0, got 0"),
    (float, Rule(high=1), 1.5, ValueError, "k must be a finite float <= 1, got 1.5"),
    (bool, NO_RULE, 1, TypeError, "k must be true or false, got 1"),
    (bool, NO_RULE, "yes", TypeError, "k must be true or false, got 'yes'"),
    (str, Rule(choices=("char", "byte")), "word", ValueError, "k must be one of ['byte', 'char'], got 'word'"),
    (str, NO_RULE, 3, TypeError, "k must be a string, got 3"),
    (int | None, Rule(low=1), 0, ValueError, "k must be an integer >= 1 or None, got 0"),
    (int | None, Rule(low=1), "x", TypeError, "k must be an integer >= 1 or None, got 'x'"),
    (tuple[int, ...], NO_RULE, "4,32", TypeError, "k must be a tuple of integers, got '4,32'"),
    (tuple[int, ...], NO_RULE, [1, True], TypeError, "k must be a tuple of integers, got [1, True]"),
    (tuple[int, int, int], NO_RULE, [1, 2], ValueError, "k must be a tuple of 3 integers, got [1, 2]"),
    (dict | str, NO_RULE, 3, TypeError, "k must be a mapping or a string, got 3"),
])
def test_check_value_refuses(annotation, rule, value, error, message):
    with pytest.raises(error, match=re.escape(message)):
        check_value("k", value, annotation, rule)


# ---------------------------------------------------------------- the measured cases


def test_set_values_are_parsed_by_type():
    with pytest.raises(ValueError, match=re.escape("train.lr must be a finite float > 0, got 'fast'")):
        apply_overrides({}, ["train.lr=fast"], GPTConfig)
    with pytest.raises(ValueError, match=re.escape("train.progress must be true or false, got 'maybe'")):
        apply_overrides({}, ["train.progress=maybe"], GPTConfig)
    with pytest.raises(ValueError, match=re.escape("train.steps must be an integer >= 1, got '2.5'")):
        apply_overrides({}, ["train.steps=2.5"], GPTConfig)
    cfg = apply_overrides({}, ["train.lr=1", "train.steps=5", "model.mlp_ratio=2", "data.path=null",
                               "train.max_bad_steps=3", "train.keep_checkpoints=1"], GPTConfig)
    assert cfg["train"] == {"lr": 1.0, "steps": 5, "max_bad_steps": 3, "keep_checkpoints": 1}
    assert type(cfg["train"]["lr"]) is float and type(cfg["model"]["mlp_ratio"]) is float
    assert cfg["data"] == {"path": None}


def test_bool_fields_take_only_booleans():
    with pytest.raises(TypeError, match=re.escape("model.bias must be true or false, got 'no'")):
        GPTConfig(bias="no")
    with pytest.raises(TypeError, match=re.escape("train.progress must be true or false, got 1")):
        TrainConfig(progress=1)
    with pytest.raises(TypeError, match=re.escape("model.attention.shared_kv must be true or false, got 'no'")):
        GPTConfig(d_model=32, n_heads=4, attention={"method": "mla", "kv_rank": 8, "shared_kv": "no"})
    with pytest.raises(TypeError, match=re.escape("attention.bias must be true or false, got 'no'")):
        attention_spec({"method": "mha", "bias": "no"})


def test_attention_spec_checks_values_against_the_constructor():
    spec = attention_spec({"method": "tucker", "ranks": [2, 8, 8], "value_ranks": None, "rope": True, "scale": 1})
    assert spec == {"method": "tucker", "ranks": (2, 8, 8), "value_ranks": None, "rope": True, "scale": 1.0}
    assert type(spec["scale"]) is float
    with pytest.raises(TypeError, match=re.escape("attention.ranks must be a tuple of 3 integers, got '2,8,8'")):
        attention_spec({"method": "tucker", "ranks": "2,8,8"})
    with pytest.raises(TypeError, match=re.escape("attention.n_kv_heads must be an integer, got 2.0")):
        attention_spec({"method": "gqa", "n_kv_heads": 2.0})
    with pytest.raises(TypeError, match=re.escape("attention.q_rank must be an integer or None, got 'x'")):
        attention_spec({"method": "mla", "kv_rank": 8, "q_rank": "x"})


def test_device_syntax_is_checked_in_the_config_and_availability_when_resolved(monkeypatch):
    with pytest.raises(ValueError, match=r"train\.device must be 'auto' or a torch device .*got 'tpu9'"):
        TrainConfig(device="tpu9")
    with pytest.raises(ValueError, match=r"train\.device must be 'auto' or a torch device .*got 'tpu9'"):
        resolve_device("tpu9")
    assert TrainConfig(device="cuda:3").device == "cuda:3"  # a GPU machine's config still loads here
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu"))
    for kind in ("cuda", "xpu", "mps", "mtia"):  # a CPU-only build, whatever this machine has
        if hasattr(torch, kind):
            monkeypatch.setattr(getattr(torch, kind), "is_available", lambda: False, raising=False)
    assert offered_devices() == ["auto", "cpu"]
    for name in ("cuda", "cuda:0", "mps", "meta"):
        with pytest.raises(ValueError, match=re.escape(f"train.device={name!r}")) as err:
            resolve_device(name)
        assert "it offers ['auto', 'cpu']" in str(err.value)
    assert resolve_device("auto") == torch.device("cpu")


def test_resolve_device_with_one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == resolve_device("cuda") == resolve_device("cuda:0") == torch.device("cuda:0")
    assert "cuda:0" in offered_devices() and "cuda:1" not in offered_devices()
    with pytest.raises(ValueError, match=r"train\.device='cuda:7' is not available.*'cuda', 'cuda:0'"):
        resolve_device("cuda:7")
    with pytest.raises(ValueError, match=r"train\.device='cuda' \(as cuda:1 for local rank 1\) is not available"):
        resolve_device("cuda", local_rank=1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", local_rank=1) == resolve_device("auto", local_rank=1) == torch.device("cuda:1")


def test_new_train_fields():
    config = TrainConfig()
    assert (config.max_bad_steps, config.keep_checkpoints) == (0, 2)
    assert "max_bad_steps" in TrainConfig.__doc__ and "keep_checkpoints" in TrainConfig.__doc__


# ---------------------------------------------------------------- config files


@pytest.mark.parametrize("name, text, message", [
    ("run.json", "[1, 2]", "must hold a mapping ({task, model, data, train}) at the top level, got a JSON list"),
    ("run.json", '"lm"', "got a JSON string"),
    ("run.json", '{"task": "lm",\n "train": {"steps": }}', "is not valid JSON: Expecting value at line 2, column 21"),
    ("run.toml", "[train]\nsteps = = 3\n", "is not valid TOML: Invalid value (at line 2, column 9)"),
    ("run.yaml", "task: lm", "config file must end in .json or .toml"),
])
def test_config_file_errors_name_the_file(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        load_config_file(path)
    assert str(path) in str(err.value)


def test_config_file_reads_json_and_toml(tmp_path):
    (tmp_path / "a.json").write_text('{"train": {"steps": 3}}')
    (tmp_path / "a.toml").write_text("[train]\nsteps = 3\n")
    assert load_config_file(tmp_path / "a.json") == load_config_file(tmp_path / "a.toml") == {"train": {"steps": 3}}
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.json"))):
        load_config_file(tmp_path / "missing.json")


# ---------------------------------------------------------------- overrides and RunConfig


def test_attention_arguments_are_parsed_by_the_method_constructor():
    both = [["model.attention.method=mla", "model.attention.kv_rank=8", "model.attention.q_rank=null"],
            ["model.attention.kv_rank=8", "model.attention.q_rank=null", "model.attention.method=mla"]]
    for assignments in both:  # the method may come before or after its arguments
        assert apply_overrides({}, assignments, GPTConfig)["model"]["attention"] == {
            "method": "mla", "kv_rank": 8, "q_rank": None}
    base = {"model": {"attention": {"method": "tucker", "ranks": [2, 8, 8]}}}
    spec = apply_overrides(base, ["model.attention.rope=true", "model.attention.value_ranks=[2,4,4]"],
                           GPTConfig)["model"]["attention"]
    assert spec == {"method": "tucker", "ranks": [2, 8, 8], "rope": True, "value_ranks": (2, 4, 4)}
    assert apply_overrides({}, ['model.attention={"method": "gqa"}', "model.attention.n_kv_heads=2"],
                           GPTConfig)["model"]["attention"] == {"method": "gqa", "n_kv_heads": 2}
    assert apply_overrides({}, ["model.attention.dropout=0"], GPTConfig)["model"]["attention"] == {
        "method": "mha", "dropout": 0.0}  # no method anywhere: mha
    with pytest.raises(ValueError, match=re.escape("model.attention.kv_rank must be an integer, got 'abc'")):
        apply_overrides({}, ["model.attention.method=mla", "model.attention.kv_rank=abc"], GPTConfig)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['kv_rank'\] for attention method 'gqa'"):
        apply_overrides({}, ["model.attention.kv_rank=4", "model.attention.method=gqa"], GPTConfig)
    with pytest.raises(ValueError, match="attention method must be one of"):
        apply_overrides({}, ["model.attention.method=flash", "model.attention.kv_rank=4"], GPTConfig)


def test_model_keys_come_from_the_model_config_class():
    assert apply_overrides({}, ["model.patch_size=2"], ViTConfig)["model"] == {"patch_size": 2}
    with pytest.raises(ValueError, match=r"unknown --set key 'model\.patch_size'"):
        apply_overrides({}, ["model.patch_size=2"], GPTConfig)
    with pytest.raises(ValueError, match=re.escape("model.pool must be one of ['cls', 'mean'], got 'max'")):
        RunConfig.from_dict({"task": "vit", **apply_overrides({}, ["model.pool=max"], ViTConfig)})


def test_run_config_checks_the_model_before_any_data():
    RunConfig.from_dict({"task": "vit", "model": {"patch_size": 2}})  # image_size comes from the data later
    RunConfig.from_dict({"model": {"vocab_size": 3}})
    for model, error, message in [
        ({"d_model": 0}, ValueError, "model.d_model must be an integer >= 1, got 0"),
        ({"bias": "no"}, TypeError, "model.bias must be true or false, got 'no'"),
        ({"foo": 1}, ValueError, "unknown config key(s) ['model.foo']"),
        ({"d_model": 30, "n_heads": 4}, ValueError, "model.d_model must be divisible by n_heads"),
        ({**TINY_MODEL, "attention": {"method": "tucker", "ranks": [2, 32, 8]}}, ValueError,  # the layer's check
         "ranks[1] (r2) must be an integer in [1, 16], got 32"),
    ]:
        with pytest.raises(error, match=re.escape(message)):
            RunConfig.from_dict({"model": model})
    with pytest.raises(ValueError, match=re.escape("model.patch_size must be an integer >= 1, got 0")):
        RunConfig.from_dict({"task": "vit", "model": {"patch_size": 0}})
    with pytest.raises(ValueError, match=re.escape("task must be one of ['lm', 'vit'], got 'gan'")):
        RunConfig.from_dict({"task": "gan"})
    with pytest.raises(TypeError, match=re.escape("train must be a mapping, got 5")):
        RunConfig.from_dict({"train": 5})


def test_to_dict_is_json_data():
    config = RunConfig.from_dict({"model": {**TINY_MODEL, "attention": {"method": "tucker", "ranks": (2, 8, 8)}}})
    assert config.to_dict()["model"]["attention"]["ranks"] == [2, 8, 8]
    assert RunConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


# ---------------------------------------------------------------- every numeric and choice field has a range


BAD_FIELDS = [
    (TrainConfig, {"steps": 0}, "train.steps must be an integer >= 1, got 0"),
    (TrainConfig, {"batch_size": 0}, "train.batch_size must be an integer >= 1, got 0"),
    (TrainConfig, {"lr": 0.0}, "train.lr must be a finite float > 0, got 0.0"),
    (TrainConfig, {"lr": math.nan}, "train.lr must be a finite float > 0, got nan"),
    (TrainConfig, {"min_lr_ratio": 1.5}, "train.min_lr_ratio must be a finite float in [0, 1], got 1.5"),
    (TrainConfig, {"warmup_steps": -1}, "train.warmup_steps must be an integer >= 0, got -1"),
    (TrainConfig, {"weight_decay": -0.1}, "train.weight_decay must be a finite float >= 0, got -0.1"),
    (TrainConfig, {"beta1": 1.0}, "train.beta1 must be a finite float in [0, 1), got 1.0"),
    (TrainConfig, {"beta2": -0.5}, "train.beta2 must be a finite float in [0, 1), got -0.5"),
    (TrainConfig, {"grad_clip": -1}, "train.grad_clip must be a finite float >= 0, got -1"),
    (TrainConfig, {"attention_lr_scale": 0}, "train.attention_lr_scale must be a finite float > 0, got 0"),
    (TrainConfig, {"lr_rule": "fast"}, "train.lr_rule must be one of ['relative', 'uniform'], got 'fast'"),
    (TrainConfig, {"eval_interval": 0}, "train.eval_interval must be an integer >= 1, got 0"),
    (TrainConfig, {"eval_windows": 0}, "train.eval_windows must be an integer >= 1, got 0"),
    (TrainConfig, {"checkpoint_interval": 0}, "train.checkpoint_interval must be an integer >= 1, got 0"),
    (TrainConfig, {"log_interval": 0}, "train.log_interval must be an integer >= 1, got 0"),
    (TrainConfig, {"seed": -1}, "train.seed must be an integer in [0, 9223372036854775807], got -1"),
    (TrainConfig, {"seed": 2**63}, f"train.seed must be an integer in [0, {2**63 - 1}], got {2**63}"),
    (TrainConfig, {"device": "tpu9"}, "train.device must be 'auto' or a torch device"),
    (TrainConfig, {"precision": "fp16"}, "train.precision must be one of ['auto', 'bf16', 'fp32'], got 'fp16'"),
    (TrainConfig, {"max_bad_steps": -1}, "train.max_bad_steps must be an integer >= 0, got -1"),
    (TrainConfig, {"keep_checkpoints": 0}, "train.keep_checkpoints must be an integer >= 1, got 0"),
    (TrainConfig, {"rank_budget_params": 0.0}, "train.rank_budget_params must be a finite float > 0 or None, got 0.0"),
    (TrainConfig, {"rank_budget_kv": -1}, "train.rank_budget_kv must be a finite float > 0 or None, got -1"),
    (TrainConfig, {"rank_start": 0.5}, "train.rank_start must be a finite float >= 1, got 0.5"),
    (TrainConfig, {"rank_until": 1.5}, "train.rank_until must be a finite float in (0, 1], got 1.5"),
    (TrainConfig, {"rank_cuts": 0}, "train.rank_cuts must be an integer >= 1, got 0"),
    (TrainConfig, {"grad_accum_steps": 0}, "train.grad_accum_steps must be an integer >= 1, got 0"),
    (DataConfig, {"tokenizer": "word"}, "data.tokenizer must be one of ['byte', 'char'], got 'word'"),
    (DataConfig, {"val_fraction": 0.0}, "data.val_fraction must be a finite float in (0, 1), got 0.0"),
    (DataConfig, {"val_fraction": 1}, "data.val_fraction must be a finite float in (0, 1), got 1"),
    (DataConfig, {"source": "mnist"}, "data.source must be one of ['digits', 'fashion-mnist', 'folder', 'idx', 'npz']"),
    (DataConfig, {"pad": -1}, "data.pad must be an integer >= 0, got -1"),
    (GPTConfig, {"vocab_size": 0}, "model.vocab_size must be an integer >= 1, got 0"),
    (GPTConfig, {"block_size": 0}, "model.block_size must be an integer >= 1, got 0"),
    (GPTConfig, {"n_layers": 0}, "model.n_layers must be an integer >= 1, got 0"),
    (GPTConfig, {"d_model": 0}, "model.d_model must be an integer >= 1, got 0"),
    (GPTConfig, {"n_heads": 0}, "model.n_heads must be an integer >= 1, got 0"),
    (GPTConfig, {"norm": "batchnorm"}, "model.norm must be one of ['layernorm', 'rmsnorm'], got 'batchnorm'"),
    (GPTConfig, {"positions": "alibi"}, "model.positions must be one of ['learned', 'rope'], got 'alibi'"),
    (GPTConfig, {"mlp_ratio": 0}, "model.mlp_ratio must be a finite float > 0, got 0"),
    (GPTConfig, {"mlp_ratio": 0.001}, "model.mlp_ratio x model.d_model must give an MLP at least 1 wide"),
    (GPTConfig, {"dropout": 1.0}, "model.dropout must be a finite float in [0, 1), got 1.0"),
    (ViTConfig, {"image_size": 0}, "model.image_size must be an integer >= 1, got 0"),
    (ViTConfig, {"patch_size": 0}, "model.patch_size must be an integer >= 1, got 0"),
    (ViTConfig, {"patch_size": 56}, "model.image_size must be divisible by patch_size (so patch_size <= image_size)"),
    (ViTConfig, {"in_channels": 0}, "model.in_channels must be an integer >= 1, got 0"),
    (ViTConfig, {"n_classes": 0}, "model.n_classes must be an integer >= 1, got 0"),
    (ViTConfig, {"n_layers": 0}, "model.n_layers must be an integer >= 1, got 0"),
    (ViTConfig, {"d_model": 0}, "model.d_model must be an integer >= 1, got 0"),
    (ViTConfig, {"n_heads": 0}, "model.n_heads must be an integer >= 1, got 0"),
    (ViTConfig, {"pool": "max"}, "model.pool must be one of ['cls', 'mean'], got 'max'"),
    (ViTConfig, {"norm": "batchnorm"}, "model.norm must be one of ['layernorm', 'rmsnorm'], got 'batchnorm'"),
    (ViTConfig, {"mlp_ratio": -1.0}, "model.mlp_ratio must be a finite float > 0, got -1.0"),
    (ViTConfig, {"dropout": -0.1}, "model.dropout must be a finite float in [0, 1), got -0.1"),
]


@pytest.mark.parametrize("cls, kwargs, message", BAD_FIELDS, ids=[f"{c.__name__}-{k}" for c, k, _ in BAD_FIELDS])
def test_bad_field_values_are_refused(cls, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cls(**kwargs)


def test_the_table_covers_every_numeric_and_choice_field():
    for cls in (TrainConfig, DataConfig, GPTConfig, ViTConfig):
        covered = {name for c, kwargs, _ in BAD_FIELDS if c is cls for name in kwargs}
        for name, (annotation, rule) in field_types(cls).items():
            if annotation in (int, float) or rule.choices is not None or name == "device":
                assert name in covered, f"{cls.__name__}.{name} has no bad value in BAD_FIELDS"
                assert annotation is str or rule.low is not None, f"{cls.__name__}.{name} has no declared range"


# ---------------------------------------------------------------- the CLI: no run folder after a config error


@pytest.mark.parametrize("extra, message", [
    (["--set", "train.lr=fast"], "train.lr must be a finite float > 0, got 'fast'"),
    (["--set", "train.progress=maybe"], "train.progress must be true or false, got 'maybe'"),
    (["--set", "model.d_model=0"], "model.d_model must be an integer >= 1, got 0"),
    (["--set", "model.attention.method=mla", "--set", "model.attention.shared_kv=no"],
     "model.attention.shared_kv must be true or false, got 'no'"),
    (["--set", "model.attention.method=tucker", "--set", "model.attention.ranks=2,64,8"],
     "ranks[1] (r2) must be an integer in [1, 16], got 64"),
    (["--set", "train.device=tpu9"], "train.device must be 'auto' or a torch device"),
])
def test_cli_config_errors_leave_no_run_folder(tmp_path, capsys, extra, message):
    run = tmp_path / "run"
    tiny = [f"--set=model.{k}={v}" for k, v in TINY_MODEL.items()]
    assert main(["train", "--run-dir", str(run), *tiny, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tucker-attn train: error: ") and message in err
    assert not run.exists()


def test_cli_config_file_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2, 3]")
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--config", str(bad)]) == 2
    assert f"config file {str(bad)!r} must hold a mapping" in capsys.readouterr().err
    bad.write_text(json.dumps({"train": {"lr": "fast"}}))
    assert main(["train", "--run-dir", str(tmp_path / "run"), "--config", str(bad)]) == 2
    assert "train.lr must be a finite float > 0, got 'fast'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    stored = tmp_path / "old" / "config.json"
    stored.parent.mkdir()
    stored.write_text('{"task": "lm", ')
    assert main(["train", "--run-dir", str(stored.parent), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"config file {str(stored)!r} is not valid JSON" in err and "line 1, column" in err
    assert sorted(p.name for p in stored.parent.iterdir()) == ["config.json"]


def test_dataclass_fields_keep_their_defaults():
    for cls in (TrainConfig, DataConfig, GPTConfig, ViTConfig):
        instance = cls()
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                assert getattr(instance, f.name) == f.default
