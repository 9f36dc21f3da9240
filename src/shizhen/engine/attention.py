"""Attention over the slot cache, called by the engine's text layers (fused_layers.py).

transformers' SDPA path copies K/V per query head (`repeat_kv`) whenever a mask is given — for a 40-head, 8-KV-head
model that is 5x the cache read every decode step. Here grouped queries attend to their shared K/V head directly.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def slot_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                   scaling: float) -> torch.Tensor:
    """query [B, H, q, d]; key/value [B, kv, L, d] → [B, q, H, d].

    Prefill (mask None): causal attention of the prompts over themselves. Decode (one query token per row, mask
    bool [B, 1, 1, L]): each row attends to its own slot's first positions."""
    if attention_mask is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1, scale=scaling,
                                             enable_gqa=True)
        return out.transpose(1, 2).contiguous()
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    # a K/V head's query group stands in for the query positions: one fused kernel, no K/V copy per query head
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, 1, heads, dim)
