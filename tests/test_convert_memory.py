"""What bounds the memory of ``tucker-attn convert``, pinned on tiny models: a bf16 source stays bf16
and computes exactly as its float32 upcast (:func:`float32_compute`), converted candidates share the
source's weights, the converted folder of a bf16 source is the float32 path's bit for bit, and
logits are scored in chunks (equal to the unchunked float64 formula; peak memory bounded where the
unchunked formula's is not)."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

T = pytest.importorskip("transformers", reason="the conversion needs transformers (extra 'hf')")

from safetensors.torch import load_file  # noqa: E402

from tucker_attention.hf import convert, convert_folder, find_blocks  # noqa: E402
from tucker_attention.hf.conversion import calibration as calibration_module  # noqa: E402
from tucker_attention.hf.conversion import fidelity as fidelity_module  # noqa: E402
from tucker_attention.hf.conversion.calibration import attention_statistics  # noqa: E402
from tucker_attention.hf.conversion.convert import save_converted  # noqa: E402
from tucker_attention.hf.conversion.fidelity import fidelity, make_inputs  # noqa: E402
from tucker_attention.hf.conversion.settings import convert_model  # noqa: E402
from tucker_attention.hf.sources.compute import _libc, float32_compute, head_in_chunks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
KW = {"n_calibration": 8, "n_eval": 4, "seq_len": 16, "batch_size": 4}


def _llama(vocab: int = 96, layers: int = 2) -> T.LlamaForCausalLM:
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=vocab, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=64, num_hidden_layers=layers, max_position_embeddings=64,
                           initializer_range=0.3, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    return T.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("bf16") / "llama"
    _llama().to(torch.bfloat16).save_pretrained(path)
    return path


def _load(path, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return T.LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()


def test_float32_compute_is_the_float32_model_exactly(bf16_folder):
    stored, upcast = _load(bf16_folder, torch.bfloat16), _load(bf16_folder, torch.float32)
    before = {name: p for name, p in stored.named_parameters()}
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    seen = []
    stored.model.embed_tokens.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
    with torch.no_grad(), float32_compute():
        got = stored(input_ids=ids).logits
    want = upcast(input_ids=ids).logits
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert seen == [torch.bfloat16]                          # the table is not copied: its rows are cast
    after = dict(stored.named_parameters())
    assert all(after[name] is p and p.dtype == torch.bfloat16 for name, p in before.items())
    broken = stored.model.layers[1].mlp.up_proj

    def fails(x):
        assert broken.weight.dtype == torch.float32          # inside its forward: the float32 copy
        raise RuntimeError("a forward that raises")

    broken.forward = fails
    with pytest.raises(RuntimeError, match="a forward that raises"), torch.no_grad(), float32_compute():
        stored(input_ids=ids)                               # the stored tensors are put back all the same
    assert all(dict(stored.named_parameters())[name] is p for name, p in before.items())


def test_a_bf16_head_in_chunks_gives_the_float32_logits_without_a_float32_table(bf16_folder):
    """head_in_chunks: the output head casts a few vocabulary rows at a time (its weight stays bf16 while
    it computes, so float32_compute made no copy of the table); the logits are the float32 model's,
    and those of an independent float64 reference to float32 round-off. Restored after."""
    stored, upcast = _load(bf16_folder, torch.bfloat16), _load(bf16_folder, torch.float32)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    head = stored.get_output_embeddings()
    seen = []
    head.register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
    with torch.no_grad(), float32_compute(), head_in_chunks(stored, rows=40):      # 96 rows: 40 + 40 + 16
        got = stored(input_ids=ids).logits
        hidden = stored.model(input_ids=ids).last_hidden_state
    want = upcast(input_ids=ids).logits
    assert seen == [torch.bfloat16] and "forward" not in vars(head)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    exact = hidden.double() @ head.weight.double().T
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), float32_compute():                 # without it: the whole table cast, as before
        stored(input_ids=ids)
    assert seen == [torch.bfloat16, torch.float32]
    with head_in_chunks(upcast, rows=40):                    # a float32 head needs no copy: left as it is
        assert "forward" not in vars(upcast.get_output_embeddings())


TRIM_CHILD = """
import sys
import torch
from tucker_attention.hf.sources.compute import release_memory

def anon():
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("RssAnon"))

big = torch.ones(4 << 20)
del big                                   # glibc now serves blocks under 16 MB from its heap, not by mmap
blocks = [torch.ones(1 << 20) for _ in range(100)]
kept = blocks[9::10]                      # every tenth 4 MB block stays: the heap cannot shrink from its top
del blocks
before = anon()
print(release_memory(), (before - anon()) / 1e6)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or _libc() is None, reason="glibc's malloc_trim")
def test_release_memory_returns_freed_heap_memory_to_the_system():
    """release_memory: 360 MB of freed 4 MB tensors held in glibc's heap between kept ones (what made
    convert's resident memory creep up from candidate to candidate) go back to the system."""
    proc = subprocess.run([sys.executable, "-c", TRIM_CHILD], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trimmed, returned = proc.stdout.split()
    assert trimmed == "True" and float(returned) > 300, proc.stdout


def test_converted_copy_shares_the_weights_outside_attention():
    model = _llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy = convert(model, "tucker", (2, 16, 8), inplace=False, share_weights=True)
        apart = convert(model, "tucker", (2, 16, 8), inplace=False)
    source = dict(model.named_parameters())
    shared = {n for n, p in copy.named_parameters() if n in source and p is source[n]}
    assert shared and all("self_attn" not in n for n in shared)
    assert {n for n in source if "self_attn" not in n} == shared
    assert not {n for n, p in apart.named_parameters() if n in source and p is source[n]}
    assert all("self_attn" in b.path for b in find_blocks(model))          # the source keeps its attention


def test_bf16_source_converts_to_the_float32_paths_folder(bf16_folder, tmp_path, monkeypatch):
    """convert_folder keeps a bf16 source in bf16, calibrates layer by layer and keeps statistics and
    reference logits on disk; the folder equals the one the float32 model gives all at once (the
    whole model run per batch, everything in memory)."""
    out = tmp_path / "new"
    report = convert_folder(bf16_folder, "tucker", budget_kv=0.5, out=out, progress=False, **KW)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]          # the spill folder is gone
    model = _load(bf16_folder, torch.float32)                 # the float32 path: statistics, choice, conversion
    cal, ev, _ = make_inputs(model, None, **KW)
    monkeypatch.setattr(calibration_module, "layer_stack", lambda model, paths: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = attention_statistics(model, cal)
        converted, info = convert_model(model, "tucker", budget_kv=0.5, statistics=stats, batches=cal,
                                        kind="decoder")
    scores = fidelity(model, converted, ev, "decoder")
    save_converted(converted.to(torch.bfloat16), tmp_path / "ref")
    got, want = load_file(out / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k]) for k in want)
    assert report["converted"]["kl"] == pytest.approx(scores["kl"], rel=1e-12)
    assert report["nope_fraction"] == info["nope_fraction"]


