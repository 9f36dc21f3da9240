"""Fewer, larger kernels for the text layers: the weights stay transformers', regrouped.

The q/k/v projections become one GEMM and gate/up another (decode_model.py relies on both), rotary embeddings turn
q and k in one pass, and RMSNorm is one kernel (torch.rms_norm) instead of six. Prefill runs transformers' model
with these layers; the arithmetic is the same as transformers' own layers.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.nn import functional as F


def fuse_text_layers(text_model: nn.Module) -> None:
    """Rewire every decoder layer of a Qwen2.5-VL text model in place (the old projection weights are freed).
    A model already rewired is left as it is."""
    if hasattr(text_model.layers[0].self_attn, "qkv_proj"):
        return
    for norm in text_model.modules():
        if type(norm).__name__.endswith("RMSNorm") and hasattr(norm, "variance_epsilon"):
            norm.forward = partial(_rms_norm, norm)
    for layer in text_model.layers:
        _fuse_attention(layer.self_attn)
        _fuse_mlp(layer.mlp)


def _stacked_linear(parts: list[nn.Linear]) -> nn.Linear:
    first = parts[0]
    fused = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused


def _fuse_attention(attention: nn.Module) -> None:
    attention.qkv_proj = _stacked_linear([attention.q_proj, attention.k_proj, attention.v_proj])
    del attention.q_proj, attention.k_proj, attention.v_proj
    attention.forward = partial(_attention_forward, attention)


def _fuse_mlp(mlp: nn.Module) -> None:
    mlp.gate_up_proj = _stacked_linear([mlp.gate_proj, mlp.up_proj])
    del mlp.gate_proj, mlp.up_proj
    mlp.forward = partial(_mlp_forward, mlp)


def _attention_forward(attention, hidden_states, position_embeddings, attention_mask=None, past_key_values=None,
                       **kwargs):
    batch, length, _ = hidden_states.shape
    config = attention.config
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, attention.head_dim
    qkv = attention.qkv_proj(hidden_states)
    qk = qkv[..., : (heads + kv_heads) * dim].view(batch, length, heads + kv_heads, dim).transpose(1, 2)
    value = qkv[..., (heads + kv_heads) * dim :].view(batch, length, kv_heads, dim).transpose(1, 2)
    cos, sin = (part.unsqueeze(1) for part in position_embeddings)
    half = dim // 2
    qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), dim=-1) * sin  # q and k rotated together
    query, key = qk.split([heads, kv_heads], dim=1)
    if past_key_values is not None:
        key, value = past_key_values.update(key, value, attention.layer_idx)
    # grouped queries attend to their shared K/V head directly (transformers' SDPA path copies K/V per query head)
    out = F.scaled_dot_product_attention(query, key, value, is_causal=length > 1, scale=attention.scaling,
                                         enable_gqa=True)
    return attention.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), None


def _mlp_forward(mlp, hidden_states):
    gate, up = mlp.gate_up_proj(hidden_states).chunk(2, dim=-1)
    return mlp.down_proj(mlp.act_fn(gate) * up)


def _rms_norm(norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return torch.rms_norm(hidden, (hidden.shape[-1],), norm.weight, norm.variance_epsilon)
