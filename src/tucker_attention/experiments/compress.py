"""``tucker-attn compress``: compress a pretrained sentence encoder's attention (Tucker / GQA /
MLA, no training) and measure how far its sentence embeddings move, optionally after a short
distillation that recovers them (PAPER.md §7, post-training compression). By default the
conversions are activation-aware: they use the statistics of the attention blocks' inputs on
training sentences (``convert(..., calibration=...)``), which keeps far more of the model.

Quality is measured on held-out sentences against the original model's embeddings: mean
cosine of each sentence's two embeddings, and Spearman correlation of the pairwise
similarities (what retrieval and clustering use).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from torch import nn

from .._checks import check_choice, check_int
from .._table import text_table
from ..accounting import attention_param_count, kv_cache_floats_per_token
from ..tensors.methods import METHODS, conversion_method

# MiniLM-L6 (12 heads, d_model 384): Tucker from ~0.8 (to compare with GQA/MLA at equal size) to ~1/20 of
# MHA's attention parameters
# (value ranks = ranks; at equal size, keeping all 12 head components beat r1 = 4-8 here);
# GQA and MLA over their whole range (neither goes below ~1/2: their queries and output stay full).
DEFAULT_SWEEP = {
    "tucker": [(12, 128, 96), (12, 96, 64), (12, 64, 48), (12, 48, 32), (12, 32, 24), (12, 16, 12)],
    "gqa": [6, 4, 3, 2, 1],
    "mla": [256, 192, 128, 96, 64],
}
TINY_SWEEP = {"tucker": [(12, 128, 96), (4, 32, 16)], "gqa": [4], "mla": [64]}
# the recovery fine-tune's learning rate (100 steps of 32 sentences, activation-aware starts): 1e-3 pulled the
# close MLA starts down (kv_rank 256: cosine 0.997 -> 0.960); 3e-4 improved every setting tried, held-out
# cosine after / at 1e-4: MLA 128 0.975 / 0.977, Tucker (12, 64, 48) 0.855 / 0.841, GQA n_kv 2 0.910 / 0.900
FINETUNE_LR = 3e-4
# training sentences held out of the fine-tune to validate it (the best state is kept)
DISTILL_VAL = 128
# training sentences whose tokens give the calibration statistics (activation-aware conversion)
CALIBRATION_SENTENCES = 512


def setting_label(method: str, ranks) -> str:
    """'ranks (12, 128, 96)' | 'n_kv 4' | 'kv_rank 128' (None: 'full rank'; a list: 'per-layer ranks')."""
    if isinstance(ranks, list):
        return f"per-layer {conversion_method(method).names[0]}"
    return conversion_method(method).label(ranks, short=True)


def attention_stats(model: nn.Module) -> dict:
    """Attention parameters and KV-cache floats per token, summed over the attention layers of
    an original (our MHA/GQA copies) or converted (their :class:`HFAttention` layers) model."""
    from ..hf import attention_layers, converted_blocks

    blocks = converted_blocks(model)
    layers = [b.layer for b in blocks.values()] if blocks else list(attention_layers(model).values())
    return {"attention_params": sum(attention_param_count(layer) for layer in layers),
            "kv_floats_per_token": sum(kv_cache_floats_per_token(layer) for layer in layers),
            "n_layers": len(layers)}


def _check_ranks(method: str, ranks):
    """``ranks`` as ``convert`` takes them: the method's setting (one int, or a tuple of as many ints as it
    takes) or a list of them per layer (a plan's); None: full rank (exact)."""
    record = conversion_method(method)

    def setting(value):
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
        if len(values) in record.counts and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            return record.normal(values)
        return None

    if ranks is None:
        return None
    if isinstance(ranks, list) and ranks and all(isinstance(r, (tuple, list)) and setting(r) is not None
                                                 for r in ranks):
        return [setting(r) for r in ranks]                    # one setting per layer (plan_ranks)
    if setting(ranks) is None:
        raise ValueError(f"{method} ranks must be {record.given_as()} or a list of them per layer, got {ranks!r}")
    return setting(ranks)


def evaluate_setting(model: nn.Module, tokenizer, method: str, ranks, eval_sentences: list[str],
                     reference_embeddings, *, value_ranks=None, calibration=None, finetune_steps: int = 0,
                     train_sentences: list[str] | None = None, train_embeddings=None, lr: float = FINETUNE_LR,
                     batch_size: int = 32, seed: int = 0, original_stats: dict | None = None, progress: bool = False,
                     return_model: bool = False):
    """Convert a copy of ``model`` with ``method`` / ``ranks`` and measure it -> record (dict).

    reference_embeddings: the original model's embeddings (N, d) of ``eval_sentences``.
    calibration: block input statistics (:func:`~tucker_attention.experiments.sentences.sentence_statistics`
    of training sentences) for an activation-aware conversion; None: weights only.
    With ``finetune_steps`` > 0 the copy is then distilled (:func:`~tucker_attention.experiments.sentences.distill`)
    on ``train_sentences`` (targets: ``train_embeddings``, else the original model) and
    measured again (``cosine_ft``, ``spearman_ft``). ``model`` itself is never changed.
    Returns the record, or (record, converted model) with ``return_model``.
    """
    from ..hf import convert
    from .sentences import distill, embed, similarity

    check_choice("method", method, METHODS)
    ranks = _check_ranks(method, ranks)
    check_int("finetune_steps", finetune_steps, low=0)
    if finetune_steps:
        if not train_sentences:
            raise ValueError("finetune_steps > 0 needs train_sentences (distinct from the eval sentences)")
        overlap = set(train_sentences) & set(eval_sentences)
        if overlap:
            raise ValueError(f"{len(overlap)} eval sentences are also training sentences (e.g. "
                             f"{next(iter(overlap))!r}); the eval sentences must never be trained on")
    start = time.perf_counter()
    original = original_stats or attention_stats(model)
    converted = convert(model, method, ranks, value_ranks=value_ranks, calibration=calibration, inplace=False).eval()
    stats = attention_stats(converted)
    record = {"method": method, "label": setting_label(method, ranks),
              "ranks": list(ranks) if isinstance(ranks, tuple) else ranks, "value_ranks": value_ranks,
              "calibrated": calibration is not None,
              "attention_params": stats["attention_params"],
              "attention_params_original": original["attention_params"],
              "attention_param_ratio": stats["attention_params"] / original["attention_params"],
              "kv_floats_per_token": stats["kv_floats_per_token"],
              "kv_floats_per_token_original": original["kv_floats_per_token"], "n_layers": stats["n_layers"],
              **similarity(reference_embeddings, embed(converted, tokenizer, eval_sentences))}
    if finetune_steps:
        # the last DISTILL_VAL training sentences validate the fine-tune (best state kept), if there are enough
        n_val = DISTILL_VAL if len(train_sentences) >= 4 * DISTILL_VAL else 0
        fit, val = train_sentences[:len(train_sentences) - n_val], train_sentences[len(train_sentences) - n_val:]
        teacher, val_teacher = model, model
        if train_embeddings is not None:
            teacher, val_teacher = train_embeddings[:len(fit)], train_embeddings[len(fit):]
        run = distill(teacher, converted, tokenizer, fit, steps=finetune_steps, lr=lr, batch_size=batch_size,
                      seed=seed, val_sentences=val or None, val_teacher=val_teacher, progress=progress)
        after = similarity(reference_embeddings, embed(converted, tokenizer, eval_sentences))
        record.update(cosine_ft=after["cosine"], spearman_ft=after["spearman"], finetune_steps=finetune_steps,
                      finetune_loss_first=run["losses"][0], finetune_loss_last=run["losses"][-1],
                      finetune_best_step=run["best_step"], finetune_val_cosine=run["val_cosine"])
    record["seconds"] = time.perf_counter() - start
    return (record, converted) if return_model else record


def reference_record(model: nn.Module, tokenizer, eval_sentences: list[str], reference_embeddings=None) -> dict:
    """The original model's row: MHA, ratio 1, its embeddings against themselves."""
    from .sentences import embed, similarity

    start = time.perf_counter()
    stats = attention_stats(model)
    ref = embed(model, tokenizer, eval_sentences) if reference_embeddings is None else reference_embeddings
    return {"method": "mha", "label": "original (MHA)", "ranks": None, "attention_params": stats["attention_params"],
            "attention_params_original": stats["attention_params"], "attention_param_ratio": 1.0,
            "kv_floats_per_token": stats["kv_floats_per_token"],
            "kv_floats_per_token_original": stats["kv_floats_per_token"], "n_layers": stats["n_layers"],
            **similarity(ref, ref), "seconds": time.perf_counter() - start}


def _load(model):
    from ..hf import load_model

    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    if isinstance(model, tuple) and len(model) == 2:
        return model
    raise TypeError(f"model must be 'minilm', a model folder, or a (model, tokenizer) pair, got {type(model).__name__}")


def _sentences(model, tokenizer, data, n_eval: int, n_train: int, finetune_steps: int, calibrate: bool):
    """Eval sentences (held-out documents), training sentences (for the fine-tune and the
    calibration; never eval ones) and the calibration statistics (None without ``calibrate``)."""
    from .sentences import corpus_sentences, sentence_statistics

    eval_sentences = corpus_sentences(data, split="val", n=n_eval)
    train_sentences = corpus_sentences(data, split="train", n=n_train) if finetune_steps or calibrate else None
    stats = sentence_statistics(model, tokenizer, train_sentences[:CALIBRATION_SENTENCES]) if calibrate else None
    return eval_sentences, train_sentences, stats


def compress_one(model="minilm", method: str = "tucker", ranks=None, *, value_ranks=None, calibrate: bool = True,
                 n_eval: int = 256, finetune_steps: int = 0, n_train: int = 1024, lr: float = FINETUNE_LR,
                 batch_size: int = 32, data=None, save=None, progress: bool = True) -> dict:
    """One setting of :func:`evaluate_setting` on a model name/folder; ``save``: write the
    converted (and fine-tuned) model and its tokenizer there with ``save_converted``."""
    from ..hf import save_converted
    from .sentences import embed

    model, tokenizer = _load(model)
    eval_sentences, train_sentences, stats = _sentences(model, tokenizer, data, n_eval, n_train, finetune_steps,
                                                        calibrate)
    reference = embed(model, tokenizer, eval_sentences)
    record, converted = evaluate_setting(model, tokenizer, method, ranks, eval_sentences, reference,
                                         value_ranks=value_ranks, calibration=stats, finetune_steps=finetune_steps,
                                         train_sentences=train_sentences, lr=lr, batch_size=batch_size,
                                         progress=progress, return_model=True)
    if save is not None:
        record["saved"] = str(save_converted(converted, save, tokenizer=tokenizer))
    return record


def run_compress_sweep(model="minilm", *, sweep: dict | None = None, calibrate: bool = True, n_eval: int = 256,
                       finetune_steps: int = 0, n_train: int = 1024, lr: float = FINETUNE_LR, batch_size: int = 32,
                       data=None, out: str | os.PathLike = "compress-out", progress: bool = True) -> list[dict]:
    """The original model's row, then one :func:`evaluate_setting` record per (method, setting)
    of ``sweep`` ({method: [ranks, ...]}, default :data:`DEFAULT_SWEEP`); writes
    ``OUT/results.json`` (atomic) and ``OUT/compress.png``, returns the records. ``calibrate``:
    activation-aware conversions from the first :data:`CALIBRATION_SENTENCES` training sentences."""
    from tqdm.auto import tqdm

    from .compare import write_json_atomic
    from .sentences import embed

    sweep = DEFAULT_SWEEP if sweep is None else sweep
    for method in sweep:
        check_choice("sweep method", method, METHODS)
    model, tokenizer = _load(model)
    eval_sentences, train_sentences, stats = _sentences(model, tokenizer, data, n_eval, n_train, finetune_steps,
                                                        calibrate)
    reference = embed(model, tokenizer, eval_sentences)
    train_embeddings = embed(model, tokenizer, train_sentences) if finetune_steps else None
    records = [reference_record(model, tokenizer, eval_sentences, reference)]
    settings = [(m, r) for m, values in sweep.items() for r in values]
    bar = tqdm(settings, desc="compress", disable=not progress)
    for method, ranks in bar:
        bar.set_postfix_str(f"{method} {setting_label(method, ranks)}")
        records.append(evaluate_setting(model, tokenizer, method, ranks, eval_sentences, reference,
                                        calibration=stats, finetune_steps=finetune_steps,
                                        train_sentences=train_sentences, train_embeddings=train_embeddings, lr=lr,
                                        batch_size=batch_size, original_stats=records[0], progress=progress))
    out = Path(out)
    write_json_atomic(out / "results.json", records)
    plot_compress(records, out / "compress.png")
    return records


def format_compress_table(records: list[dict]) -> str:
    """Plain-text table, one row per record (in order); fine-tune columns when present."""
    ft = any("cosine_ft" in r for r in records)
    head = ["method", "setting", "attn params", "vs MHA", "KV floats/token", "cosine", "spearman"]
    head += ["cosine ft", "spearman ft"] if ft else []
    head += ["s"]
    rows = []
    for r in records:
        row = [r["method"], r["label"], f"{r['attention_params']:,}", f"{r['attention_param_ratio']:.3f}",
               f"{r['kv_floats_per_token']:,}", f"{r['cosine']:.5f}", f"{r['spearman']:.5f}"]
        if ft:
            row += [f"{r['cosine_ft']:.5f}" if "cosine_ft" in r else "-",
                    f"{r['spearman_ft']:.5f}" if "spearman_ft" in r else "-"]
        rows.append(row + [f"{r['seconds']:.1f}"])
    return text_table(head, rows)


def plot_compress(records: list[dict], path: str | os.PathLike) -> Path:
    """Two panels, cosine and Spearman against attention parameters (log x): one line per
    method (marker per setting), dashed after fine-tune, the original as a black star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    colors = {"gqa": "tab:blue", "mla": "tab:green", "tucker": "tab:red"}
    markers = {"gqa": "s", "mla": "^", "tucker": "o"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, metric in zip(axes, ("cosine", "spearman")):
        for r in (r for r in records if r["method"] == "mha"):
            ax.scatter([r["attention_params"]], [r[metric]], marker="*", s=140, color="black", zorder=4,
                       label="original (MHA)")
        for method in dict.fromkeys(r["method"] for r in records if r["method"] != "mha"):
            pts = sorted((r for r in records if r["method"] == method), key=lambda r: r["attention_params"])
            x = [r["attention_params"] for r in pts]
            name = conversion_method(method).title or method
            color, marker = colors.get(method), markers.get(method, "o")
            ax.plot(x, [r[metric] for r in pts], "-", marker=marker, color=color, label=name, zorder=3)
            for r in pts:
                ax.annotate(r["label"].split(" ", 1)[1], (r["attention_params"], r[metric]), textcoords="offset points",
                            xytext=(4, -9), fontsize=6, color=color)
            if all(f"{metric}_ft" in r for r in pts):
                ax.plot(x, [r[f"{metric}_ft"] for r in pts], "--", marker=marker, mfc="none", color=color,
                        label=f"{name}, fine-tuned ({pts[0]['finetune_steps']} steps)", zorder=3)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:g}M" if v >= 1e6 else f"{v / 1e3:g}k"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("attention parameters (whole model)")
        ax.set_ylabel(f"{metric} vs the original's embeddings")
        ax.set_title("mean cosine of each sentence's embeddings" if metric == "cosine"
                     else "Spearman of pairwise similarities")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

