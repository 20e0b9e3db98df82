"""KV-cache bytes per token that converted Hugging Face decoders really hold after ``generate()``,
against what each layer's ``cache_spec()`` says, for every method and RoPE setting.

Tiny random GPT-2 (no RoPE) and Llama (head-dimension RoPE; converted Tucker/MLA layers use
latent RoPE) models, d_model 64, 4 heads, 2 layers, float32; nothing is downloaded.

    python benchmarks/cache_bytes.py
"""

from __future__ import annotations

import warnings

import torch
import transformers as T

from tucker_attention.hf import convert, converted_blocks
from tucker_attention.layers import make_attention

D, HEADS, LAYERS, VOCAB = 64, 4, 2, 128
CASES = (("tucker", (2, 32, 16), False), ("tucker", (2, 32, 16), True), ("gqa", 2, False), ("gqa", 1, False),
         ("mla", 16, False), ("mla", (16, 32), False))


def build(arch: str):
    torch.manual_seed(0)
    if arch == "gpt2":
        config = T.GPT2Config(n_embd=D, n_head=HEADS, n_layer=LAYERS, vocab_size=VOCAB, n_positions=64,
                              bos_token_id=None, eos_token_id=None)
        return T.GPT2LMHeadModel(config).eval()
    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=D, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                           intermediate_size=2 * D, num_hidden_layers=LAYERS, bos_token_id=None, eos_token_id=None)
    return T.LlamaForCausalLM(config).eval()


def measure(arch: str, method: str, ranks, shared: bool) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert(build(arch), method, ranks)
    blocks = list(converted_blocks(model).values())
    if shared:                                  # the same ranks with one shared latent (random weights)
        for block in blocks:
            config = {**block.layer.config(), "shared_kv": True}
            config["value_ranks"] = (*config["value_ranks"][:2], config["ranks"][2])
            block.layer = make_attention(**config)
    ids = torch.randint(0, VOCAB, (1, 6))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                         pad_token_id=0, return_dict_in_generate=True)
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values   # 5.24: cache
    held = sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers) // cache.layers[0].keys.shape[2]
    spec = sum(4 * h * w for b in blocks for h, w in b.layer.cache_spec().values())
    layer = blocks[0].layer
    label = f"{method}{' shared' if shared else ''} {ranks}"
    return {"model": arch, "setting": label, "rope": str(layer.rope), "spec": layer.cache_spec(),
            "held": held, "cache_spec": spec, "mha": LAYERS * 2 * D * 4}


def main() -> None:
    rows = [measure(arch, *case) for arch in ("gpt2", "llama") for case in CASES]
    head = f"{'model':<6} {'setting':<26} {'rope':<7} {'cache_spec() per layer':<28} {'B/token held':>12} " \
           f"{'B/token spec':>12} {'held/spec':>9} {'vs MHA':>7}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['model']:<6} {r['setting']:<26} {r['rope']:<7} {str(r['spec']):<28} {r['held']:>12,} "
              f"{r['cache_spec']:>12,} {r['held'] / r['cache_spec']:>9.2f} {r['held'] / r['mha']:>7.3f}")


if __name__ == "__main__":
    main()
