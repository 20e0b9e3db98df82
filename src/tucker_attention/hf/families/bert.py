"""``bert``: ``query``/``key``/``value`` (nn.Linear); the output projection is the parent's ``output.dense``
(BERT, RoBERTa, XLM-R)."""

from __future__ import annotations

from torch import nn

from .common import GQAFamily, Projections, dropout_p, head_dim_of, weight_and_bias
from .registry import Unsupported, register


class Bert(GQAFamily):
    name = "bert"
    description = "query/key/value and the parent's output.dense"
    tested_on = ("BertSelfAttention", "RobertaSelfAttention", "XLMRobertaSelfAttention")
    linears = ("query", "key", "value")
    outside_parts = ("output.dense",)

    def projections(self, module: nn.Module, parent: nn.Module | None) -> Projections:
        out = getattr(getattr(parent, "output", None), "dense", None)
        if not isinstance(out, nn.Linear):
            raise Unsupported(f"it needs its parent's output.dense (nn.Linear) as output projection; the parent "
                              f"{type(parent).__name__} has none")
        head_dim = int(getattr(module, "attention_head_size", 0)
                       or head_dim_of(module, module.config, module.query.out_features))
        return Projections([weight_and_bias(m) for m in (module.query, module.key, module.value, out)], head_dim,
                           dropout_p(getattr(module, "dropout", 0.0)))


register(Bert())
