"""Run a model stored in bfloat16 / float16 as if it were float32, one module at a time.

A conversion measures the source (activation statistics, fidelity, the choices of :mod:`.choose`)
in float32, as it always has; holding a bf16 model as a float32 copy doubles its memory (an 8B
model: 32 GB). :func:`float32_compute` keeps the weights in their stored dtype and gives each
module, for the duration of its own forward, float32 copies of its own low-precision
parameters and buffers (then the stored tensors are put back). The outputs are those of the
float32 model exactly: the same float32 values enter the same kernels. Extra memory: the largest
single module in float32 (e.g. the output head); a plain embedding table is not copied, the rows
it looks up are cast instead.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

LOW = (torch.bfloat16, torch.float16)


def _own_low(module: nn.Module) -> list[tuple[dict, str]]:
    return [(store, name) for store in (module._parameters, module._buffers)
            for name, t in store.items() if t is not None and t.dtype in LOW]


def _is_lookup(module: nn.Module) -> bool:
    """A plain embedding table (exactly ``nn.Embedding``, no max_norm): its output rows are its weight's rows,
    so they are cast after the lookup instead of the whole table before it."""
    return type(module) is nn.Embedding and module.max_norm is None


@contextlib.contextmanager
def float32_compute(enabled: bool = True):
    """Within the context every module's forward (of any model: a source and the converted models
    sharing its weights alike) sees its own bf16 / fp16 parameters and buffers as float32 copies;
    the stored tensors are untouched. Not for training: gradients reach the copies only."""
    if not enabled:
        yield
        return
    saved: dict[int, list] = {}
    lookups: set[int] = set()

    def before(module, args):
        low = _own_low(module)
        if low and _is_lookup(module):                # gather in the stored dtype, cast the rows (same values)
            lookups.add(id(module))
        elif low:
            saved.setdefault(id(module), []).append([(store, name, store[name]) for store, name in low])
            for store, name in low:
                t = store[name]
                store[name] = nn.Parameter(t.float(), t.requires_grad) if isinstance(t, nn.Parameter) else t.float()

    def after(module, args, output):
        if id(module) in lookups:
            lookups.discard(id(module))
            return output.float()
        stack = saved.get(id(module))
        if stack:
            for store, name, t in stack.pop():
                store[name] = t
            if not stack:
                del saved[id(module)]

    handles = [module_hooks.register_module_forward_pre_hook(before),
               module_hooks.register_module_forward_hook(after, always_call=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for stack in saved.values():              # a forward that raised before its hook ran
            for entries in stack:
                for store, name, t in entries:
                    store[name] = t
