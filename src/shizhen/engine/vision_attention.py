"""The vision tower's attention as one SDPA call per layer.

Without flash-attn installed, transformers runs Qwen2.5-VL's vision attention one window at a time: a phone photo at
the largest size we take has ~47 windows of 64 patches, so its 28 window layers make ~1,300 tiny SDPA calls (and a
host sync per layer) — the host, not the GPU, sets the pace of image prefill. Here each window (or, in the four
full-attention layers, each image) becomes one row of a padded batch, the padding is masked out of the keys, and one
call covers them all, without a host sync.

transformers hands the packed segment boundaries (`cu_seq_lens_q`) only to implementations whose name contains
"flash", hence the name this registers under.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "shizhen_packed_flash"
ALIGN = 16  # memory-efficient attention wants the mask's last dimension a multiple of this


def packed_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                     scaling: float, cu_seq_lens_q: torch.Tensor, max_length_q: int, **_) -> tuple[torch.Tensor, None]:
    """query/key/value [1, heads, tokens, head_dim]; token t attends to the tokens of its own segment
    (`cu_seq_lens_q` are the boundaries). Returns [1, tokens, heads, head_dim], as transformers' flash path does."""
    device = query.device
    starts = cu_seq_lens_q[:-1].long()
    lengths = cu_seq_lens_q[1:].long() - starts
    width = -(-max_length_q // ALIGN) * ALIGN
    offsets = torch.arange(width, device=device)
    real = offsets < lengths[:, None]  # [segments, width]
    gather = torch.where(real, starts[:, None] + offsets, starts[:, None])  # padding repeats a real token

    def padded(states: torch.Tensor) -> torch.Tensor:
        return states[0][:, gather].transpose(0, 1)  # [segments, heads, width, head_dim]

    out = F.scaled_dot_product_attention(padded(query), padded(key), padded(value), attn_mask=real[:, None, None, :],
                                         scale=scaling)
    tokens = torch.arange(query.shape[2], device=device)
    segment = torch.searchsorted(cu_seq_lens_q[1:].long(), tokens, right=True)
    return out[segment, :, tokens - starts[segment]].unsqueeze(0), None


def use_packed_vision_attention(model) -> None:
    """Switch a loaded Qwen2.5-VL model's vision tower to `packed_attention`."""
    AttentionInterface.register(NAME, packed_attention)
    model.model.visual.config._attn_implementation = NAME
