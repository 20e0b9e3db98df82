"""ViT with every attention type, the vision task on scikit-learn's digits, conversion of a
trained MHA ViT, and the finetune-compare protocol (tiny configs)."""

from __future__ import annotations

import json

import pytest
import torch

from tucker_attention.cli import main
from tucker_attention.experiments.finetune import convert_model
from tucker_attention.models import ViT, ViTConfig
from tucker_attention.training import RunConfig, train
from tucker_attention.training.checkpoint import load_trained_model

SPECS = ["mha", {"method": "gqa", "n_kv_heads": 2}, "mqa", {"method": "mla", "kv_rank": 8},
         {"method": "tucker", "ranks": (2, 16, 8)}]


def digits_config(attention="mha", **train) -> RunConfig:
    t = {"steps": 120, "batch_size": 64, "lr": 1e-2, "warmup_steps": 5, "eval_interval": 120,
         "checkpoint_interval": 120, "log_interval": 10, "progress": False, **train}
    # no augmentation: a 2-pixel shift is a quarter of an 8x8 digit
    return RunConfig.from_dict({"task": "vit", "data": {"source": "digits", "augment": False}, "train": t,
                                "model": {"d_model": 32, "n_heads": 4, "n_layers": 1, "patch_size": 2,
                                          "attention": attention}})


@pytest.mark.parametrize("attention", SPECS, ids=str)
def test_tiny_vit_learns_digits_for_every_attention(attention, tmp_path):
    summary = train(digits_config(attention), tmp_path / "run")
    assert summary["val_accuracy"] > 0.5 > 0.1 + summary["majority_val_accuracy"]  # chance is ~0.1
    assert summary["best_val_accuracy"] >= summary["val_accuracy"]
    assert summary["images_per_s"] > 0


def test_vit_shapes_pooling_and_errors():
    for pool in ("cls", "mean"):
        model = ViT(ViTConfig(image_size=8, patch_size=2, d_model=16, n_heads=2, n_layers=1, pool=pool))
        logits, loss = model(torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]))
        assert logits.shape == (3, 10) and loss.ndim == 0
        assert model.pos_embed.shape[1] == 16 + (pool == "cls")
    with pytest.raises(ValueError, match=r"images must have shape \(batch, 1, 8, 8\).*got \(2, 1, 28, 28\)"):
        model(torch.randn(2, 1, 28, 28))
    with pytest.raises(ValueError, match="image_size must be divisible by patch_size"):
        ViTConfig(image_size=28, patch_size=5)
    with pytest.raises(ValueError, match="pool must be one of"):
        ViTConfig(pool="max")


def test_attention_is_not_causal():
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=2, d_model=16, n_heads=2, n_layers=1, pool="mean"))
    assert not model.blocks[0].attn.causal
    x = torch.randn(1, 1, 8, 8)
    y = x.clone()
    y[..., -2:, -2:] += 1.0  # only the last patch changes
    tokens = {}
    model.blocks[0].register_forward_hook(lambda m, i, o: tokens.setdefault(len(tokens), o))
    model(x), model(y)
    assert not torch.allclose(tokens[0][:, 0], tokens[1][:, 0])  # the first patch sees the last one


@pytest.mark.parametrize("spec", [{"method": "gqa", "n_kv_heads": 4}, {"method": "mla", "kv_rank": 32},
                                  {"method": "tucker", "ranks": (4, 32, 32)}], ids=str)
def test_full_rank_conversion_keeps_the_logits(spec):
    torch.manual_seed(0)
    model = ViT(ViTConfig(image_size=8, patch_size=2, d_model=32, n_heads=4, n_layers=2)).eval()
    converted, new_spec = convert_model(model, spec)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(converted(x)[0], model(x)[0], atol=1e-4, rtol=0)
    assert new_spec["method"] == spec["method"] and converted.config.attention == new_spec
    rebuilt = ViT(ViTConfig(**{**converted.config.to_dict(), "attention": new_spec}))
    rebuilt.load_state_dict(converted.state_dict())  # the spec rebuilds the converted architecture


def test_conversion_ranks_beyond_the_layer_are_refused():
    model = ViT(ViTConfig(image_size=8, patch_size=2, d_model=32, n_heads=4, n_layers=1))
    with pytest.raises(ValueError, match="ranks"):
        convert_model(model, {"method": "tucker", "ranks": (4, 64, 16)})


