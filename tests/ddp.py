"""One CLI training run in one process and the same under torchrun with 2 gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tucker_attention.training.checkpoint import latest_checkpoint


def run_one_and_two(args_of, timeout: int = 180) -> None:
    """Run ``tucker-attn`` with ``args_of("one")`` in one process and ``args_of("two")`` under torchrun
    with 2 gloo processes (one thread each); assert both succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, launcher in (("one", [sys.executable, "-m", "tucker_attention.cli"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node=2", "-m", "tucker_attention.cli"])):
        proc = subprocess.run(launcher + args_of(name), env=env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-3000:]


def assert_two_processes_match_one(args: list[str], tmp_path: Path) -> tuple[list[dict], list[dict]]:
    """Run ``tucker-attn`` ``args`` in ``tmp_path/one`` (1 process) and ``tmp_path/two`` (2 DDP
    processes); assert the same logged steps, losses (1e-5) and final weights; return both metrics."""
    run_one_and_two(lambda name: args + ["--run-dir", str(tmp_path / name)])
    one, two = ([json.loads(line) for line in (tmp_path / n / "metrics.jsonl").open()] for n in ("one", "two"))
    assert [m["step"] for m in one] == [m["step"] for m in two]
    for a, b in zip(one, two):
        for key in ("train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    wa = load_file(str(latest_checkpoint(tmp_path / "one") / "model.safetensors"))
    wb = load_file(str(latest_checkpoint(tmp_path / "two") / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    return one, two
