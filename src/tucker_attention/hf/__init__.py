"""Hugging Face ``transformers`` models: read their attention, convert it, save the result.

Needs the extra ``pip install 'tucker-attention[hf]'`` (transformers, safetensors). Importing
this package registers the converted model types (``tucker_llama``, ...) with transformers'
Auto classes, so ``AutoModelForCausalLM.from_pretrained(folder)`` loads a converted folder.
"""

from .auto import register, register_families
from .blocks import HFAttention
from .calibration import BlockStatistics, attention_statistics, input_statistics
from .convert import (METHODS, convert, convert_block, converted_blocks, load_converted, plan_ranks, plan_uniform,
                      save_converted)
from .models import load_model, model_path
from .pipeline import convert_folder
from .read import SUPPORTED_BLOCKS, attention_layers, find_blocks, read_block

register_families()

__all__ = ["METHODS", "SUPPORTED_BLOCKS", "BlockStatistics", "HFAttention", "attention_layers", "attention_statistics",
           "convert", "convert_block", "convert_folder", "converted_blocks", "find_blocks", "input_statistics",
           "load_converted", "load_model", "model_path", "plan_ranks", "plan_uniform", "read_block", "register",
           "save_converted"]
