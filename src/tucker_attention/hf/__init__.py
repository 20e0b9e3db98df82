"""Hugging Face ``transformers`` models: read their attention, convert it, save the result.

Needs the extra ``pip install 'tucker-attention[hf]'`` (transformers, safetensors).
"""

from .blocks import HFAttention
from .read import SUPPORTED_BLOCKS, attention_layers, find_blocks, read_block
from .calibration import input_statistics
from .convert import METHODS, convert, convert_block, converted_blocks, load_converted, plan_ranks, save_converted
from .models import load_model, model_path

__all__ = ["METHODS", "SUPPORTED_BLOCKS", "HFAttention", "attention_layers", "convert", "convert_block",
           "converted_blocks", "find_blocks", "input_statistics", "load_converted", "load_model", "model_path",
           "plan_ranks", "read_block", "save_converted"]
