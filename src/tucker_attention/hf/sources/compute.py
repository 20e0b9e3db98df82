"""Run a model stored in bfloat16 / float16 as if it were float32, one module at a time.

A conversion measures the source (activation statistics, fidelity, the choices of :mod:`.choose`)
in float32, as it always has; holding a bf16 model as a float32 copy doubles its memory (an 8B
model: 32 GB). :func:`float32_compute` keeps the weights in their stored dtype and gives each
module, for the duration of its own forward, float32 copies of its own low-precision
parameters and buffers (then the stored tensors are put back). The outputs are those of the
float32 model exactly: the same float32 values enter the same kernels. Extra memory: the largest
single module in float32; a plain embedding table is not copied, the rows it looks up are cast
instead, and within :func:`head_in_chunks` the output head casts :data:`HEAD_ROWS` vocabulary rows
at a time. :func:`release_memory` hands freed heap memory back to the system between phases.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

LOW = (torch.bfloat16, torch.float16)
#: vocabulary rows of a low-precision output head cast to float32 at once (128 MB at d_model 4096)
HEAD_ROWS = 8192


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
    the stored tensors are untouched. Gradients flow through the copies to the inputs, so frozen
    low-precision weights serve training (distill); a low-precision parameter that should train would
    get no gradient (its copy would), so what trains is float32."""
    if not enabled:
        yield
        return
    saved: dict[int, list] = {}
    lookups: set[int] = set()

    def before(module, args):
        low = _own_low(module)
        if isinstance(module.__dict__.get("forward"), _RowChunks):   # casts its own rows
            return
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


class _RowChunks:
    """The forward of a plain ``nn.Linear`` (out, in) computing ``rows`` output features at a time with
    float32 copies of just those rows of its weight: (..., in) -> (..., out) float32, the values of
    ``F.linear(x, weight.float(), bias.float())`` (each output is the same dot product)."""

    def __init__(self, linear: nn.Linear, rows: int):
        self.linear, self.rows = linear, rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        x = x.float()
        out = x.new_empty(*x.shape[:-1], weight.shape[0])
        for start in range(0, weight.shape[0], self.rows):
            part = slice(start, start + self.rows)
            out[..., part] = nn.functional.linear(x, weight[part].float(), None if bias is None else bias[part].float())
        return out


@contextlib.contextmanager
def head_in_chunks(model: nn.Module, rows: int = HEAD_ROWS):
    """Within the context ``model``'s output head, when it is a plain ``nn.Linear`` stored in bf16 / fp16
    with more than ``rows`` outputs, computes its float32 logits ``rows`` vocabulary rows at a time
    (with :func:`float32_compute` or without): a float32 copy of ``rows`` x d_model instead of the
    whole V x d_model table (1 GB at Llama-3.2-1B). Other heads are left as they are."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if (type(head) is not nn.Linear or head.weight.dtype not in LOW or head.weight.shape[0] <= rows
            or "forward" in head.__dict__):
        yield
        return
    head.forward = _RowChunks(head, rows)
    try:
        yield
    finally:
        del head.forward


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_memory(collect: bool = True) -> bool:
    """Collect garbage (``collect``) and return the C heap's free pages to the system (glibc
    ``malloc_trim``; where there is none, only the collection). Freed tensors of a few MB stay in the
    heap otherwise, so a long job's resident memory creeps up between phases that each need the same
    amount. True when the heap was trimmed."""
    if collect:
        gc.collect()
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
