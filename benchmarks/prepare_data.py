"""Throughput and peak memory of ``tucker-attn prepare-data``.

Generates a corpus of ``--mb`` MB (or takes ``--src``): files of ~250 kB of English-like text
whose words follow a Zipf law over a 300k-word vocabulary, the frequent words short (so new
words keep coming, as in real text; a repeated text would only measure a warm cache).
prepare-data runs in a child process, so its peak RSS (``ru_maxrss`` of the child) is its own;
MB/s per core is source MB over the child's CPU seconds in ``prepare_data`` (tokenization runs
on one thread with ``TOKENIZERS_PARALLELISM=false``), MB/s wall over its wall time (imports
excluded). ``--reference`` also times the transformers tokenizer alone, in another child.

    TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 python benchmarks/prepare_data.py --mb 20 --tokenizer minilm
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = """
import json, sys, time
start = time.perf_counter()
from tucker_attention.data.prepare import prepare_data
if sys.argv[2] not in ("char", "byte"):
    import transformers  # a fixed start-up cost, reported apart
src, tokenizer, out = sys.argv[1:4]
wall, cpu = time.perf_counter(), time.process_time()
meta = prepare_data(src, tokenizer, out, progress=False)
print(json.dumps({"import_s": wall - start, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                  "tokens": sum(s["tokens"] for s in meta["splits"].values()), "bytes": meta["source_bytes"],
                  "encoding": meta["tokenizer"].get("encoding")}))
"""
REFERENCE = """
import sys, time
from pathlib import Path
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[2], local_files_only=True)
text = "".join(p.read_text() for p in sorted(Path(sys.argv[1]).rglob("*.txt"))[:20])[:4_000_000]
start = time.process_time()
for i in range(0, len(text), 1 << 20):
    tok(text[i:i + (1 << 20)], add_special_tokens=False)
print(len(text.encode()) / 1e6 / (time.process_time() - start))
"""


def make_corpus(folder: Path, mb: float, seed: int = 0, vocab: int = 300_000) -> int:
    """Write ~``mb`` MB of Zipf-distributed pseudo-English into ``folder``; returns the bytes written."""
    rng = np.random.default_rng(seed)
    syllables = [a + b for a in ("", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "st", "th", "w")
                 for b in ("a", "e", "i", "o", "u", "ea", "ou", "ai", "er", "in", "on", "an")]
    lengths = rng.integers(1, 5, vocab)
    words = sorted(("".join(rng.choice(syllables, n)) for n in lengths), key=len)  # frequent words are short
    weights = 1.0 / np.arange(1, vocab + 1) ** 1.1
    weights /= weights.sum()
    folder.mkdir(parents=True, exist_ok=True)
    written, index = 0, 0
    while written < mb * 1e6:
        tokens = [words[i] for i in rng.choice(vocab, 40_000, p=weights)]
        for i in np.flatnonzero(rng.random(len(tokens)) < 0.12):  # punctuation after ~1 word in 8
            tokens[i] += str(rng.choice([",", ",", ".", ".", ";", "?", "!"]))
        breaks = np.cumsum(rng.integers(6, 16, len(tokens) // 6))
        lines = [" ".join(tokens[a:b]) for a, b in zip(np.r_[0, breaks[:-1]], breaks) if a < len(tokens)]
        text = "\n".join(lines) + "\n"
        (folder / f"doc-{index:05d}.txt").write_text(text, encoding="utf-8")
        written += len(text.encode())
        index += 1
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=20, help="corpus size to generate (default 20)")
    parser.add_argument("--src", help="an existing corpus instead (file, folder or saved dataset)")
    parser.add_argument("--tokenizer", default="minilm", help="char, byte, minilm or a tokenizer folder")
    parser.add_argument("--reference", action="store_true",
                        help="also time the transformers tokenizer alone (tokenizer(text)) on the first ~4 MB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(args.src) if args.src else Path(tmp) / "corpus", Path(tmp) / "out"
        if not args.src:
            make_corpus(src, args.mb)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", CHILD, str(src), args.tokenizer, str(out)], env=env,
                              capture_output=True, text=True)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        r = json.loads(done.stdout.strip().splitlines()[-1])
        peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux; this child only
        reference = None
        if args.reference and (out / "tokenizer").is_dir():
            reference = float(subprocess.run([sys.executable, "-c", REFERENCE, str(src), str(out / "tokenizer")],
                                             env=env, capture_output=True, text=True, check=True).stdout)
    mb = r["bytes"] / 1e6
    print(f"prepare-data --tokenizer {args.tokenizer} ({r['encoding'] or 'direct'}): {mb:.1f} MB -> "
          f"{r['tokens']:,} tokens in {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} CPU s (after {r['import_s']:.1f} s "
          f"of imports)")
    print(f"  {mb / r['cpu_s']:.1f} MB/s per core (CPU time), {mb / r['wall_s']:.1f} MB/s wall; "
          f"peak RSS {peak_mb:.0f} MiB (child process)")
    if reference:
        print(f"  the tokenizer alone (tokenizer(text), 1 MB pieces of the first 4 MB): {reference:.1f} MB/s per core")
    return 0


if __name__ == "__main__":
    sys.exit(main())
