"""Hugging Face ``transformers`` models: read their attention, convert it, recover it, save the result.

Needs the extra ``pip install 'tucker-attention[hf]'`` (transformers, safetensors). Importing
this package registers the converted model types (``tucker_llama``, ...) with transformers'
Auto classes, so ``AutoModelForCausalLM.from_pretrained(folder)`` loads a converted folder.

Which file to open for:
- a model's files: ``model_files.py`` (a local folder, a bundled name: ``minilm``, ``smollm2``),
  ``gguf.py`` (GGUF files), ``source_model.py`` (loading an original for a command; ConvertError);
- reading a family: ``reading.py`` (find attention blocks by structure, dispatch),
  ``family_readers.py`` (one reader per structure: projections, RoPE, norms into our layers);
- converting a block: ``convert.py`` (``convert`` on a loaded model, plans, save/load),
  ``calibration.py`` (activation statistics), ``choose.py`` (settings settled by measurement);
- the HF model classes: ``blocks.py`` (HFAttention, the drop-in block running our layer),
  ``cache.py`` (our cache over transformers' Cache), ``auto.py`` (Tucker<Base> classes, Auto
  registration, the folders' remote-code files);
- measuring: ``fidelity.py`` (calibration / held-out inputs, KL, top-1, perplexity, replies);
- the command pipelines: ``convert_command.py`` (``tucker-attn convert``) over ``convert_settings.py``
  (ranks, budgets, plans, ``convert_model``), ``distill_command.py``
  (``tucker-attn distill``) over ``distill.py`` (the loop), ``distill_losses.py``,
  ``distill_data.py``; ``sentences.py`` (MiniLM sentence embeddings, ``compress``'s distillation);
- tests and examples: ``tiny.py`` (tiny random models of every family).
Old paths (``read``, ``readers``, ``pipeline``, ``models``, ``source``) still import, with a
DeprecationWarning, for one release.
"""

from .._extras import require

require("transformers", "tucker_attention.hf (Hugging Face models)")   # before anything imports it

from .auto import register, register_families
from .blocks import HFAttention
from .calibration import BlockStatistics, attention_statistics, input_statistics
from .convert import (
                      METHODS,
                      convert,
                      convert_block,
                      converted_blocks,
                      load_converted,
                      plan_ranks,
                      plan_uniform,
                      save_converted,
)
from .convert_command import convert_folder
from .distill import DistillConfig, distill
from .distill_command import distill_folder
from .model_files import load_model, model_path
from .reading import SUPPORTED_BLOCKS, attention_layers, find_blocks, read_block

register_families()

__all__ = ["METHODS", "SUPPORTED_BLOCKS", "BlockStatistics", "DistillConfig", "HFAttention", "attention_layers",
           "attention_statistics", "convert", "convert_block", "convert_folder", "converted_blocks", "distill",
           "distill_folder", "find_blocks", "input_statistics", "load_converted", "load_model", "model_path",
           "plan_ranks", "plan_uniform", "read_block", "register", "save_converted"]
