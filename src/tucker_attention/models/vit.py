"""A Vision Transformer whose attention is any of MHA, GQA, MQA, MLA or Tucker Attention."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .._checks import check_ids
from .._fields import check_fields, typed
from ..layers import RopeTables
from .blocks import NORMS, Block, ModelStats, check_block_config, init_non_attention_, layer_specs, make_norm

POOLS = ("cls", "mean")


@dataclass
class ViTConfig:
    """Shapes and choices of :class:`ViT` (non-causal attention, learned positions).

    attention: the attention spec, as for :class:`~tucker_attention.models.GPTConfig`.
    pool: ``"cls"`` (a class token) or ``"mean"`` (mean of the patch tokens).
    """

    image_size: int = typed(28, low=1)
    patch_size: int = typed(4, low=1)
    in_channels: int = typed(1, low=1)
    n_classes: int = typed(10, low=1)
    n_layers: int = typed(4, low=1)
    d_model: int = typed(64, low=1)
    n_heads: int = typed(4, low=1)
    attention: dict | str | list = field(default_factory=lambda: {"method": "mha"})
    pool: str = typed("cls", choices=POOLS)
    norm: str = typed("layernorm", choices=NORMS)
    mlp_ratio: float = typed(2.0, low=0, low_open=True)
    dropout: float = typed(0.0, low=0, high=1, high_open=True)
    bias: bool = False

    def __post_init__(self):
        check_fields(self, "model")
        if self.patch_size > self.image_size or self.image_size % self.patch_size:
            raise ValueError(f"model.image_size must be divisible by patch_size (so patch_size <= image_size), got "
                             f"image_size={self.image_size}, patch_size={self.patch_size}")
        self.attention = check_block_config(self)

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)


class ViT(ModelStats, nn.Module):
    """images (B, C, H, W) float -> logits (B, n_classes)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        self.patch_embed = nn.Conv2d(c.in_channels, c.d_model, c.patch_size, stride=c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.d_model)) if c.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, c.n_patches + (c.pool == "cls"), c.d_model))
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_heads, spec, causal=False, rope=False, mlp_ratio=c.mlp_ratio, norm=c.norm,
                  dropout=c.dropout, bias=c.bias) for spec in layer_specs(c))
        self.norm_f = make_norm(c.norm, c.d_model)
        self.head = nn.Linear(c.d_model, c.n_classes)
        init_non_attention_(self, c.n_layers)
        nn.init.normal_(self.pos_embed, std=0.02)
        fan_in = c.in_channels * c.patch_size ** 2
        nn.init.normal_(self.patch_embed.weight, std=fan_in ** -0.5)
        nn.init.zeros_(self.patch_embed.bias)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        """images (B, C, H, W) float -> (logits (B, n_classes), mean cross-entropy with ``labels`` or None).

        labels: (B,) integer class ids in [0, n_classes).
        """
        c = self.config
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a floating-point tensor, got {images.dtype}; normalize them to float "
                             f"first (e.g. images.float() / 255, then the training mean/std)")
        expected = (c.in_channels, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape (batch, {expected[0]}, {expected[1]}, {expected[2]}) for this "
                             f"model (image_size={c.image_size}, in_channels={c.in_channels}), got "
                             f"{tuple(images.shape)}")
        if labels is not None:
            check_ids("labels", labels, c.n_classes, bound="n_classes", shape=images.shape[:1])
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, d)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + N, d)
        x = self.drop(x + self.pos_embed)
        rope = RopeTables(torch.arange(x.shape[1], device=x.device))  # only for specs that switch RoPE on
        for block in self.blocks:
            x = block(x, rope=rope)
        x = self.norm_f(x)
        logits = self.head(x[:, 0] if self.cls_token is not None else x.mean(dim=1))
        loss = F.cross_entropy(logits.float(), labels.long()) if labels is not None else None
        return logits, loss
