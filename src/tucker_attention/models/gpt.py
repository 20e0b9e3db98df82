"""A GPT (pre-norm decoder) whose attention is any of MHA, GQA, MQA, MLA or Tucker Attention."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .._checks import check_choice, check_int
from ..layers import KVCache, RopeTables, frozen_weights
from .blocks import Block, ModelStats, check_block_config, init_non_attention_, make_norm

POSITIONS = ("rope", "learned")


@dataclass
class GPTConfig:
    """Shapes and choices of :class:`GPT`.

    attention: the attention spec, e.g. ``"mha"`` or ``{"method": "tucker", "ranks": (8, 32, 16)}``
        (see :func:`tucker_attention.models.blocks.attention_spec`).
    positions: ``"rope"`` (each method's RoPE: head-dimension for MHA/GQA/MQA, latent for MLA
        and Tucker) or ``"learned"`` (absolute embeddings, at most ``block_size`` tokens).
    """

    vocab_size: int = 256
    block_size: int = 256
    n_layers: int = 4
    d_model: int = 192
    n_heads: int = 6
    attention: dict | str = field(default_factory=lambda: {"method": "mha"})
    norm: str = "rmsnorm"
    positions: str = "rope"
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    bias: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layers", "d_model", "n_heads"):
            check_int(name, getattr(self, name))
        check_choice("positions", self.positions, POSITIONS)
        self.attention = check_block_config(self)

    def to_dict(self) -> dict:
        return asdict(self)


class GPT(ModelStats, nn.Module):
    """idx (B, T) int64 -> logits (B, T, vocab_size); tied input/output embeddings."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.wpe = nn.Embedding(c.block_size, c.d_model) if c.positions == "learned" else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_heads, c.attention, causal=True, rope=c.positions == "rope", mlp_ratio=c.mlp_ratio,
                  norm=c.norm, dropout=c.dropout, bias=c.bias) for _ in range(c.n_layers))
        self.norm_f = make_norm(c.norm, c.d_model)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        init_non_attention_(self, c.n_layers)
        self.lm_head.weight = self.wte.weight  # tied after init so both see the embedding's init

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                caches: list[KVCache] | None = None):
        """idx (B, T) -> (logits (B, T, V), loss or None).

        targets: (B, T) next tokens; the loss is their mean cross-entropy (-1 entries ignored).
        caches: one :class:`KVCache` per layer (:meth:`make_caches`); idx continues the cached tokens.
        """
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be an integer tensor of shape (batch, seq), got {idx.dtype} "
                             f"{tuple(idx.shape)}")
        start = caches[0].length if caches else 0
        steps = idx.shape[1]
        if self.wpe is not None and start + steps > self.config.block_size:
            raise ValueError(f"learned positions cover block_size={self.config.block_size} tokens, "
                             f"got {start + steps}")
        x = self.wte(idx)  # (B, T, d)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(start, start + steps, device=idx.device))
        x = self.drop(x)
        positions = torch.arange(start, start + steps, device=idx.device)
        rope = RopeTables(positions, torch.arange(start + steps, device=idx.device) if caches else None)  # all layers
        for i, block in enumerate(self.blocks):
            x = block(x, cache=caches[i] if caches else None, rope=rope)
        logits = self.lm_head(self.norm_f(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    def make_caches(self, batch_size: int, max_seq_len: int, *, dtype: torch.dtype | None = None) -> list[KVCache]:
        return [block.attn.make_cache(batch_size, max_seq_len, dtype=dtype) for block in self.blocks]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue idx (B, T) by ``max_new_tokens`` tokens -> (B, T + max_new_tokens).

        temperature 0 is greedy decoding. With ``use_cache`` each step feeds only the new token
        through the layers' KV caches; without, each step re-reads the whole sequence. Both
        attend to the full sequence, so greedy decoding gives the same tokens either way.
        """
        check_int("max_new_tokens", max_new_tokens, low=0)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if self.wpe is not None and idx.shape[1] + max_new_tokens > self.config.block_size:
            raise ValueError(f"learned positions cover block_size={self.config.block_size} tokens; the prompt "
                             f"({idx.shape[1]}) plus max_new_tokens ({max_new_tokens}) exceeds it")
        caches = self.make_caches(idx.shape[0], idx.shape[1] + max_new_tokens) if use_cache else None
        step_input = idx
        with frozen_weights(self):               # the weights stay fixed while decoding
            for _ in range(max_new_tokens):
                logits, _ = self(step_input if use_cache else idx, caches=caches)
                logits = logits[:, -1, :].float()
                if temperature == 0:
                    token = logits.argmax(dim=-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None:
                        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
                idx = torch.cat([idx, token], dim=1)
                step_input = token
        return idx
