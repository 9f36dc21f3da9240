"""The text model's layers as explicit code over the paged KV cache: prefill of whole prompts, one-token decode.

transformers' layers launch ~20 kernels per layer; these launch ~8 (kernels.py): RMSNorm fused with the residual add
before it, q/k/v as one projection and gate/up as another (their weights are stacked here, once), rotary embedding
fused with the KV-cache write, attention, the output projection, SiLU*up, down. Prefill and decode share every
layer's code but attention. The arithmetic, and where it rounds, is that of transformers' Qwen2.5-VL text model;
the vision tower and the rotary tables stay transformers' own.

Stacking the projections frees the originals, so the model's own text layers cannot run afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import kernels
from .kv_cache import KVCache

# not cuDNN's attention: it builds a plan for every new shape, ~0.1 s each on an H200, and the shapes of prompts
# and photos rarely repeat
PREFILL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
Attend = Callable[[int, torch.Tensor], torch.Tensor]  # (layer index, fused q/k/v rows) → attention output rows


@dataclass(frozen=True)
class _Layer:
    input_norm: nn.Module
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor
    post_attention_norm: nn.Module
    gate_up_weight: torch.Tensor
    down_weight: torch.Tensor


class TextStack:
    def __init__(self, model: nn.Module):
        """`model`: a Qwen2_5_VLForConditionalGeneration."""
        self._model = model.model
        self._text = model.model.language_model
        self._lm_head = model.lm_head
        config = self._text.config
        self._heads, self._kv_heads = config.num_attention_heads, config.num_key_value_heads
        self._image_token_id = model.config.image_token_id
        self._layers = [_stack_projections(layer) for layer in self._text.layers]
        self._scale = self._text.layers[0].self_attn.scaling

    @torch.inference_mode()
    def prefill(self, kv: KVCache, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                last: torch.Tensor, vision: dict[str, torch.Tensor]) -> torch.Tensor:
        """Prompts [batch, length] (right-padded) into their `slots` of `kv` (block tables set), with rotary
        positions [3, batch, length] and the images in `vision` (pixel_values, image_grid_thw) for their
        placeholder tokens. Returns the logits at each prompt's `last` position. Padding writes K/V past its
        prompt's end (or into the scratch block), which decode overwrites before anything reads it; causal
        attention keeps it from every real token."""
        batch, length = input_ids.shape
        embeds = self._text.embed_tokens(input_ids)
        if vision:
            with sdpa_kernel(PREFILL_ATTENTION):
                images = torch.cat(self._model.get_image_features(**vision).pooler_output).to(embeds.dtype)
            placeholders = (input_ids == self._image_token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(placeholders, images)
        cos, sin = (table.reshape(batch * length, -1) for table in self._text.rotary_emb(embeds, positions))
        token_slots = slots.repeat_interleave(length)
        token_positions = torch.arange(length, device=input_ids.device).repeat(batch)

        def attend(index: int, qkv: torch.Tensor) -> torch.Tensor:
            query = kernels.rotary_to_cache(qkv, cos, sin, kv.keys[index], kv.values[index], kv.block_tables,
                                            token_slots, token_positions, self._heads, self._kv_heads)
            query = query.view(batch, length, self._heads, -1).transpose(1, 2)
            keys, values = kv.gather(index, slots, length)
            with sdpa_kernel(PREFILL_ATTENTION):
                out = F.scaled_dot_product_attention(query, keys, values, is_causal=length > 1, scale=self._scale,
                                                     enable_gqa=True)
            return out.transpose(1, 2).reshape(batch * length, -1)

        hidden = self._run_layers(embeds.view(batch * length, -1), attend).view(batch, length, -1)
        return kernels.linear(hidden[torch.arange(batch, device=last.device), last], self._lm_head.weight)

    @torch.inference_mode()
    def decode(self, kv: KVCache, tokens: torch.Tensor, positions: torch.Tensor, cache_lens: torch.Tensor,
               length: int) -> torch.Tensor:
        """tokens, positions, cache_lens: [batch], row i being slot i; the fed token goes to position cache_lens[i]
        of its sequence, and no row attends beyond `length` positions. Returns logits [batch, vocab]."""
        batch = tokens.shape[0]
        residual = self._text.embed_tokens(tokens)
        # a text token's three rotary position axes are equal
        cos, sin = (table.reshape(batch, -1) for table in
                    self._text.rotary_emb(residual, positions.view(1, batch, 1).expand(3, batch, 1)))
        slots = torch.arange(batch, device=tokens.device)

        def attend(index: int, qkv: torch.Tensor) -> torch.Tensor:
            keys, values, tables = kv.keys[index], kv.values[index], kv.block_tables
            query = kernels.rotary_to_cache(qkv, cos, sin, keys, values, tables, slots, cache_lens, self._heads,
                                            self._kv_heads)
            return kernels.decode_attention(query, keys, values, tables, cache_lens, self._scale, length)

        return kernels.linear(self._run_layers(residual, attend), self._lm_head.weight)

    def _run_layers(self, residual: torch.Tensor, attend: Attend) -> torch.Tensor:
        """residual: [tokens, hidden], updated in place; returns the final-normed hidden states."""
        layers = self._layers
        hidden = _norm(None, residual, layers[0].input_norm)
        for index, layer in enumerate(layers):
            attended = attend(index, kernels.linear(hidden, layer.qkv_weight, layer.qkv_bias))
            hidden = _norm(kernels.linear(attended, layer.o_weight), residual, layer.post_attention_norm)
            down = kernels.linear(kernels.silu_mul(kernels.linear(hidden, layer.gate_up_weight)), layer.down_weight)
            following = layers[index + 1].input_norm if index + 1 < len(layers) else self._text.norm
            hidden = _norm(down, residual, following)
        return hidden


def _norm(delta: torch.Tensor | None, residual: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    return kernels.add_rms_norm(delta, residual, norm.weight, norm.variance_epsilon)


def _stack_projections(layer: nn.Module) -> _Layer:
    """One decoder layer's weights, q/k/v and gate/up stacked; the unstacked originals are freed."""
    attention, mlp = layer.self_attn, layer.mlp
    with torch.no_grad():
        qkv_weight = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
        qkv_bias = (torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias])
                    if attention.q_proj.bias is not None else None)
        gate_up_weight = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
    del attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj
    return _Layer(layer.input_layernorm, qkv_weight, qkv_bias, attention.o_proj.weight, layer.post_attention_layernorm,
                  gate_up_weight, mlp.down_proj.weight)
