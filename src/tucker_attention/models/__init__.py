"""Models built on the attention layers: a GPT language model (and the shared transformer blocks)."""

from .blocks import Block, attention_spec, build_attention
from .gpt import GPT, GPTConfig

__all__ = ["GPT", "Block", "GPTConfig", "attention_spec", "build_attention"]
