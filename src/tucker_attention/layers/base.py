"""The projection-free base of every attention layer: the one forward, its checks and conventions.

Shape legend used in all layer docstrings:
B batch, T query length, S key length (cached + new), H query heads, Hkv key/value heads,
D query/key width, Dv value width, d d_model, r1 r2 r3 Tucker ranks.
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import nn

from .._checks import check_input, check_int, check_probability
from .cache import CacheProtocol, KVCache
from .factors import AttentionFactors
from .rope import RopeTables, RotaryEmbedding, apply_rope
from .sdpa import attend, check_mask

#: ``kernel(q, k, v, *, scale, causal, attn_mask, dropout_p) -> o``, see :meth:`Attention.forward`.
AttentionKernel = Callable[..., torch.Tensor]

#: {method name: layer class}; every subclass of :class:`Attention` with a ``method`` joins it.
ATTENTION_METHODS: dict[str, type[Attention]] = {}


def _rename_legacy_keys(module, state_dict, prefix, *args) -> None:
    """Read state dicts that still use a layer's old parameter names."""
    for old, new in module.legacy_state_keys.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


@contextlib.contextmanager
def frozen_weights(module: nn.Module):
    """Explicit inference-time switch: inside the block, every attention layer of ``module``
    computes its :meth:`Attention.derived_weights` once (on entry) and reuses them.

    Outside it nothing derived is kept, so outputs always follow the parameters. Inside it the
    parameters must not change: a change a layer can see (optimizer step, in-place edit,
    ``load_state_dict``, ``.to()``) raises at the next forward, and so does a forward with
    autograd on; a write through ``.data`` cannot be seen, so leave the block first.
    ``GPT.generate`` decodes inside one. ``with frozen_weights(model): model.generate(...)``
    does the same for a converted Hugging Face model.
    """
    layers = [m for m in module.modules() if isinstance(m, Attention)]
    try:
        with torch.no_grad():
            for layer in layers:
                params = list(layer.parameters())
                layer._frozen = (params, layer._weights_key(params), layer.derived_weights())
        yield module
    finally:
        for layer in layers:
            layer._frozen = None


