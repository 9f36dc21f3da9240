"""The text model's layers as explicit code over the paged KV cache: prefill of prompt chunks, one-token decode.

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
from torch.nn.attention.bias import causal_lower_right

from . import kernels
from .kv_cache import KVCache

# not cuDNN's attention: it builds a plan for every new shape, ~0.1 s each on an H200, and the shapes of prompts
# and photos rarely repeat
PREFILL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
Attend = Callable[[int, torch.Tensor], torch.Tensor]  # (layer index, fused q/k/v rows) → attention output rows


@dataclass(frozen=True)
class PackedChunks:
    """One prefill step's prompt chunks, their tokens end to end (no padding), on the device."""

    input_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [3, tokens]: Qwen2.5-VL's rotary positions (time, height, width)
    tables: torch.Tensor  # [rows, blocks]: each chunk's block table
    token_rows: torch.Tensor  # [tokens]: the row of `tables` each token's K/V goes to
    token_positions: torch.Tensor  # [tokens]: its position in its sequence
    spans: list[tuple[int, int, int]]  # per row, on the host: (offset in the tokens, first position, end position)
    last: torch.Tensor  # the token indices whose logits are returned
    images: torch.Tensor | None  # [image tokens, hidden]: the vision tower's output for the image placeholders


@dataclass(frozen=True)
class DecodeRows:
    """A decode step riding along with a prefill: one token per sequence, on the device."""

    tokens: torch.Tensor  # [rows]: each sequence's last sampled token
    positions: torch.Tensor  # [rows]: its rotary position
    cache_lens: torch.Tensor  # [rows]: where its K/V goes (tokens already in the cache)
    tables: torch.Tensor  # [rows, blocks]: the sequences' block tables
    length: int  # no row attends beyond this many positions


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
    def prefill(self, kv: KVCache, chunks: PackedChunks, decode: DecodeRows | None = None) -> torch.Tensor:
        """Prompt chunks, packed, into their rows' blocks of `kv`; each chunk attends causally to itself and to all
        of its prompt before it (in the cache already). With `decode`, one decode step of those rows rides along
        in the same pass (their tokens first). Returns the logits of the decode rows, then of the chunks' `last`
        positions."""
        ahead = decode.tokens.shape[0] if decode is not None else 0
        input_ids = torch.cat([decode.tokens, chunks.input_ids]) if decode is not None else chunks.input_ids
        embeds = self._text.embed_tokens(input_ids)
        if chunks.images is not None:
            placeholders = chunks.input_ids == self._image_token_id  # not a decode row's: it may sample that id
            if decode is not None:
                placeholders = torch.cat([torch.zeros_like(decode.tokens, dtype=torch.bool), placeholders])
            embeds = embeds.masked_scatter(placeholders.unsqueeze(-1).expand_as(embeds),
                                           chunks.images.to(embeds.dtype))
        positions, tables = chunks.positions, chunks.tables
        token_rows, token_positions = chunks.token_rows, chunks.token_positions
        if decode is not None:  # a text token's three rotary position axes are equal
            positions = torch.cat([decode.positions.expand(3, ahead), positions], dim=1)
            tables = torch.cat([decode.tables, tables])
            token_rows = torch.cat([torch.arange(ahead, device=token_rows.device), token_rows + ahead])
            token_positions = torch.cat([decode.cache_lens, token_positions])
        cos, sin = (table[0] for table in self._text.rotary_emb(embeds[None], positions[:, None]))

        def attend(index: int, qkv: torch.Tensor) -> torch.Tensor:
            keys, values = kv.keys[index], kv.values[index]
            query = kernels.rotary_to_cache(qkv, cos, sin, keys, values, tables, token_rows, token_positions,
                                            self._heads, self._kv_heads)
            outputs = []
            if decode is not None:
                outputs.append(kernels.decode_attention(query[:ahead], keys, values, decode.tables,
                                                        decode.cache_lens, self._scale, decode.length))
            with sdpa_kernel(PREFILL_ATTENTION):
                for row, (offset, start, end) in enumerate(chunks.spans):
                    length, offset = end - start, offset + ahead
                    row_query = query[offset : offset + length].transpose(0, 1)[None]
                    row_keys, row_values = kv.gather(index, chunks.tables[row], end)
                    # causal from the chunk's first position on: every cached position before it is visible
                    mask = causal_lower_right(length, end) if start and length > 1 else None
                    attended = F.scaled_dot_product_attention(row_query, row_keys[None], row_values[None],
                                                              attn_mask=mask, is_causal=not start and length > 1,
                                                              scale=self._scale, enable_gqa=True)
                    outputs.append(attended[0].transpose(0, 1).reshape(length, -1))
            return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

        hidden = self._run_layers(embeds, attend)
        rows = chunks.last + ahead
        if decode is not None:
            rows = torch.cat([torch.arange(ahead, device=rows.device), rows])
        return kernels.linear(hidden[rows], self._lm_head.weight)

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
