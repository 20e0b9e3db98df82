"""``tucker-attn distill``: an original model and its converted folder in, a recovered converted folder out.

:func:`distill_folder` checks everything (the two models belong together, the data's tokenizer is
the model's, the folders) before it trains, runs :func:`~.distill.distill` in a run folder
(checkpoints, resume), measures a greedy reply to a prompt before and after, and writes an
ordinary converted folder (plain ``from_pretrained`` loads it) with ``distill.json``, the summary.
Both models load in their stored dtype (a bf16 original is held once, in bf16, shared with the
student outside attention); what trains is cast to float32 and every forward computes in float32
(:func:`~.compute.float32_compute`), so the run is the one the float32 models give, bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

from ..._files import write_folder
from ..._table import text_table
from ...settings.distill import DistillError
from ..conversion.fidelity import greedy_reply
from ..conversion.model_text import kept_samples
from ..sources.compute import float32_compute
from ..sources.original import ConvertError, load_source, read_config, source_dtype
from .data import check_prepared_kind, load_data
from .distill import DistillConfig, check_pair, distill
from .losses import trained_modules

PROMPT = "What is the capital of France?"


@contextlib.contextmanager
def _as_distill_error(argument: str | None = None):
    """A :class:`ConvertError` of the loaders this command shares with ``convert`` as a
    :class:`DistillError` naming ``argument`` (default: the one the loader named)."""
    try:
        yield
    except ConvertError as err:
        raise DistillError(argument or err.argument, err.message) from None


def _converted_config(converted) -> tuple[Path, dict]:
    """(folder, its config.json) of the converted folder, checked to be one."""
    path = Path(converted)
    if not path.is_dir():
        raise DistillError("converted", f"{str(path)!r} is not a folder (give the folder tucker-attn convert wrote)")
    with _as_distill_error("converted"):
        config = read_config(path)
    if not config.get("tucker_attention"):
        raise DistillError("converted", f"{str(path)!r} holds no converted model (its config.json has no "
                                        f"tucker_attention); give the folder tucker-attn convert wrote")
    return path, config


def _load_student(path: Path, config: dict) -> tuple:
    from ..conversion.convert import load_converted

    stored = source_dtype(config)
    try:
        model = load_converted(path, dtype=stored)          # bf16 stays bf16; what trains becomes float32 later
    except Exception as err:          # a damaged or edited folder: the loaders say what (one line)
        raise DistillError("converted", f"{str(path)!r} is not a readable converted model: "
                                        f"{' '.join(str(err).split())}") from None
    return model, stored


def _check_first(config: dict, data, run_dir: Path, settings: DistillConfig) -> None:
    """What needs no model, checked before either loads: the run folder is free, ``--seq-len`` fits
    the model's positions, ``--data`` exists and is readable text or a prepared folder of a
    transformers tokenizer (its ids are checked against the model's once it is loaded)."""
    from ...data.prepared import is_prepared, read_meta
    from ...training.lock import RunFolderError, RunLock
    from ..conversion.fidelity import text_split

    try:
        RunLock(run_dir).check_free()
    except RunFolderError as err:
        raise DistillError("run_dir", str(err)) from None
    positions = config.get("max_position_embeddings") or config.get("n_positions")
    if isinstance(positions, int) and settings.seq_len > positions:
        raise DistillError("seq_len", f"{settings.seq_len} tokens exceed the model's {positions} positions "
                                      f"(max_position_embeddings in its config.json); give at most {positions}")
    if data is None:
        return
    if is_prepared(data):
        try:
            kind = read_meta(Path(data))["tokenizer"]["kind"]
        except (ValueError, OSError, KeyError) as err:
            raise DistillError("data", f"{str(data)!r} is not a readable prepared folder: {err}") from None
        check_prepared_kind(data, kind)
        return
    with _as_distill_error("data"):
        text_split(data)


def _run_dir(run_dir, out: Path, resume: bool, overwrite: bool) -> Path:
    run_dir = Path(run_dir) if run_dir is not None else out.with_name(out.name + ".run")
    if resume and not (run_dir / "checkpoints").is_dir():
        raise DistillError("run_dir", f"{str(run_dir)!r} holds no distillation run to resume")
    if run_dir.resolve() == out.resolve():
        raise DistillError("run_dir", "the run folder must not be the output folder")
    if not resume and not overwrite and (run_dir / "checkpoints").exists():
        raise DistillError("run_dir", f"{str(run_dir)!r} already holds a distillation run; continue it with "
                                      f"--resume, or pass --overwrite to start afresh")
    return run_dir


def distill_folder(original, converted, *, out, data=None, run_dir=None, config: DistillConfig | None = None,
                   resume: bool = False, overwrite: bool = False, prompt: str | None = PROMPT,
                   prompt_tokens: int = 24) -> dict:
    """Distil ``original`` (a model folder, ``.gguf`` file or bundled name) into ``converted`` (a
    folder ``tucker-attn convert`` wrote from it) and write the result to ``out``.

    data: a ``prepare-data`` folder (the model's tokenizer), a text file or folder, or None: the
    built-in Shakespeare plays, joined by the model's own text when ``convert`` kept it in
    ``converted`` (its calibration samples train, its evaluation ones validate). run_dir:
    checkpoints and metrics (default ``OUT.run``). resume: continue that run; overwrite: replace
    ``out`` and a finished or stale run in ``run_dir``. Raises
    :class:`~tucker_attention.settings.distill.DistillError` naming the argument for bad input,
    before anything is written. Returns the report :func:`format_report` prints.
    """
    from ..conversion.command import transformers_bars

    config = config or DistillConfig()
    with transformers_bars(config.progress):
        return _distill_folder(original, converted, out, data, run_dir, config, resume, overwrite, prompt,
                               prompt_tokens)


def _distill_folder(original, converted, out, data, run_dir, config, resume, overwrite, prompt, prompt_tokens):
    from ..conversion.command import check_out, save

    start = time.perf_counter()
    student_path, student_config = _converted_config(converted)
    with _as_distill_error():
        out = check_out(out, student_path, overwrite)
    run_dir = _run_dir(run_dir, out, resume, overwrite)
    _check_first(student_config, data, run_dir, config)
    student, stored_dtype = _load_student(student_path, student_config)
    with _as_distill_error("original"):
        source = load_source(original, dtype="stored")       # held once, in its stored dtype (shared with the student)
    if source["kind"] != "decoder":
        raise DistillError("original", f"distill is for causal LMs; {source['class']} is a {source['kind']}")
    teacher, tokenizer = source["model"], source["tokenizer"]
    try:
        check_pair(teacher, student)
    except ValueError as err:
        raise DistillError("converted", str(err).removeprefix("converted: ")) from None
    try:
        trained_modules(student, config.params).float()    # trained in float32; the rest computes in float32
    except ValueError as err:
        raise DistillError("converted", str(err)) from None
    samples = kept_samples(student_path) if data is None else {}
    tokens = load_data(data, tokenizer, teacher.config.vocab_size, samples)
    try:
        tokens.check_seq_len(config.seq_len)
    except ValueError as err:
        raise DistillError("data", str(err)) from None
    lead = int(os.environ.get("RANK", "0")) == 0           # under torchrun only rank 0 samples and writes
    sample = bool(prompt) and tokenizer is not None and lead
    with float32_compute():                                  # bf16 weights computed as float32, module by module
        before = greedy_reply(student, tokenizer, prompt, prompt_tokens) if sample else None
        summary = distill(teacher, student, tokens, run_dir, config, resume=resume, overwrite=overwrite)
        student.cpu()
        after = greedy_reply(student, tokenizer, prompt, prompt_tokens) if sample else None
        answers = {"prompt": prompt, "source": greedy_reply(teacher.cpu(), tokenizer, prompt, prompt_tokens)
                   if before is not None else None, "converted": before, "distilled": after}
    report = {"original": str(source["path"]), "converted": str(student_path), "out": str(out),
              "run_dir": str(run_dir), "data": tokens.source, "config": dataclasses.asdict(config),
              "summary": summary, "answers": answers, "dtype": str(stored_dtype).removeprefix("torch.")}

    def write(tmp: Path) -> None:
        save(student.to(stored_dtype), tmp, tokenizer, source["generation_config"], samples)
        (tmp / "distill.json").write_text(json.dumps(report, indent=1))

    if lead:
        write_folder(out, write, overwrite=overwrite, error=DistillError)
    report["seconds"] = time.perf_counter() - start
    return report


def format_report(report: dict) -> str:
    """Held-out scores after conversion, after the per-layer phase and after the end-to-end phase."""
    s = report["summary"]
    processes = f" x {s['world_size']} processes" if s["world_size"] > 1 else ""
    rows = [[r["phase"], str(r["step"]), f"{r['tokens']:,}", f"{r['seconds']:.0f}", f"{r['kl']:.4g}",
             f"{r['top1']:.4f}", f"{r['ppl']:.3f}"]
            for r in s["history"] if r["phase"] in ("converted", "per-layer", "end-to-end")]
    lines = [f"{report['converted']} distilled from {report['original']} on {report['data']}",
             f"trained {s['trained_params']:,} parameters ({s['params']}), {s['precision']} on {s['device']}"
             f"{processes}; original perplexity "
             f"{s['converted']['source_ppl']:.3f}",
             text_table(["after", "step", "tokens", "s", "next-token KL", "top-1 agreement", "held-out perplexity"],
                        rows)]
    errors = s["block_errors"]
    if errors.get("before") and errors.get("after"):
        b, a = errors["before"], errors["after"]
        lines.append(f"per-block relative output error (held-out): mean {sum(b.values()) / len(b):.4f} -> "
                     f"{sum(a.values()) / len(a):.4f}, worst {max(b.values()):.4f} -> {max(a.values()):.4f}")
    answers = report["answers"]
    if answers["prompt"]:
        lines += [f"prompt {answers['prompt']!r}:", f"  original:  {answers['source']!r}",
                  f"  converted: {answers['converted']!r}", f"  distilled: {answers['distilled']!r}"]
    lines.append(f"wrote {report['out']} ({report['dtype']}; run folder {report['run_dir']}) in "
                 f"{report.get('seconds', 0):.1f} s")
    return "\n".join(lines)