class Attention(nn.Module, ABC):
    """Base of MHA/GQA, MLA and Tucker: input checks, RoPE, the cache, the SDPA call.

    Input and output are (B, T, d_model); ``forward`` is the only implementation of
    project -> cache -> attend -> output, for every variant and every integration.

    Conventions shared by every layer
    ---------------------------------
    - ``rope``: ``None`` (no RoPE), ``'head'`` (rotate each head's queries and keys: MHA/GQA),
      ``'latent'`` (rotate the shared latent, PAPER.md §3: Tucker, MLA's coupled RoPE) or
      ``'decoupled'`` (DeepSeek's extra RoPE branch: MLA). Each class accepts the modes in
      its ``rope_modes``; ``True`` means its ``positional_rope`` (the mode a model's
      ``positions='rope'`` switches on) and ``False`` means ``None``. ``layer.rope`` and
      ``config()['rope']`` always hold the mode string (or None).
    - ``shared_kv`` (latent layers): one latent serves as keys and values. The default is the
      method's published form: True for MLA (DeepSeek-V2 caches one latent), False for
      Tucker (the paper's Def. 2.1 and Tables 1-2 have a separate value factor U3~).
    - ``norm_eps``: epsilon of every norm a layer has (MLA's latent RMSNorm, GQA's per-head
      ``qk_norm``; 1e-6 as DeepSeek and Qwen3). A layer with such a norm is not linear in x:
      :meth:`nonlinearity` says why, :meth:`linearized` folds each norm into its projection.
    - ``rope_dim``: the width RoPE rotates (GQA: the first ``rope_dim`` dims of each head,
      partial rotary; MLA: the decoupled RoPE branch).
    - ``rope_freqs``: the inverse frequency of each rotated pair (rope_dim/2 floats), default
      ``rope_base ** (-2j / rope_dim)``: a scaled RoPE's, or those a converted latent's pairs
      carry from the source's heads (0: a pair that is not rotated). ``config()`` has it when set.
    - ``bias``: biases on every projection whose bias is not redundant (see each class).
    - Learning-rate scales (:meth:`lr_scales`) follow from :meth:`init_stds`, i.e. from the
      configuration alone; the trainer's ``lr_rule`` default lives in one place,
      ``tucker_attention.training.config.DEFAULT_LR_RULE``.

    A subclass defines ``method`` and

    - ``config()``: its constructor arguments; ``make_attention(**layer.config())`` rebuilds it;
    - ``cache_spec() -> {name: (heads, width)}``: what one token leaves in the cache;
    - ``init_stds() -> {parameter name: std}``: the N(0, std^2) init of its weight matrices;
    - ``_project(x, rope) -> (q, entries)``: queries (B, H, T, D) and the new cache entries
      {name: (B, heads, T, width)} exactly as ``cache_spec()`` says; ``rope`` is ``(cos, sin)``
      for the T query positions or None;
    - ``_output(o) -> y``: (B, H, T, Dv) -> (B, T, d_model);
    - optionally ``_keys_values(entries, rope) -> (k, v)`` from all S cached entries (the
      default covers ``k``/``v`` entries and one shared latent ``kv``, whose key copy is
      rotated on read under latent RoPE), ``tensor_view()`` (its per-head factors, for
      :mod:`tucker_attention.tensors`), ``exact_tucker()`` and ``input_weights()``.
    """

    method: str = ""                   # the name make_attention builds this class by
    rope_modes: tuple = (None,)        # the RoPE modes this class supports
    positional_rope: str | None = None  # what rope=True means for this class
    legacy_state_keys: dict[str, str] = {}  # {old state-dict name: current name}, still read

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("method")
        if name:
            known = ATTENTION_METHODS.get(name)
            if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
                raise ValueError(f"attention method {name!r} is already taken by {known.__qualname__}; "
                                 f"choose another method name for {cls.__qualname__}")
            ATTENTION_METHODS[name] = cls

    def __init__(self, d_model: int, n_heads: int, *, causal: bool, dropout: float, scale: float | None,
                 default_scale: float, rope, rope_dim: int | None, rope_base: float, rope_freqs=None):
        super().__init__()
        self.d_model = check_int("d_model", d_model)
        self.n_heads = check_int("n_heads", n_heads)
        self.causal = bool(causal)
        self.dropout = check_probability("dropout", dropout)
        if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite float or None, got {scale!r}")
        self.scale = float(scale) if scale is not None else default_scale
        self.rope = self.rope_mode(rope)
        if rope_freqs is not None and self.rope is None:
            raise ValueError(f"rope_freqs sets the frequencies of RoPE, but rope={rope!r}; pass rope_freqs=None "
                             f"or a RoPE mode")
        self.rotary = RotaryEmbedding(rope_dim, rope_base, inv_freq=rope_freqs) if self.rope is not None else None
        self.rope_base = float(rope_base)
        self._frozen: tuple | None = None            # set only inside frozen_weights()
        if self.legacy_state_keys:
            self._register_load_state_dict_pre_hook(_rename_legacy_keys, with_module=True)

    @classmethod
    def rope_mode(cls, rope) -> str | None:
        """The normalized RoPE mode of ``rope`` for this class (see the class docstring)."""
        mode = {True: cls.positional_rope, False: None}.get(rope, rope) if isinstance(rope, bool) else rope
        if (rope is True and cls.positional_rope is None) or not any(mode is m or mode == m for m in cls.rope_modes):
            extra = f" (True means {cls.positional_rope!r}, False means None)" if cls.positional_rope else ""
            raise ValueError(f"rope must be one of {list(cls.rope_modes)!r}{extra} for {cls.__name__}, got {rope!r}")
        return mode

    # -- what subclasses define -------------------------------------------------------------
    @abstractmethod
    def config(self) -> dict:
        """Constructor arguments, with ``method``: ``make_attention(**layer.config())`` rebuilds it."""

    @abstractmethod
    def cache_spec(self) -> dict[str, tuple[int, int]]:
        """{name: (heads, width)} of what one token leaves in the cache."""

    @abstractmethod
    def init_stds(self) -> dict[str, float]:
        """{parameter name: std} of the N(0, std^2) init, in the order they are drawn."""

    @abstractmethod
    def _project(self, x, rope):
        """x (B, T, d) -> queries (B, H, T, D), new cache entries {name: (B, heads, T, width)}."""

    @abstractmethod
    def _output(self, o):
        """o (B, H, T, Dv) -> y (B, T, d_model)."""

    def _keys_values(self, entries: dict[str, torch.Tensor], rope: RopeTables | None):
        """Cached entries over S positions -> k (B, Hkv, S, D), v (B, Hkv, S, Dv).

        Default: the cached ``k`` and ``v``; or one shared latent ``kv`` that serves as both,
        its key copy rotated on read under latent RoPE (the values need it unrotated, so it is
        cached unrotated and only once).
        """
        if "kv" not in entries:
            return entries["k"], entries["v"]
        latent = entries["kv"]
        if self.rope != "latent":
            return latent, latent
        return apply_rope(latent, *rope.key(self.rotary, latent.dtype)), latent

    def tensor_view(self, dtype: torch.dtype = torch.float64) -> AttentionFactors:
        """Per-head factors of W and W_tilde (PAPER.md §1) in ``dtype``, RoPE ignored."""
        raise TypeError(f"{type(self).__name__} does not describe its tensor view; define tensor_view()")

    def exact_tucker(self) -> dict:
        """The exact Tucker form (PAPER.md §4): {'pre': (core, (U1, U2, U3)), 'post': (...),
        'shared_kv': bool, 'rope': mode, 'rope_freqs': each latent pair's frequency or None}, float64,
        for :func:`tucker_attention.tensors.to_tucker`; optionally the latent biases 'q_bias' (H, r3)
        and 'k_bias' (r3,) (else the query bias is fitted from the tensor view)."""
        raise TypeError(f"{type(self).__name__} has no exact Tucker form; define exact_tucker()")

    def input_weights(self) -> dict[str, str]:
        """{parameter name: 'linear' | 'factor'} of the weights that act on the input x: a Linear
        weight (out, d) or a factor (d, r). Used by :func:`tucker_attention.tensors.input_transform`."""
        raise TypeError(f"{type(self).__name__} does not list its input weights; define input_weights()")

    def value_inputs(self) -> tuple[str, ...]:
        """The weights of :meth:`input_weights` that feed only the values (not queries or keys): a
        conversion may weigh their truncation by the attention-mixed inputs' second moment, which is
        what a value error reaches the output through (:func:`tucker_attention.tensors.input_transform`)."""
        return ()

    def kernel_layout(self) -> tuple[int, int]:
        """(key heads Hkv, key width D) of what the attention kernel receives: by default what the
        cache holds (its first entry); a layer that forms its keys when attending says otherwise."""
        return next(iter(self.cache_spec().values()))

    def rotates_keys_on_read(self) -> bool:
        """True when cached keys are stored unrotated and rotated when read (a shared latent under
        latent RoPE: the values need it unrotated), so the cache must know every key's position."""
        return self.rope == "latent" and "kv" in self.cache_spec()

    def native_setting(self, method: str):
        """This layer's own setting for conversion ``method`` when it already has that structure (GQA:
        its n_kv_heads for 'gqa'; MLA: its kv_rank for 'mla'; Tucker: its ranks), else None."""
        return None

    def nonlinearity(self) -> str | None:
        """Why this layer is not linear in x (e.g. norms between its projections), or None.
        A non-linear layer has no tensor view; :meth:`linearized` gives the nearest linear one."""
        return None

    def exact_with_norms(self) -> bool:
        """Whether :meth:`exact_tucker` keeps this non-linear layer's norms exactly (a Tucker layer's
        latent q/k norms can be its norms), so a full-rank conversion need not linearize it."""
        return False

    def keeps_key_heads(self) -> bool:
        """Whether this layer has per-head q/k norms that a :class:`~.tucker_heads.TuckerHeadsAttention`
        keeps exactly (:meth:`key_heads_form`); from its structure alone (meta layers answer too)."""
        return False

    def key_heads_form(self) -> dict:
        """What :func:`tucker_attention.tensors.to_tucker_heads` builds from, float64: {'query' (H*D, d),
        'key' (Hkv*D, d) projection weights, 'q_gain', 'k_gain' (D,); 'key_heads', 'head_dim', 'norm_eps'}."""
        raise TypeError(f"{type(self).__name__} has no per-head q/k norms to keep as key heads")

    def linearized(self, input_cov: torch.Tensor | None = None) -> Attention:
        """The nearest linear layer (this one when it is linear). ``input_cov`` (d, d): the second
        moment of the layer's inputs, which a linearization may use to estimate norm scales."""
        return self

    def derived_weights(self) -> dict[str, torch.Tensor]:
        """Weights computed from the parameters that a forward can reuse while they stay fixed
        (Tucker's head cores in the layouts it multiplies by); see :func:`frozen_weights`."""
        return {}

    # -- shared machinery -------------------------------------------------------------------
    def _weights_key(self, params) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in params)      # .to() and swaps move data_ptr

    def _check_frozen(self) -> None:
        """Inside :func:`frozen_weights`: refuse autograd and weights changed since entry."""
        params, key, _ = self._frozen
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            raise RuntimeError("frozen_weights() is for inference: run the forward under torch.no_grad() or "
                               "torch.inference_mode(), or leave the frozen_weights() block to train")
        if key != self._weights_key(params):
            raise RuntimeError(f"the weights of a {type(self).__name__} changed inside frozen_weights(); "
                               f"change weights outside the block (its derived weights were computed on entry)")

    def _derived(self, name: str) -> torch.Tensor | None:
        """The frozen derived weight ``name`` inside :func:`frozen_weights` (checked by this
        forward), else None: compute from the parameters."""
        return None if self._frozen is None else self._frozen[2][name]

    @property
    def rope_freqs(self) -> tuple[float, ...] | None:
        """The inverse frequencies of the rotated pairs when they are not the default
        ``rope_base ** (-2j / rope_dim)`` (a scaled RoPE, or a latent whose pairs carry the source
        heads' frequencies), else None."""
        signature = self.rotary.signature if self.rotary is not None else ()
        return signature[2] if len(signature) == 3 else None

    def _common_config(self) -> dict:
        config = {"method": self.method, "d_model": self.d_model, "n_heads": self.n_heads, "causal": self.causal,
                  "dropout": self.dropout, "scale": self.scale, "rope": self.rope, "rope_base": self.rope_base}
        if self.rope_freqs is not None:                  # only when custom: older configs stay as they were
            config["rope_freqs"] = self.rope_freqs
        return config

    def reset_parameters(self) -> None:
        """Weights from :meth:`init_stds` (drawn in that order), biases zero, norm gains one."""
        with torch.no_grad():
            for name, std in self.init_stds().items():
                nn.init.normal_(self.get_parameter(name), std=std)
            for name, p in self.named_parameters():
                if name.endswith("bias"):
                    nn.init.zeros_(p)
        for module in self.modules():
            if isinstance(module, nn.RMSNorm):
                module.reset_parameters()

    def lr_scales(self) -> dict[str, float]:
        """{parameter name: learning-rate multiplier} of the *relative* rule: init std × sqrt(d_model).

        Under Adam every weight then moves by the same fraction of its initial scale per step
        as an MHA projection (std 1/sqrt(d_model), multiplier 1). For MHA/GQA/MQA all
        multipliers are 1; the small cores and head factors of Tucker (and MLA's up-projections)
        get larger ones. Biases and norm gains: 1. Derived from the configuration only.
        """
        unit = self.d_model ** 0.5
        stds = self.init_stds()
        return {name: round(stds[name] * unit, 12) if name in stds else 1.0 for name, _ in self.named_parameters()}

    def assign_parameters(self, values: dict[str, torch.Tensor], *, like: nn.Module) -> Attention:
        """Set parameters {name: value} at float64 precision, check they are finite, then return the
        layer in ``like``'s dtype and device (how converters build a layer from computed factors)."""
        ref = next(like.parameters())
        layer = self.to(torch.float64)                    # copy at full precision, cast once at the end
        with torch.no_grad():
            for name, value in values.items():
                layer.get_parameter(name).copy_(value)
        if not all(torch.isfinite(p).all() for p in layer.parameters()):
            raise ValueError("the conversion produced non-finite weights; check the source layer's weights")
        return layer.to(device=ref.device, dtype=ref.dtype)

    def make_cache(self, batch_size: int, max_seq_len: int, *, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> KVCache:
        """A preallocated cache for ``batch_size`` sequences of up to ``max_seq_len`` tokens."""
        ref = next(self.parameters())
        return KVCache(self.cache_spec(), batch_size, max_seq_len, dtype=dtype or ref.dtype,
                       device=device if device is not None else ref.device)

    def _reference_weight(self) -> torch.Tensor:
        """A parameter whose dtype and device are the layer's (subclasses name one: it is faster)."""
        return next(self.parameters())

    def _check_call(self, x, cache, attn_mask, positions, rope) -> tuple[int, torch.Tensor]:
        """Every argument of :meth:`forward`, checked before anything is computed or written.

        Returns (tokens already cached, the query positions (T,) or (B, T))."""
        check_input(x, self.d_model)
        ref = self._reference_weight()
        if x.device != ref.device:
            raise ValueError(f"x is on {x.device} but the layer's weights are on {ref.device}; "
                             f"move one of them (layer.to(device) or x.to(device))")
        if x.dtype != ref.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"x has dtype {x.dtype} but the layer's weights are {ref.dtype}; convert one of them "
                             f"(layer.to({x.dtype}) or x.to({ref.dtype})) or run under torch.autocast")
        batch, steps = x.shape[:2]
        past = first = 0
        if cache is not None:
            if not self.causal:
                raise ValueError("cache decoding needs a causal layer (construct it with causal=True)")
            if not (isinstance(cache, KVCache) or all(callable(getattr(cache, m, None)) for m in ("check", "append"))):
                raise TypeError(f"cache must be a KVCache from layer.make_cache() (or implement check/append/"
                                f"length), got {type(cache).__name__}")
            cache.check(self.cache_spec(), batch, steps)
            past = cache.length
            first_key = getattr(cache, "first_key", None)
            first = first_key(steps) if callable(first_key) else 0
        if rope is not None:
            if not isinstance(rope, RopeTables):
                raise TypeError(f"rope must be RopeTables or None, got {type(rope).__name__}")
            if rope.n_keys is not None and self.rope is not None and rope.n_keys != past + steps - first:
                raise ValueError(f"rope tables cover {rope.n_keys} key positions but this call attends to "
                                 f"{past - first} cached + {steps} new tokens")
            if positions is None and rope.positions is not None:
                positions = rope.positions
        if positions is None:
            positions = torch.arange(past, past + steps, device=x.device)
        elif (not isinstance(positions, torch.Tensor) or positions.dtype.is_floating_point or positions.is_complex()
              or positions.dtype == torch.bool):
            raise TypeError(f"positions must be an integer torch.Tensor of shape ({steps},) or ({batch}, {steps}), "
                            f"got {type(positions).__name__}"
                            + (f" of dtype {positions.dtype}" if isinstance(positions, torch.Tensor) else ""))
        elif tuple(positions.shape) not in ((steps,), (batch, steps)):
            raise ValueError(f"positions must have shape (seq,) = ({steps},), got {tuple(positions.shape)}; "
                             f"per-sequence positions have shape (batch, seq) = ({batch}, {steps})")
        elif positions.device != x.device:
            raise ValueError(f"positions are on {positions.device} but x is on {x.device}")
        if attn_mask is not None:
            check_mask(attn_mask, batch, self.n_heads, steps, past + steps)
        return past, positions

    def forward(self, x: torch.Tensor, *, cache: CacheProtocol | None = None, attn_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, rope: RopeTables | None = None,
                kernel: AttentionKernel | None = None) -> torch.Tensor:
        """x (B, T, d_model) -> (B, T, d_model).

        cache: a :class:`KVCache` from :meth:`make_cache` (or any :class:`CacheProtocol`); the
            chunk is appended and attends causally to every cached token. Requires ``causal=True``.
            On any error the cache is unchanged.
        attn_mask: bool (1|B, 1|H, 1|T, S), True = may attend; combined with causality.
        positions: (T,) or (B, T) integer RoPE positions; default ``cache.length + arange(T)``.
        rope: the model's :class:`RopeTables` for this forward (computed once, shared by all
            layers); its positions then set the rotations (``positions`` only what a cache
            records). Default: tables of ``positions`` made here.
        kernel: the attention computation, called as ``kernel(q, k, v, scale=, causal=,
            attn_mask=, dropout_p=)`` with q (B, H, T, D), k (B, Hkv, S, D), v (B, Hkv, S, Dv) and
            returning (B, H, T, Dv); default :func:`~.sdpa.attend`. An integration passes its own
            (e.g. a Hugging Face model's attention interface, which then owns the model's mask).
        """
        past, positions = self._check_call(x, cache, attn_mask, positions, rope)
        if self._frozen is not None:
            self._check_frozen()
        tables = rope
        if tables is None and self.rotary is not None:
            tables = RopeTables(positions)
        q, entries = self._project(x, tables.query(self.rotary, x.dtype) if self.rotary is not None else None)
        if cache is not None:
            entries, key_positions = cache.append(entries, positions)
            if rope is None and tables is not None:
                tables = RopeTables(positions, key_positions)
        k, v = self._keys_values(entries, tables)
        o = (kernel or attend)(q, k, v, scale=self.scale, causal=self.causal, attn_mask=attn_mask,
                               dropout_p=self.dropout if self.training else 0.0)
        return self._output(o)
