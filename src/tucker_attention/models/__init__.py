"""Models built on the attention layers: a GPT language model, a ViT, and the blocks they share."""

from .blocks import Block, attention_spec, build_attention
from .gpt import GPT, GPTConfig
from .vit import ViT, ViTConfig

__all__ = ["GPT", "Block", "GPTConfig", "ViT", "ViTConfig", "attention_spec", "build_attention"]
