"""Checkpoints (safetensors + layer configs) and the `tucker-attn ranks` command."""

import json

import pytest
import torch
from safetensors.torch import save_file

from tucker_attention import MultiHeadAttention, MultiHeadLatentAttention, TuckerAttention, make_attention
from tucker_attention.cli import main
from tucker_attention.io import load_attention_layers, read_metadata, save_checkpoint
from tucker_attention.layers import ATTENTION_METHODS


@pytest.mark.parametrize("method,kwargs", [("mha", {"rope": True, "bias": True}), ("gqa", {"n_kv_heads": 2}),
                                           ("mqa", {}), ("mla", {"kv_rank": 8, "q_rank": 6, "rope": "decoupled"}),
                                           ("tucker", {"ranks": (2, 8, 6), "shared_kv": True, "rope": True})])
def test_config_rebuilds_the_same_layer(method, kwargs):
    layer = make_attention(method, 32, 4, causal=True, scale=0.2, **kwargs)
    rebuilt = make_attention(**json.loads(json.dumps(layer.config())))
    assert type(rebuilt) is type(layer) is ATTENTION_METHODS[method]
    rebuilt.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(rebuilt(x), layer(x))


def small_model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"block0": MultiHeadAttention(32, 4, causal=True, rope=True),
                                "block1": TuckerAttention(32, 4, (2, 16, 8)),
                                "block2": MultiHeadLatentAttention(32, 4, 8, q_rank=8)})


def test_checkpoint_round_trip(tmp_path):
    model = small_model()
    path = save_checkpoint(tmp_path / "run" / "model.safetensors", model, extra={"step": 7})
    assert path.exists() and not list(path.parent.glob("*.tmp"))
    assert read_metadata(path)["extra"] == {"step": 7}
    layers = load_attention_layers(path)
    assert set(layers) == {"block0", "block1", "block2"}
    x = torch.randn(1, 6, 32)
    for name, layer in layers.items():
        torch.testing.assert_close(layer(x), model[name](x))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_attention_layers(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="is not a safetensors checkpoint"):
        load_attention_layers(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="without tucker-attention metadata"):
        load_attention_layers(tmp_path / "plain.safetensors")


def test_ranks_command_prints_ranks_and_writes_the_spectra_png(tmp_path, capsys):
    path = save_checkpoint(tmp_path / "model.safetensors", small_model())
    assert main(["ranks", str(path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "RoPE layers are read at position offset 0" in out
    rows = {tuple(line.split()[:3]): line for line in out.splitlines() if line.startswith("block")}
    assert rows[("block1", "tucker", "W")].endswith("(2, 16, 8)")          # numerical ranks = the layer's ranks
    assert rows[("block2", "mla", "W_tilde")].endswith("(4, 32, 8)")       # Thm. B.4: (h, d, d_c)
    assert "90% energy" in out and "99% energy" in out
    png = tmp_path / "out" / "spectra.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_ranks_command_reports_a_missing_checkpoint(tmp_path, capsys):
    assert main(["ranks", str(tmp_path / "nope.safetensors")]) == 2
    assert "does not exist" in capsys.readouterr().err
