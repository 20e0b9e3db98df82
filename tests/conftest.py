import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))

if os.environ.get("PYTEST_XDIST_WORKER"):   # parallel workers (pytest -n): one thread each, no oversubscription
    torch.set_num_threads(1)

# (method, kwargs) at d_model=32, n_heads=4: every layer type and option the library offers.
LAYER_CONFIGS = [
    ("mha", {}),
    ("mha", {"rope": True, "bias": True}),
    ("gqa", {"n_kv_heads": 2}),
    ("gqa", {"n_kv_heads": 2, "rope": True}),
    ("mqa", {"rope": True}),
    ("mla", {"kv_rank": 16}),
    ("mla", {"kv_rank": 16, "q_rank": 12, "bias": True}),
    ("mla", {"kv_rank": 16, "q_rank": 12, "rope": "decoupled"}),
    ("mla", {"kv_rank": 16, "rope": "latent"}),
    ("mla", {"kv_rank": 12, "q_rank": 8, "rope": "latent", "shared_kv": False}),
    ("mla", {"kv_rank": 12, "q_rank": 8, "rope": "decoupled", "rope_dim": 6, "shared_kv": False,
             "latent_norm": True}),
    ("mla", {"kv_rank": 16, "q_rank": 12, "bias": True, "down_bias": True}),
    ("mla", {"kv_rank": 12, "q_rank": 8, "rope": "decoupled", "rope_dim": 4, "latent_norm": True,
             "norm_eps": 1e-3, "down_bias": True}),
    ("tucker", {"ranks": (2, 16, 8)}),
    ("tucker", {"ranks": (3, 12, 8), "value_ranks": (2, 10, 6), "bias": True}),
    ("tucker", {"ranks": (2, 16, 8), "rope": True}),
    ("tucker", {"ranks": (4, 32, 8), "shared_kv": True}),
    ("tucker", {"ranks": (2, 16, 8), "shared_kv": True, "rope": True, "bias": True}),
]
CONFIG_IDS = [f"{m}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for m, kw in LAYER_CONFIGS]


def randomize_(layer):
    """Give biases and norm weights nonzero values so tests see every parameter's effect."""
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0.0, 0.5)
    return layer


@pytest.fixture(params=LAYER_CONFIGS, ids=CONFIG_IDS)
def config(request):
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (on a busy 2-core machine OpenMP spinning makes them ~20x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
