"""The text model's one-token decode step over the slot cache, written out layer by layer on the model's own weights.

transformers' layers cost ~20 kernel launches per layer at decode; this loop costs 7 (kernels.py): RMSNorm fused
with the residual add before it, q/k/v as one projection, rotary embedding fused with the KV-cache write, attention
that reads each row's real length, the output projection, gate/up as one projection, SiLU*up, down. It needs the
fused projections fused_layers.py makes, and it computes what transformers' Qwen2.5-VL text model computes for
text tokens (whose three rotary position axes are equal).
"""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .kv_slots import KVSlots


class DecodeModel:
    def __init__(self, text_model: nn.Module, lm_head: nn.Linear, kv: KVSlots):
        config = text_model.config
        self._text = text_model
        self._lm_head = lm_head
        self._kv = kv
        self._heads, self._kv_heads = config.num_attention_heads, config.num_key_value_heads
        self._layers = list(text_model.layers)

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor,
                 length: int) -> torch.Tensor:
        """tokens, positions, cache_lens: [batch], row i being slot i; the fed token goes to position cache_lens[i]
        of its slot, and attention reads positions below `length`. Returns logits [batch, vocab]."""
        batch = tokens.shape[0]
        residual = self._text.embed_tokens(tokens)
        cos, sin = self._text.rotary_emb(residual, positions.view(1, batch, 1).expand(3, batch, 1))
        cos, sin = cos.view(batch, -1).contiguous(), sin.view(batch, -1).contiguous()
        hidden = _norm(None, residual, self._layers[0].input_layernorm)
        for index, layer in enumerate(self._layers):
            attention = layer.self_attn
            qkv = kernels.linear(hidden, attention.qkv_proj.weight, attention.qkv_proj.bias)
            keys, values = self._kv.keys[index], self._kv.values[index]
            query = kernels.rotary_to_cache(qkv, cos, sin, keys, values, cache_lens, self._heads, self._kv_heads)
            attended = kernels.decode_attention(query, keys[:batch, :, :length], values[:batch, :, :length],
                                                cache_lens, attention.scaling)
            hidden = _norm(kernels.linear(attended, attention.o_proj.weight), residual, layer.post_attention_layernorm)
            gate_up = kernels.linear(hidden, layer.mlp.gate_up_proj.weight)
            down = kernels.linear(kernels.silu_mul(gate_up), layer.mlp.down_proj.weight)
            following = self._layers[index + 1].input_layernorm if index + 1 < len(self._layers) else self._text.norm
            hidden = _norm(down, residual, following)
        return kernels.linear(hidden, self._lm_head.weight)


def _norm(delta: torch.Tensor | None, residual: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    return kernels.add_rms_norm(delta, residual, norm.weight, norm.variance_epsilon)