def test_checkpoint_of_the_other_task_is_refused(tmp_path):
    train(digits_config(steps=2), tmp_path / "vit")
    model, extra = load_trained_model(tmp_path / "vit", task="vit")
    assert isinstance(model, ViT) and extra["task"] == "vit"
    with pytest.raises(ValueError, match="checkpoint of task 'vit', not 'lm'"):
        load_trained_model(tmp_path / "vit", task="lm")
    assert main(["generate", str(tmp_path / "vit")]) == 2


def test_compare_vit_tiny(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--task", "vit", "--preset", "tiny", "--out", str(out), "--steps", "4",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    records = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in records] == ["mha", "gqa", "mla", "tucker", "tucker", "tucker", "tucker"]
    for r in records:
        assert {"val_accuracy", "attention_params", "kv_bytes_per_token", "images_per_s"} <= set(r)
        assert "val_loss" in r and 0 <= r["val_accuracy"] <= 1
    auto = records[-1]
    assert auto["rank_budget"]["budget"] == 409 and auto["attention_params"] <= 409 and len(auto["ranks"]) == 1
    assert (out / "compare.png").stat().st_size > 10_000
    assert "majority-class baseline" in printed
    assert "parameter ratio at matched quality: " in printed and "accuracy" in printed
    claim = json.loads((out / "claim.json").read_text())
    assert claim["matched_quality"]["metric"] == "val_accuracy" and "claim_checks" not in claim


def test_finetune_compare_tiny(tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune-compare", "--task", "vit", "--preset", "tiny", "--out", str(out), "--no-progress"]) == 0
    records = json.loads((out / "results.json").read_text())
    assert records[0]["method"] == "mha" and len(records) == 5
    for r in records[1:]:
        assert len(r["finetuned_accuracies"]) == 2 and r["attention_params"] < records[0]["attention_params"]
        assert 0 <= r["converted_accuracy"] <= 1
    assert (out / "finetune.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "acc converted" in printed and "±" in printed
    # --from a trained baseline, and a non-MHA source is refused
    assert main(["finetune-compare", "--preset", "tiny", "--out", str(tmp_path / "ft2"), "--no-progress",
                 "--from", str(out / "runs" / "mha-baseline"), "--seeds", "1", "--steps", "2"]) == 0
    assert main(["finetune-compare", "--preset", "tiny", "--out", str(tmp_path / "ft3"), "--no-progress",
                 "--from", str(out / "runs" / "tucker-2-8-8-seed0")]) == 2
    assert "must be an MHA model" in capsys.readouterr().err


def test_vit_resume_is_bit_for_bit(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from tucker_attention.training import tasks
    from tucker_attention.training.checkpoint import latest_checkpoint

    config = {"steps": 6, "checkpoint_interval": 3, "eval_interval": 3}
    aug = digits_config({"method": "tucker", "ranks": (2, 16, 8)}, **config)
    aug.data.augment = True  # the augmentation draws from the saved generator too
    train(aug, tmp_path / "straight")
    original = tasks.VisionTask.sample_batch
    calls = {"n": 0}

    def crash_at_five(self, *args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(tasks.VisionTask, "sample_batch", crash_at_five)
    with pytest.raises(KeyboardInterrupt):
        train(aug, tmp_path / "resumed")
    monkeypatch.setattr(tasks.VisionTask, "sample_batch", original)
    train(aug, tmp_path / "resumed", resume=True)
    a = load_file(str(latest_checkpoint(tmp_path / "straight") / "model.safetensors"))
    b = load_file(str(latest_checkpoint(tmp_path / "resumed") / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, message", [
    (["--set", "model.patch_size=3"], "image_size must be divisible by patch_size"),
    (["--set", "data.source=idx", "--data", "/no/such/folder"], "/no/such/folder"),
    (["--set", "data.source=cifar"], "one of"),
    (["--set", "model.image_size=16"], r"model.image_size=16 does not fit the data"),
])
def test_vit_bad_input_gives_a_clear_error(extra, message, tmp_path, capsys):
    args = ["train", "--task", "vit", "--run-dir", str(tmp_path / "run"), "--set", "data.source=digits",
            "--set", "train.steps=1", "--set", "train.progress=false", *extra]
    assert main(args) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
