"""Model families: which transformers attention blocks we read, and how each structure's weights,
RoPE and norms become one of our layers (``reading``: find and dispatch; ``readers``: the readers)."""
