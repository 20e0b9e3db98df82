"""A GPT (pre-norm decoder) whose attention is any of MHA, GQA, MQA, MLA or Tucker Attention."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .._checks import check_ids
from .._fields import Rule, check_fields, check_value, typed
from ..layers import KVCache, RopeTables, frozen_weights
from .blocks import NORMS, Block, ModelStats, check_block_config, init_non_attention_, layer_specs, make_norm

POSITIONS = ("rope", "learned")


@dataclass
class GPTConfig:
    """Shapes and choices of :class:`GPT`.

    attention: the attention spec, e.g. ``"mha"`` or ``{"method": "tucker", "ranks": (8, 32, 16)}``
        (see :func:`tucker_attention.models.blocks.attention_spec`), or a list of ``n_layers``
        specs, one per layer (rank-adaptive training ends with per-layer ranks).
    positions: ``"rope"`` (each method's RoPE: head-dimension for MHA/GQA/MQA, latent for MLA
        and Tucker) or ``"learned"`` (absolute embeddings, at most ``block_size`` tokens).
    """

    vocab_size: int = typed(256, low=1)
    block_size: int = typed(256, low=1)
    n_layers: int = typed(4, low=1)
    d_model: int = typed(192, low=1)
    n_heads: int = typed(6, low=1)
    attention: dict | str | list = field(default_factory=lambda: {"method": "mha"})
    norm: str = typed("rmsnorm", choices=NORMS)
    positions: str = typed("rope", choices=POSITIONS)
    mlp_ratio: float = typed(4.0, low=0, low_open=True)
    dropout: float = typed(0.0, low=0, high=1, high_open=True)
    bias: bool = False

    def __post_init__(self):
        check_fields(self, "model")
        self.attention = check_block_config(self)

    def to_dict(self) -> dict:
        return asdict(self)


def check_sampling(max_new_tokens, temperature, top_k, *,
                   names: tuple[str, str, str] = ("max_new_tokens", "temperature", "top_k")) -> tuple:
    """The decoding arguments of :meth:`GPT.generate`, checked: ``max_new_tokens`` an int >= 0,
    ``temperature`` a finite float >= 0 (0 = greedy), ``top_k`` None or an int >= 1. ``names``:
    what errors call them (the CLI passes its flags)."""
    return (check_value(names[0], max_new_tokens, int, Rule(low=0)),
            check_value(names[1], temperature, float, Rule(low=0)),
            check_value(names[2], top_k, int | None, Rule(low=1)))


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
            Block(c.d_model, c.n_heads, spec, causal=True, rope=c.positions == "rope", mlp_ratio=c.mlp_ratio,
                  norm=c.norm, dropout=c.dropout, bias=c.bias) for spec in layer_specs(c))
        self.norm_f = make_norm(c.norm, c.d_model)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        init_non_attention_(self, c.n_layers)
        self.lm_head.weight = self.wte.weight  # tied after init so both see the embedding's init

    def _check_tokens(self, idx, targets=None) -> None:
        """idx: (B, T >= 1) int64/int32 ids in [0, vocab_size); targets: idx's shape, ids or -1."""
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"idx must be a torch.Tensor of token ids, got {type(idx).__name__}")
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"idx must be an integer tensor of shape (batch, seq) (int64 or int32), got {idx.dtype} "
                             f"{tuple(idx.shape)}")
        if idx.shape[1] == 0:
            raise ValueError(f"idx must hold at least one token (seq >= 1), got shape {tuple(idx.shape)}")
        check_ids("idx", idx, self.config.vocab_size, bound="vocab_size")
        if targets is not None:
            check_ids("targets", targets, self.config.vocab_size, bound="vocab_size", shape=idx.shape,
                      ignore_minus_one=True)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                caches: list[KVCache] | None = None):
        """idx (B, T) -> (logits (B, T, V), loss or None).

        targets: (B, T) next tokens; the loss is their mean cross-entropy (-1 entries ignored).
        caches: one :class:`KVCache` per layer (:meth:`make_caches`); idx continues the cached tokens.
        """
        self._check_tokens(idx, targets)
        return self._forward(idx, targets, caches)

    def _forward(self, idx, targets, caches):
        """:meth:`forward` after its input checks (``generate`` checks the prompt once: the ids it
        samples are in range by construction, and checking them would sync the device every step)."""
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
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().long(), ignore_index=-1)
        return logits, loss

    def make_caches(self, batch_size: int, max_seq_len: int, *, dtype: torch.dtype | None = None) -> list[KVCache]:
        return [block.attn.make_cache(batch_size, max_seq_len, dtype=dtype) for block in self.blocks]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue idx (B, T) by ``max_new_tokens`` tokens -> (B, T + max_new_tokens).

        temperature 0 is greedy decoding; ``top_k`` samples among the k most likely tokens. With
        ``use_cache`` each step feeds only the new token through the layers' KV caches; without,
        each step re-reads the whole sequence. Both attend to the full sequence, so greedy
        decoding gives the same tokens either way. Learned positions cover ``block_size`` tokens,
        prompt and new tokens together. With RoPE generation continues past ``block_size``: every
        token still attends to the whole sequence, but positions beyond ``block_size`` were never
        seen in training, so quality may degrade there.
        """
        max_new_tokens, temperature, top_k = check_sampling(max_new_tokens, temperature, top_k)
        self._check_tokens(idx)
        if self.wpe is not None and idx.shape[1] > self.config.block_size:
            raise ValueError(f"the prompt has {idx.shape[1]} tokens but learned positions cover only "
                             f"block_size={self.config.block_size} tokens")
        if self.wpe is not None and idx.shape[1] + max_new_tokens > self.config.block_size:
            raise ValueError(f"learned positions cover block_size={self.config.block_size} tokens; the prompt "
                             f"({idx.shape[1]}) plus max_new_tokens ({max_new_tokens}) exceeds it")
        caches = self.make_caches(idx.shape[0], idx.shape[1] + max_new_tokens) if use_cache else None
        step_input = idx
        with frozen_weights(self):               # the weights stay fixed while decoding
            for _ in range(max_new_tokens):
                logits, _ = self._forward(step_input if use_cache else idx, None, caches)
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
