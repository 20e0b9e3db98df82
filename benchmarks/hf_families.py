"""Per decoder family: how exact reading and conversion are, and the cache a converted model holds.

On the tiny random float64 model of every family (``tests/tiny.py``), with a
calibration batch of random tokens (no padding), it measures

- read: max |our layer(x) - the original attention block(x)| over every block, block inputs
  captured from the model's own forward (transformers computes some norms and RoPE tables in
  float32 even in float64, so a few families read to ~1e-8 here; the tests pin 1e-10 with those
  computed in float64);
- native: max |logits| difference after converting to the family's own structure (GQA with its
  key heads; MLA with its kv_rank for DeepSeek): a copy, exact;
- tucker / mla at full rank and at a 4x smaller KV cache: the relative error of every block's
  output (mean over blocks) and of the logits;
- cache: KV bytes per token per layer held after ``generate`` (a Tucker model at the 4x smaller
  KV cache), measured on the cache object, against ``kv_cache_floats_per_token`` x 8 bytes.

    python benchmarks/hf_families.py
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))   # tests/tiny.py: the tiny models
from tiny import FAMILIES, VOCAB, block_io, build, window_mask  # noqa: E402

from tucker_attention._table import text_table
from tucker_attention.accounting import kv_cache_floats_per_token
from tucker_attention.hf import attention_layers, convert, convert_block, converted_blocks, find_blocks


def kv_quarter(layer, method: str):
    """The setting of ``method`` whose KV floats per token are a quarter of ``layer``'s (r3 = r3~)."""
    floats = kv_cache_floats_per_token(layer)
    if method == "tucker":
        r3 = max(2, floats // 8 // 2 * 2)
        return (layer.n_heads, layer.d_model, r3)
    return max(2, floats // 4 // 2 * 2)                                     # mla: one shared latent


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def measure(family: str, steps: int = 9) -> dict:
    model = build(family, unit_scale=True)
    model.set_attn_implementation("sdpa" if family != "gemma2" else "eager")
    ids = torch.randint(0, VOCAB, (2, steps), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    io = block_io(model, input_ids=ids)
    layers = attention_layers(model)
    masks = {b.path: window_mask(steps, b.sliding_window) for b in find_blocks(model)}
    row = {"family": family}
    with torch.no_grad():
        row["read"] = max((layers[p](x, attn_mask=masks[p]) - y).abs().max().item() for p, (x, y) in io.items())
    native = "mla" if family.startswith("deepseek") else "gqa"
    with torch.no_grad():
        row["native"] = (convert(model, native, inplace=False)(input_ids=ids).logits - want).abs().max().item()
    for method in ("tucker", "mla"):
        for label, ranks in (("full", None), ("kv/4", "quarter")):
            per_block = {p: (kv_quarter(layers[p], method) if ranks else None) for p in layers}
            try:
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")
                    errors = [rel(convert_block(layers[p], method, per_block[p])(x, attn_mask=masks[p]), y)
                              for p, (x, y) in io.items()]
                    converted = convert(model, method, per_block, inplace=False)
                    logits = converted(input_ids=ids).logits
            except ValueError as err:                        # e.g. DeepSeek's 12-wide q/k vs 8-wide v heads
                row[f"{method} {label} block"] = row[f"{method} {label} logits"] = "n/a"
                print(f"{family} -> {method} {label}: {err}")
                continue
            row[f"{method} {label} block"] = sum(errors) / len(errors)
            row[f"{method} {label} logits"] = rel(logits, want)
            if method == "tucker" and ranks:
                out = converted.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                                         return_dict_in_generate=True)
                cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
                measured = {(layer.keys.numel() * layer.keys.element_size()
                             + layer.values.numel() * layer.values.element_size())
                            // (layer.keys.shape[0] * layer.keys.shape[2]) for layer in cache.layers}
                promised = {kv_cache_floats_per_token(b.layer) * 8 for b in converted_blocks(converted).values()}
                row["cache B/token (measured/promised)"] = f"{sorted(measured)}/{sorted(promised)}"
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = [measure(f) for f in args.families]
    columns = list(rows[0])
    text = [[r[c] if isinstance(r[c], str) else f"{r[c]:.1e}" if c in ("read", "native") else f"{r[c]:.3f}"
             for c in columns] for r in rows]
    print(text_table(columns, text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
