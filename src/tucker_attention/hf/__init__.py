"""Hugging Face ``transformers`` models: read their attention, convert it, recover it, save the result.

Needs the extra ``pip install 'tucker-attention[hf]'`` (transformers, safetensors). Importing
this package registers the converted model types (``tucker_llama``, ...) with transformers'
Auto classes, so ``AutoModelForCausalLM.from_pretrained(folder)`` loads a converted folder.

Its rooms: ``sources/`` (loading an original offline: folders, GGUF files, bundled names),
``families/`` (reading each attention structure into our layers), ``modeling/`` (the converted
model classes, their blocks and cache), ``conversion/`` (``convert`` and ``tucker-attn convert``),
``distillation/`` (``tucker-attn distill``). ``auto.py`` is the path saved folders import.
"""

from .._extras import require

require("transformers", "tucker_attention.hf (Hugging Face models)")   # before anything imports it

from .conversion.calibration import BlockStatistics, attention_statistics, input_statistics
from .conversion.command import convert_folder
from .conversion.convert import (
    METHODS,
    convert,
    convert_block,
    converted_blocks,
    load_converted,
    plan_ranks,
    plan_uniform,
    save_converted,
)
from .distillation.command import distill_folder
from .distillation.distill import DistillConfig, distill
from .families.reading import SUPPORTED_BLOCKS, attention_layers, find_blocks, read_block
from .modeling.auto import register, register_families
from .modeling.blocks import HFAttention
from .sources.files import load_model, model_path

register_families()

__all__ = ["METHODS", "SUPPORTED_BLOCKS", "BlockStatistics", "DistillConfig", "HFAttention", "attention_layers",
           "attention_statistics", "convert", "convert_block", "convert_folder", "converted_blocks", "distill",
           "distill_folder", "find_blocks", "input_statistics", "load_converted", "load_model", "model_path",
           "plan_ranks", "plan_uniform", "read_block", "register", "save_converted"]
