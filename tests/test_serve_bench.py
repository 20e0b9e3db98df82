"""benchmarks/serve.py and benchmarks/gpu_check.py: cache bytes, the memory-limited batch, SDPA backend
detection and their --quick runs (tiny shapes on a CPU; no speed is asserted)."""

import importlib.util
import json
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BENCHMARKS = pathlib.Path(__file__).parents[1] / "benchmarks"


def load(name, filename):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def serve():
    return load("bench_serve", "serve.py")


@pytest.fixture(scope="module")
def gpu_check():
    return load("bench_gpu_check", "gpu_check.py")


@pytest.fixture(scope="module")
def quick_models(serve):
    args = serve.parse_args(["--quick"])
    return args, serve.build_models(args)


# -- (c) cache bytes per token --------------------------------------------------------------------
def test_measured_cache_bytes_equal_cache_spec_for_every_method(serve, quick_models):
    args, models = quick_models
    rows = serve.cache_rows(models, args)
    by_label = {r.label: r for r in rows}
    for row, model in zip(rows, models, strict=True):
        per_layer = sum(h * w for h, w in model.gpt.blocks[0].attn.cache_spec().values())
        assert row.measured == row.from_spec == args.n_layers * per_layer * 4      # float32
    # quick shapes: d_model 64, 4 heads of 16; 2 layers
    assert {label: r.measured for label, r in by_label.items()} == {
        "MHA": 2 * 2 * 64 * 4, "GQA n_kv=2": 2 * 2 * 32 * 4, "MLA d_c=16 q=16": 2 * 16 * 4,
        "Tucker [2,16,8]": 2 * (8 + 8) * 4, "Tucker [2,16,8] shared": 2 * 8 * 4}
    assert (by_label["Tucker [2,16,8] shared"].measured < by_label["Tucker [2,16,8]"].measured
            < by_label["GQA n_kv=2"].measured < by_label["MHA"].measured)


def test_allocated_caches_are_checked_in_their_dtype_and_filled(serve, quick_models):
    _, models = quick_models
    for model in models:
        with torch.inference_mode():
            caches = serve.allocate(model, 3, 10, torch.bfloat16)
        assert serve.measured_bytes_per_token(caches) == model.gpt.kv_bytes_per_token(torch.bfloat16)
        assert all(c.length == 10 and c.max_seq_len == 11 and c.batch_size == 3 for c in caches)
        first = next(iter(caches[0].tensors.values()))
        assert first[:, :, :10].abs().sum() > 0 and torch.equal(first[0], first[2])
        assert torch.equal(caches[0].positions[:10], torch.arange(10))


# -- (b) the memory-limited batch -------------------------------------------------------------------
def test_memory_limited_batch(serve):
    fit = serve.memory_limited_batch(1000, 10, 10)
    assert (fit.batch, fit.fits, fit.capped, fit.note) == (10, 10, False, "")
    assert serve.memory_limited_batch(999, 10, 10).batch == 9                  # floor
    capped = serve.memory_limited_batch(1000, 10, 10, max_batch=4)
    assert (capped.batch, capped.fits, capped.capped) == (4, 10, True) and "capped at --max-batch 4" in capped.note
    assert serve.memory_limited_batch(1000, 10, 10, max_batch=10).capped is False
    for budget in (99, 0):
        none = serve.memory_limited_batch(budget, 10, 10)
        assert (none.batch, none.fits, none.capped) == (0, 0, False) and "holds no sequence" in none.note
    # GPT-2 small, float32, 4k context, 2 GiB: MHA 12 x 6144 B/token, Tucker [8,128,64] 12 x 512, shared 12 x 256
    assert [serve.memory_limited_batch(2 * 2 ** 30, b, 4096).batch for b in (73728, 6144, 3072)] == [7, 85, 170]
    for bad in ({"bytes_per_token": 0}, {"context": 0}, {"budget_bytes": -1}, {"max_batch": 0}):
        kwargs = {"budget_bytes": 100, "bytes_per_token": 1, "context": 1, **bad}
        with pytest.raises(ValueError):
            serve.memory_limited_batch(**kwargs)


def test_timed_groups_fit_the_cache_limit(serve):
    groups, skipped = serve.pack_groups([5, 3, 3, 12, 1], 6)
    assert groups == [[0], [1, 2], [4]] and skipped == [3]
    assert serve.pack_groups([], 1) == ([], [])


