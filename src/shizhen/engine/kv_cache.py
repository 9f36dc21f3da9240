"""The paged KV cache: for every layer, K and V in blocks of BLOCK_SIZE positions, [blocks, kv_heads, BLOCK_SIZE, dim].

A sequence holds the blocks its tokens fill so far (one more every BLOCK_SIZE tokens), listed in its row of
`block_tables` (row = the sequence's slot, which is also its row in a decode batch). Memory goes to the tokens
sequences really have, not to a full context per sequence, so an 80 GB card serves many short consultations instead
of a few full-length ones. Block 0 is never handed out: rows of free slots and positions past a sequence's blocks
point at it, so whatever a padded row writes lands there. The tables are one static device tensor, which CUDA graphs
read in place.
"""

from __future__ import annotations

import torch

from .allocation import BLOCK_SIZE, blocks_for
from .kernels import gather_positions


class KVCache:
    def __init__(self, num_layers: int, blocks: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (blocks, kv_heads, BLOCK_SIZE, head_dim)
        # zeros, not empty: masked-out positions still meet V in a matmul, and 0 * NaN would poison the row
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_tables = torch.zeros(slots, blocks_for(max_len), dtype=torch.long, device=device)
        self.slots = slots
        self.max_len = max_len

    @staticmethod
    def bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def gather(self, layer: int, table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of positions [0, length) of the sequence whose block table is `table`, as [kv_heads, length,
        dim] copies (what prefill attention reads)."""
        return (gather_positions(self.keys[layer], table[None], length)[0],
                gather_positions(self.values[layer], table[None], length)[0])

    def clear_table(self, slot: int) -> None:
        """Point a freed slot at block 0 again (queued on the device after every step that still uses its blocks)."""
        self.block_tables[slot].fill_(0)
