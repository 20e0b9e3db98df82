"""An independent float64 reference for every layer: dense per-head weights, explicit
rotation matrices, explicit softmax. Shares no code with the library's forward paths."""

from __future__ import annotations

import torch

from tucker_attention import GroupedQueryAttention, MultiHeadLatentAttention, TuckerAttention


def rotation(width: int, position: int, base: float = 10000.0, inv_freq=None) -> torch.Tensor:
    """The (width x width) RoPE rotation for one position (pairs j and j + width/2; pair j's inverse
    frequency ``inv_freq[j]``, default base ** (-2j / width))."""
    half = width // 2
    R = torch.zeros(width, width, dtype=torch.float64)
    for j in range(half):
        angle = position * (base ** (-2.0 * j / width) if inv_freq is None else float(inv_freq[j]))
        c, s = torch.cos(torch.tensor(angle, dtype=torch.float64)), torch.sin(torch.tensor(angle, dtype=torch.float64))
        R[j, j], R[j, j + half], R[j + half, j], R[j + half, j + half] = c, -s, s, c
    return R


def rotate(rows: torch.Tensor, positions, base: float = 10000.0, inv_freq=None) -> torch.Tensor:
    """rows (..., T, width): row t rotated by R(positions[t])."""
    out = torch.empty_like(rows)
    for t, pos in enumerate(positions):
        out[..., t, :] = rows[..., t, :] @ rotation(rows.shape[-1], int(pos), base, inv_freq).T
    return out


def _softmax_attention(logits, values, causal, mask=None):
    """logits (B, H, T, S), values (B, H, S, Dv): explicit masked softmax, queries aligned lower-right."""
    T, S = logits.shape[-2:]
    allowed = torch.ones(T, S, dtype=torch.bool)
    if causal:
        allowed = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]
    allowed = allowed if mask is None else allowed & mask
    logits = logits.masked_fill(~allowed, float("-inf"))
    weights = torch.exp(logits - logits.amax(-1, keepdim=True))
    return (weights / weights.sum(-1, keepdim=True)) @ values


def _heads(t, H):
    B, T, _ = t.shape
    return t.reshape(B, T, H, -1).transpose(1, 2)


def reference_forward(layer, x: torch.Tensor, positions=None, mask=None) -> torch.Tensor:
    """Output of ``layer`` on x (B, T, d) computed from first principles in float64."""
    x = x.double()
    B, T, d = x.shape
    H = layer.n_heads
    positions = list(range(T)) if positions is None else [int(p) for p in positions]
    p = {k: v.detach().double() for k, v in layer.named_parameters()}
    if isinstance(layer, TuckerAttention):
        U3t = p["U3"] if layer.shared_kv else p["U3_tilde"]
        # Dense tensors of PAPER.md §1: W[i] (d x d) and W_tilde[i] (d_out x d_in).
        W = torch.einsum("ic,cab,pa,qb->ipq", p["U1"], p["core"], p["U2"], p["U3"])
        Wt = torch.einsum("ic,cab,pa,qb->ipq", p["U1_tilde"], p["core_tilde"], p["U2_tilde"], U3t)
        if layer.rope is None:
            logits = torch.einsum("btp,ipq,bsq->bits", x, W, x)
            if "q_bias" in p:
                logits = logits + torch.einsum("ir,bsr->bis", p["q_bias"], x @ p["U3"])[:, :, None, :]
        else:
            G = torch.einsum("ic,cab->iab", p["U1"], p["core"])
            q = torch.einsum("bta,iac->bitc", x @ p["U2"], G)
            if "q_bias" in p:
                q = q + p["q_bias"][:, None, :]
            k = (x @ p["U3"] + p.get("k_bias", 0.0))[:, None]
            freqs = (layer.rope_base, layer.rope_freqs)
            logits = rotate(q, positions, *freqs) @ rotate(k, positions, *freqs).transpose(-1, -2)
        values = torch.einsum("bsq,ipq->bisp", x, Wt)            # (B, H, S, d): W_tilde[i] x_s
        out = _softmax_attention(layer.scale * logits, values, layer.causal, mask).sum(1)
        return out + p["out_bias"] if "out_bias" in p else out
    if isinstance(layer, GroupedQueryAttention):
        lin = lambda name, inp: inp @ p[f"{name}.weight"].T + p.get(f"{name}.bias", 0.0)  # noqa: E731
        group = H // layer.n_kv_heads
        q = _heads(lin("q_proj", x), H)
        k = _heads(lin("k_proj", x), layer.n_kv_heads).repeat_interleave(group, 1)
        v = _heads(lin("v_proj", x), layer.n_kv_heads).repeat_interleave(group, 1)
        if layer.rope is not None:                               # the first rope_dim dims of each head
            width = layer.config()["rope_dim"] or q.shape[-1]
            turn = lambda t: torch.cat([rotate(t[..., :width], positions, layer.rope_base, layer.rope_freqs),  # noqa: E731
                                        t[..., width:]], dim=-1)
            q, k = turn(q), turn(k)
        o = _softmax_attention(layer.scale * q @ k.transpose(-1, -2), v, layer.causal, mask)
        return lin("o_proj", o.transpose(1, 2).reshape(B, T, -1))
    if isinstance(layer, MultiHeadLatentAttention):
        lin = lambda name, inp: inp @ p[f"{name}.weight"].T + p.get(f"{name}.bias", 0.0)  # noqa: E731

        def rms(t, name):
            return t / t.pow(2).mean(-1, keepdim=True).add(layer.norm_eps).sqrt() * p[f"{name}.weight"]

        c_q = x if layer.q_rank is None else lin("q_down", x)
        if layer.q_norm is not None:
            c_q = rms(c_q, "q_norm")
        c = lin("kv_down", x)
        c_k, c_v = (c, c) if layer.shared_kv else (c[..., :layer.kv_rank], c[..., layer.kv_rank:])
        if layer.kv_norm is not None:
            c_k, c_v = rms(c_k, "kv_norm"), rms(c_v, "kv_norm")
        q = _heads(lin("q_up", c_q), H)                            # (B, H, T, head_dim)
        k = _heads(lin("k_up", c_k), H)
        v = _heads(lin("v_up", c_v), H)
        if layer.rope == "latent":                                 # coupled RoPE on the latent
            w_uk = p["k_up.weight"].view(H, layer.head_dim, layer.kv_rank)
            q_lat = torch.einsum("bhtd,hdc->bhtc", q, w_uk)
            freqs = (layer.rope_base, layer.rope_freqs)
            logits = rotate(q_lat, positions, *freqs) @ rotate(c_k[:, None], positions, *freqs).transpose(-1, -2)
        else:
            logits = q @ k.transpose(-1, -2)
            if layer.rope == "decoupled":
                freqs = (layer.rope_base, layer.rope_freqs)
                q_r = rotate(_heads(lin("q_rope", c_q), H), positions, *freqs)
                k_r = rotate(lin("k_rope", x)[:, None], positions, *freqs)
                logits = logits + q_r @ k_r.transpose(-1, -2)
        o = _softmax_attention(layer.scale * logits, v, layer.causal, mask)
        return lin("o_proj", o.transpose(1, 2).reshape(B, T, -1))
    raise TypeError(type(layer))