def test_each_blocks_whitening_is_computed_once_for_every_candidate(bf16_folder, tmp_path, monkeypatch):
    """The spilled statistics keep their whitenings (two d x d eigendecompositions per block, the largest
    single cost of a block at 8B's width): the plan and the four partial-RoPE candidates read them, none
    recomputes them, nor the per-layer allocation's measurements and its candidate. The folder is the one the
    recomputing in-memory path gives (the test above)."""
    calls = []
    real = calibration_module.whitening
    monkeypatch.setattr(calibration_module, "whitening", lambda sigma: calls.append(1) or real(sigma))
    report = convert_folder(bf16_folder, "tucker", budget_kv=0.5, out=tmp_path / "out", progress=False, **KW)
    assert report["choice"].count(": kl ") == 4 + 1                        # four candidates and the allocation
    assert "per-layer allocation by measured sensitivity" in report["choice"]
    assert len(calls) == 2 * 2                                            # 2 blocks x (inputs, mixed)


def _explicit_scores(sources, converteds, batches) -> dict:
    """The unchunked float64 formula: log-softmax of whole (B, T, V) logits."""
    kl = top1 = nll = source_nll = 0.0
    count = tokens = 0
    for a, b, batch in zip(sources, converteds, batches):
        la, lb = a.double().log_softmax(-1), b.double().log_softmax(-1)
        mask = batch["attention_mask"].bool()
        targets, has = batch["input_ids"][:, 1:], mask[:, 1:]
        source_nll -= float(la[:, :-1].gather(-1, targets[..., None]).squeeze(-1)[has].sum())
        nll -= float(lb[:, :-1].gather(-1, targets[..., None]).squeeze(-1)[has].sum())
        tokens += int(has.sum())
        la, lb = la[mask], lb[mask]
        kl += float((la.exp() * (la - lb)).sum(-1).clamp(min=0).sum())
        top1 += float((la.argmax(-1) == lb.argmax(-1)).sum())
        count += la.shape[0]
    return {"kl": kl / count, "top1": top1 / count, "ppl": math.exp(nll / tokens),
            "source_ppl": math.exp(source_nll / tokens)}


class _Logits(torch.nn.Module):
    """A 'model' whose logits are given, one batch after another."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs, self.calls = outputs, 0

    def forward(self, **batch):
        self.calls += 1
        return T.modeling_outputs.CausalLMOutput(logits=self.outputs[self.calls - 1])


def _padded_batches(vocab: int, n: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    batches, a, b = [], [], []
    for _ in range(n):
        ids = torch.randint(0, vocab, (3, 9), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, 6:], mask[2, 2:] = 0, 0
        batches.append({"input_ids": ids, "attention_mask": mask})
        a.append(torch.randn(3, 9, vocab, generator=gen) * 3)
        b.append(a[-1] + torch.randn(3, 9, vocab, generator=gen) * 0.5)
    return batches, a, b


@pytest.mark.parametrize("chunk", [1 << 23, 7 * 500, 500])          # one chunk, 7 rows, one row at a time
def test_chunked_scores_equal_the_unchunked_formula(monkeypatch, chunk):
    monkeypatch.setattr(fidelity_module, "CHUNK_ELEMENTS", chunk)
    batches, a, b = _padded_batches(500)
    got = fidelity(a, _Logits(b), batches, "decoder")
    want = _explicit_scores(a, b, batches)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12), key


MEMORY_CHILD = """
import resource, sys
sys.path.insert(0, sys.argv[1])
from test_convert_memory import _Logits, _explicit_scores, _padded_batches
from tucker_attention.hf.conversion.fidelity import fidelity
batches, a, b = _padded_batches(int(sys.argv[2]), n=1)
start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[3] == "chunked":
    fidelity(a, _Logits(b), batches, "decoder")
else:
    _explicit_scores(a, b, batches)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) / 1024)
"""


def test_scoring_memory_does_not_grow_with_the_vocabulary():
    """A 2M-token vocabulary: the logits are 2 x 216 MB; the unchunked float64 formula needs
    several float64 copies of them, the chunked scores a few 64 MB blocks."""
    grew = {}                                                 # MB of peak memory above the logits themselves
    for mode in ("chunked", "unchunked"):
        proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(Path(__file__).parent), str(1 << 21), mode],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        grew[mode] = float(proc.stdout.splitlines()[-1])
    assert grew["chunked"] < 400, grew
    assert grew["unchunked"] > 3 * grew["chunked"], grew        # what the bound guards against
