"""A new distillation loss defined here, outside the package: one function registered under its name
is a choice of ``DistillConfig`` (and so of ``tucker-attn distill``'s flags) and trains a tiny
distillation through the one training loop, without editing the package."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("transformers", reason="distillation needs transformers (extra 'hf')")

from test_distill import FAST, _llama, _random_data  # noqa: E402

from tucker_attention._fields import describe, field_types  # noqa: E402
from tucker_attention.hf import convert  # noqa: E402
from tucker_attention.hf.distillation.distill import DistillConfig, block_errors, distill  # noqa: E402
from tucker_attention.hf.distillation.losses import LOSSES, block_pairs, register_loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
NAME = "block-mse-test"


@pytest.fixture
def block_mse():
    """The new loss, registered for one test: the mean squared difference of each converted block's output
    (B, T, d) and the original block's, mean over blocks. Yields it and its calls' input shapes."""
    calls = []

    @register_loss(NAME)
    def loss(teacher, student, input_ids, blocks):
        calls.append(tuple(input_ids.shape))
        pairs = block_pairs(teacher, student, blocks, input_ids).values()
        return torch.stack([(out.float() - target.float()).pow(2).mean() for out, target in pairs]).mean()

    yield loss, calls
    LOSSES.pop(NAME)


def test_a_loss_registered_outside_the_package_distills(block_mse, tmp_path):
    loss, calls = block_mse
    assert NAME in describe(*field_types(DistillConfig)["layer_loss"])     # what the --layer-loss help lists
    teacher = _llama()
    base = convert(teacher, "tucker", ranks=(4, 16, 8), inplace=False)
    student = copy.deepcopy(base)
    held_out = _random_data(seed=3).eval_batches(16, 8, "cpu")
    before = block_errors(teacher, student, held_out)
    cfg = DistillConfig(layer_steps=12, steps=0, layer_lr=1e-2, warmup_steps=2, layer_loss=NAME, grad_accum_steps=2,
                        **FAST)
    summary = distill(teacher, student, _random_data(), tmp_path / "run", cfg)
    after = block_errors(teacher, student, held_out)
    for path in before:
        assert after[path] < 0.93 * before[path], (path, before[path], after[path])
    assert calls == [(4, 16)] * 24                                        # 12 steps of 2 micro-batches of 4 windows
    assert summary["steps"] == 12 and summary["final"]["phase"] == "per-layer"
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["layer_loss"] == NAME
    with pytest.raises(ValueError, match="is already registered"):
        register_loss(NAME, lambda *args: None)


def test_an_unknown_loss_name_is_refused_with_the_registered_ones():
    with pytest.raises(ValueError, match=r"distill\.loss must be one of \['block-error', 'logit-kl'\], got 'mse'"):
        DistillConfig(loss="mse")
