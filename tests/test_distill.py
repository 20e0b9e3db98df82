"""Recovery by distillation (``tucker_attention.hf.distill``, ``tucker-attn distill``) on a tiny
random Llama with a character-level WordPiece tokenizer: what each phase lowers, resume after a
kill, what trains, and the bad inputs (each an error with nothing written)."""

from __future__ import annotations

import copy
import json
import math
import string

import pytest
import torch

T = pytest.importorskip("transformers", reason="distill needs transformers (extra 'hf')")

from tucker_attention.cli import main  # noqa: E402
from tucker_attention.hf import convert  # noqa: E402
from tucker_attention.hf.conversion.convert import converted_blocks, load_converted  # noqa: E402
from tucker_attention.hf.distillation.command import distill_folder  # noqa: E402
from tucker_attention.hf.distillation.data import TokenData, load_data  # noqa: E402
from tucker_attention.hf.distillation.distill import (  # noqa: E402
    DistillConfig,
    block_errors,
    check_pair,
    distill,
    trained_modules,
)
from tucker_attention.settings.distill import DistillError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(batch_size=4, seq_len=16, eval_windows=8, eval_interval=5, checkpoint_interval=4, progress=False)


def _tokenizer():
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase)
             + ["##" + c for c in string.ascii_lowercase] + list(string.punctuation))
    return T.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})       # 89 tokens


def _llama(seed: int = 0):
    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=89, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128,
                           initializer_range=0.3, rope_theta=100.0)
    return T.LlamaForCausalLM(config).eval()


def _random_data(seed: int = 1) -> TokenData:
    g = torch.Generator().manual_seed(seed)
    return TokenData(torch.randint(0, 89, (4000,), generator=g), torch.randint(0, 89, (1500,), generator=g), "random")


@pytest.fixture(scope="module")
def pair():
    teacher = _llama()
    return teacher, convert(teacher, "tucker", ranks=(4, 16, 8), inplace=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, pair):
    root = tmp_path_factory.mktemp("distill")
    teacher, student = pair
    teacher.save_pretrained(root / "original")
    _tokenizer().save_pretrained(root / "original")
    student.save_pretrained(root / "converted")
    other = convert(_llama(seed=1), "tucker", ranks=(4, 16, 8), inplace=False)
    other.save_pretrained(root / "other")
    return root


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_per_layer_phase_lowers_every_blocks_held_out_error(pair, tmp_path):
    teacher, base = pair
    student = copy.deepcopy(base)
    data = _random_data()
    held_out = data.eval_batches(16, 8, "cpu")
    before = block_errors(teacher, student, held_out)
    summary = distill(teacher, student, data, tmp_path / "run",
                      DistillConfig(layer_steps=25, steps=0, layer_lr=3e-3, **FAST))
    after = block_errors(teacher, student, held_out)
    assert set(before) == set(converted_blocks(student)) and len(before) == 2
    for path in before:
        assert after[path] < 0.93 * before[path], (path, before[path], after[path])
    assert summary["block_errors"]["before"].keys() == before.keys()
    assert summary["final"]["kl"] < summary["converted"]["kl"]
    outside = {k: v for k, v in _params(student).items() if "self_attn" not in k}
    assert all(torch.equal(v, _params(base)[k]) for k, v in outside.items())     # attention only, by default


def test_end_to_end_phase_lowers_the_held_out_kl_against_an_explicit_softmax(pair, tmp_path):
    teacher, base = pair
    student = copy.deepcopy(base)
    summary = distill(teacher, student, _random_data(), tmp_path / "run",
                      DistillConfig(layer_steps=0, steps=40, lr=3e-3, **{**FAST, "batch_size": 8}))
    history = summary["history"]
    assert [r["phase"] for r in history][0] == "converted" and history[-1]["phase"] == "end-to-end"
    assert history[-1]["kl"] < 0.92 * history[0]["kl"]
    ids = _random_data().eval_batches(16, 8, "cpu")
    with torch.no_grad():
        p = torch.cat([teacher(**b).logits for b in ids]).double().softmax(-1)        # reference: explicit formula
        q = torch.cat([student(**b).logits for b in ids]).double().softmax(-1)
    kl = float((p * (p.log() - q.log())).sum(-1).mean())
    assert kl == pytest.approx(history[-1]["kl"], rel=1e-4)
    assert summary["tokens"] == 40 * 8 * 16


