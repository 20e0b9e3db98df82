"""What the forward pass computes: no d x d weights, no per-head copies of the shared K/V."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tucker_attention import make_attention


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor produced by an aten op."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


D, H, B = 48, 6, 2


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("shared_kv", [False, True])
def test_tucker_never_forms_a_d_by_d_weight(rope, shared_kv):
    layer = make_attention("tucker", D, H, ranks=(3, 10, 8), shared_kv=shared_kv, rope=rope, causal=True)
    x = torch.randn(B, 5, D)
    with ShapeRecorder() as rec:
        layer(x).sum().backward()
    big = [(op, s) for op, s in rec.shapes if sum(dim == D for dim in s) >= 2]
    assert not big, f"d x d tensors formed: {big}"


@pytest.mark.parametrize("method,kwargs", [("tucker", {"ranks": (3, 10, 8)}),
                                           ("tucker", {"ranks": (3, 10, 8), "shared_kv": True, "rope": True}),
                                           ("mla", {"kv_rank": 8, "rope": "latent"}),
                                           ("mla", {"kv_rank": 8, "rope": "decoupled", "rope_dim": 4}),
                                           ("gqa", {"n_kv_heads": 2})])
def test_decode_makes_no_per_head_copy_of_the_cache(method, kwargs):
    layer = make_attention(method, D, H, causal=True, **kwargs)
    S = 37                                                     # a length no weight dimension has
    cache = layer.make_cache(B, S)
    with torch.no_grad():
        layer(torch.randn(B, S - 1, D), cache=cache)
        with ShapeRecorder() as rec:
            layer(torch.randn(B, 1, D), cache=cache)
    ours = [(op, s) for op, s in rec.shapes if "scaled_dot_product" not in op and "_flash" not in op]
    per_head = [(op, s) for op, s in ours if len(s) == 4 and s[1] == H and s[2] == S]
    assert not per_head, f"keys/values copied per query head: {per_head}"