# -- SDPA backend detection ---------------------------------------------------------------------
def test_backend_of_maps_profiler_names(gpu_check):
    names = {
        "aten::_scaled_dot_product_flash_attention": "flash",
        "aten::_flash_attention_backward": "flash",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, "
        "cutlass::bfloat16_t>, false, true, false, false, true, true, false, false>(pytorch_flash::Flash_fwd_params)":
            "flash",
        "flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel": "flash",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "flash",
        "ScaledDotProductFlashAttentionForCpuBackward0": "flash",
        "aten::_scaled_dot_product_efficient_attention": "efficient",
        "aten::_efficient_attention_forward": "efficient",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params)": "efficient",
        "fmha_cutlassB_bf16_aligned_64x64_k64_sm80": "efficient",
        "aten::_scaled_dot_product_cudnn_attention": "cudnn",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64_4x1x1_kernel0_0": "cudnn",
        "aten::_scaled_dot_product_attention_math": "math",
        "aten::scaled_dot_product_attention": None, "aten::bmm": None, "aten::_safe_softmax": None,
        "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn": None, "aten::mm": None,
    }
    assert {name: gpu_check.backend_of(name) for name in names} == names
    found = gpu_check.detect_backends(list(names) + ["aten::_scaled_dot_product_attention_math"])
    assert set(found) == {"cudnn", "efficient", "flash", "math"}
    assert found["math"] == ["aten::_scaled_dot_product_attention_math"]      # distinct names
    assert gpu_check.detect_backends(["aten::mm", "aten::add"]) == {}


def test_backend_detection_on_a_real_cpu_trace(gpu_check):
    q = torch.randn(1, 2, 8, 8, requires_grad=True)
    k, v = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)

    def call():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    def math_call():
        with sdpa_kernel(SDPBackend.MATH):
            call()

    default = gpu_check.detect_backends(gpu_check.profiled_names(call, torch.device("cpu")))
    assert set(default) in ({"flash"}, {"math"})               # the CPU flash kernel where torch has it
    if "flash" in default:
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" in default["flash"]
    forced = gpu_check.detect_backends(gpu_check.profiled_names(math_call, torch.device("cpu")))
    assert set(forced) == {"math"} and "aten::_scaled_dot_product_attention_math" in forced["math"]


# -- the --quick runs ---------------------------------------------------------------------------
def test_serve_quick_run(serve, tmp_path, capsys):
    out = tmp_path / "serve.json"
    results = serve.main(["--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "(a) decode, context 64, batch 2" in printed and "(b) fixed KV memory" in printed
    assert "(c) KV cache bytes per token" in printed and "issue targets" in printed
    saved = json.loads(out.read_text())
    assert saved["targets"] == results["targets"] and len(saved["cache"]) == 5
    assert [r["batch"] for r in saved["decode"]] == [1] * 5 + [2] * 5
    assert all(r["time"]["median"] > 0 and r["tokens_per_s"] > 0 and r["gb_per_s"] > 0 for r in saved["decode"])
    budget = {r["label"]: r for r in saved["budget"]}
    assert budget["MHA"]["fit"]["batch"] == 4                   # 0.25 MiB / (1024 B/token x 64 tokens)
    assert budget["Tucker [2,16,8] shared"]["fit"] == {"batch": 8, "fits": 64, "capped": True,
                                                       "note": "capped at --max-batch 8 (the budget holds 64)"}
    assert budget["MHA"]["decode"]["kv_bytes"] == 1024 * 64 * 4


def test_serve_reports_what_it_does_not_time(serve, capsys):
    results = serve.main(["--quick", "--batches", "2", "--max-cache-gib", str(2 * 1024 * 65 * 0.75 / 2 ** 30),
                          "--kv-budget-gib", str(500 / 2 ** 30)])
    printed = capsys.readouterr().out
    mha = [r for r in results["decode"] if r["label"] == "MHA"][0]
    assert mha["time"] is None and "exceed --max-cache-gib" in mha["note"]   # 2 x 1024 x 65 B > the limit
    assert "consecutive interleaved groups" in printed
    assert all(r["fit"]["batch"] == 0 and r["decode"]["time"] is None for r in results["budget"])
    assert "holds no sequence" in printed


def test_gpu_check_quick_run(gpu_check, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--quick", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for title in ("1. SDPA backend", "2. training step", "3. serving", "4. decode bandwidth", "total"):
        assert title in printed
    saved = json.loads(out.read_text())
    assert len(saved["backends"]) == 5 and all(r["backends"] for r in saved["backends"])
    assert [r["label"] for r in saved["training"]] == ["MHA", "Tucker [2,16,8]"]
    assert all(r["tokens_per_s"] > 0 for r in saved["training"])
    assert len(saved["bandwidth"]) == 15 and saved["wall_s"]["total"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_check_refuses_to_run_without_cuda(gpu_check, capsys):
    assert gpu_check.main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