@pytest.mark.parametrize("kill", [5, 8, 10])         # inside phase 1, at its end (a checkpoint), inside phase 2
def test_resume_after_a_kill_equals_the_uninterrupted_run(pair, tmp_path, kill):
    teacher, base = pair
    cfg = DistillConfig(layer_steps=8, steps=6, grad_accum_steps=2, **FAST)
    whole = copy.deepcopy(base)
    expected = distill(teacher, whole, _random_data(), tmp_path / "whole", cfg)

    class Killed(Exception):
        pass

    def stop(step):
        if step == kill:
            raise Killed

    with pytest.raises(Killed):
        distill(teacher, copy.deepcopy(base), _random_data(), tmp_path / "cut", cfg, on_step=stop)
    resumed = copy.deepcopy(base)
    got = distill(teacher, resumed, _random_data(), tmp_path / "cut", cfg, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))

    def timeless(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert timeless(got["history"]) == timeless(expected["history"])
    logs = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").open()] for d in ("whole", "cut")]
    assert timeless(logs[0]) == timeless(logs[1])


def test_a_run_written_before_the_shared_settings_and_the_loss_names_resumes(pair, tmp_path, monkeypatch):
    """Checkpoints whose settings lack the fields added since (``beta1``, ``beta2``, ``layer_loss``, ``loss``)
    resume at the values those runs trained with (LATER_FIELDS), to the uninterrupted run."""
    teacher, base = pair
    cfg = DistillConfig(layer_steps=3, steps=3, **FAST)
    whole = copy.deepcopy(base)
    distill(teacher, whole, _random_data(), tmp_path / "whole", cfg)
    real = DistillConfig.fixed
    added = ("beta1", "beta2", "layer_loss", "loss")
    monkeypatch.setattr(DistillConfig, "fixed", lambda self: {k: v for k, v in real(self).items() if k not in added})

    class Killed(Exception):
        pass

    def stop(step):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        distill(teacher, copy.deepcopy(base), _random_data(), tmp_path / "old", cfg, on_step=stop)
    monkeypatch.undo()
    resumed = copy.deepcopy(base)
    distill(teacher, resumed, _random_data(), tmp_path / "old", cfg, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    other = DistillConfig(layer_steps=3, steps=3, loss="block-error", **FAST)
    with pytest.raises(ValueError, match=r"\(loss differ\)"):
        distill(teacher, copy.deepcopy(base), _random_data(), tmp_path / "old", other, resume=True)


def test_resume_refuses_other_settings_and_overwrite_is_needed_to_restart(pair, tmp_path):
    teacher, base = pair
    cfg = DistillConfig(layer_steps=2, steps=2, **FAST)
    distill(teacher, copy.deepcopy(base), _random_data(), tmp_path / "run", cfg)
    other = DistillConfig(layer_steps=2, steps=2, **{**FAST, "seq_len": 8})
    with pytest.raises(ValueError, match="seq_len"):
        distill(teacher, copy.deepcopy(base), _random_data(), tmp_path / "run", other, resume=True)
    with pytest.raises(ValueError, match="already holds a run"):
        distill(teacher, copy.deepcopy(base), _random_data(), tmp_path / "run", cfg)
    longer = DistillConfig(layer_steps=2, steps=4, **FAST)               # more end-to-end steps: allowed
    assert distill(teacher, copy.deepcopy(base), _random_data(), tmp_path / "run", longer, resume=True)["steps"] == 6


def test_a_stale_lock_is_taken_over_and_said(pair, tmp_path, capsys):
    """The one loop's run folder: a lock left by a dead process is taken over, and the run says so."""
    import socket

    teacher, base = pair
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text(json.dumps({"pid": 2**22 + 4321, "host": socket.gethostname(), "started": "then"}))
    distill(teacher, copy.deepcopy(base), _random_data(), run, DistillConfig(layer_steps=1, steps=1, **FAST))
    assert f"distill: took over the stale lock of process {2**22 + 4321}" in capsys.readouterr().err
    assert (run / ".lock").read_text() == ""                                      # released


def test_params_all_trains_every_weight_and_attention_only_the_blocks(pair, tmp_path):
    teacher, base = pair
    student = copy.deepcopy(base)
    distill(teacher, student, _random_data(), tmp_path / "run", DistillConfig(layer_steps=0, steps=3, params="all",
                                                                              lr=1e-3, **FAST))
    changed = {k for k, v in _params(student).items() if not torch.equal(v, _params(base)[k])}
    assert any("mlp" in k for k in changed) and any("self_attn" in k for k in changed)
    holder = trained_modules(copy.deepcopy(base), "attention")
    assert sum(p.numel() for p in holder.parameters()) == sum(
        p.numel() for b in converted_blocks(base).values() for p in b.parameters())
    with pytest.raises(ValueError, match="params must be one of"):
        trained_modules(base, "mlp")


def test_attention_only_runs_hold_the_frozen_weights_once(pair, tmp_path):
    """params='attention': the student's weights outside attention are the teacher's own tensors
    (shared, not copied), and stay equal to the original's; params='all' keeps its own copies."""
    teacher, base = pair
    original = _params(teacher)
    student = copy.deepcopy(base)
    distill(teacher, student, _random_data(), tmp_path / "run", DistillConfig(layer_steps=1, steps=1, **FAST))
    theirs = dict(teacher.named_parameters())
    frozen = [n for n, _ in student.named_parameters() if "self_attn" not in n]
    assert frozen and all(dict(student.named_parameters())[n] is theirs[n] for n in frozen)
    assert all(torch.equal(v, original[k]) for k, v in _params(teacher).items())
    own = copy.deepcopy(base)
    distill(teacher, own, _random_data(), tmp_path / "all", DistillConfig(layer_steps=0, steps=1, params="all", **FAST))
    assert not any(dict(own.named_parameters())[n] is theirs[n] for n in frozen)


def test_activation_checkpointing_recomputes_the_blocks_and_trains_the_same_student(pair, tmp_path):
    """The student's layers are run once more per step (recomputed in the backward pass instead of keeping
    their activations) and the trained weights are the ones a run without it gives; the model's layers
    are left as they were."""
    teacher, base = pair
    students, calls = [], []
    for checkpointing in (False, True):
        student = copy.deepcopy(base)
        count = [0]
        attention = student.model.layers[0].self_attn
        attention.register_forward_hook(lambda *args, count=count: count.__setitem__(0, count[0] + 1))
        distill(teacher, student, _random_data(), tmp_path / f"run{checkpointing}",
                DistillConfig(layer_steps=0, steps=2, activation_checkpointing=checkpointing, **FAST))
        assert all("forward" not in vars(layer) for layer in student.model.layers)
        students.append(_params(student))
        calls.append(count[0])
    assert calls[1] == calls[0] + 2                                      # one recomputation per step
    assert all(torch.equal(v, students[0][k]) for k, v in students[1].items())
    assert any(not torch.equal(v, _params(base)[k]) for k, v in students[1].items())


def test_chunked_end_to_end_kl_equals_the_whole_logits_formula(pair, monkeypatch):
    """The KL taken a few positions at a time (logits recomputed in backward) has the value and the
    gradients of the formula on whole logits."""
    from tucker_attention.hf.distillation import losses as distill_losses

    teacher, base = pair
    ids = torch.randint(0, 89, (3, 16), generator=torch.Generator().manual_seed(0))

    def value_and_grads(student):
        loss = distill_losses.logit_kl(teacher, student, ids)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    whole = copy.deepcopy(base)
    with torch.no_grad():
        target = teacher(input_ids=ids).logits.log_softmax(-1)
    got = whole(input_ids=ids).logits.log_softmax(-1)
    want = (target.exp() * (target - got)).sum(-1).mean()
    want.backward()
    want_grads = {n: p.grad.clone() for n, p in whole.named_parameters()}
    monkeypatch.setattr(distill_losses, "KL_CHUNK", 5)                  # 16 positions: chunks of 5, 5, 5, 1
    loss, grads = value_and_grads(copy.deepcopy(base))
    assert distill_losses._chunkable(teacher, base, ids)
    assert float(loss) == pytest.approx(float(want.detach()), rel=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max())), name


def test_a_non_finite_loss_stops_the_run_and_no_checkpoint_holds_it(pair, tmp_path):
    from tucker_attention.training.guard import NonFiniteError

    teacher, base = pair
    student = copy.deepcopy(base)
    block = next(iter(converted_blocks(student).values()))
    with torch.no_grad():
        next(block.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteError, match="max_bad_steps"):
        distill(teacher, student, _random_data(), tmp_path / "run", DistillConfig(layer_steps=3, steps=0, **FAST))
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert records[-1].get("stopped")


def test_bf16_autocast_run(pair, tmp_path):
    teacher, base = pair
    summary = distill(teacher, copy.deepcopy(base), _random_data(), tmp_path / "run",
                      DistillConfig(layer_steps=2, steps=2, precision="bf16", **FAST))
    assert summary["precision"] == "bf16" and all(map(math.isfinite, (summary["final"]["kl"], summary["final"]["ppl"])))


def test_relative_lr_rule_scales_each_parameter_by_its_rms(pair):
    from tucker_attention.hf.distillation.distill import _make_optimizer, lr_scales

    _, base = pair
    params = list(trained_modules(copy.deepcopy(base), "attention").parameters())
    scales = lr_scales(params, 32, "relative")
    for p, scale in zip(params, scales):
        expected = float(p.double().pow(2).mean().sqrt()) * 32 ** 0.5 if p.dim() >= 2 else 1.0
        assert scale == pytest.approx(expected, rel=1e-5)
    assert lr_scales(params, 32, "uniform") == [1.0] * len(params)
    cfg = DistillConfig(layer_lr=1e-3, lr_rule="relative", **FAST)
    optimizer, _ = _make_optimizer(params, scales, cfg, "layer", torch.device("cpu"))
    assert [g["initial_lr"] for g in optimizer.param_groups] == pytest.approx([1e-3 * s for s in scales])


def test_config_is_checked():
    with pytest.raises(ValueError, match="distill.lr"):
        DistillConfig(lr=0.0)
    with pytest.raises(ValueError, match="both 0"):
        DistillConfig(layer_steps=0, steps=0)


def test_a_converted_model_of_another_original_is_refused(pair):
    teacher, student = pair
    with pytest.raises(ValueError, match="converted from another model"):
        check_pair(_llama(seed=1), student)
    check_pair(teacher, student)


def test_distill_command_writes_a_plain_folder_and_refuses_bad_input(folders, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(folders / "original"), str(folders / "converted"), "--out", str(out), "--layer-steps", "3",
            "--steps", "3", "--seq-len", "16", "--batch-size", "2", "--eval-windows", "2", "--no-progress",
            "--prompt", "to be"]
    assert main(["distill"] + args) == 0
    printed = capsys.readouterr().out
    assert "per-layer" in printed and "end-to-end" in printed and "distilled:" in printed
    loaded = T.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert converted_blocks(loaded) and (out / "distill.json").is_file()
    summary = json.loads((out / "distill.json").read_text())["summary"]
    assert summary["steps"] == 6 and (tmp_path / "out.run" / "checkpoints").is_dir()
    assert main(["distill"] + args) == 2                                           # out exists
    assert "already exists" in capsys.readouterr().err

    def refused(argv, *expected):
        bad = tmp_path / "bad"
        assert main(["distill"] + argv + ["--out", str(bad), "--no-progress", "--seq-len", "16"]) == 2
        err = capsys.readouterr().err
        for text in expected:
            assert text in err, err
        assert not bad.exists() and not (tmp_path / "bad.run").exists()

    refused([str(folders / "original"), str(tmp_path / "missing")], "CONVERTED", "not a folder")
    refused([str(folders / "original"), str(folders / "original")], "CONVERTED", "holds no converted model")
    refused([str(folders / "original"), str(folders / "other")], "CONVERTED", "converted from another model")
    refused([str(tmp_path / "nowhere"), str(folders / "converted")], "ORIGINAL")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for f in (folders / "converted").iterdir():
        (corrupt / f.name).write_bytes(f.read_bytes()[: 64] if f.suffix == ".safetensors" else f.read_bytes())
    refused([str(folders / "original"), str(corrupt)], "CONVERTED")
    prepared = tmp_path / "chars"
    assert main(["prepare-data", str(_text(tmp_path)), "--tokenizer", "char", "--out", str(prepared)]) == 0
    refused([str(folders / "original"), str(folders / "converted"), "--data", str(prepared)], "--data",
            "tokenizer")


def _text(tmp_path):
    folder = tmp_path / "text"
    folder.mkdir(exist_ok=True)
    for i in range(12):
        (folder / f"doc{i}.txt").write_text(" ".join(f"word{j} is here, and more text" for j in range(80 + i)))
    return folder


def test_prepared_folder_with_the_models_tokenizer_is_read(folders, tmp_path):
    prepared = tmp_path / "prepared"
    assert main(["prepare-data", str(_text(tmp_path)), "--tokenizer", str(folders / "original"), "--out",
                 str(prepared)]) == 0
    data = load_data(prepared, _tokenizer(), 89)
    batch = data.train_batch(torch.Generator().manual_seed(0), 3, 16)
    assert batch.shape == (3, 16) and int(batch.max()) < 89
    assert data.eval_batches(16, 4, "cpu")[0]["input_ids"].shape == (4, 16)
    with pytest.raises(DistillError, match="vocabulary"):
        load_data(prepared, _tokenizer(), 50)                    # a model whose vocabulary is smaller


def test_distill_folder_resumes_a_run_and_loads_with_plain_from_pretrained(folders, tmp_path):
    import tucker_attention.hf  # noqa: F401  (registers the converted types with the Auto classes)

    cfg = DistillConfig(layer_steps=2, steps=2, **{**FAST, "batch_size": 2, "eval_windows": 2})
    report = distill_folder(folders / "original", folders / "converted", out=tmp_path / "a", config=cfg, prompt=None)
    assert report["summary"]["final"]["phase"] == "end-to-end"
    with pytest.raises(DistillError, match="no distillation run to resume"):
        distill_folder(folders / "original", folders / "converted", out=tmp_path / "b", config=cfg, resume=True)
    again = distill_folder(folders / "original", folders / "converted", out=tmp_path / "b", config=cfg, prompt=None,
                           run_dir=tmp_path / "a.run", resume=True)
    assert again["summary"]["steps"] == 4
    a, b = load_converted(tmp_path / "a"), T.AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_models_own_text_kept_by_convert_joins_the_default_data(folders, tmp_path, monkeypatch):
    import shutil

    from tucker_attention.hf.conversion.model_text import SAMPLE_FILES, kept_samples, save_sample_ids
    from tucker_attention.hf.distillation import command as distill_command

    converted = tmp_path / "converted"
    shutil.copytree(folders / "converted", converted)
    own = {"calibration": [[5, 6, 7] * 40] * 3, "evaluation": [[8, 9] * 30] * 2}
    for name, rows in own.items():
        save_sample_ids(converted / SAMPLE_FILES[name], rows, {"seed": len(name)})
    seen = {}
    real = distill_command.load_data
    monkeypatch.setattr(distill_command, "load_data", lambda *a: seen.setdefault("data", real(*a)))
    cfg = DistillConfig(layer_steps=1, steps=1, **{**FAST, "batch_size": 2, "eval_windows": 2})
    report = distill_folder(folders / "original", converted, out=tmp_path / "a", config=cfg, prompt=None)
    data, plain = seen["data"], real(None, _tokenizer(), 89)
    assert "own text that convert kept" in report["data"]
    assert torch.equal(data.train, torch.cat([plain.train, torch.tensor(sum(own["calibration"], []))]))
    assert torch.equal(data.val, torch.cat([plain.val, torch.tensor(sum(own["evaluation"], []))]))
    assert kept_samples(tmp_path / "a") == kept_samples(converted)                  # carried to the result
    text = tmp_path / "text.txt"
    text.write_text("to be or not to be\n" * 50)
    seen.clear()
    distill_folder(folders / "original", converted, out=tmp_path / "b", data=text, config=cfg, prompt=None)
    assert "own text" not in seen["data"].source and not kept_samples(tmp_path / "b")    # the user's data alone


def test_bf16_folders_distill_held_once_in_bf16_to_the_float32_runs_student(tmp_path, monkeypatch):
    """``distill`` of a bf16 original and its bf16 converted folder keeps the original in bf16 (shared with
    the student outside attention: no float32 copy of the model), trains the converted blocks in float32
    (with and without activation checkpointing) and gives, bit for bit, the student that the float32 path
    (both models loaded in float32, as before) trains."""
    from safetensors.torch import load_file

    from tucker_attention.hf.distillation import command as distill_command
    from tucker_attention.hf.sources.original import load_source

    teacher = _llama().to(torch.bfloat16)
    teacher.save_pretrained(tmp_path / "original")
    _tokenizer().save_pretrained(tmp_path / "original")
    convert(teacher.float(), "tucker", ranks=(4, 16, 8), inplace=False).to(torch.bfloat16).save_pretrained(
        tmp_path / "converted")
    seen = []
    real = distill_command.distill

    def spy(teacher, student, *args, **kwargs):
        summary = real(teacher, student, *args, **kwargs)
        frozen = {n: p for n, p in student.named_parameters() if not n.startswith(tuple(converted_blocks(student)))}
        theirs = dict(teacher.named_parameters())
        seen.append(({p.dtype for p in teacher.parameters()}, all(p is theirs[n] for n, p in frozen.items()),
                     {p.dtype for p in trained_modules(student, "attention").parameters()}))
        return summary

    monkeypatch.setattr(distill_command, "distill", spy)
    data = tmp_path / "text.txt"
    data.write_text(" ".join(f"word{j} is here, and more text" for j in range(400)))
    trained = []
    for checkpointing in (False, True):
        cfg = DistillConfig(layer_steps=2, steps=2, activation_checkpointing=checkpointing,
                            **{**FAST, "batch_size": 2, "eval_windows": 2})
        distill_folder(tmp_path / "original", tmp_path / "converted", out=tmp_path / f"out{checkpointing}",
                       data=data, config=cfg, prompt="hi", prompt_tokens=4)
        trained.append(load_file(str(tmp_path / f"out{checkpointing}" / "model.safetensors")))
    assert seen == [({torch.bfloat16}, True, {torch.float32})] * 2
    source = load_source(tmp_path / "original")                             # the float32 path
    student = load_converted(tmp_path / "converted", dtype=torch.float32)
    tokens = load_data(data, source["tokenizer"], 89)
    distill(source["model"], student, tokens, tmp_path / "f32.run",
            DistillConfig(layer_steps=2, steps=2, **{**FAST, "batch_size": 2, "eval_windows": 2}))
    reference = {k: v.to(torch.bfloat16) for k, v in student.state_dict().items()}
    for weights in trained:
        assert weights.keys() <= reference.keys()
        assert all(torch.equal(weights[k], reference[k]) for k in weights)
    before = load_file(str(tmp_path / "converted" / "model.safetensors"))
    assert any(not torch.equal(trained[0][k], v) for k, v in before.items())


def test_two_ddp_processes_match_one(folders, tmp_path):
    """``torchrun --nproc_per_node=2 tucker-attn distill`` against one process: same losses, same weights."""
    from ddp import run_one_and_two
    from safetensors.torch import load_file

    args = ["distill", str(folders / "original"), str(folders / "converted"), "--layer-steps", "2", "--steps", "2",
            "--seq-len", "16", "--batch-size", "4", "--eval-windows", "2", "--no-progress", "--prompt", ""]
    run_one_and_two(lambda name: args + ["--out", str(tmp_path / name)], timeout=300)
    one, two = ([json.loads(line) for line in (tmp_path / f"{n}.run" / "metrics.jsonl").open()] for n in ("one", "two"))
    assert [m["step"] for m in one] == [m["step"] for m in two]
    for a, b in zip(one, two):
        for key in ("loss", "kl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6)
    summary = json.loads((tmp_path / "two.run" / "summary.json").read_text())
    assert summary["world_size"] == 2
    wa, wb = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("one", "two"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    before = load_file(str(folders / "converted" / "model.safetensors"))
    assert any(not torch.equal(wa[k], v) for k, v in before.items())
