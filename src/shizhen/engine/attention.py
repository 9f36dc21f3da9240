"""The attention function the text layers use over the slot cache, registered with transformers by name.

transformers' SDPA path copies K/V per query head (`repeat_kv`) whenever a mask is given — for a 40-head, 8-KV-head
model that is 5x the cache read every decode step. Here grouped queries attend to their shared K/V head directly.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers import AttentionInterface

SLOT_ATTENTION = "shizhen_slots"


def slot_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [B, H, q, d]; key/value [B, kv, L, d]; mask None (prefill: causal) or bool [B, 1, 1, L] (decode)."""
    if attention_mask is None:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=query.shape[2] > 1, scale=scaling,
                                             enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads * q_len, dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float() * scaling
    scores = scores.masked_fill(~attention_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value).reshape(batch, heads, q_len, dim)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SLOT_ATTENTION, slot_attention)
