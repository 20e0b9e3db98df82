"""``tucker-attn train`` and ``tucker-attn compare`` through the CLI's main function."""

from __future__ import annotations

import json

import pytest

from tucker_attention.cli import main
from tucker_attention.experiments.compare import compare_configs, format_compare_table, pareto_front

TEXT = "".join(f"verse {i % 23}: the quick brown fox {i * 5 % 11} jumps.\n" for i in range(300))
TINY = ["--set", "model.d_model=32", "--set", "model.n_heads=4", "--set", "model.n_layers=1",
        "--set", "model.block_size=16", "--set", "train.batch_size=4", "--set", "train.progress=false",
        "--set", "train.eval_windows=8"]


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def test_train_then_resume_with_more_steps(corpus, tmp_path, capsys):
    run = str(tmp_path / "run")
    args = ["train", "--run-dir", run, "--data", corpus, "--set", "train.steps=4",
            "--set", "model.attention.method=tucker", "--set", "model.attention.ranks=2,16,8", *TINY]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "GPT (tucker)" in out and "val_loss" in out
    assert main(["train", "--run-dir", run, "--resume", "--set", "train.steps=6", "--set", "train.progress=false"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["attention"] == {"method": "tucker", "ranks": [2, 16, 8]}
    # `ranks` reads a run folder (its newest checkpoint) or a checkpoint folder, as generate does
    capsys.readouterr()
    for where in (run, str(tmp_path / "run" / "checkpoints" / "step-0000004")):
        assert main(["ranks", where, "--out", str(tmp_path / "spectra")]) == 0
        printed = capsys.readouterr().out
        assert "blocks.0.attn  tucker" in printed and (tmp_path / "spectra" / "spectra.png").is_file()


def test_train_from_a_config_file(corpus, tmp_path):
    config = {"task": "lm", "data": {"path": corpus, "tokenizer": "byte"},
              "model": {"d_model": 32, "n_heads": 4, "n_layers": 1, "block_size": 16,
                        "attention": {"method": "gqa", "n_kv_heads": 2}},
              "train": {"steps": 2, "batch_size": 4, "progress": False, "eval_windows": 4}}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    assert main(["train", "--config", str(path), "--run-dir", str(tmp_path / "run")]) == 0
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["data"]["tokenizer"] == "byte"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["params"] > 256 * 32  # a byte-level vocabulary of 256 embeddings


@pytest.mark.parametrize("extra, message", [
    (["--set", "train.bogus=1"], "unknown --set key 'train.bogus'"),
    (["--set", "model.attention.method=flash"], "attention method must be one of"),
    (["--set", "model.attention.method=tucker", "--set", "model.attention.ranks=4,64,16"],
     r"ranks\[1\] \(r2\) must be an integer in \[1, 32\], got 64"),
    (["--set", "model.attention.method=gqa", "--set", "model.attention.kv_rank=4"],
     "unknown argument.*'kv_rank'.*for attention method 'gqa'"),
    (["--set", "model.block_size=100000"], "too few for block_size=100000"),
    (["--set", "train.lr=-1"], r"train\.lr must be a finite float > 0, got -1\.0"),
    (["--set", "data.tokenizer=word"], "tokenizer must be one of"),
])
def test_bad_input_gives_a_clear_error(corpus, tmp_path, capsys, extra, message):
    args = ["train", "--run-dir", str(tmp_path / "run"), "--set", f"data.path={corpus}", "--set", "train.steps=1",
            *TINY, *extra]
    assert main(args) == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_resume_errors(tmp_path, capsys):
    assert main(["train", "--run-dir", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()
    assert main(["train", "--run-dir", str(tmp_path), "--set", "data.path=/does/not/exist.txt"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_compare_tiny_writes_table_plot_and_results(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--preset", "tiny", "--out", str(out), "--steps", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    records = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in records] == ["mha", "gqa", "mla", "tucker", "tucker", "tucker", "tucker"]
    for r in records:
        for key in ("method", "attention_params", "kv_bytes_per_token", "val_loss", "tokens_per_s",
                    "attention_param_ratio"):
            assert key in r
    assert records[1]["n_kv_heads"] == 2 and records[2]["kv_rank"] == 8
    assert records[3]["ranks"] == [4, 8, 8] and records[3]["shared_kv"] is True
    assert records[3]["kv_bytes_per_token"] == records[2]["kv_bytes_per_token"]  # one latent of MLA's width
    assert records[0]["attention_param_ratio"] == 1.0
    assert all(r["attention_params"] < records[0]["attention_params"] for r in records[1:])
    auto = records[6]
    assert auto["label"] == "Tucker auto 10%" and auto["train_settings"] == {"rank_budget_params": 0.1}
    assert auto["rank_budget"] == {"kind": "params", "budget": 409, "mha": 4096}
    assert auto["attention_params"] <= 409 and len(auto["ranks"]) == 1  # one layer: [[r1,r2,r3],[r1~,r2~,r3~]]
    assert [len(side) for side in auto["ranks"][0]] == [3, 3]
    assert (out / "runs" / "tucker-auto-10" / "ranks.png").is_file()
    assert (out / "compare.png").stat().st_size > 10_000
    assert "unigram baseline" in printed and "Tucker [2,3,2]" in printed
    assert "parameter ratio at matched quality: " in printed
    assert "Tucker auto 10%: budget 409 attention params (10.0% of MHA's)" in printed
    assert "<= 25% of MHA's attention parameters within 3%" in printed
    assert "<= 10% of MHA's attention parameters within 5%" in printed
    claim = json.loads((out / "claim.json").read_text())
    assert claim["task"] == "lm" and claim["preset"] == "tiny"
    assert claim["matched_quality"]["text"] in printed
    assert [c["max_ratio"] for c in claim["claim_checks"]] == [0.25, 0.1]
    # a second call reuses every finished run, the rank-adaptive one too
    assert main(["compare", "--preset", "tiny", "--out", str(out), "--steps", "4", "--no-progress"]) == 0
    assert capsys.readouterr().out.count("finished earlier") == 7
    # so does a run whose config.json predates a train option (written without it: its default)
    path = out / "runs" / "mha" / "config.json"
    stored = json.loads(path.read_text())
    del stored["train"]["grad_accum_steps"], stored["train"]["compile"]
    path.write_text(json.dumps(stored))
    assert main(["compare", "--preset", "tiny", "--out", str(out), "--steps", "4", "--no-progress"]) == 0
    assert capsys.readouterr().out.count("finished earlier") == 7


def test_compare_on_user_data_retrains_when_the_budget_changes(corpus, tmp_path, capsys):
    out = str(tmp_path / "cmp")
    assert main(["compare", "--preset", "tiny", "--out", out, "--steps", "2", "--data", corpus, "--no-progress"]) == 0
    assert main(["compare", "--preset", "tiny", "--out", out, "--steps", "3", "--data", corpus, "--no-progress"]) == 0
    assert "finished earlier" not in capsys.readouterr().out
    records = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert {r["steps"] for r in records} == {3}
    config = json.loads((tmp_path / "cmp" / "runs" / "mha" / "config.json").read_text())
    assert config["data"]["path"] == corpus


def test_compare_refuses_attention_overrides_and_unknown_presets():
    with pytest.raises(ValueError, match="sets the attention of every model itself"):
        compare_configs("tiny", overrides=["model.attention.method=mha"])
    with pytest.raises(ValueError, match="preset must be one of"):
        compare_configs("huge")
    configs = compare_configs("tiny", steps=7, overrides=["train.lr=0.01"])
    assert {c.train.steps for c in configs.values()} == {7} and {c.train.lr for c in configs.values()} == {0.01}


def test_pareto_front_and_table():
    records = [{"label": "a", "method": "mha", "attention_params": 100, "val_loss": 1.0, "kv_bytes_per_token": 8,
                "tokens_per_s": 1.0, "attention_param_ratio": 1.0, "val_loss_vs_mha": 0.0},
               {"label": "b", "method": "gqa", "attention_params": 50, "val_loss": 1.2, "kv_bytes_per_token": 4,
                "tokens_per_s": 1.0, "attention_param_ratio": 0.5, "val_loss_vs_mha": 0.2},
               {"label": "c", "method": "tucker", "attention_params": 20, "val_loss": 1.1, "kv_bytes_per_token": 2,
                "tokens_per_s": 1.0, "attention_param_ratio": 0.2, "val_loss_vs_mha": 0.1}]
    assert [r["label"] for r in pareto_front(records)] == ["c", "a"]
    table = format_compare_table(records)
    assert table.splitlines()[2].startswith("a") and "+10.0%" in table


def test_generate_from_a_trained_run(corpus, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", "--run-dir", run, "--set", f"data.path={corpus}", "--set", "train.steps=2", *TINY]) == 0
    capsys.readouterr()
    assert main(["generate", run, "--prompt", "verse", "--tokens", "12", "--temperature", "0"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert text.startswith("verse") and len(text) == len("verse") + 12
    assert main(["generate", run, "--prompt", "verse€"]) == 2
    assert "not in the tokenizer's alphabet" in capsys.readouterr().err


def test_claim_check_reads_the_records():
    from tucker_attention.experiments.compare import claim_check

    def rec(label, method, params, loss):
        return {"label": label, "method": method, "attention_params": params, "val_loss": loss}

    records = [rec("MHA", "mha", 100, 2.0), rec("GQA", "gqa", 75, 2.1), rec("T big", "tucker", 40, 2.0),
               rec("T", "tucker", 25, 2.05), rec("T small", "tucker", 10, 2.2)]
    lines = claim_check(records)
    assert lines[0].startswith("T (25.0% of MHA") and "+2.5%" in lines[0] and lines[0].endswith("yes")
    assert "GQA (3.0x its size)" in lines[1] and lines[1].endswith("yes")
    records[3]["val_loss"] = 2.15
    lines = claim_check(records)
    assert lines[0].endswith("NO") and lines[1].endswith("NO")  # +7.5%, and GQA (2.1) beats it
    assert "no Tucker setting" in claim_check(records[:3])[0]
